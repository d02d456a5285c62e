"""The training objective of :class:`~v2flow.tokenizer.V2FlowTokenizer`: MAR masks, noise levels bound to
token positions (ordered mode), nested truncation, flow matching on the masked patches, and the auxiliary
patch prediction. Also the config rules of those training keys.

Time convention: t = 1 is noise, t = 0 is data (see :mod:`v2flow.velocity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from einops import repeat

from .layers import draw
from .ordering import PREFIX_SAMPLING, TRUNCATION_TAILS, sample_prefix_lengths
from .velocity import TIME_SAMPLING, flow_matching_losses, sample_time, time_cdf, time_quantile

if TYPE_CHECKING:
    from .tokenizer import V2FlowTokenizer


@dataclass
class LossOutput:
    """loss: the scalar to minimise; parts: named (weighted) terms; indices (B, N) the tokens drawn."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    indices: torch.Tensor


def check_objective_config(config: dict) -> None:
    """Raise a ValueError naming the key for training settings out of range or of another mode."""
    lo, hi = config["mask_ratio_min"], config["mask_ratio_max"]
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"need 0 < mask_ratio_min <= mask_ratio_max <= 1, got {lo}, {hi}")
    if config["mask_ratio_std"] <= 0:
        raise ValueError(f"mask_ratio_std must be > 0, got {config['mask_ratio_std']}")
    if config["batch_mul"] < 1:
        raise ValueError(f"batch_mul must be >= 1, got {config['batch_mul']}")
    if not 0.0 <= config["time_uniform_share"] <= 1.0:
        raise ValueError(f"time_uniform_share must be in [0, 1], got {config['time_uniform_share']}")
    if config["x0_loss_weight"] < 0:
        raise ValueError(f"x0_loss_weight must be >= 0, got {config['x0_loss_weight']}")
    if config["time_sampling"] not in TIME_SAMPLING:
        raise ValueError(f"unknown time_sampling {config['time_sampling']!r}; choose one of {TIME_SAMPLING}")
    if not 0.0 <= config["truncation_prob"] <= 1.0:
        raise ValueError(f"truncation_prob must be in [0, 1], got {config['truncation_prob']}")
    if config["prefix_sampling"] not in PREFIX_SAMPLING:
        raise ValueError(f"unknown prefix_sampling {config['prefix_sampling']!r}; choose one of {PREFIX_SAMPLING}")
    if config["truncation_tail"] not in TRUNCATION_TAILS:
        raise ValueError(f"unknown truncation_tail {config['truncation_tail']!r}; choose one of {TRUNCATION_TAILS}")
    if config["interval_times"] and config["token_order"] != "ordered":
        raise ValueError("interval_times applies to token_order='ordered' only")
    if config["velocity_decoder"] == "transformer":  # it needs every patch of an image at one time
        if config["mask_ratio_min"] != 1.0:
            raise ValueError(
                "velocity_decoder='transformer' sees whole images, so training masks every patch: set "
                f"mask_ratio_min: 1.0 and mask_ratio_max: 1.0 (got mask_ratio_min={config['mask_ratio_min']})"
            )
        if config["interval_times"]:
            raise ValueError(
                "interval_times draws a time per patch; velocity_decoder='transformer' takes one per image"
            )


