"""Sampling: timestep grids, ODE solvers picked by name, the MAR mask schedule and classifier-free guidance.

Time convention: t = 1 is noise, t = 0 is data; the ODE dx/dt = v(x, t) is integrated from 1 to 0 and the
state is kept in float32 whatever the model's dtype.

Solvers: torchdiffeq's ``euler``, ``midpoint``, ``rk4`` (fixed grid: ``num_steps`` steps on the shifted
grid) and ``dopri5`` (adaptive, ``rtol``/``atol``), and ``flow_match_euler``: diffusers'
``FlowMatchEulerDiscreteScheduler`` stepping on the same grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from einops import repeat
from torchdiffeq import odeint

from .layers import draw
from .velocity import shift_time

FIXED_SOLVERS = ("euler", "midpoint", "rk4")
SOLVERS = (*FIXED_SOLVERS, "dopri5", "flow_match_euler")

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (t scalar tensor, x (M, P)) -> (M, P)


def time_grid(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_steps + 1,) times from 1 (noise) down to 0 (data), uniform then shifted."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float32), shift)


def solve_ode(
    velocity: VelocityFn,
    x1: torch.Tensor,
    *,
    num_steps: int = 8,
    solver: str = "euler",
    shift: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(t, x) from t = 1 (x1, noise) to t = 0 and return x0.

    Args:
        velocity: ``f(t, x)`` with t a 0-dim float32 tensor, x (M, P) -> (M, P).
        x1: (M, P) starting noise.
        num_steps: steps of the fixed-grid solvers and the scheduler (ignored by ``dopri5``, which is adaptive).
        solver: one of ``SOLVERS``.
        shift: timestep shift of the grid (SD3 convention).
        rtol, atol: tolerances of ``dopri5``. Its adaptive step size is shared by the whole batch, so a sample
            decoded alone and in a batch can differ by up to the tolerances.
        grid: explicit decreasing times for the fixed-grid solvers (replaces ``num_steps``/``shift``); its
            end points bound ``dopri5``. It lets a caller integrate one stretch [t_a, t_b] of the trajectory.
    """
    x1 = x1.float()
    if grid is not None:
        if grid.ndim != 1 or grid.numel() < 2 or bool((grid[1:] >= grid[:-1]).any()):
            raise ValueError("grid must hold >= 2 strictly decreasing times")
        if solver == "flow_match_euler" and float(grid[-1]) != 0.0:
            raise ValueError("flow_match_euler integrates down to t = 0 only; use euler (the same steps) on a stretch")

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return velocity(t, x).float()

    if solver in FIXED_SOLVERS:
        times = time_grid(num_steps, shift, x1.device) if grid is None else grid.to(x1.device, torch.float32)
        return odeint(f, x1, times, method=solver)[-1]
    if solver == "dopri5":
        if shift != 1.0:
            raise ValueError("shift only changes the grid of fixed-step solvers; use shift=1.0 with dopri5")
        ends = (1.0, 0.0) if grid is None else (float(grid[0]), float(grid[-1]))
        t = torch.tensor(ends, device=x1.device)
        return odeint(f, x1, t, method="dopri5", rtol=rtol, atol=atol)[-1]
    if solver == "flow_match_euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        # the scheduler shifts the uniform sigmas itself; an explicit grid is used as given
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift if grid is None else 1.0)
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1)[:-1] if grid is None else grid[:-1].cpu().float()
        scheduler.set_timesteps(sigmas=sigmas.tolist(), device=x1.device)
        x = x1
        for timestep in scheduler.timesteps:
            t = (timestep / scheduler.config.num_train_timesteps).float()
            x = scheduler.step(f(t, x), timestep, x).prev_sample.float()
        return x
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")


def _stretches(
    num_steps: int, shift: float, breakpoints: Sequence[float], solver: str, end: float = 0.0
) -> list[torch.Tensor | None]:
    """The time grids of the stretches between breakpoints, from t = 1 down to `end` ([]: `end` is 1;
    [None]: one stretch down to 0, the solver's own grid)."""
    if end >= 1.0:
        return []
    cuts = sorted({float(b) for b in breakpoints if end < float(b) < 1.0}, reverse=True)
    if not cuts and end == 0.0:
        return [None]
    if solver == "flow_match_euler":
        raise ValueError(
            "ordered decoding and stop_at > 0 integrate stretch by stretch; use solver='euler' (the same steps)"
        )
    ends = [1.0, *cuts, end]
    if solver == "dopri5":
        return [torch.tensor([a, b]) for a, b in zip(ends[:-1], ends[1:], strict=True)]
    base = time_grid(num_steps, shift).tolist()
    grids = []
    for a, b in zip(ends[:-1], ends[1:], strict=True):
        inner = [t for t in base if b < t < a]
        grids.append(torch.tensor([a, *inner, b]))
    return grids


