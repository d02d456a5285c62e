"""The structured outputs of the tokenizers' public verbs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodeOutput:
    """ids (B, N): LLM token ids (``quantizer="vocab"``) or codebook indices (``"vq"``);
    indices (B, N): row indices into the vocabulary subset / codebook;
    soft_embeddings (B, N, d_llm): p @ E, points in the LLM's embedding space;
    probs (B, N, K) when asked for."""

    ids: torch.Tensor
    indices: torch.Tensor
    soft_embeddings: torch.Tensor
    probs: torch.Tensor | None = None


@dataclass
class DecodeOutput:
    """images (B, C, H, W) in [-1, 1]; latents (B, c, h, w): the first stage's latents they were decoded from
    (the unclipped pixels for ``first_stage="pixels"``)."""

    images: torch.Tensor
    latents: torch.Tensor | None = None


@dataclass
class ReconstructOutput:
    """images (B, C, H, W) in [-1, 1]; ids (B, N) the tokens they were decoded from."""

    images: torch.Tensor
    ids: torch.Tensor
