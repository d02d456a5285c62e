"""First stage: what the tokenizer patchifies. Pixels here; a frozen diffusers autoencoder fits the same
interface (``encode`` images -> latents (B, c, h, w), ``decode`` latents -> images)."""

from __future__ import annotations

import torch
from torch import nn

FIRST_STAGES = ("pixels",)


class PixelFirstStage(nn.Module):
    """The identity: latents are the pixels themselves, in [-1, 1].

    Args:
        in_channels: image channels.
        image_size: image height and width.
    """

    def __init__(self, *, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.latent_channels = in_channels
        self.latent_size = image_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return latents


def build_first_stage(kind: str, *, in_channels: int, image_size: int) -> nn.Module:
    if kind == "pixels":
        return PixelFirstStage(in_channels=in_channels, image_size=image_size)
    raise ValueError(f"unknown first_stage {kind!r}; choose one of {FIRST_STAGES}")
