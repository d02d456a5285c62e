"""Image encoder: a ViT over patches with N learned query tokens, giving a compact 1-D token sequence.

The number of queries N does not depend on the image size: patches and queries share one transformer and
only the query outputs leave the encoder.

With ``query_modulation`` (Selftok's choice for ordered tokens) every query position also gets its own
adaptive LayerNorm-style shift and scale before each block, computed from an embedding of its index, so
each position can specialise in its stretch of the noise schedule. The modulation is zero-initialised:
the encoder starts as the plain one.

With ``causal_queries`` (FlexTok's causal register mask, arXiv 2502.13967) query i attends to the patches
and to queries 0..i only, and the patches attend to patches only: token i is then a function of the image
and nothing computed for a later position, so a prefix of the tokens is the same whatever follows it.
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
        query_modulation: per-position shift/scale of the query stream before every block.
        causal_queries: query i sees the patches and queries 0..i only; patches see patches only.
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
        query_modulation: bool = False,
        causal_queries: bool = False,
    ) -> None:
        super().__init__()
        if num_tokens < 1 or depth < 1:
            raise ValueError(f"num_tokens and depth must be >= 1, got {num_tokens} and {depth}")
        self.num_patches = num_patches
        self.num_tokens = num_tokens
        self.causal_queries = causal_queries
        self.patch_embed = nn.Linear(patch_dim, hidden_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_dim))
        self.queries = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        self.blocks = nn.ModuleList(TransformerBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim)
        self.index_embed = nn.Parameter(torch.zeros(num_tokens, hidden_dim)) if query_modulation else None
        self.modulations = (
            nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim)) for _ in range(depth))
            if query_modulation
            else None
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.queries, std=0.02)
        if self.modulations is not None:
            nn.init.normal_(self.index_embed, std=0.02)
            for m in self.modulations:  # start as the identity
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patches) + self.pos_embed  # (B, L, D)
        x = torch.cat([x, self.queries.expand(x.shape[0], -1, -1)], dim=1)  # (B, L + N, D)
        attn_mask = self.attention_mask(x.device) if self.causal_queries else None  # (L + N, L + N)
        for i, block in enumerate(self.blocks):
            if self.modulations is not None:
                shift, scale = self.modulations[i](self.index_embed).chunk(2, dim=-1)  # (N, D) each
                queries = x[:, self.num_patches :] * (1 + scale) + shift  # (B, N, D)
                x = torch.cat([x[:, : self.num_patches], queries], dim=1)
            x = block(x, attn_mask=attn_mask)
        return self.norm(x[:, self.num_patches :])  # (B, N, D)

    def attention_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(L + N, L + N) bool, True where a row may attend to a column: patches see patches, query i sees
        the patches and queries 0..i (the ``causal_queries`` mask)."""
        size = self.num_patches + self.num_tokens
        mask = torch.ones(size, size, dtype=torch.bool, device=device).tril()  # queries: causal among queries
        mask[:, : self.num_patches] = True  # every position sees every patch
        mask[: self.num_patches, self.num_patches :] = False  # patches never see queries
        return mask
