"""FLOP counting, MFU arithmetic, the speed benchmark's helpers, and the performance paths that must keep the
numbers (closed-form entropy gradient, one time embedding per ODE step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer
from torch import nn

from v2flow.eval import speed
from v2flow.eval.flops import count_flops, linear_flops, matmul_peak, mfu
from v2flow.resampler import _ScoresAndEntropies
from v2flow.velocity import VelocityHead

# ------------------------------------------------------------------ counting


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_is_2nab_and_backward_doubles_it(bias):
    n, a, b = 5, 7, 3
    layer = nn.Linear(a, b, bias=bias)
    x = torch.randn(n, a, requires_grad=True)
    forward = count_flops(lambda: layer(x))
    assert forward.total == 2 * n * a * b == linear_flops(n, a, b)
    both = count_flops(lambda: layer(x).sum().backward())
    assert both.total == 3 * 2 * n * a * b == linear_flops(n, a, b, backward=True)  # input and weight gradients


def test_frozen_input_backward_counts_only_the_weight_gradient():
    n, a, b = 4, 6, 8
    layer = nn.Linear(a, b)
    x = torch.randn(n, a)  # no gradient for the input: one backward product
    assert count_flops(lambda: layer(x).sum().backward()).total == 2 * 2 * n * a * b


def test_per_module_counts_name_the_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    counts = count_flops(lambda: model(x), depth=2)
    assert counts.by_module["Global"] == counts.total == 2 * 3 * (4 * 8 + 8 * 2)
    assert counts.by_module["Sequential.0"] == 2 * 3 * 4 * 8
    assert counts.by_module["Sequential.2"] == 2 * 3 * 8 * 2
    assert set(counts.by_op) == {"addmm"}


def test_attention_is_counted_on_cpu():
    b, h, s, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    # 4 b h s^2 d: scores and the weighted sum, whichever kernel (CPU flash or math) runs
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)).total == 4 * b * h * s * s * d


# ------------------------------------------------------------------ MFU


def test_mfu_arithmetic():
    # 1 TFLOP per step in 2 s against a 1 TFLOP/s peak: half the peak
    assert mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    assert mfu(3e9, 0.5, 12e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be > 0"):
        mfu(1e9, 0.0, 1e9)


def test_matmul_peak_is_a_positive_rate():
    peak = matmul_peak(size=64, repeats=1, min_seconds=0.01)
    assert math.isfinite(peak) and peak > 0


def test_benchmark_helpers():
    assert speed.loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    points = [
        {"seconds_per_image": 1.0, "psnr": 20.0},
        {"seconds_per_image": 2.0, "psnr": 19.0},  # slower and worse: off the front
        {"seconds_per_image": 3.0, "psnr": 25.0},
    ]
    assert [p["psnr"] for p in speed.pareto(points)] == [20.0, 25.0]
    env = speed.Env("cpu", "fp32", False)
    nbytes = 1 << 20

    def two_live_buffers():
        a = torch.empty(nbytes, dtype=torch.uint8)
        b = torch.empty(nbytes, dtype=torch.uint8)
        del a, b

    assert speed.peak_memory(two_live_buffers, env) == 2 * nbytes


def test_speed_sections_are_kept_apart_per_command_and_setting(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    result = {"command": "python benchmarks/speed.py quality-cost", "plot": str(tmp_path / "results" / "qc.png")}
    key, section = speed.markdown_section("quality-cost", result, "| a |", speed.Env("cpu", "fp32", False), report)
    assert key == "speed:quality-cost:cpu-fp32" and "| a |" in section
    assert "![quality vs decode cost](results/qc.png)" in section, "the plot is linked relative to the report"
    key_bf16, _ = speed.markdown_section("mfu", {"command": "c"}, "", speed.Env("cpu", "bf16", True), report)
    assert key_bf16 == "speed:mfu:cpu-bf16-compile"


# ------------------------------------------------------------------ performance paths keep the numbers


def _entropies_by_autograd(query, table, temperature):
    logits = query @ table.T / temperature
    probs = logits.softmax(-1)
    sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    mean = probs.flatten(0, 1).mean(0)
    return logits.argmax(-1), probs, sample, -(mean * mean.clamp_min(1e-12).log()).sum()


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.1, -0.1)])
def test_closed_form_entropy_gradient_matches_autograd(weights):
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(3, 5, 8, generator=g, dtype=torch.float64), dim=-1)
    table = F.normalize(torch.randn(40, 8, generator=g, dtype=torch.float64), dim=-1)
    results = []
    for fn in (_entropies_by_autograd, _ScoresAndEntropies.apply):
        q, t = query.clone().requires_grad_(), table.clone().requires_grad_()
        indices, probs, sample, batch = fn(q, t, 0.05)
        (weights[0] * sample + weights[1] * batch).backward()
        results.append((indices, probs, sample, batch, q.grad, t.grad))
    for ref, new in zip(*results, strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-12)


def test_projected_training_loss_parts_unchanged_by_the_closed_form():
    tok = make_tokenizer().train()
    features = torch.randn(4, tok.config["num_tokens"], tok.config["encoder_dim"])
    out = tok.resampler(features)
    _, probs, sample, batch = _entropies_by_autograd(
        tok.resampler.queries(features), tok.resampler.unit_table(), tok.resampler.temperature
    )
    torch.testing.assert_close(out.probs, probs)
    torch.testing.assert_close(out.losses["sample_entropy"], tok.resampler.sample_entropy_weight * sample)
    torch.testing.assert_close(out.losses["batch_entropy"], -tok.resampler.batch_entropy_weight * batch)


def test_velocity_head_embeds_a_shared_time_once():
    torch.manual_seed(0)
    head = VelocityHead(patch_dim=4, cond_dim=6, width=16, depth=2)
    for p in head.parameters():  # leave the zero initialisation, so the output depends on everything
        nn.init.normal_(p, std=0.3)
    x, cond = torch.randn(10, 4), torch.randn(10, 6)
    t = torch.tensor(0.37)
    per_row = head(x, t.repeat(10), cond)  # a real (M,) tensor: embedded row by row
    torch.testing.assert_close(head(x, t.expand(10), cond), per_row)  # stride 0: embedded once
    torch.testing.assert_close(head(x, t, cond), per_row)  # 0-dim
