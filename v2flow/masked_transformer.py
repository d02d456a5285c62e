"""MAR-style masked encoder-decoder: visual tokens + partly masked patches -> per-patch conditions.

The visual tokens (projected to the hidden width) form a prefix buffer. The encoder sees the buffer and the
visible patches only; the decoder sees the encoder's output with learned mask tokens in the masked
positions, and returns one condition vector per patch for the velocity head. A learned null buffer replaces
the tokens with probability ``cond_drop_prob`` during training, which enables classifier-free guidance.

Two token masks serve ordered tokens (:mod:`v2flow.ordering`):

* ``token_mask`` hides tokens: their embeddings are zeroed and no query attends to them, in the encoder
  and the decoder, so hidden tokens have no influence at all on the output (the noise-level visibility).
* ``token_keep`` truncates: tokens outside it are replaced by a learned truncation token, which the model
  does see (nested truncation: "the rest of the sequence is unknown").
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from .layers import TransformerBlock, init_transformer_weights


class MaskedTransformer(nn.Module):
    """(token embeddings (B, N, d), patches (B, L, P), mask (B, L)) -> conditions (B, L, D).

    Args:
        num_patches: L.
        patch_dim: P.
        num_tokens: N.
        token_dim: d, width of the visual-token embeddings (the LLM's embedding width).
        hidden_dim: D.
        encoder_depth, decoder_depth: transformer blocks on each side.
        num_heads: attention heads.
        mlp_ratio: MLP width as a multiple of D.
        cond_drop_prob: probability of replacing a sample's tokens with the null buffer in training.
        truncation: learn a truncation token (needed for ``token_keep``).
    """

    def __init__(
        self,
        *,
        num_patches: int,
        patch_dim: int,
        num_tokens: int,
        token_dim: int,
        hidden_dim: int,
        encoder_depth: int,
        decoder_depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cond_drop_prob: float = 0.1,
        truncation: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.num_tokens = num_tokens
        self.cond_drop_prob = cond_drop_prob
        self.token_proj = nn.Sequential(nn.Linear(token_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.token_pos = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        self.null_tokens = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        # only models trained with nested truncation carry the truncation token
        self.truncation_token = nn.Parameter(torch.zeros(1, 1, hidden_dim)) if truncation else None
        self.patch_embed = nn.Linear(patch_dim, hidden_dim)
        self.encoder_pos = nn.Parameter(torch.zeros(1, num_patches, hidden_dim))
        self.encoder = nn.ModuleList(TransformerBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, num_tokens + num_patches, hidden_dim))
        self.decoder = nn.ModuleList(TransformerBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_transformer_weights(self)
        for p in (self.token_pos, self.null_tokens, self.encoder_pos, self.mask_token, self.decoder_pos):
            nn.init.normal_(p, std=0.02)
        if self.truncation_token is not None:
            nn.init.normal_(self.truncation_token, std=0.02)

    def embed_tokens(
        self,
        token_embeddings: torch.Tensor,
        drop: torch.Tensor | None = None,
        token_keep: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N, d) -> (B, N, D); rows where `drop` (B,) is True get the learned null buffer instead, tokens
        outside `token_keep` (B, N) the truncation token, tokens outside `token_mask` (B, N) zeros."""
        tokens = self.token_proj(token_embeddings)
        if drop is not None:
            tokens = torch.where(drop[:, None, None], self.null_tokens.to(tokens.dtype), tokens)
        if token_keep is not None:
            if self.truncation_token is None:
                raise ValueError("token_keep needs a model built with truncation=True (trained with nested truncation)")
            tokens = torch.where(token_keep[..., None], tokens, self.truncation_token.to(tokens.dtype))
        tokens = tokens + self.token_pos
        if token_mask is not None:
            tokens = tokens * token_mask[..., None].to(tokens.dtype)
        return tokens

    def forward(
        self,
        token_embeddings: torch.Tensor,
        patches: torch.Tensor,
        mask: torch.Tensor,
        drop: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        token_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            token_embeddings: (B, N, d) visual-token embeddings.
            patches: (B, L, P) patch values; masked ones are never read.
            mask: (B, L) bool, True where the patch is unknown. Every row must mask the same number.
            drop: (B,) bool, True to use the null buffer (unconditional).
            token_mask: (B, N) bool, False for hidden tokens (no influence on the output).
            token_keep: (B, N) bool, False for truncated tokens (replaced by the truncation token).
        Returns:
            (B, L, D) per-patch conditions.
        """
        b, length = mask.shape
        fewest, most = torch.stack(torch.aminmax(mask.sum(1))).tolist()  # one device-to-host sync
        if fewest != most:
            raise ValueError("every sample must mask the same number of patches")
        num_visible = length - most
        tokens = self.embed_tokens(token_embeddings, drop, token_keep, token_mask)  # (B, N, D)
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible positions first
        visible_idx = order[:, :num_visible]  # (B, V)
        x = self.patch_embed(patches) + self.encoder_pos  # (B, L, D)
        visible = torch.gather(x, 1, repeat(visible_idx, "b v -> b v d", d=x.shape[-1]))  # (B, V, D)
        h = torch.cat([tokens, visible], dim=1)  # (B, N + V, D)
        encoder_keys = decoder_keys = None
        if token_mask is not None:
            encoder_keys = torch.cat([token_mask, token_mask.new_ones(b, num_visible)], dim=1)  # (B, N + V)
            decoder_keys = torch.cat([token_mask, token_mask.new_ones(b, length)], dim=1)  # (B, N + L)
        for block in self.encoder:
            h = block(h, encoder_keys)
        h = self.encoder_norm(h)
        # scatter the encoded visible patches back; mask tokens elsewhere
        full = self.mask_token.to(h.dtype).expand(b, length, -1).clone()  # (B, L, D)
        full.scatter_(1, repeat(visible_idx, "b v -> b v d", d=h.shape[-1]), h[:, self.num_tokens :])
        h = torch.cat([h[:, : self.num_tokens], full], dim=1) + self.decoder_pos  # (B, N + L, D)
        for block in self.decoder:
            h = block(h, decoder_keys)
        return self.decoder_norm(h[:, self.num_tokens :])  # (B, L, D)


class TokenConditions:
    """The sampler's ``conditions(patches (B, L, P), mask (B, L), t)`` for given token embeddings (B, N, d):
    the masked transformer's per-patch conditions (B, L, D) from the tokens visible at noise level t (ordered
    mode), a prefix's tail replaced by the truncation token (`keep` (B, N)) or hidden (`hidden_tail` (B, N)),
    and with guidance the unconditional conditions of the same call."""

    def __init__(self, decoder, schedule, embeddings, keep, hidden_tail, cfg_scale: float) -> None:
        self.decoder, self.schedule, self.embeddings = decoder, schedule, embeddings
        self.keep, self.hidden_tail, self.cfg_scale = keep, hidden_tail, cfg_scale

    def visible_at(self, t: float) -> torch.Tensor | None:
        """(B, N) bool tokens in play at noise level t, or None for all."""
        visible = self.hidden_tail
        if self.schedule is not None:
            b, device = self.embeddings.shape[0], self.embeddings.device
            at_t = self.schedule.visibility(torch.full((b,), t)).to(device)  # (B, N)
            visible = at_t if visible is None else visible & at_t
        return visible

    def __call__(self, patches: torch.Tensor, mask: torch.Tensor, t: float):
        visible, keep, b = self.visible_at(t), self.keep, self.embeddings.shape[0]
        if self.cfg_scale == 1.0:
            return self.decoder(self.embeddings, patches, mask, token_mask=visible, token_keep=keep), None
        both = self.decoder(
            self.embeddings.repeat(2, 1, 1),
            patches.repeat(2, 1, 1),
            mask.repeat(2, 1),
            torch.arange(2 * b, device=patches.device) >= b,  # the second half drops its tokens
            token_mask=None if visible is None else visible.repeat(2, 1),
            token_keep=None if keep is None else keep.repeat(2, 1),
        )
        return both[:b], both[b:]
