"""Training where the ids matter: thick-tailed time sampling and a loss on the one-step clean estimate."""

import pytest
import torch
from torch import nn

from v2flow.testing import tiny_tokenizer
from v2flow.velocity import flow_matching_losses, sample_time, time_cdf, time_quantile


def test_mixture_times_follow_their_cdf_and_reach_the_noise_end():
    g = torch.Generator().manual_seed(0)
    t = sample_time(200_000, method="mixture", uniform_share=0.1, generator=g)
    for level in (0.05, 0.3, 0.5, 0.9, 0.95):
        empirical = float((t <= level).double().mean())
        assert empirical == pytest.approx(float(time_cdf(torch.tensor(level), method="mixture")), abs=0.004)
    # logit-normal alone puts 0.16 % above t = 0.95; a tenth of uniform draws adds 0.5 %
    above = float((t > 0.95).double().mean())
    logit_normal = 1 - float(time_cdf(torch.tensor(0.95), method="logit_normal"))
    assert above == pytest.approx(0.9 * logit_normal + 0.1 * 0.05, abs=0.001) and above > 3 * logit_normal
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for shift in (1.0, 3.0):
        back = time_cdf(time_quantile(u, method="mixture", shift=shift), method="mixture", shift=shift)
        torch.testing.assert_close(back, u, atol=1e-9, rtol=0)


class ZeroVelocity(nn.Module):
    def forward(self, x, t, cond):
        return torch.zeros_like(x)


def test_the_one_step_estimate_loss_in_closed_form():
    x0, cond = torch.randn(6, 4), torch.randn(6, 3)
    t = torch.linspace(0.1, 0.9, 6)

    def run(weight):
        return flow_matching_losses(
            ZeroVelocity(), x0, cond, batch_mul=1, x0_weight=weight, t=t, generator=torch.Generator().manual_seed(0)
        )

    losses = run(0.5)
    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    # v = 0: the flow term is |noise - x0|^2, the estimate is x_t itself, off by t (noise - x0)
    torch.testing.assert_close(losses["flow"], ((noise - x0) ** 2).mean())
    torch.testing.assert_close(losses["x0"], 0.5 * ((x_t - x0) ** 2).mean())
    assert set(run(0.0)) == {"flow"}


def test_the_tokenizer_logs_the_estimate_loss_and_refuses_a_share_without_the_mixture():
    tok = tiny_tokenizer(x0_loss_weight=1.0, time_sampling="mixture", time_uniform_share=0.2).train()
    out = tok.loss(torch.rand(4, 1, 8, 8) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert {"flow", "x0"} <= set(out.parts) and torch.isfinite(out.loss)
    out.loss.backward()
    with pytest.raises(ValueError, match="time_uniform_share=0.2 applies to time_sampling='mixture' only"):
        tiny_tokenizer(time_uniform_share=0.2)
    with pytest.raises(ValueError, match="x0_loss_weight must be >= 0"):
        tiny_tokenizer(x0_loss_weight=-1.0)
