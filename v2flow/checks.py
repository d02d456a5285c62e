"""Input contracts shared by every model of the package, as free functions that raise clear errors.

Nothing here imports from the package.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Callable

import torch

RANGE_TOLERANCE = 1e-3  # images may overshoot [-1, 1] by this much (resampling, float round-off)


def _matches(value, annotation) -> bool:
    """Whether a config value (as JSON/YAML gives it) fits a constructor annotation."""
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:  # YAML and JSON write 1.0 as 1
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not understand is left to the constructor


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_types(constructor: Callable, values: dict) -> None:
    """Raise a ValueError naming the key, the value and the expected type for every value in `values` whose
    type does not fit `constructor`'s annotation (``int`` refuses floats and bools; ``float`` takes ints)."""
    hints = typing.get_type_hints(constructor)
    wrong = [
        f"{key}={value!r} ({type(value).__name__}; expected {_type_name(hints[key])})"
        for key, value in values.items()
        if key in hints and not _matches(value, hints[key])
    ]
    if wrong:
        raise ValueError(f"config values of the wrong type: {'; '.join(wrong)}")


IMAGE_RANGE_HINT = "map [0, 1] images with x * 2 - 1 and [0, 255] images with x / 127.5 - 1"


def check_image_range(images: torch.Tensor, what: str = "images", hint: str = IMAGE_RANGE_HINT) -> None:
    """Raise a ValueError unless `images` are finite and in [-1, 1] (give or take ``RANGE_TOLERANCE``); `hint`
    says what to do. One device-to-host sync (NaN and inf show in the extremes)."""
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} must be finite but contain NaN or inf values; replace or drop those images first")
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        # round outward, so the printed interval contains the values (never "[-1, 0.993]" for a max of 0.9931)
        shown_lo, shown_hi = math.floor(lo * 1e4) / 1e4, math.ceil(hi * 1e4) / 1e4
        raise ValueError(f"{what} must be in [-1, 1], got values in [{shown_lo:g}, {shown_hi:g}]; {hint}")


# ---------------------------------------------------------------------------- training-data statistics

OFF_DISTRIBUTION_Z = 6.0  # an image whose pixel mean or spread is this many training spreads away is "far off"
_STATISTICS_KEYS = ("pixel_mean", "pixel_std", "num_images", "data")


