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


class _Features(torch.nn.Module):
    """Adapts a model with ``features(images)`` and ``num_features`` to torchmetrics' feature interface."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images)


@torch.no_grad()
def frechet_distance(
    extractor: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 500
) -> float:
    """Frechet distance between the Gaussians fitted to `extractor.features` of two image sets.

    Args:
        extractor: a model with ``features(images) -> (B, F)`` and an int ``num_features`` (for MNIST, the
            project's :class:`~v2flow.classifier.DigitClassifier`).
        real, fake: (B, C, H, W) images in [-1, 1], given to the extractor as they are (on its device).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(real), len(fake)) < 2:
        raise ValueError(f"a Frechet distance needs >= 2 images per set, got {len(real)} and {len(fake)}")
    was_training = extractor.training
    extractor.eval()
    device = next(extractor.parameters()).device
    try:
        metric = FrechetInceptionDistance(feature=_Features(extractor))
        metric.to(device)  # states only: the extractor is already there
        for chunk in real.split(batch_size):
            metric.update(chunk.to(device), real=True)
        for chunk in fake.split(batch_size):
            metric.update(chunk.to(device), real=False)
        return float(metric.compute())
    finally:
        extractor.train(was_training)