def sample_mask(
    config: dict, num_patches: int, batch_size: int, device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, L) bool training mask: one ratio per batch from a truncated normal, random positions per sample."""
    lo, hi, std = config["mask_ratio_min"], config["mask_ratio_max"], config["mask_ratio_std"]
    normal = torch.distributions.Normal(0.0, 1.0)
    a, b = normal.cdf(torch.tensor((lo - hi) / std)), torch.tensor(0.5)
    u = a + (b - a) * draw(torch.rand, (), generator=generator, device="cpu")
    ratio = float((hi + std * torch.special.ndtri(u)).clamp(lo, hi))
    num_masked = min(max(round(ratio * num_patches), 1), num_patches)
    order = draw(torch.rand, (batch_size, num_patches), generator=generator, device=device).argsort(dim=1)
    return order < num_masked


def tokenizer_loss(
    tok: V2FlowTokenizer,
    images: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    latents: torch.Tensor | None = None,
) -> LossOutput:
    """Flow matching on masked patches plus regularisers, on images (B, C, H, W) or latents (B, c, h, w)."""
    cfg = tok.config
    patches = tok.patches_of(images, latents, check_values=False)  # (B, L, P)
    out = tok.resampler(tok.encoder(patches), generator)
    b, device = patches.shape[0], patches.device
    mask = sample_mask(cfg, tok.num_patches, b, device, generator)  # (B, L)
    drop = draw(torch.rand, (b,), generator=generator, device=device) < cfg["cond_drop_prob"]
    t, visible = ordered_times(tok, b, device, generator)
    kept = truncation(cfg, b, device, generator) if tok.training else None  # (B, N) prefix kept, or None
    token_keep, lengths = kept, None
    if kept is not None and cfg["truncation_tail"] == "hidden":  # the tail hidden like tokens not yet in play
        lengths, token_keep = kept.sum(1), None
        visible = kept if visible is None else visible & kept
    cond = tok.decoder(
        out.embeddings, patches, mask, drop if tok.training else None, token_mask=visible, token_keep=token_keep
    )  # (B, L, D)
    times = loss_times(tok, t, mask, generator, lengths)
    parts = flow_loss(tok, patches[mask], cond[mask], generator, times)  # "flow" (and "x0")
    if tok.patch_predictor is not None:
        counted = (mask & ~drop[:, None]) if tok.training else mask  # (B, L): masked patches with their tokens
        # a masked mean, not mse_loss on a selection: a batch whose every sample dropped its tokens gives 0, not NaN
        err = (tok.patch_predictor(cond) - patches).pow(2).mean(-1)  # (B, L)
        parts["aux"] = cfg["aux_weight"] * (err * counted).sum() / counted.sum().clamp_min(1)
    parts.update(out.losses)
    return LossOutput(sum(parts.values()), parts, out.indices)


def ordered_times(tok: V2FlowTokenizer, batch_size: int, device, generator: torch.Generator | None):
    """Ordered mode: one noise level per sample (B,) and the tokens visible at it (B, N); else (None, None)."""
    if tok.schedule is None:
        return None, None
    cfg = tok.config
    t = sample_time(batch_size, **_time_distribution(cfg), device=device, generator=generator)
    return t, tok.schedule.visibility(t)


def _time_distribution(cfg: dict) -> dict:
    return dict(
        method=cfg["time_sampling"],
        mean=cfg["time_mean"],
        std=cfg["time_std"],
        shift=cfg["time_shift"],
        uniform_share=cfg["time_uniform_share"],
    )


def loss_times(
    tok: V2FlowTokenizer,
    t: torch.Tensor | None,
    mask: torch.Tensor,
    generator: torch.Generator | None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The flow loss's times: :func:`patch_times` in ordered mode; with the whole-image velocity network, one
    time per image and noise draw (its rows share it), (batch_mul * B * L,) draw-major; else None (the loss
    draws one per row)."""
    times = patch_times(tok, t, mask, generator, lengths)
    if times is None and tok.config["velocity_decoder"] == "transformer":
        cfg, b = tok.config, mask.shape[0]
        per_image = sample_time(
            cfg["batch_mul"] * b, **_time_distribution(cfg), device=mask.device, generator=generator
        )  # (batch_mul * B,)
        times = per_image.repeat_interleave(tok.num_patches)
    return times


