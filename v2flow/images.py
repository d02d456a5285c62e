"""Images from files: reading with Pillow into (C, H, W) float32 in [-1, 1], padding, folder listing, and
streaming files as batches at a model's size.

No Lightning here: the data modules (:mod:`v2flow.data`), the latent cache, the evaluation and the command line
all read image files through this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .utils import releasing_heap

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image(path: str | Path, channels: int = 3, size: int | None = None, convert: bool = True) -> torch.Tensor:
    """Read an image file as (C, H, W) float32 in [-1, 1].

    The format is read from the content, not the extension (a PNG named .jpg loads). Palette, 1-bit, CMYK and
    alpha images are converted with Pillow's ``convert`` (alpha is dropped, not composited); 16-bit images
    (and 32-bit integer ones whose values fit in 16 bits, as older Pillow opens 16-bit PNGs) map [0, 65535]
    to [-1, 1]. 32-bit float images and integer ones beyond 16 bits have no standard range and are refused.

    Args:
        path: the file.
        channels: 1 (grayscale) or 3 (RGB).
        size: if given (>= 1), resize the shorter side to `size` (bicubic) and centre-crop to size x size;
            if None the image is returned at its own size.
        convert: convert a colour image to grey when `channels` is 1 (Pillow's ITU-R 601 luma). With
            ``convert=False`` a colour image for 1 channel is refused instead; grey images always load (as 3
            equal channels when `channels` is 3), and so do colour files whose channels are all equal.

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: bad `channels` or `size`; a corrupt, truncated, non-image or unsupported file; an image
            over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive int (or None for the image's own size), got {size!r}")
    refused = None  # why a readable image has no defined mapping to [-1, 1]
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "F":
                refused = "it holds 32-bit floats (mode F), which have no standard value range"
            elif img.mode.startswith("I"):  # I;16* hold 16-bit values, I 32-bit integers
                array = np.asarray(img, dtype=np.float64)
                lo, hi = float(array.min()), float(array.max())
                if lo < 0 or hi > 65535:
                    refused = f"its {img.mode} values span [{lo:.0f}, {hi:.0f}], beyond the 16-bit range [0, 65535]"
                else:
                    img = Image.fromarray(np.rint(array * (255.0 / 65535.0)).astype(np.uint8))
            if refused is None and channels == 1 and not convert and _is_colour(img):
                refused = "colour"
            if refused is None:
                img = img.convert("L" if channels == 1 else "RGB")
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"image {path} is too large to read: {err} Pillow refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS "
            f"(now {Image.MAX_IMAGE_PIXELS}) pixels; if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS first"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read image {path}: {err}; the file is corrupt or not an image") from err
    if refused == "colour":
        raise ValueError(
            f"{path} is a colour image but a 1-channel (grey) image is wanted; convert it to grey explicitly "
            "(command line: --convert; Python: load_image(..., convert=True))"
        )
    if refused is not None:
        raise ValueError(f"cannot map image {path} to [-1, 1]: {refused}; save it as an 8- or 16-bit integer image")
    if size is not None:
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)


def _is_colour(img: Image.Image) -> bool:
    """Whether an image holds colour: channels that differ somewhere (a grey image stored as RGB is grey)."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        return False
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def pad_to_size(image: torch.Tensor, size: int, value: float = -1.0) -> torch.Tensor:
    """Pad a (C, H, W) image centred to size x size with `value` (-1: black background), as MNIST's 28x28
    digits are padded to 32x32 for training. Refuses images larger than `size`."""
    h, w = image.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad a {w}x{h} image to {size}x{size}: it is larger; resize it instead")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(image, (left, size - w - left, top, size - h - top), value=value)


def list_images(root: str | Path) -> list[Path]:
    """Image files under `root`, recursively, sorted; raises if the folder is missing or holds none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


class ImageFileDataset(Dataset):
    """Image files resized (shorter side) and centre-cropped to `image_size`, with optional horizontal flips."""

    def __init__(self, files: list[Path], image_size: int, channels: int = 3, hflip: bool = False) -> None:
        self.files, self.image_size, self.channels, self.hflip = files, image_size, channels, hflip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.files[i], self.channels, self.image_size)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, -1


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The image files named by `inputs`: files as given, folders searched recursively (:func:`list_images`)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(list_images(path))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{path} does not look like an image file ({', '.join(IMAGE_SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


class _SizedFiles(Dataset):
    """Image files as (C, size, size) tensors, with the one change to each that the caller allowed."""

    def __init__(self, files: list[Path], size: int, channels: int, resize: bool, pad: bool, convert: bool) -> None:
        self.files, self.size, self.channels = files, size, channels
        self.resize, self.pad, self.convert = resize, pad, convert

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        size = self.size
        image = load_image(self.files[i], self.channels, size if self.resize else None, convert=self.convert)
        h, w = image.shape[-2:]
        if self.pad and (h, w) != (size, size):
            image = pad_to_size(image, size)
        if image.shape[-2:] != (size, size):
            smaller = h <= size and w <= size
            raise ValueError(
                f"{self.files[i]} is {w}x{h} but the tokenizer expects {size}x{size}; pass "
                + (
                    "--pad to pad it with black background (as 28x28 MNIST digits were padded for training; "
                    "this matches the shipped MNIST tokenizers) or --resize to scale it up and centre-crop"
                    if smaller
                    else "--resize to resize (shorter side) and centre-crop"
                )
            )
        return image


def image_batches(
    files: list[Path],
    image_size: int,
    channels: int,
    batch_size: int,
    resize: bool = False,
    pad: bool = False,
    convert: bool = False,
    desc: str = "reading",
) -> Iterator[torch.Tensor]:
    """Stream image files as (B, C, H, W) batches in [-1, 1] (bounded memory), with a progress bar.

    An image not of `image_size` is refused unless the caller allows one change; the keywords and the options
    that error messages name are those of the ``v2flow`` command line.

    Args:
        files: the image files, in order.
        image_size: the side every image must have (H = W).
        channels: 1 or 3.
        batch_size: images per batch, >= 1.
        resize: resize the shorter side (bicubic) and centre-crop to `image_size`.
        pad: pad smaller images centred with black background (-1), as MNIST digits are padded.
        convert: convert colour images to grey for 1 channel (else refused).
        desc: the progress bar's label.
    """
    if resize and pad:
        raise ValueError("--resize and --pad are two ways to reach the tokenizer's size; choose one")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    loader = DataLoader(_SizedFiles(files, image_size, channels, resize, pad, convert), batch_size=batch_size)
    return releasing_heap(tqdm(loader, desc=desc, unit="batch", disable=None))