def image_features(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) per-image pixel mean and pixel standard deviation of images (B, C, H, W)."""
    flat = images.detach().float().flatten(1)  # (B, C*H*W)
    return torch.stack([flat.mean(1), flat.std(1, correction=0)], dim=1)


def input_statistics(features: torch.Tensor, data: str) -> dict:
    """The statistics a tokenizer stores from its training images: mean and spread over the images of each
    image's pixel mean and pixel spread. `features` (n, 2) from :func:`image_features`; `data` describes
    the images (shown in warnings)."""
    if features.ndim != 2 or features.shape[1] != 2 or features.shape[0] < 2:
        raise ValueError(f"need (n >= 2, 2) image features, got shape {tuple(features.shape)}")
    mean, std = features.double().mean(0), features.double().std(0)
    if not bool((std > 0).all()):
        raise ValueError("the images all have the same pixel mean or spread; statistics need the varied training data")
    return {
        "pixel_mean": [round(float(mean[0]), 6), round(float(std[0]), 6)],
        "pixel_std": [round(float(mean[1]), 6), round(float(std[1]), 6)],
        "num_images": int(features.shape[0]),
        "data": data,
    }


def check_statistics(statistics: dict | None) -> None:
    """Raise a ValueError unless `statistics` is None or a dict as :func:`input_statistics` writes."""
    if statistics is None:
        return
    if not isinstance(statistics, dict) or sorted(statistics) != sorted(_STATISTICS_KEYS):
        raise ValueError(f"input_statistics must be a dict with keys {list(_STATISTICS_KEYS)}, got {statistics!r}")
    for key in ("pixel_mean", "pixel_std"):
        pair = statistics[key]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise ValueError(f"input_statistics[{key!r}] must be [mean, spread], got {pair!r}")
        if not pair[1] > 0:
            raise ValueError(f"input_statistics[{key!r}] needs a spread > 0, got {pair[1]!r}")


def distribution_warning(images: torch.Tensor, statistics: dict) -> str | None:
    """A message when at least half of `images` (B, C, H, W) are far from the training images' statistics
    (pixel mean or spread more than ``OFF_DISTRIBUTION_Z`` training spreads away), else None."""
    features = image_features(images)  # (B, 2)
    centre = torch.tensor([statistics["pixel_mean"][0], statistics["pixel_std"][0]], device=features.device)
    spread = torch.tensor([statistics["pixel_mean"][1], statistics["pixel_std"][1]], device=features.device)
    z = ((features - centre) / spread).abs().amax(1)  # (B,)
    off = int((z > OFF_DISTRIBUTION_Z).sum())
    if 2 * off < len(images):
        return None
    seen = features.mean(0).tolist()
    return (
        f"{off} of {len(images)} images look unlike this tokenizer's training data ({statistics['data']}): their "
        f"pixel mean is {seen[0]:.2f} and spread {seen[1]:.2f} against {centre[0]:.2f} +- {spread[0]:.2f} and "
        f"{centre[1]:.2f} +- {spread[1]:.2f} in training, so the reconstructions will be poor. Common causes: "
        "images in [0, 1] instead of [-1, 1] (map with x * 2 - 1), inverted colours (e.g. dark digits on a light "
        "background), or data the tokenizer was never trained on"
    )


# ---------------------------------------------------------------------------- image and latent contracts


def check_images(
    images: torch.Tensor,
    *,
    channels: int,
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    check_values: bool = True,
    model: str = "tokenizer",
) -> None:
    """Raise a ValueError naming the problem unless images are (B, C, H, W) floats in [-1, 1] for a `model` that
    takes `channels` x `size` x `size` images in `dtype` on `device`.

    The rules: a tensor of 4 axes; floating point of the model's dtype (nothing is cast silently; mixed
    precision is ``torch.autocast``'s job); on the model's device; C, H, W as configured; at least one image
    (an empty batch, B = 0, is an error: its loss would be NaN and it has nothing to encode); finite values in
    [-1, 1] (give or take ``RANGE_TOLERANCE``). `check_values=False` checks all but the values (no
    device-to-host sync)."""
    c, s = channels, size
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, {c}, {s}, {s}), got {type(images).__name__}")
    if images.ndim != 4:
        hint = " add a batch axis with images[None]" if images.ndim == 3 else ""
        raise ValueError(f"images must have 4 axes (B, C, H, W), got shape {tuple(images.shape)};{hint}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}; use x.float() / 127.5 - 1")
    if images.dtype != dtype:
        raise ValueError(
            f"images are {images.dtype} but this {model} computes in {dtype}; convert them with "
            f"images.to({dtype}) (images.float() for float32), and for mixed precision keep {dtype} images "
            "and run under torch.autocast"
        )
    if images.device != device:
        raise ValueError(
            f"images are on {images.device} but this {model} is on {device}; move them with images.to('{device}')"
        )
    if images.shape[1] != c:
        raise ValueError(f"images have {images.shape[1]} channels but this {model} expects {c}")
    if images.shape[-2:] != (s, s):
        raise ValueError(
            f"images are {images.shape[-2]}x{images.shape[-1]} but this {model} expects {s}x{s}; "
            "resize, crop or pad them first (v2flow.data.load_image and pad_to_size do it on request)"
        )
    if images.shape[0] == 0:
        raise ValueError(
            f"images hold an empty batch (shape {tuple(images.shape)}); pass at least one image "
            "(skip empty batches before calling)"
        )
    if check_values:
        check_image_range(images)


def check_latents(
    latents: torch.Tensor,
    *,
    channels: int,
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    check_values: bool = True,
) -> None:
    """Raise a ValueError naming the problem unless latents are finite floats (B, c, h, w) of a first stage
    that gives `channels` x `size` x `size` latents, in `dtype` on `device`."""
    c, s = channels, size
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or not latents.is_floating_point():
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a float tensor (B, {c}, {s}, {s}), got {got}")
    if latents.shape[1:] != (c, s, s):
        raise ValueError(
            f"latents are {tuple(latents.shape[1:])} but this tokenizer's first stage gives ({c}, {s}, {s}); "
            "were they cached with another autoencoder or image size?"
        )
    if latents.shape[0] == 0:
        raise ValueError("latents hold an empty batch (B = 0)")
    if latents.dtype != dtype:
        raise ValueError(
            f"latents are {latents.dtype} but this tokenizer computes in {dtype}; convert them with "
            f"latents.to({dtype}) (a float16 cache is read back as float32 by LatentCacheDataset)"
        )
    if latents.device != device:
        raise ValueError(f"latents are on {latents.device} but this tokenizer is on {device}")
    if check_values and not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or inf values")


# ---------------------------------------------------------------------------- token ids

# ids may come in any integer dtype; floats, bool and complex are refused, not cast
ID_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32, torch.int64)


def check_ids(ids: torch.Tensor, num_tokens: int, prefix: bool = False) -> None:
    """Raise unless `ids` is an integer tensor (B, N) with B >= 1 and N = `num_tokens` (any 1 <= k when
    `prefix`; the caller checks k). Any integer dtype is accepted (uint64 included); floats, bool and complex
    are refused, not cast."""
    n = num_tokens
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor of integer token ids (B, {n}), got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise ValueError(
            f"ids must be an integer tensor (B, {n}), got {ids.dtype}; use the int64 ids that encode() returns"
        )
    if ids.ndim != 2 or (ids.shape[1] != n and not prefix):
        hint = "; add a batch axis with ids[None]" if ids.ndim == 1 else ""
        raise ValueError(f"ids must have shape (B, {n}), got {tuple(ids.shape)}{hint}")
    if ids.shape[0] == 0:
        raise ValueError(f"ids hold an empty batch (shape {tuple(ids.shape)}); pass at least one sequence")
    if ids.is_meta:
        raise ValueError("ids are on the meta device and hold no values; pass real ids (from encode())")


def shown_ids(ids: torch.Tensor, bad: torch.Tensor) -> list[int]:
    """Up to 8 distinct values of `ids` where `bad`, read in their own dtype on the CPU (exact for uint64)."""
    return sorted(set(ids.cpu()[bad.cpu()].tolist()))[:8]


def check_codes(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Codebook indices (any integer dtype) as int64, or a ValueError naming those outside [0, num_codes)."""
    wide = ids.long()  # uint64 ids >= 2**63 wrap to negative int64, so they are caught too
    bad = (wide < 0) | (wide >= num_codes)
    if bad.any():
        raise ValueError(f"ids {shown_ids(ids, bad)} are outside the codebook [0, {num_codes})")
    return wide