def patch_times(
    tok: V2FlowTokenizer,
    t: torch.Tensor | None,
    mask: torch.Tensor,
    generator: torch.Generator | None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Ordered mode: the flow loss's times for the masked patches of samples at levels t (B,): (M,), each
    patch at its sample's level, or with ``interval_times`` (batch_mul * M,), one per noise draw, drawn
    inside the stretch where the sample's visible tokens stay the same (with `lengths` (B,), the prefix
    lengths of samples truncated with a hidden tail, the visible tokens are min(k(t), length) of them).
    None in unordered mode."""
    if t is None:
        return None
    cfg = tok.config
    if not cfg["interval_times"]:
        return t[:, None].expand(mask.shape)[mask]  # (M,)
    lo, hi = tok.schedule.visibility_interval(t, lengths)  # (B,) each
    # float64: near t = 1 the CDF is within 1e-6 of 1, where float32 would leave a stretch a few values
    lo, hi = (repeat(x[:, None].expand(mask.shape)[mask], "m -> (r m)", r=cfg["batch_mul"]).double() for x in (lo, hi))
    dist = _time_distribution(cfg)
    u_lo, u_hi = time_cdf(lo, **dist), time_cdf(hi, **dist)
    u = u_lo + (u_hi - u_lo) * draw(torch.rand, lo.shape, generator=generator, device=lo.device).double()
    times = torch.minimum(torch.maximum(time_quantile(u, **dist), lo), hi)
    return times.to(t.dtype)  # (batch_mul * M,)


def truncation(cfg: dict, batch_size: int, device, generator: torch.Generator | None) -> torch.Tensor | None:
    """Nested truncation: (B, N) bool, a random prefix kept in a `truncation_prob` share of the samples."""
    if cfg["truncation_prob"] <= 0:
        return None
    n = cfg["num_tokens"]
    lengths = sample_prefix_lengths(batch_size, n, cfg["prefix_sampling"], generator, device)
    truncate = draw(torch.rand, (batch_size,), generator=generator, device=device) < cfg["truncation_prob"]
    lengths = torch.where(truncate, lengths, torch.full_like(lengths, n))
    return torch.arange(n, device=device)[None, :] < lengths[:, None]


def flow_loss(
    tok: V2FlowTokenizer,
    x0: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator | None,
    t: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The flow-matching terms of the velocity network on patches x0 (M, P) under conditions (M, D): ``"flow"``
    and, with ``x0_loss_weight`` > 0, ``"x0"`` (:func:`v2flow.velocity.flow_matching_losses`)."""
    cfg = tok.config
    return flow_matching_losses(
        tok.head,
        x0,
        cond,
        batch_mul=cfg["batch_mul"],
        time_sampling=cfg["time_sampling"],
        time_mean=cfg["time_mean"],
        time_std=cfg["time_std"],
        time_shift=cfg["time_shift"],
        time_uniform_share=cfg["time_uniform_share"],
        x0_weight=cfg["x0_loss_weight"],
        t=t,
        generator=generator,
    )


@torch.no_grad()
def token_usefulness(
    tok: V2FlowTokenizer, images: torch.Tensor | None = None, seed: int = 0, *, latents: torch.Tensor | None = None
) -> dict[str, float]:
    """How much the decoder relies on the tokens: the flow loss (all patches masked, as at decoding) with the
    true tokens and with tokens shuffled across the batch, under identical noise and times."""
    was_training = tok.training
    tok.eval()
    try:
        patches = tok.patches_of(images, latents, check_values=True)  # (B, L, P)
        b, device = patches.shape[0], patches.device
        indices = tok.resampler(tok.encoder(patches)).indices
        mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=device)
        result = {}
        for name, idx in (("true", indices), ("shuffled", indices.roll(1, dims=0))):
            generator = torch.Generator(device=device).manual_seed(seed)
            t, visible = ordered_times(tok, b, device, generator)
            cond = tok.decoder(tok.resampler.embed(idx), patches, mask, token_mask=visible)
            t = loss_times(tok, t, mask, generator)
            result[f"flow_loss_{name}"] = float(flow_loss(tok, patches[mask], cond[mask], generator, t)["flow"])
    finally:
        tok.train(was_training)
    result["shuffle_gap"] = result["flow_loss_shuffled"] / max(result["flow_loss_true"], 1e-12) - 1.0
    return result