def reveal_counts(num_patches: int, num_iters: int) -> list[int]:
    """How many patches each mask-schedule iteration reveals (MAR's cosine schedule; sums to num_patches).

    After iteration i, ``floor(L * cos(pi/2 * (i + 1) / num_iters))`` patches stay masked, keeping at least
    one patch for each iteration still to come.
    """
    if not 1 <= num_iters <= num_patches:
        raise ValueError(f"num_iters must be in [1, {num_patches}] (the number of patches), got {num_iters}")
    counts, masked = [], num_patches
    for i in range(num_iters):
        remaining = math.floor(num_patches * math.cos(math.pi / 2 * (i + 1) / num_iters))
        remaining = min(max(remaining, num_iters - 1 - i), masked - 1)
        counts.append(masked - remaining)
        masked = remaining
    return counts


def _field(
    conditions: Callable,
    velocity: Callable,
    patches: torch.Tensor,
    known: torch.Tensor,
    reveal: torch.Tensor,
    t0: float,
    cfg_scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The velocity field ``f(t, x)`` of the patches in `reveal` (B, n), with the conditions the transformer
    gives at noise level t0 for the `patches` (B, L, P) `known` (B, L) so far (guided when cfg_scale != 1)."""
    cond, null_cond = conditions(patches, ~known, t0)
    pick = repeat(reveal, "b n -> b n d", d=cond.shape[-1])
    c = torch.gather(cond, 1, pick).flatten(0, 1)  # (B*n, D)
    guided = cfg_scale != 1.0
    if guided:
        if null_cond is None:
            raise ValueError("cfg_scale != 1 needs unconditional conditions")
        c = torch.cat([c, torch.gather(null_cond, 1, pick).flatten(0, 1)])

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.expand(c.shape[0])
        if not guided:
            return velocity(x, tt, c)
        v_cond, v_null = velocity(torch.cat([x, x]), tt, c).chunk(2)
        return v_null + cfg_scale * (v_cond - v_null)

    return field


def masked_flow_sample(
    conditions: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    num_patches: int,
    patch_dim: int,
    num_steps: int = 8,
    num_iters: int = 1,
    solver: str = "euler",
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    temperature: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    breakpoints: Sequence[float] = (),
    stop_at: float = 0.0,
    grid_order: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Generate patches over `num_iters` mask-schedule iterations, integrating one ODE per iteration.

    Each iteration runs the masked transformer once (twice with guidance) on the patches known so far,
    then integrates the flow ODE for the patches it reveals, in a random order drawn from `generator`.
    With `breakpoints` (ordered tokens: the noise levels where the visible tokens change) the trajectory is
    cut into stretches and the transformer runs once per stretch and iteration, never per ODE step; the
    fixed-grid solvers then step on the union of their grid and the breakpoints.

    Args:
        conditions: ``(patches (B, L, P), mask (B, L), t) -> (cond (B, L, D), null_cond (B, L, D) or None)``,
            t the noise level at the start (noisy end) of the stretch.
        velocity: the velocity head, ``(x (M, P), t (M,), cond (M, D)) -> (M, P)``.
        cfg_scale: guidance scale; 1.0 disables guidance (no unconditional pass).
        temperature: scale of the starting noise (MAR's sampling temperature): 1 samples the learned
            distribution, smaller values trade diversity for fidelity to the condition.
        stop_at: integrate each iteration's ODE only down to this noise level, then return the velocity
            head's one-step data estimate there, ``x - stop_at * v(x, stop_at)`` (with the conditions at
            ``stop_at``). 0 integrates to the data; 1 returns the estimate from the starting noise.
        grid_order: reveal the patches in grid order instead of a random one (one iteration only): the rows
            given to `velocity` are then each image's patches in grid order, as a whole-image network needs.
    Returns:
        (B, L, P) float32 patches.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if not 0.0 <= stop_at <= 1.0:
        raise ValueError(f"stop_at must be a noise level in [0, 1], got {stop_at}")
    if grid_order and num_iters != 1:
        raise ValueError(f"grid_order reveals every patch at once: use num_iters=1, got {num_iters}")
    patches = torch.zeros(batch_size, num_patches, patch_dim, device=device)
    known = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    if grid_order:
        order = torch.arange(num_patches, device=device).expand(batch_size, num_patches)
    else:
        order = draw(torch.rand, batch_size, num_patches, generator=generator, device=device).argsort(dim=1)
    stretches = _stretches(num_steps, shift, breakpoints, solver, end=stop_at)  # the estimate replaces the rest
    start = 0
    for count in reveal_counts(num_patches, num_iters):
        reveal = order[:, start : start + count]  # (B, n)
        start += count
        x = temperature * draw(torch.randn, batch_size * count, patch_dim, generator=generator, device=device)
        for grid in stretches:
            t0 = float(grid[0]) if grid is not None else 1.0
            field = _field(conditions, velocity, patches, known, reveal, t0, cfg_scale)
            x = solve_ode(field, x, num_steps=num_steps, solver=solver, shift=shift, rtol=rtol, atol=atol, grid=grid)
        if stop_at > 0.0:  # the one-step data estimate at stop_at
            t = torch.tensor(stop_at, device=x.device)
            x = x - stop_at * _field(conditions, velocity, patches, known, reveal, stop_at, cfg_scale)(t, x).float()
        x0 = x
        patches.scatter_(1, repeat(reveal, "b n -> b n p", p=patch_dim), x0.view(batch_size, count, patch_dim))
        known.scatter_(1, reveal, True)
    return patches
