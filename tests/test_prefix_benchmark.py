"""The measures of benchmarks/prefix.py and benchmarks/ordered_sweep.py (v2flow.eval.prefix,
v2flow.eval.ordered_sweep) on tiny inputs (the benchmarks themselves run on the shipped checkpoints)."""

import math

import pytest
import torch

from v2flow.eval import prefix
from v2flow.testing import tiny_tokenizer


def test_position_entropy_counts_bits_per_position():
    indices = torch.tensor([[0, 0], [0, 1], [0, 2], [0, 3]])  # (n=4, N=2)
    assert prefix.position_entropy(indices, num_codes=4) == pytest.approx([0.0, 2.0])


def test_prefix_quality_is_reproducible_and_in_range():
    tok = tiny_tokenizer(token_order="ordered", truncation_prob=0.5)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = tok.encode(images).ids
    first = prefix.prefix_quality(tok, images, ids, k=2, batch_size=4)
    again = prefix.prefix_quality(tok, images, ids, k=2, batch_size=4)
    assert first == again  # the decode noise is seeded per batch
    assert math.isfinite(first["psnr"]) and -1.0 <= first["ssim"] <= 1.0


def test_next_token_entropy_gives_one_finite_value_per_position():
    train = torch.randint(0, 5, (64, 3), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 5, (16, 3), generator=torch.Generator().manual_seed(1))
    bits = prefix.next_token_entropy(train, test, num_codes=5, steps=2, seed=0)
    assert len(bits) == 3 and all(math.isfinite(b) and b > 0 for b in bits)


def test_sweep_variants_parse_and_override_only_the_ordering_keys():
    from v2flow.eval import ordered_sweep

    name, stages, prob, sampling, extra = ordered_sweep.parse_variant("B=8,4,2,1,1:0.5:uniform")
    assert (name, stages, prob, sampling, extra) == ("B", [8.0, 4.0, 2.0, 1.0, 1.0], 0.5, "uniform", {})
    for bad, message in [
        ("B=8,4,2:0.5", "NAME=STAGES"),
        ("B=8,4:0.5:uniform:interval_time=true", "interval_time"),
        ("B=8,4:0.5:uniform:interval_times=", "empty value"),
        ("B=8,x:0.5:uniform", "must be numbers"),
        ("B=8,4:0.5:random", "prefix sampling"),
    ]:
        with pytest.raises(ValueError, match=message):
            ordered_sweep.parse_variant(bad)
    args = dict(
        config=["configs/mnist.yaml", "configs/mnist_ordered.yaml"],
        accelerator="cpu",
        runs_dir="runs/x",
        vocab_source="smollm2",
        max_steps=0,
    )
    command = ordered_sweep.fit_command(ordered_sweep.parse_variant("D=8,4,2,1,1:0.3:pow2"), **args)
    overrides = {k.rsplit(".", 1)[-1]: v for k, v in zip(command[8::2], command[9::2], strict=False)}
    assert overrides["order_stages"] == "[8.0, 4.0, 2.0, 1.0, 1.0]" and overrides["truncation_prob"] == "0.3"
    assert overrides["prefix_sampling"] == "pow2" and "--trainer.max_steps" not in command
    command = ordered_sweep.fit_command(ordered_sweep.parse_variant("D2=8,4:0.3:pow2:interval_times=true"), **args)
    overrides = {k.rsplit(".", 1)[-1]: v for k, v in zip(command[8::2], command[9::2], strict=False)}
    assert overrides["interval_times"] == "true" and "--seed_everything" not in command
    command = ordered_sweep.fit_command(ordered_sweep.parse_variant("D_seed3=8,4:0.3:pow2"), **args, seed=3)
    assert command[-2:] == ["--seed_everything", "3"]
    assert ordered_sweep.run_name("D", 3, [3, 4]) == "D_seed3" and ordered_sweep.run_name("D", None, [None]) == "D"


def test_sweep_averages_over_seeds():
    from v2flow.eval import ordered_sweep

    mean, std = ordered_sweep.over_seeds([{1: 14.0, 2: 16.0}, {1: 15.0, 2: 16.0}, {1: 16.0, 2: 16.0}])
    assert mean == {1: 15.0, 2: 16.0} and std == {1: 1.0, 2: 0.0}
    assert ordered_sweep.over_seeds([{1: 14.0}]) == ({1: 14.0}, {1: 0.0})


def test_denoising_gain_scores_each_noise_level_and_hides_late_tokens():
    tok = tiny_tokenizer(token_order="ordered", truncation_prob=0.5)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = tok.encode(images).ids
    times = (0.9, 0.5, 0.1)
    out = prefix.denoising_gain(tok, images, ids, times=times, batch_size=3)
    assert out["times"] == list(times)
    assert all(len(out[key]) == 3 for key in ("psnr_tokens", "psnr_null", "visible_tokens"))
    assert all(math.isfinite(v) for v in out["psnr_tokens"] + out["psnr_null"])
    assert out["visible_tokens"] == sorted(out["visible_tokens"])  # more tokens in play as t falls
    assert out == prefix.denoising_gain(tok, images, ids, times=times, batch_size=3)  # seeded noise
    # a token hidden at t changes nothing: replace the tokens that enter below t = 0.9, same estimate at 0.9
    k = out["visible_tokens"][0]
    assert k < ids.shape[1]
    other = ids.clone()
    other[:, k:] = ids[:, k:].roll(1, dims=0)
    assert not torch.equal(other, ids)
    changed = prefix.denoising_gain(tok, images, other, times=times, batch_size=3)
    assert changed["psnr_tokens"][0] == out["psnr_tokens"][0]
    assert changed["psnr_tokens"][2] != out["psnr_tokens"][2]  # ... and they are in play at t = 0.1


def test_denoising_gain_of_an_unordered_tokenizer_sees_every_token_at_every_level():
    tok = tiny_tokenizer(token_order="unordered")
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = tok.encode(images).ids
    times = (0.9, 0.5, 0.1)
    out = prefix.denoising_gain(tok, images, ids, times=times, batch_size=3)
    assert out["visible_tokens"] == [ids.shape[1]] * 3
    # the last token is in play at every level; the null condition reads no token at all
    other = ids.clone()
    other[:, -1] = ids[:, -1].roll(1, dims=0)
    assert not torch.equal(other, ids)
    changed = prefix.denoising_gain(tok, images, other, times=times, batch_size=3)
    assert all(a != b for a, b in zip(changed["psnr_tokens"], out["psnr_tokens"], strict=True))
    assert changed["psnr_null"] == out["psnr_null"]
