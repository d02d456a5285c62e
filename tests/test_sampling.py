import math

import pytest
import torch

from v2flow.sampling import masked_flow_sample, reveal_counts, solve_ode, time_grid
from v2flow.velocity import VelocityHead, flow_matching_losses, sample_time, shift_time, time_cdf, time_quantile

A = 0.7  # dx/dt = A * x  =>  x(0) = x(1) * exp(-A)


def linear_field(t, x):
    return A * x


@pytest.mark.parametrize(
    "solver, steps, tol",
    [
        ("euler", 200, 5e-3),
        ("midpoint", 20, 1e-3),
        ("rk4", 8, 1e-5),
        ("dopri5", 1, 1e-5),
        ("flow_match_euler", 200, 5e-3),
    ],
)
def test_solvers_match_closed_form(solver, steps, tol):
    x1 = torch.randn(5, 3)
    x0 = solve_ode(linear_field, x1, num_steps=steps, solver=solver)
    torch.testing.assert_close(x0, x1 * math.exp(-A), rtol=tol, atol=tol)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_fixed_solvers_converge_at_their_order(solver):
    x1 = torch.ones(1, 1)
    exact = math.exp(-A)
    e1 = (solve_ode(linear_field, x1, num_steps=4, solver=solver) - exact).abs().item()
    e2 = (solve_ode(linear_field, x1, num_steps=8, solver=solver) - exact).abs().item()
    order = {"euler": 1, "midpoint": 2, "rk4": 4}[solver]
    assert e1 / e2 == pytest.approx(2**order, rel=0.25)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_scheduler_matches_torchdiffeq_euler(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler steps on the same shifted grid as our Euler."""
    x1 = torch.randn(4, 2)
    field = lambda t, x: torch.sin(3 * t) * x + t  # noqa: E731
    a = solve_ode(field, x1, num_steps=6, solver="euler", shift=shift)
    b = solve_ode(field, x1, num_steps=6, solver="flow_match_euler", shift=shift)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_time_grid_and_shift():
    grid = time_grid(4, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    assert shift_time(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="unknown solver"):
        solve_ode(linear_field, torch.ones(1, 1), solver="heun")


@pytest.mark.parametrize("length, iters", [(64, 1), (64, 4), (64, 64), (5, 3), (16, 7)])
def test_reveal_counts(length, iters):
    counts = reveal_counts(length, iters)
    assert len(counts) == iters and sum(counts) == length and min(counts) >= 1


def test_reveal_counts_bad():
    with pytest.raises(ValueError, match="num_iters"):
        reveal_counts(4, 5)


def test_masked_flow_sample_reveals_each_patch_once():
    seen = []

    def conditions(patches, mask, t):
        seen.append((patches.clone(), mask.clone()))
        return torch.zeros(*mask.shape, 3), None

    out = masked_flow_sample(
        conditions,
        lambda x, t, c: torch.zeros_like(x),
        batch_size=2,
        num_patches=10,
        patch_dim=4,
        num_iters=3,
        num_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (2, 10, 4) and len(seen) == 3
    masks = [m for _, m in seen] + [torch.zeros(2, 10, dtype=torch.bool)]
    assert masks[0].all()
    assert all((masks[i + 1] <= masks[i]).all() for i in range(3)), "a revealed patch must stay revealed"
    revealed = [masks[i] & ~masks[i + 1] for i in range(3)]  # what iteration i revealed
    assert torch.equal(sum(r.long() for r in revealed), torch.ones(2, 10, dtype=torch.long)), "each patch once"
    assert [int(r[0].sum()) for r in revealed] == reveal_counts(10, 3)
    for i in range(1, 3):  # known patches are passed on unchanged (v = 0: each patch is its starting noise)
        known = ~masks[i]
        assert torch.equal(seen[i][0][known], out[known])


@pytest.mark.parametrize("stop_at", [1.0, 0.7, 0.3])
def test_stop_at_returns_the_one_step_estimate_of_a_point_mass_exactly(stop_at):
    # data = the point c: the exact rectified-flow velocity is v(x, t) = (x - c) / t, so the one-step estimate
    # x - t v is c at every level, while a 2-step Euler decode from noise does not reach it until t = 0
    c = torch.tensor([0.5, -1.0, 2.0])

    def velocity(x, t, cond):
        return (x - c) / t[:, None]

    kwargs = dict(batch_size=2, num_patches=3, patch_dim=3, num_steps=2, temperature=1.0, breakpoints=[0.8, 0.5])
    conditions = lambda patches, mask, t: (torch.zeros(*mask.shape, 1), None)  # noqa: E731
    out = masked_flow_sample(
        conditions, velocity, stop_at=stop_at, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.allclose(out, c.expand(2, 3, 3), atol=1e-5)


def test_stop_at_integrates_the_stretches_above_it_then_takes_one_estimate():
    levels = []

    def conditions(patches, mask, t):
        levels.append(t)
        return torch.full((*mask.shape, 1), t), None

    def velocity(x, t, cond):  # depends on x, t and the condition
        return 0.5 * x + t[:, None] * cond

    kwargs = dict(batch_size=1, num_patches=2, patch_dim=3, num_steps=4, breakpoints=[0.9, 0.6, 0.2])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = masked_flow_sample(conditions, velocity, stop_at=0.6, generator=g(), **kwargs)
    assert levels == pytest.approx([1.0, 0.9, 0.6])  # one transformer pass per stretch above 0.6, one for the estimate
    # by hand: Euler on the grid [1, 0.9, 0.75] then [0.9, 0.75, 0.6], then x - 0.6 v(x, 0.6)
    gen = g()  # the sampler draws the reveal order, then the starting noise
    order = torch.rand(1, 2, generator=gen).argsort(dim=1)
    x = torch.randn(2, 3, generator=gen)
    for grid, cond in (([1.0, 0.9], 1.0), ([0.9, 0.75, 0.6], 0.9)):
        x = solve_ode(
            lambda t, x, cond=cond: velocity(x, t.expand(2), torch.full((2, 1), cond)), x, grid=torch.tensor(grid)
        )
    x = x - 0.6 * velocity(x, torch.full((2,), 0.6), torch.full((2, 1), 0.6))
    assert torch.allclose(out[0, order[0]], x, atol=1e-6)
    with pytest.raises(ValueError, match="stop_at"):
        masked_flow_sample(conditions, velocity, stop_at=1.5, **kwargs)


def test_velocity_head_zero_init_and_loss():
    head = VelocityHead(patch_dim=4, cond_dim=8, width=16, depth=2)
    x, t, c = 2 * torch.randn(2000, 4), torch.rand(2000), torch.randn(2000, 8)
    assert torch.equal(head(x, t, c), torch.zeros(2000, 4))
    g = torch.Generator().manual_seed(0)
    loss = flow_matching_losses(head, x, c, batch_mul=3, generator=g)["flow"]
    # v = 0 at init: loss = E||noise - x0||^2 = 1 + mean(x0^2) (about 5 here) up to sampling error (~1.5 %)
    assert loss.item() == pytest.approx(1 + x.pow(2).mean().item(), rel=0.05)


@pytest.mark.parametrize("method", ["uniform", "logit_normal"])
def test_sample_time_range(method):
    t = sample_time(1000, method=method, shift=2.0, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    with pytest.raises(ValueError, match="unknown time sampling"):
        sample_time(3, method="beta")


@pytest.mark.parametrize("method", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_time_quantile_inverts_the_cdf_of_sample_time(method, shift):
    dist = {"method": method, "mean": 0.3, "std": 0.8, "shift": shift}
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(time_cdf(time_quantile(u, **dist), **dist), u, atol=1e-10)
    # the quantiles of sample_time's draws are where the CDF says (Kolmogorov-Smirnov distance ~ 1/sqrt(n))
    t = sample_time(40000, **dist, generator=torch.Generator().manual_seed(0)).double()
    empirical = (t[None, :] <= time_quantile(u, **dist)[:, None]).double().mean(1)
    assert (empirical - u).abs().max() < 0.01
    assert time_cdf(torch.tensor([0.0, 1.0], dtype=torch.float64), **dist).tolist() == [0.0, 1.0]


def test_flow_loss_takes_one_time_per_patch_or_per_draw():
    head = VelocityHead(patch_dim=4, cond_dim=8, width=16, depth=1)
    nn_init = torch.Generator().manual_seed(1)
    for p in head.parameters():  # not the zero init, so the loss depends on t
        p.data = torch.randn(p.shape, generator=nn_init) * 0.3
    x, c = torch.randn(5, 4), torch.randn(5, 8)
    t = torch.rand(5, generator=torch.Generator().manual_seed(2))

    def loss(times):
        return flow_matching_losses(head, x, c, batch_mul=3, t=times, generator=torch.Generator().manual_seed(0))[
            "flow"
        ]

    assert loss(t) == loss(t.repeat(3))  # (M,) is shared by the draws of a patch, laid out draw-major
    assert loss(t) != loss(t.repeat_interleave(3))
    with pytest.raises(ValueError, match=r"t must have shape \(M,\)"):
        loss(t[:4])
