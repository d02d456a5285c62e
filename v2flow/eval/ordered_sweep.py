"""Helpers of the ordered-mode settings sweep: variants of ``configs/mnist_ordered.yaml`` (an override of ``configs/mnist.yaml``), their ``v2flow fit``
commands, and their prefix scores averaged over seeds.

A variant is ``NAME=STAGES:TRUNCATION_PROB:PREFIX_SAMPLING[:KEY=VALUE,...]`` (e.g. ``B=8,4,2,1,1:0.5:uniform``
or ``B2=8,4,2,1,1:0.5:uniform:interval_times=true``); ``benchmarks/ordered_sweep.py`` trains and scores them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..lm_training import encode_images
from ..ordering import PREFIX_SAMPLING
from ..tokenizer import V2FlowTokenizer
from .prefix import prefix_quality

# (name, order_stages, truncation_prob, prefix_sampling, {further tokenizer key: value})
Variant = tuple[str, list[float], float, str, dict[str, str]]
DECODE = {"num_steps": 2, "temperature": 0.0}  # the decode the ordered checkpoints ship with


def parse_variant(spec: str) -> Variant:
    """``NAME=STAGES:TRUNCATION_PROB:PREFIX_SAMPLING[:KEY=VALUE,...]`` -> (name, stages, truncation_prob,
    prefix_sampling, {key: value} of further tokenizer keys)."""
    name, _, rest = spec.partition("=")
    parts = rest.split(":")
    if not name.isidentifier() or len(parts) not in (3, 4):
        raise ValueError(
            f"variant {spec!r} is not NAME=STAGES:TRUNCATION_PROB:SAMPLING[:KEY=VALUE,...], e.g. B=8,4,2,1,1:0.5:uniform"
        )
    extra = dict(item.partition("=")[::2] for item in parts[3].split(",")) if len(parts) == 4 else {}
    unknown = sorted(k for k in extra if k not in V2FlowTokenizer.config_keys())
    if unknown or not all(extra.values()):
        raise ValueError(
            f"variant {spec!r}: {unknown or 'an empty value'} in KEY=VALUE; keys are tokenizer config keys"
        )
    try:
        stages, prob = [float(s) for s in parts[0].split(",")], float(parts[1])
    except ValueError as err:
        raise ValueError(f"variant {spec!r}: stages and truncation probability must be numbers ({err})") from None
    if parts[2] not in PREFIX_SAMPLING:
        raise ValueError(f"variant {spec!r}: prefix sampling must be one of {PREFIX_SAMPLING}")
    return name, stages, prob, parts[2], extra


def run_name(name: str, seed: int | None, seeds: list[int | None]) -> str:
    """A variant's run directory: its name, suffixed by the seed when the sweep has several."""
    return name if len(seeds) == 1 else f"{name}_seed{seed}"


def fit_command(
    variant: Variant,
    config: str | Path | Sequence[str | Path],
    runs_dir: str | Path,
    accelerator: str = "auto",
    vocab_source: str = "smollm2",
    max_steps: int = 0,
    seed: int | None = None,
) -> list[str]:
    """The ``v2flow fit`` command of one variant (:func:`parse_variant`).

    Args:
        variant: the variant; its name is the run's name under `runs_dir`.
        config: the Lightning CLI config the variant changes, or its configs in merge order (a base, then
            overrides such as ``configs/mnist.yaml``, ``configs/mnist_ordered.yaml``).
        runs_dir: the logger's directory.
        accelerator: the Trainer's accelerator.
        vocab_source: the tokenizer's ``vocab_source``.
        max_steps: optimiser steps (0 keeps the config's).
        seed: ``seed_everything`` (None keeps the config's).
    """
    name, stages, prob, sampling, extra = variant
    configs = [config] if isinstance(config, (str, Path)) else list(config)
    init = "--model.tokenizer.init_args."
    return [
        *(sys.executable, "-m", "v2flow.cli", "fit"),
        *(arg for c in configs for arg in ("--config", str(c))),
        *("--trainer.accelerator", accelerator, "--trainer.enable_progress_bar", "false"),
        *("--trainer.logger.init_args.save_dir", str(runs_dir), "--trainer.logger.init_args.name", name),
        *(f"{init}order_stages", json.dumps(stages), f"{init}truncation_prob", str(prob)),
        *(f"{init}prefix_sampling", sampling, f"{init}vocab_source", vocab_source),
        *(arg for key, value in extra.items() for arg in (f"{init}{key}", value)),
        *(["--trainer.max_steps", str(max_steps)] if max_steps else []),
        *(["--seed_everything", str(seed)] if seed is not None else []),
    ]


def score(tok: V2FlowTokenizer, images: torch.Tensor, batch_size: int) -> dict[int, float]:
    """PSNR of the prefixes k = 1, 2, 4, ..., N of `images` (n, C, H, W) at the shipped decode (:data:`DECODE`)."""
    n = tok.config["num_tokens"]
    ids = encode_images(tok, images, batch_size)
    ks = [2**i for i in range(n.bit_length()) if 2**i < n] + [n]
    return {k: round(prefix_quality(tok, images, ids, k, batch_size, **DECODE)["psnr"], 3) for k in ks}


def over_seeds(per_seed: list[dict[int, float]]) -> tuple[dict[int, float], dict[int, float]]:
    """Mean and sample standard deviation per prefix length over the seeds' PSNR (the std is 0 for one seed)."""
    ks = sorted(per_seed[0])
    values = torch.tensor([[psnr[k] for k in ks] for psnr in per_seed], dtype=torch.float64)  # (seeds, ks)
    std = values.std(0) if len(per_seed) > 1 else torch.zeros(len(ks), dtype=torch.float64)
    return (
        {k: round(float(m), 3) for k, m in zip(ks, values.mean(0), strict=True)},
        {k: round(float(d), 3) for k, d in zip(ks, std, strict=True)},
    )
