"""Selftok-style token ordering (arXiv 2505.07538): the map between token positions and noise levels, and
the prefix lengths of nested truncation.

Time convention (the package's, stated once): t = 1 is pure noise, t = 0 is data; sampling integrates from
t = 1 to t = 0. Write s = 1 - t for the progress along that trajectory.

The schedule is a monotone piecewise-linear map F from s to the fraction of tokens in play: F(0) = 0,
F(1) = 1, linear within each of S equal stretches of the trajectory, stretch j receiving the share
``stage_tokens[j] / sum(stage_tokens)`` of the tokens. The default shares are Selftok's 512-token
schedule: 16, 48, 72, 184 and 192 tokens over the five fifths from noise to clean, so few tokens go to
the noisiest stretch.

Token i enters at noise level ``t_i = 1 - F^{-1}(i / N)``: t_0 = 1 (token 0, the coarsest, is in play from
the start) and t_i decreases with i. At noise level t the decoder may see the prefix ``{i : t_i >= t}``,
whose length is ``k(t) = min(floor(N * F(1 - t)) + 1, N)``; so k(1) = 1 and k(0) = N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layers import draw

SELFTOK_STAGES = (16.0, 48.0, 72.0, 184.0, 192.0)
PREFIX_SAMPLING = ("uniform", "pow2")
TRUNCATION_TAILS = ("token", "hidden")
_SLACK = 1e-4  # in tokens, see OrderSchedule.num_visible


class OrderSchedule:
    """The token <-> noise-level map of ordered tokens.

    Args:
        num_tokens: N, the sequence length.
        stage_tokens: relative token counts of S equal stretches of the trajectory, noisiest first
            (default: Selftok's 16, 48, 72, 184, 192).
    """

    def __init__(self, num_tokens: int, stage_tokens: Sequence[float] = SELFTOK_STAGES) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        weights = torch.as_tensor(list(stage_tokens), dtype=torch.float64)
        if weights.ndim != 1 or weights.numel() < 1:
            raise ValueError(f"stage_tokens must be a non-empty list of numbers, got {stage_tokens!r}")
        if not bool((weights > 0).all()):
            raise ValueError(
                f"every stage needs a positive token share (a strictly monotone map), got {stage_tokens!r}"
            )
        self.num_tokens = num_tokens
        self.stage_tokens = tuple(float(w) for w in weights)
        self.knots_s = torch.linspace(0.0, 1.0, weights.numel() + 1, dtype=torch.float64)  # (S + 1,)
        self.knots_f = torch.cat([weights.new_zeros(1), weights.cumsum(0) / weights.sum()])  # (S + 1,)
        self.knots_f[-1] = 1.0

    @property
    def num_stages(self) -> int:
        return len(self.stage_tokens)

    def token_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """F(1 - t): the fraction of tokens in play at noise level t (same shape as t, in [0, 1])."""
        t = _check_times(t)
        return _interp(1.0 - t.double(), self.knots_s, self.knots_f).float()

    def num_visible(self, t: torch.Tensor) -> torch.Tensor:
        """k(t): the length of the token prefix the decoder may see at noise level t (long, in [1, N])."""
        t = _check_times(t)
        fraction = _interp(1.0 - t.double(), self.knots_s, self.knots_f)
        # slack of _SLACK token: a float32 t at t_i (which rounding may put just above it) counts token i as visible
        k = torch.floor(fraction * self.num_tokens + _SLACK).long() + 1
        return k.clamp(1, self.num_tokens).to(t.device)

    def token_times(self) -> torch.Tensor:
        """(N,) float32: t_i, the noise level at which token i enters; t_0 = 1, decreasing in i."""
        fractions = torch.arange(self.num_tokens, dtype=torch.float64) / self.num_tokens
        return (1.0 - _interp(fractions, self.knots_f, self.knots_s)).float()

    def visibility_interval(
        self, t: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stretch (lo, hi] of noise levels around each t (B,) over which the visible prefix stays that of t.

        Args:
            t: (B,) noise levels.
            lengths: (B,) long prefix lengths in [1, N] that each sample keeps (nested truncation with a hidden
                tail, see :meth:`visibility`); None keeps all N. A truncated sample's prefix stops growing at
                its length, so its stretch runs down to 0 once the whole prefix is in play.

        Returns:
            lo, hi: (B,) float32 with lo <= t <= hi; ``visibility`` is the same at every level in (lo, hi]
            (up to float32 rounding at the ends).
        """
        k, cap = self._visible_count(t, lengths)  # (B,) each: visible and most visible, in [1, N], on t's device
        hi = torch.where(k > 1, self._enter_level(k - 1), torch.ones_like(k, dtype=torch.float64))
        lo = torch.where(k < cap, self._enter_level(k), torch.zeros_like(k, dtype=torch.float64))
        return lo.float(), hi.float()

    def _enter_level(self, j: torch.Tensor) -> torch.Tensor:
        """float64: the highest noise level at which ``num_visible`` counts token j (>= 1) as visible."""
        fraction = ((j.double() - _SLACK) / self.num_tokens).clamp(0.0, 1.0)
        return 1.0 - _interp(fraction, self.knots_f, self.knots_s)

    def visibility(self, t: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) bool: which tokens the decoder may see at per-sample noise levels t (B,); with `lengths` (B,)
        (samples that keep only a prefix), only the tokens of that prefix: min(k(t), length) of them."""
        k, _ = self._visible_count(t, lengths)  # (B,)
        return torch.arange(self.num_tokens, device=k.device)[None, :] < k[:, None]

    def _visible_count(self, t: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) long each: how many tokens are visible at t, and how many a sample keeps (N without `lengths`)."""
        k = self.num_visible(t)  # (B,)
        if lengths is None:
            return k, torch.full_like(k, self.num_tokens)
        lengths = torch.as_tensor(lengths, device=k.device).long()
        if lengths.shape != k.shape or bool(((lengths < 1) | (lengths > self.num_tokens)).any()):
            raise ValueError(f"lengths must be (B,) = {tuple(k.shape)} prefix lengths in [1, {self.num_tokens}]")
        return torch.minimum(k, lengths), lengths

    def __repr__(self) -> str:
        return f"OrderSchedule(num_tokens={self.num_tokens}, stage_tokens={self.stage_tokens})"


def sample_prefix_lengths(
    batch_size: int,
    num_tokens: int,
    mode: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(B,) long prefix lengths in [1, N] for nested truncation.

    Args:
        mode: ``"uniform"`` over 1..N, or ``"pow2"``: uniform over the powers of two below N, and N itself.
    """
    if mode not in PREFIX_SAMPLING:
        raise ValueError(f"unknown prefix sampling {mode!r}; choose one of {PREFIX_SAMPLING}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if mode == "uniform":
        return draw(torch.randint, 1, num_tokens + 1, (batch_size,), generator=generator, device=device)
    choices = sorted({2**i for i in range(num_tokens.bit_length()) if 2**i < num_tokens} | {num_tokens})
    pick = draw(torch.randint, len(choices), (batch_size,), generator=generator, device=device)
    return torch.tensor(choices, device=device)[pick]


def _check_times(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError("noise levels t must lie in [0, 1] (t = 1 noise, t = 0 data)")
    return t


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of the increasing knots (xp, fp) at x (any shape), float64."""
    xp, fp = xp.to(x.device), fp.to(x.device)
    flat = x.reshape(-1).clamp(float(xp[0]), float(xp[-1]))
    j = torch.searchsorted(xp, flat, right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[j - 1], xp[j], fp[j - 1], fp[j]
    out = f0 + (f1 - f0) * (flat - x0) / (x1 - x0)
    return out.reshape(x.shape)
