"""Small helpers: image grids and PNG writing (Pillow, no torchvision), atomic directory replacement with the
permissions of ordinary files, and returning freed heap memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into one PIL image with `nrow` images per row."""
    pixels = to_uint8(images)
    b, h, w, c = pixels.shape
    rows = (b + nrow - 1) // nrow
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[top : top + h, left : left + w] = pixels[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, padding: int = 2) -> Path:
    """Write an image grid as PNG, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image_grid(images, nrow, padding).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write one (C, H, W) image in [-1, 1] as PNG."""
    return save_image_grid(image[None], path, nrow=1, padding=0)


def current_umask() -> int:
    """The process's file-creation mask (``0o022`` on most systems)."""
    try:  # Linux >= 4.7 reports it without changing it, so no other thread sees a temporary mask
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> Path:
    """Give `path`, and for a directory everything under it, the permissions that the umask gives a newly
    created file or directory: ``0o666 & ~umask`` for files (``0o777 & ~umask`` for files that were
    executable), ``0o777 & ~umask`` for directories.

    Some writers create private files: safetensors' ``save_file`` (and so ``transformers``' and ``diffusers``'
    ``save_pretrained``) writes mode 0600 whatever the umask, which leaves an exported model unreadable to
    the other users of a shared machine while its ``config.json`` beside it is readable.
    """
    path = Path(path)
    mask = current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        executable = item.is_dir() or item.stat().st_mode & 0o111
        item.chmod((0o777 if executable else 0o666) & ~mask)
    return path


def replace_dir(staged: Path, path: Path) -> Path:
    """Move the complete directory `staged` to `path`; an existing `path` is moved aside first and deleted only
    once the new one is in place, so a failure never leaves `path` damaged or missing. Everything moved in
    gets the permissions of an ordinary new file or directory (:func:`follow_umask`)."""
    follow_umask(staged)
    if path.exists():
        old = path.rename(path.with_name(f".{path.name}.old{os.getpid()}"))
        staged.rename(path)
        shutil.rmtree(old)
    else:
        staged.rename(path)
    return path


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_heap_memory() -> None:
    """Hand the heap memory that has been freed back to the operating system (glibc; a no-op elsewhere).

    Under multi-threaded CPU kernels glibc keeps freed blocks in its per-thread arenas; over a long stream
    of batches the resident set then climbs although no tensor is held (``benchmarks/memory.py`` measures
    it with and without this call, ``--no-release``). A call costs a few milliseconds, small beside a batch.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


T = TypeVar("T")


def releasing_heap(batches: Iterable[T]) -> Iterator[T]:
    """Yield from `batches`, calling :func:`release_heap_memory` each time the consumer is done with one."""
    for batch in batches:
        yield batch
        release_heap_memory()
