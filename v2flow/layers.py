"""Shared building blocks: attention with key masks, transformer blocks, adaLN, timestep embedding, patchify.

Everything here is plain PyTorch; the models in this package compose these pieces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def draw(sampler, *args, generator: torch.Generator | None = None, device=None, **kwargs) -> torch.Tensor:
    """A random draw of `sampler` (``torch.rand``, ``randn``, ``randint``, ``randperm``) made on the generator's
    device and moved to `device`, so a seeded generator gives the same numbers wherever the result goes."""
    where = generator.device if generator is not None else device
    return sampler(*args, generator=generator, device=where, **kwargs).to(device)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation `x * (1 + scale) + shift`; shift/scale broadcast over all but the last axis of `x`."""
    return x * (1 + scale) + shift


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C*p*p) with L = (H/p)*(W/p), patches in row-major order."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, L, C*p*p) -> (B, C, H, W), the inverse of :func:`patchify`."""
    return rearrange(
        patches,
        "b (h w) (c p1 p2) -> b c (h p1) (w p2)",
        h=height // patch_size,
        w=width // patch_size,
        p1=patch_size,
        p2=patch_size,
    )


class TimestepEmbedder(nn.Module):
    """Scalar time t in [0, 1] -> (B, dim) through sinusoidal features and an MLP (DiT style)."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10_000.0) -> None:
        super().__init__()
        if frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even, got {frequency_dim}")
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        # t is in [0, 1]; scale by 1000 so the lowest frequencies still resolve small time differences
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, D); key_mask (B, T) bool, False for positions no query may attend to; attn_mask (T, T)
        bool, False where query position i may not attend to key position j (both masks apply)."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        if key_mask is not None:
            key_mask = key_mask[:, None, None, :]  # (B, 1, 1, T)
            attn_mask = key_mask if attn_mask is None else key_mask & attn_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, d)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask, attn_mask)
        return x + self.mlp(self.norm2(x))


class AdaLNResBlock(nn.Module):
    """Residual MLP block with adaptive LayerNorm conditioning (shift, scale, gate), as in MAR's flow/diffusion head.

    The modulation layer is zero-initialised by the owner so the block starts as the identity.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class AdaLNTransformerBlock(nn.Module):
    """DiT block: attention and MLP, each behind an adaptive LayerNorm (shift, scale) and a gate, all six read
    from a conditioning vector c (B, D) (the time). The owner zero-initialises the modulation (adaLN-Zero), so
    the block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), c (B, D) -> (B, T, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)  # (B, 1, D)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


def init_transformer_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases; LayerNorms at identity (DiT/MAR convention)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
