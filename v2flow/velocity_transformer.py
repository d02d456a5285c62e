"""A velocity network that sees the whole image: v(x_t, t, c) over all patches of an image at once.

The per-patch MLP of V2Flow/MAR (:class:`v2flow.velocity.VelocityHead`) predicts each patch's velocity from
that patch alone; in pixel space nothing makes neighbouring patches agree. Here every patch is a token built
from its noisy values, its condition from the masked transformer and its position, and DiT blocks
(attention over all patches, time by adaLN-Zero) predict every patch's velocity together.

It is called like the per-patch head, on rows (M, P) with M = B * L: the rows of one image are consecutive,
in grid order, and share one time. Time convention: t = 1 noise, t = 0 data (see :mod:`v2flow.velocity`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .layers import AdaLNTransformerBlock, TimestepEmbedder, init_transformer_weights, modulate

VELOCITY_DECODERS = ("mlp", "transformer")


class ImageVelocityTransformer(nn.Module):
    """(x_t (B*L, P), t (B*L,), cond (B*L, D)) -> velocity (B*L, P), attending over the L patches of each image.

    Args:
        patch_dim: P, values per patch.
        cond_dim: D, width of the per-patch condition.
        num_patches: L, patches per image.
        width: transformer width.
        depth: DiT blocks.
        num_heads: attention heads (`width` must be divisible by it).
        mlp_ratio: MLP width as a multiple of `width`.
    """

    def __init__(
        self,
        *,
        patch_dim: int,
        cond_dim: int,
        num_patches: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if width % num_heads:
            raise ValueError(f"velocity width {width} is not divisible by {num_heads} heads")
        self.num_patches = num_patches
        self.input_proj = nn.Linear(patch_dim, width)
        self.cond_proj = nn.Linear(cond_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, num_patches, width))
        self.time_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(AdaLNTransformerBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the velocity starts at 0
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _image_times(self, t: torch.Tensor, num_images: int) -> torch.Tensor:
        """(B,) one time per image from a row time (M,), a broadcast one (stride 0) or a 0-dim one."""
        if t.ndim == 0 or (t.numel() > 1 and t.stride(0) == 0):
            return t.reshape(-1)[:1].expand(num_images)
        return t.reshape(num_images, self.num_patches)[:, 0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m, length = x.shape[0], self.num_patches
        if m % length:
            raise ValueError(
                f"the whole-image velocity network takes all {length} patches of each image ({m} rows given); "
                "decode with num_iters=1 and train with every patch masked (mask_ratio_min=1)"
            )
        b = m // length
        h = rearrange(self.input_proj(x) + self.cond_proj(cond), "(b l) w -> b l w", l=length) + self.pos
        c = self.time_embed(self._image_times(t, b))  # (B, W)
        for block in self.blocks:
            h = block(h, c)  # (B, L, W)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)
        v = self.output(modulate(self.final_norm(h), shift, scale))  # (B, L, P)
        return rearrange(v, "b l p -> (b l) p")
