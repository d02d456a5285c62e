"""Rectified-flow velocity head and its loss.

Time convention (used everywhere in v2flow): t = 0 is data, t = 1 is noise,
    x_t = (1 - t) * x0 + t * noise,        velocity v = dx_t/dt = noise - x0.
Sampling integrates dx/dt = v from t = 1 down to t = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from .layers import AdaLNResBlock, TimestepEmbedder, draw, modulate

TIME_SAMPLING = ("uniform", "logit_normal", "mixture")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift (SD3): shift > 1 moves time towards the noise end, t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def time_quantile(
    u: torch.Tensor,
    *,
    method: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    uniform_share: float = 0.1,
) -> torch.Tensor:
    """The training time whose CDF is u (same shape, u in [0, 1]): the inverse of :func:`time_cdf`."""
    if method == "uniform":
        t = u
    elif method == "logit_normal":
        t = torch.sigmoid(mean + std * torch.special.ndtri(u))
    elif method == "mixture":  # no closed form: bisection on the monotone CDF (60 halvings: below float64 spacing)
        lo, hi = torch.zeros_like(u, dtype=torch.float64), torch.ones_like(u, dtype=torch.float64)
        target = u.double()
        for _ in range(60):
            mid = (lo + hi) / 2
            below = _unshifted_cdf(mid, method, mean, std, uniform_share) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = ((lo + hi) / 2).to(u.dtype)
    else:
        raise ValueError(f"unknown time sampling {method!r}; choose one of {TIME_SAMPLING}")
    return shift_time(t, shift)


def _unshifted_cdf(t: torch.Tensor, method: str, mean: float, std: float, uniform_share: float) -> torch.Tensor:
    if method == "uniform":
        return t
    logit_normal = torch.special.ndtr((torch.logit(t) - mean) / std)
    if method == "logit_normal":
        return logit_normal
    if method == "mixture":
        return (1 - uniform_share) * logit_normal + uniform_share * t
    raise ValueError(f"unknown time sampling {method!r}; choose one of {TIME_SAMPLING}")


def time_cdf(
    t: torch.Tensor,
    *,
    method: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    uniform_share: float = 0.1,
) -> torch.Tensor:
    """P(T <= t) under the training time distribution of :func:`sample_time` (same shape, t in [0, 1])."""
    t = t / (shift - (shift - 1) * t)  # undo the shift
    return _unshifted_cdf(t, method, mean, std, uniform_share)


def sample_time(
    n: int,
    *,
    method: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    uniform_share: float = 0.1,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n,) training times in [0, 1), then shifted: uniform; sigmoid of a normal (logit-normal); or
    ``mixture``, logit-normal with a `uniform_share` of uniform draws (FlowMo's thick tails: the logit-normal
    alone puts 0.16 % of its draws above t = 0.95, where decoding starts)."""
    if method == "uniform":
        t = draw(torch.rand, n, generator=generator, device=device)
    elif method in ("logit_normal", "mixture"):
        t = torch.sigmoid(mean + std * draw(torch.randn, n, generator=generator, device=device))
        if method == "mixture":
            uniform = draw(torch.rand, n, generator=generator, device=device)
            pick = draw(torch.rand, n, generator=generator, device=device) < uniform_share
            t = torch.where(pick, uniform, t)
    else:
        raise ValueError(f"unknown time sampling {method!r}; choose one of {TIME_SAMPLING}")
    return shift_time(t, shift)


class VelocityHead(nn.Module):
    """Per-patch MLP v(x_t, t, c) with adaLN conditioning on time and the patch condition (MAR's flow head).

    Args:
        patch_dim: P, values per patch.
        cond_dim: D, width of the per-patch condition.
        width: MLP width.
        depth: residual adaLN blocks.
    """

    def __init__(self, *, patch_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(patch_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # zero-init modulation and output: every block starts as the identity and v starts at 0
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        nn.init.zeros_(self.final_modulation[-1].weight)
        nn.init.zeros_(self.final_modulation[-1].bias)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (M, P) noisy patches, t (M,) times (or a 0-dim time of every row), cond (M, D) -> velocity (M, P)."""
        if t.ndim == 0 or (t.numel() > 1 and t.stride(0) == 0):
            # one time for all rows (a sampler's `t.expand(M)`): embed it once, not M times
            t_emb = self.time_embed(t.reshape(-1)[:1])  # (1, W)
        else:
            t_emb = self.time_embed(t)  # (M, W)
        c = t_emb + self.cond_embed(cond)  # (M, W)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output(modulate(self.final_norm(h), shift, scale))


def flow_matching_losses(
    head: nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    batch_mul: int = 4,
    time_sampling: str = "logit_normal",
    time_mean: float = 0.0,
    time_std: float = 1.0,
    time_shift: float = 1.0,
    time_uniform_share: float = 0.1,
    x0_weight: float = 0.0,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Rectified-flow loss ||v(x_t, t, c) - (noise - x0)||^2 with `batch_mul` noise draws per patch, and with
    `x0_weight` > 0 a loss on the one-step estimate of the clean patch, ||(x_t - t v) - x0||^2 (what the
    fidelity decode returns; DiTo / epsilon-VAE), weighted, under the name ``"x0"``.

    Args:
        x0: (M, P) clean patches; cond: (M, D) their conditions.
        t: given noise levels (ordered tokens: the condition was computed for them), (M,) shared by the
            `batch_mul` draws of a patch or (batch_mul * M,) one per draw, laid out draw-major as the
            repeated patches; drawn when None.
    Returns:
        {"flow": mean-squared velocity error, and "x0" with `x0_weight` > 0}.
    """
    x0 = repeat(x0, "m p -> (r m) p", r=batch_mul)
    cond = repeat(cond, "m d -> (r m) d", r=batch_mul)
    if t is None:
        t = sample_time(
            x0.shape[0],
            method=time_sampling,
            mean=time_mean,
            std=time_std,
            shift=time_shift,
            uniform_share=time_uniform_share,
            device=x0.device,
            generator=generator,
        )
    elif t.shape == (x0.shape[0] // batch_mul,):
        t = repeat(t.to(x0), "m -> (r m)", r=batch_mul)
    elif t.shape == (x0.shape[0],):
        t = t.to(x0)
    else:
        raise ValueError(
            f"t must have shape (M,) = ({x0.shape[0] // batch_mul},) or (batch_mul * M,) = ({x0.shape[0]},), "
            f"got {tuple(t.shape)}"
        )
    noise = draw(torch.randn, x0.shape, generator=generator, device=x0.device).to(x0.dtype)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    v = head(x_t, t, cond)
    losses = {"flow": F.mse_loss(v, noise - x0)}
    if x0_weight > 0:
        losses["x0"] = x0_weight * F.mse_loss(x_t - t[:, None] * v, x0)
    return losses
