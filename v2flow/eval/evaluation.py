"""Evaluation of a tokenizer on a data set: which images, cropped how, which features, and the result.

* :func:`evaluate`: a pretrained tokenizer and a data set (``mnist-test``, ``mnist-val``, ``photos-test`` or an
  image folder / file) -> a JSON-ready dict of PSNR, SSIM, MS-SSIM, FD/KID, vocabulary statistics and the
  policy they were measured under. ``v2flow evaluate`` is its command line.
* :func:`markdown_row`: one markdown table row of such a result (with its header).
* :func:`evaluation_batches`, :func:`feature_extractor`: the two policies it is made of, for callers that
  stream their own tokenizer.

Every metric compares a reconstruction with the exact tensor given to the tokenizer, never with a
differently cropped or resized original; :data:`EVALUATE_HELP` says what that tensor is for each data set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the functions: the command line reads EVALUATE_HELP first
    import torch
    from torch import nn

EVALUATE_HELP = """Reconstruct a data set batch by batch (bounded memory, progress bar) and print its metrics as JSON
and as a markdown table row (with its header).

What the metrics compare: each reconstruction with the exact tensor given to the tokenizer, never with a
differently cropped or resized original.
  mnist-test, mnist-val  the 28x28 digits padded with background to the tokenizer's size (no resize)
  photos-test            fixed (seeded) crops of the held-out scikit-image photo, at native resolution
  a folder / file        the images at their own size, or with --resize the shorter side resized (bicubic)
                         to the tokenizer's size and centre-cropped: the metrics then measure the tokenizer
                         on that resized crop, not the resize.

