"""Image encoder: a ViT over patches with N learned query tokens, giving a compact 1-D token sequence.

The number of queries N does not depend on the image size: patches and queries share one transformer and
only the query outputs leave the encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import TransformerBlock, init_transformer_weights


class QueryEncoder(nn.Module):
    """Patches (B, L, P) -> query features (B, N, D).

    Args:
        num_patches: L, the number of patches per image.
        patch_dim: P, values per patch (channels * patch_size**2).
        num_tokens: N, the number of learned queries (output tokens).
        hidden_dim: D, transformer width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width as a multiple of D.
    """

    def __init__(
        self,
        *,
        num_patches: int,
        patch_dim: int,
        num_tokens: int,
        hidden_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if num_tokens < 1 or depth < 1:
            raise ValueError(f"num_tokens and depth must be >= 1, got {num_tokens} and {depth}")
        self.num_patches = num_patches
        self.patch_embed = nn.Linear(patch_dim, hidden_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_dim))
        self.queries = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        self.blocks = nn.ModuleList(TransformerBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patches) + self.pos_embed  # (B, L, D)
        x = torch.cat([x, self.queries.expand(x.shape[0], -1, -1)], dim=1)  # (B, L + N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, self.num_patches :])  # (B, N, D)
