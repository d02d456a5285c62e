"""Reconstruction metrics (torchmetrics), computed against the exact pixels the model was given."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def psnr_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [-1, 1] (data range 2)."""
    return peak_signal_noise_ratio(preds, target, data_range=2.0, reduction="none", dim=(1, 2, 3))


def psnr_ssim(preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and mean SSIM of (B, C, H, W) images in [-1, 1]."""
    return {
        "psnr": float(psnr_per_image(preds, target).mean()),
        "ssim": float(structural_similarity_index_measure(preds, target, data_range=2.0)),
    }
