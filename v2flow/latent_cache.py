"""Latent caching: encode an image folder once through a frozen diffusers autoencoder, train from the cache.

Layout of a cache directory::

    index.json                      what was encoded (autoencoder, image size, files, shards done)
    shard-00000.safetensors         "latents" (n, c, h, w) and, with flips, "latents_flipped" (n, c, h, w)
    shard-00001.safetensors
    ...

Latents are the first stage's scaled latents (``(z - shift) * scale``, the posterior mean), exactly what
``V2FlowTokenizer.loss(latents=...)`` takes. Every shard is written to a temporary name and renamed, and the
index is rewritten (atomically) after each shard, so an interrupted ``v2flow cache-latents`` resumes at the
first shard that is not in the index; a cache made with another autoencoder, image size or file list is
refused rather than extended.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .first_stage import AutoencoderFirstStage, autoencoder_downsample, load_autoencoder
from .hub import write_text_atomic
from .images import ImageFileDataset, list_images
from .utils import follow_umask, releasing_heap

INDEX_NAME = "index.json"
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def _files_digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def cache_latents(
    autoencoder: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    image_size: int,
    subfolder: str | None = None,
    hflip: bool = True,
    shard_size: int = 4096,
    batch_size: int = 32,
    num_workers: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    max_shards: int | None = None,
) -> dict:
    """Encode every image under `data` (resized, centre-cropped to `image_size`, RGB) into a sharded cache.

    Args:
        autoencoder: a diffusers autoencoder directory or hub id (see :func:`load_autoencoder`).
        data: an image folder (recursive).
        output: the cache directory (created; an existing compatible cache is resumed).
        image_size: side of the images given to the autoencoder.
        subfolder: the autoencoder's sub-directory (``"vae"`` in a pipeline repository).
        hflip: also store the latents of the horizontally flipped images (training augmentation).
        shard_size: images per shard file.
        batch_size, num_workers: the encoding loader.
        dtype: storage dtype of the latents: ``float32``, ``float16`` or ``bfloat16``.
        device: where the autoencoder runs.
        max_shards: stop after writing this many new shards (None: all), e.g. to split the work.

    Returns:
        the index (a dict, also written to ``index.json``).
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(CACHE_DTYPES)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    root, output = Path(data), Path(output)
    files = list_images(root)
    names = [str(f.relative_to(root)) for f in files]
    model = load_autoencoder(autoencoder, subfolder).to(device)
    config = model.config
    first_stage = AutoencoderFirstStage(
        in_channels=config.get("in_channels", 3),
        image_size=image_size,
        latent_channels=config["latent_channels"],
        latent_downsample=autoencoder_downsample(model),
    )
    first_stage.set_autoencoder(model)
    meta = {
        "autoencoder": str(autoencoder),
        "autoencoder_subfolder": subfolder,
        "autoencoder_class": type(model).__name__,
        "scaling_factor": first_stage.scaling_factor,
        "shift_factor": first_stage.shift_factor,
        "image_size": image_size,
        "latent_shape": [first_stage.latent_channels, first_stage.latent_size, first_stage.latent_size],
        "hflip": hflip,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_images": len(files),
        "files_digest": _files_digest(names),
    }
    index_path = output / INDEX_NAME
    index = _open_index(index_path, meta, names)
    done = {shard["file"] for shard in index["shards"]}
    num_shards = (len(files) + shard_size - 1) // shard_size
    todo = [i for i in range(num_shards) if f"shard-{i:05d}.safetensors" not in done]
    if max_shards is not None:
        todo = todo[:max_shards]
    for i in tqdm(todo, desc=f"caching latents of {len(files)} images", unit="shard"):
        start, stop = i * shard_size, min((i + 1) * shard_size, len(files))
        name = f"shard-{i:05d}.safetensors"
        _write_shard(
            first_stage, files[start:stop], output / name, start, image_size, hflip, dtype, batch_size, num_workers
        )
        index["shards"].append({"file": name, "first": start, "count": stop - start})
        index["shards"].sort(key=lambda shard: shard["first"])
        _write_json(index_path, index)
    index["complete"] = len(index["shards"]) == num_shards
    _write_json(index_path, index)
    return index


def _open_index(path: Path, meta: dict, names: list[str]) -> dict:
    """The index of a cache being written: the existing one (resumed) when its settings are `meta`, else new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        index = {"meta": meta, "files": names, "shards": []}
        _write_json(path, index)
        return index
    index = json.loads(path.read_text())
    differs = {k: (index["meta"].get(k), v) for k, v in meta.items() if index["meta"].get(k) != v}
    if differs:
        raise ValueError(
            f"{path.parent} holds a cache made with other settings ({differs}); choose another output directory "
            "or delete it"
        )
    return index


def _write_shard(
    first_stage: AutoencoderFirstStage,
    files: list[Path],
    path: Path,
    first: int,
    image_size: int,
    hflip: bool,
    dtype: str,
    batch_size: int,
    num_workers: int,
) -> None:
    """Encode `files` (the cache's images `first`, `first` + 1, ...) into one shard file, atomically."""
    device = next(first_stage.autoencoder.parameters()).device
    dataset = ImageFileDataset(files, image_size, first_stage.in_channels)
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flipped": []}
    for images, _ in releasing_heap(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)):
        images = images.to(device)
        parts["latents"].append(first_stage.encode(images).to(CACHE_DTYPES[dtype]).cpu())
        if hflip:
            parts["latents_flipped"].append(first_stage.encode(images.flip(-1)).to(CACHE_DTYPES[dtype]).cpu())
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
    staged = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, staged, metadata={"first": str(first), "count": str(len(files))})
    follow_umask(staged)  # safetensors writes 0600 files
    staged.replace(path)


def read_index(root: str | Path) -> dict:
    """The index of a complete latent cache; clear errors for a missing or unfinished one."""
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a latent cache (no {INDEX_NAME}); write one with `v2flow cache-latents`"
        )
    index = json.loads(path.read_text())
    if not index.get("complete"):
        done, total = len(index["shards"]), -(-index["meta"]["num_images"] // index["meta"]["shard_size"])
        raise ValueError(
            f"the latent cache {root} is unfinished ({done} of {total} shards); re-run `v2flow cache-latents` to resume it"
        )
    return index


class LatentCacheDataset(Dataset):
    """Items ``{"latents": (c, h, w) float32}`` of a latent cache; with `hflip`, the stored flipped latents half
    of the time. Shards are memory-mapped (opened lazily, once per worker)."""

    def __init__(self, root: str | Path, rows: list[int] | None = None, hflip: bool = False) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
        self.hflip = hflip and self.index["meta"]["hflip"]
        self.rows = list(range(self.index["meta"]["num_images"])) if rows is None else rows
        self._starts = [shard["first"] for shard in self.index["shards"]]
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:  # open file handles do not travel to worker processes
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        shard = self.index["shards"][bisect.bisect_right(self._starts, row) - 1]
        handle = self._handles.get(shard["file"])
        if handle is None:
            handle = self._handles[shard["file"]] = safe_open(self.root / shard["file"], framework="pt")
        key = "latents_flipped" if self.hflip and torch.rand(()) < 0.5 else "latents"
        return {"latents": handle.get_slice(key)[row - shard["first"]].float()}