FD/KID: for MNIST the project's digit classifier (checkpoints/mnist-classifier, test accuracy 99.39 %)
gives 128-d features; for natural images standard rFID needs --features inception WEIGHTS (a local
pt_inception-2015-12-05-6726825d.pth and `pip install torch-fidelity`). Without features FD/KID are null,
with fd_note saying why. FD and KID depend on the number of images: compare them at equal --limit.
MS-SSIM under 176 px uses fewer scales and a smaller window (see ms_ssim_note)."""

MNIST_DATA = ("mnist-test", "mnist-val")
NAMED_DATA = (*MNIST_DATA, "photos-test")
DEFAULT_CLASSIFIER = Path("checkpoints") / "mnist-classifier"  # in the working directory, else in the repository


def default_classifier() -> Path:
    """The shipped MNIST classifier: ``checkpoints/mnist-classifier`` in the working directory, else in the
    repository this package lives in."""
    for path in (DEFAULT_CLASSIFIER, Path(__file__).resolve().parents[2] / DEFAULT_CLASSIFIER):
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"the default MNIST feature extractor {DEFAULT_CLASSIFIER} was not found; pass --features classifier DIR "
        "or --features none"
    )


def evaluation_batches(
    tokenizer,
    data: str,
    limit: int = 0,
    batch_size: int = 250,
    resize: bool = False,
    pad: bool = False,
    convert: bool = False,
) -> tuple[Iterable[torch.Tensor], int, str]:
    """The images of `data` as the tokenizer takes them.

    Args:
        tokenizer: anything with a ``config`` holding ``in_channels`` and ``image_size``.
        data: ``mnist-test``, ``mnist-val``, ``photos-test`` (fixed crop policies), or an image folder / file.
        limit: the first n images only (0 = all).
        batch_size: images per batch.
        resize, pad, convert: what may be done to folder images (:func:`v2flow.images.image_batches`).

    Returns:
        (batches of (B, C, H, W) in [-1, 1] with a progress bar, the number of images, the crop/resize policy
        in words).
    """
    from tqdm.auto import tqdm

    from ..images import image_batches, image_files
    from ..utils import releasing_heap

    cfg = tokenizer.config
    c, s, first = cfg["in_channels"], cfg["image_size"], limit or None
    if limit < 0 or batch_size < 1:
        raise ValueError(f"need --limit >= 0 and --batch-size >= 1, got {limit} and {batch_size}")
    if data in NAMED_DATA and (resize or pad or convert):
        raise ValueError(f"--resize, --pad and --convert apply to folders only; {data} has a fixed crop policy")
    if data in MNIST_DATA:
        from ..data import load_mnist

        if c != 1 or s < 28:
            raise ValueError(f"MNIST digits are 1x28x28 (padded); this tokenizer takes {c}x{s}x{s} images")
        images = load_mnist(data.removeprefix("mnist-"), pad_to=s)[0][:first]
        batches = releasing_heap(tqdm(images.split(batch_size), desc="evaluating", unit="batch", disable=None))
        return batches, len(images), f"28x28 digits padded with background to {s}x{s}; no resize"
    if data == "photos-test":
        from ..data import SKIMAGE_HELD_OUT, PhotoCropsDataModule

        if c != 3:
            raise ValueError(f"photos-test gives RGB crops; this tokenizer takes {c}-channel images")
        held, length = SKIMAGE_HELD_OUT, first or 2048  # the data module's default test length
        dm = PhotoCropsDataModule(
            crop_size=s, eval_batch_size=batch_size, test_length=length, photos=held, held_out=held
        )
        dm.setup("test")
        loader = dm.test_dataloader()
        batches = (x for x, _ in releasing_heap(tqdm(loader, desc="evaluating", unit="batch", disable=None)))
        return batches, len(dm.test_set), f"fixed {s}x{s} crops of the held-out photo(s) {list(held)}; no resize"
    files = image_files([data])[:first]
    policy = (
        f"shorter side resized (bicubic) to {s} and centre-cropped; compared with that crop"
        if resize
        else "the images as stored (no crop, no resize)"
    )
    batches = image_batches(files, s, c, batch_size, resize=resize, pad=pad, convert=convert, desc="evaluating")
    return batches, len(files), policy


def feature_extractor(
    tokenizer, data: str, features: Sequence[str] | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module | None, dict[str, Any]]:
    """The FD/KID feature extractor that `features` names, and a description of it for the result.

    Args:
        tokenizer: anything with a ``config`` holding ``in_channels`` and ``image_size``.
        data: the data set (MNIST data default to the shipped digit classifier, other data to none).
        features: ``["classifier"]``, ``["classifier", DIR]``, ``["inception", WEIGHTS]``, ``["none"]``, or
            None for the data's default.
        device: where the extractor runs.

    Returns:
        (extractor or None, ``{"kind", "path", "num_features"}``; without an extractor ``{"kind": "none",
        "note": why}``).
    """
    spec = list(features) if features else (["classifier"] if data in MNIST_DATA else ["none"])
    kind, rest = spec[0], spec[1:]
    if kind == "none" and not rest:
        why = "no --features given" if features is None else "--features none"
        return None, {
            "kind": "none",
            "note": f"{why}: FD/KID need a feature extractor (classifier DIR or inception "
            "WEIGHTS); MNIST data default to the shipped classifier",
        }
    if kind == "classifier" and len(rest) <= 1:
        from .classifier import DigitClassifier

        path = Path(rest[0]) if rest else default_classifier()
        model = DigitClassifier.from_pretrained(path, map_location=device)
        cfg, want = tokenizer.config, model.config
        if (cfg["in_channels"], cfg["image_size"]) != (want["in_channels"], want["image_size"]):
            raise ValueError(
                f"the classifier at {path} takes {want['in_channels']}x{want['image_size']}x{want['image_size']} "
                f"images; this tokenizer's are {cfg['in_channels']}x{cfg['image_size']}x{cfg['image_size']}"
            )
        return model, {"kind": "classifier", "path": str(path), "num_features": model.num_features}
    if kind == "inception" and len(rest) == 1:
        from ..metrics import inception_extractor

        try:
            model = inception_extractor(rest[0]).to(device)
        except ModuleNotFoundError as err:  # torch-fidelity missing: a usage error, reported as such
            raise ValueError(str(err)) from err
        return model, {"kind": "inception", "path": rest[0], "num_features": model.num_features}
    raise ValueError(f"--features takes 'classifier [DIR]', 'inception WEIGHTS' or 'none', got {' '.join(spec)!r}")


def evaluate(
    checkpoint: str | Path,
    data: str,
    limit: int = 0,
    batch_size: int = 250,
    resize: bool = False,
    pad: bool = False,
    convert: bool = False,
    features: Sequence[str] | None = None,
    kid_subset_size: int | None = None,
    decode: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Reconstruct a data set through a pretrained tokenizer, batch by batch, and measure it.

    Args:
        checkpoint: a pretrained :class:`~v2flow.V2FlowTokenizer` directory.
        data, limit, batch_size, resize, pad, convert: the images (:func:`evaluation_batches`).
        features: the FD/KID feature extractor (:func:`feature_extractor`).
        kid_subset_size: images per KID subset (None: KID over all images, with its standard error).
        decode: decode choices laid over the checkpoint's defaults (keys of
            :class:`~v2flow.settings.DecodeSettings`; None values are not given).
        seed: seeds the decode's noise and reveal order and the KID subsets.
        device: where the tokenizer and the metrics run.

    Returns:
        ``checkpoint``, ``data``, ``policy``, ``decode`` (the settings used), ``seed``, ``features``, the
        metrics of :meth:`~v2flow.metrics.ReconstructionMetrics.compute` (with ``fd_note`` saying why FD/KID
        are null when there are no features) and ``seconds``.
    """
    import torch

    from ..metrics import ReconstructionMetrics, evaluate_tokenizer
    from ..tokenizer import V2FlowTokenizer

    tokenizer = V2FlowTokenizer.from_pretrained(checkpoint, map_location=device)
    batches, num_images, policy = evaluation_batches(tokenizer, data, limit, batch_size, resize, pad, convert)
    if num_images == 0:
        raise ValueError(f"{data} holds no images")
    extractor, described = feature_extractor(tokenizer, data, features, device)
    settings = tokenizer.decode_defaults.resolve(**(decode or {})).as_dict()
    generator = torch.Generator(device=device).manual_seed(seed)
    metrics = ReconstructionMetrics(
        feature_extractor=extractor, kid_subset_size=kid_subset_size, device=device, seed=seed
    )
    start = time.perf_counter()
    evaluate_tokenizer(tokenizer, batches, metrics, generator=generator, **settings)
    seconds = time.perf_counter() - start
    result = metrics.compute()
    if extractor is None:
        result["fd_note"] = described.pop("note")
    return {
        "checkpoint": str(checkpoint),
        "data": data,
        "policy": policy,
        "decode": settings,
        "seed": seed,
        "features": described,
        **result,
        "seconds": round(seconds, 2),
    }


def markdown_row(result: Mapping[str, Any], header: bool = False) -> str:
    """One markdown table row of an :func:`evaluate` result (with the header and rule lines above it)."""

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    r, d = result, result["decode"]
    cells = {
        "checkpoint": r["checkpoint"],
        "data": r["data"],
        "images": r["num_images"],
        "steps": d["num_steps"],
        "solver": d["solver"],
        "iters": d["num_iters"],
        "cfg": d["cfg_scale"],
        "temperature": d["temperature"],
        "shift": d["shift"],
        "PSNR (dB)": fmt(r["psnr"], ".2f"),
        "SSIM": fmt(r["ssim"], ".4f"),
        "MS-SSIM": fmt(r["ms_ssim"], ".4f"),
        "FD": fmt(r["fd"], ".3f"),
        "KID": fmt(r["kid_mean"], ".4f"),
        "distinct ids": r["distinct_ids"],
        "perplexity": fmt(r["perplexity"], ".0f"),
        "bits/image": fmt(r["bits_per_image"], ".0f"),
        "mean position entropy (bits)": fmt(r["mean_position_entropy"], ".2f"),
    }
    row = "| " + " | ".join(str(v) for v in cells.values()) + " |"
    if not header:
        return row
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells) + "\n" + row
