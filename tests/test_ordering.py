"""The token <-> noise-level schedule of ordered tokens, and prefix lengths for nested truncation."""

import pytest
import torch

from v2flow import objective
from v2flow.ordering import OrderSchedule, sample_prefix_lengths


@pytest.mark.parametrize("num_tokens", [1, 4, 32, 512])
def test_token_times_run_from_noise_to_data(num_tokens):
    times = OrderSchedule(num_tokens).token_times()
    assert times.shape == (num_tokens,)
    assert times[0] == 1.0  # token 0, the coarsest, is in play from pure noise on
    assert bool((times[1:] < times[:-1]).all())  # strictly later (cleaner) for every next token
    assert bool((times > 0).all())


@pytest.mark.parametrize("stages", [(16, 48, 72, 184, 192), (1,), (1, 1, 1, 1), (5, 1, 0.5)])
def test_visible_prefix_is_monotone_with_fixed_endpoints(stages):
    schedule = OrderSchedule(32, stages)
    t = torch.linspace(1.0, 0.0, 2001)
    k = schedule.num_visible(t)
    assert k[0] == 1 and k[-1] == 32  # one token at pure noise, all of them at the data
    assert bool((k[1:] >= k[:-1]).all())  # the prefix only grows as the noise goes away
    # each token becomes visible exactly at its entry time
    assert schedule.num_visible(schedule.token_times()).tolist() == list(range(1, 33))


def test_selftok_default_stage_boundaries():
    schedule = OrderSchedule(512)
    boundaries = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    # 16, 48, 72, 184, 192 tokens over the five fifths from noise to clean (token 0 enters at t = 1)
    assert schedule.num_visible(boundaries).tolist() == [1, 17, 65, 137, 321, 512]
    assert schedule.token_fraction(torch.tensor([1.0, 0.8, 0.0])).tolist() == pytest.approx([0.0, 16 / 512, 1.0])
    # float32 and float64 noise levels agree at the boundaries
    assert schedule.num_visible(boundaries.double()).tolist() == [1, 17, 65, 137, 321, 512]


@pytest.mark.parametrize("stages", [(16, 48, 72, 184, 192), (24, 4, 2, 1, 1), (1,)])
def test_visibility_interval_is_where_the_visible_prefix_stays_the_same(stages):
    schedule = OrderSchedule(32, stages)
    t = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    lo, hi = schedule.visibility_interval(t)
    assert bool((lo <= t).all() and (t <= hi).all() and (lo < hi).all())
    k = schedule.num_visible(t)
    for frac in (0.01, 0.5, 0.99):  # anywhere inside the stretch: the same prefix
        assert torch.equal(schedule.num_visible(lo + frac * (hi - lo)), k)
    # the ends are the entry levels of the last visible token and the first hidden one (up to the slack of
    # num_visible, 1e-4 token)
    times = schedule.token_times()
    assert torch.allclose(hi, torch.where(k > 1, times[(k - 1).clamp(max=31)], torch.ones(())), atol=1e-4)
    assert torch.allclose(lo, torch.where(k < 32, times[k.clamp(max=31)], torch.zeros(())), atol=1e-4)
    # stretches tile [0, 1]: one stretch per prefix length
    ends = schedule.visibility_interval(times)
    assert torch.equal(ends[0][:-1], ends[1][1:]) and ends[1][0] == 1.0 and ends[0][-1] == 0.0


def test_visibility_with_kept_lengths_stops_growing_at_the_length():
    schedule = OrderSchedule(32, (24, 4, 2, 1, 1))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(5000, generator=g)
    lengths = torch.randint(1, 33, (5000,), generator=g)
    k = torch.minimum(schedule.num_visible(t), lengths)
    assert torch.equal(schedule.visibility(t, lengths), torch.arange(32)[None] < k[:, None])
    assert torch.equal(schedule.visibility(t, torch.full((5000,), 32)), schedule.visibility(t))
    lo, hi = schedule.visibility_interval(t, lengths)
    assert bool((lo <= t).all() and (t <= hi).all() and (lo < hi).all())
    for frac in (0.0001, 0.5, 0.99):  # the kept prefix in play is the same anywhere inside the stretch
        assert torch.equal(schedule.visibility(lo + frac * (hi - lo), lengths), schedule.visibility(t, lengths))
    # once the whole kept prefix is in play (from the entry of its last token) it stays so down to the data;
    # before, the stretch is the untruncated one
    capped = k == lengths
    assert bool((lo[capped] == 0).all())
    entry = torch.where(lengths > 1, schedule.token_times()[lengths - 1], torch.ones(()))
    assert torch.allclose(hi[capped], entry[capped], atol=1e-4)
    plain = schedule.visibility_interval(t)
    assert torch.equal(lo[~capped], plain[0][~capped]) and torch.equal(hi[~capped], plain[1][~capped])
    with pytest.raises(ValueError, match=r"prefix lengths in \[1, 32\]"):
        schedule.visibility(t[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="prefix lengths"):
        schedule.visibility(t[:2], torch.tensor([3]))


def test_visibility_mask_is_a_prefix():
    mask = OrderSchedule(8, (1, 1)).visibility(torch.tensor([1.0, 0.5, 0.25, 0.0]))
    assert mask.tolist() == [[i < k for i in range(8)] for k in (1, 5, 7, 8)]


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="positive token share"):
        OrderSchedule(8, (1, 0, 1))
    with pytest.raises(ValueError, match="non-empty"):
        OrderSchedule(8, ())
    with pytest.raises(ValueError, match="num_tokens"):
        OrderSchedule(0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        OrderSchedule(8).token_fraction(torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        OrderSchedule(8).num_visible(torch.tensor([-0.1]))


@pytest.mark.parametrize("mode", ["uniform", "pow2"])
def test_prefix_lengths(mode):
    g = torch.Generator().manual_seed(0)
    lengths = sample_prefix_lengths(4000, 32, mode, generator=g)
    assert lengths.min() >= 1 and lengths.max() <= 32
    allowed = set(range(1, 33)) if mode == "uniform" else {1, 2, 4, 8, 16, 32}
    assert set(lengths.tolist()) == allowed  # every allowed length is drawn, nothing else
    again = sample_prefix_lengths(4000, 32, mode, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lengths, again)
    assert sample_prefix_lengths(5, 24, "pow2", generator=g).max() <= 24
    with pytest.raises(ValueError, match="unknown prefix sampling"):
        sample_prefix_lengths(4, 32, "log")


def tiny_decoder(truncation: bool = False):
    from v2flow.masked_transformer import MaskedTransformer

    torch.manual_seed(0)
    return MaskedTransformer(
        num_patches=6,
        patch_dim=4,
        num_tokens=5,
        token_dim=3,
        hidden_dim=16,
        encoder_depth=2,
        decoder_depth=2,
        num_heads=2,
        truncation=truncation,
    ).eval()


@pytest.mark.parametrize("all_masked", [True, False])
def test_hidden_tokens_have_no_effect_on_the_decoder(all_masked):
    decoder = tiny_decoder()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 3, generator=g)
    patches = torch.randn(3, 6, 4, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool) if all_masked else torch.arange(6).repeat(3, 1) < 4
    visible = OrderSchedule(5, (1, 1)).visibility(torch.tensor([1.0, 0.5, 0.0]))  # prefixes of 1, 3 and 5
    out = decoder(tokens, patches, mask, token_mask=visible)
    changed = torch.where(visible[..., None], tokens, torch.randn(tokens.shape, generator=g) * 10)
    assert torch.equal(decoder(changed, patches, mask, token_mask=visible), out)
    # and visible tokens do matter
    changed_visible = tokens.clone()
    changed_visible[:, 0] += 1.0
    assert not torch.allclose(decoder(changed_visible, patches, mask, token_mask=visible), out)
    # no mask is the unmasked model
    full = torch.ones(3, 5, dtype=torch.bool)
    assert torch.allclose(decoder(tokens, patches, mask, token_mask=full), decoder(tokens, patches, mask), atol=1e-6)


def test_truncated_tokens_are_replaced_by_the_truncation_token():
    decoder = tiny_decoder(truncation=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 5, 3, generator=g)
    patches = torch.randn(2, 6, 4, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    keep = torch.arange(5)[None] < torch.tensor([[2], [4]])
    out = decoder(tokens, patches, mask, token_keep=keep)
    changed = torch.where(keep[..., None], tokens, torch.randn(tokens.shape, generator=g))
    assert torch.equal(decoder(changed, patches, mask, token_keep=keep), out)
    assert not torch.allclose(out, decoder(tokens, patches, mask))  # the truncation token is seen
    with pytest.raises(ValueError, match="truncation=True"):
        tiny_decoder()(tokens, patches, mask, token_keep=keep)


# ---------------------------------------------------------------------------- the ordered tokenizer


def ordered_tokenizer(**overrides):
    from conftest import make_tokenizer

    return make_tokenizer(**{"token_order": "ordered", "order_stages": [1, 3], "truncation_prob": 0.5, **overrides})


def tiny_images(n=3, seed=1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ordered_training_loss_backpropagates():
    tok = ordered_tokenizer().train()
    out = tok.loss(tiny_images(4), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert tok.decoder.truncation_token.grad is not None  # nested truncation reached the truncation token


def test_interval_times_stay_where_the_condition_holds_and_keep_the_time_distribution():
    from v2flow.velocity import sample_time

    tok = ordered_tokenizer(interval_times=True, batch_mul=3, order_stages=[3, 1])
    g = torch.Generator().manual_seed(0)
    t, visible = objective.ordered_times(tok, 20000, "cpu", g)  # one level per sample, (B,)
    mask = torch.rand(20000, 4, generator=g) < 0.7  # (B, L) masked patches
    times = objective.patch_times(tok, t, mask, g)  # (3 * M,), draw-major
    m = int(mask.sum())
    assert times.shape == (3 * m,)
    per_draw_visible = visible.repeat_interleave(mask.sum(1), dim=0).repeat(3, 1)  # (3 * M, N)
    assert torch.equal(tok.schedule.visibility(times), per_draw_visible)  # the condition holds at every draw
    assert times.unique().numel() > 0.99 * times.numel()  # not the sample's one level
    u = torch.linspace(0.05, 0.95, 19)
    reference = sample_time(times.numel(), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(times.quantile(u), reference.quantile(u), atol=0.01)  # the same time distribution
    # off: each patch at its sample's level
    assert torch.equal(objective.patch_times(ordered_tokenizer(), t, mask, g), t[:, None].expand(mask.shape)[mask])
    with pytest.raises(ValueError, match="interval_times applies to token_order='ordered' only"):
        ordered_tokenizer(token_order="unordered", order_stages=None, interval_times=True)


def test_hidden_truncation_tail_hides_the_tail_in_training_and_draws_times_below_the_last_kept_token(monkeypatch):
    tok = ordered_tokenizer(
        truncation_prob=1.0, truncation_tail="hidden", interval_times=True, batch_mul=2, mask_ratio_min=1.0
    ).train()
    assert tok.decoder.truncation_token is None  # nothing stands in for the tail: it is hidden
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    handle = tok.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    flow_times = []
    original = objective.flow_loss
    monkeypatch.setattr(objective, "flow_loss", lambda *a: flow_times.append(a[-1]) or original(*a))
    out = tok.loss(tiny_images(64, seed=2), generator=torch.Generator().manual_seed(0))
    handle.remove()
    out.loss.backward()
    assert torch.isfinite(out.loss)
    visible = seen["token_mask"]  # (B, N): a prefix of each sample, the tail hidden, no truncation token
    assert seen["token_keep"] is None
    lengths = visible.sum(1)
    assert torch.equal(visible, torch.arange(4)[None] < lengths[:, None])
    # every noise draw sits where its sample's condition holds: the kept prefix in play is the same there
    times = flow_times[0]  # (2 * M,), draw-major; every patch is masked in this check
    per_draw = visible.repeat_interleave(tok.num_patches, dim=0).repeat(2, 1)  # (2 * M, N)
    assert times.shape[0] == per_draw.shape[0]
    assert torch.equal(tok.schedule.visibility(times, per_draw.sum(1)), per_draw)
    # and the whole prefix of a sample is in play at its draws in some samples, with draws far below its entry
    assert bool((times < 0.3).any())


def test_hidden_truncation_tail_decodes_prefixes_and_round_trips(tmp_path):
    from v2flow import V2FlowTokenizer

    tok = ordered_tokenizer(truncation_tail="hidden")
    ids = tok.encode(tiny_images()).ids
    tok.save_pretrained(tmp_path / "hidden")
    loaded = V2FlowTokenizer.from_pretrained(tmp_path / "hidden")
    assert loaded.config["truncation_tail"] == "hidden" and loaded.decoder.truncation_token is None
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for k in range(1, 5):
        a = tok.decode(ids[:, :k], num_steps=2, generator=g()).images
        assert a.shape == (3, 1, 8, 8) and torch.equal(a, loaded.decode(ids[:, :k], num_steps=2, generator=g()).images)
    with pytest.raises(ValueError, match="unknown truncation_tail 'masked'; choose one of"):
        ordered_tokenizer(truncation_tail="masked")


def test_hidden_truncation_tail_in_unordered_mode_hides_the_tail_of_truncated_samples():
    from conftest import make_tokenizer

    tok = make_tokenizer(truncation_prob=1.0, truncation_tail="hidden").train()
    assert tok.decoder.truncation_token is None
    seen = {}
    handle = tok.decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    out = tok.loss(tiny_images(8), generator=torch.Generator().manual_seed(0))
    handle.remove()
    out.loss.backward()
    lengths = seen["token_mask"].sum(1)  # every sample truncated: a prefix visible, the rest hidden
    assert seen["token_keep"] is None and bool((lengths >= 1).all()) and bool((lengths < 4).any())
    assert torch.equal(seen["token_mask"], torch.arange(4)[None] < lengths[:, None])
    ids = tok.encode(tiny_images()).ids
    assert tok.decode(ids[:, :2], allow_truncation=True).images.shape == (3, 1, 8, 8)


def test_interval_times_training_loss_backpropagates():
    tok = ordered_tokenizer(interval_times=True).train()
    out = tok.loss(tiny_images(4), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and tok.head.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("truncation_prob", [0.0, 0.5])
def test_every_prefix_decodes(truncation_prob):
    tok = ordered_tokenizer(truncation_prob=truncation_prob)
    ids = tok.encode(tiny_images()).ids  # (3, 4)
    for k in range(1, 5):
        a = tok.decode(ids[:, :k], num_steps=2, generator=torch.Generator().manual_seed(0)).images
        b = tok.decode(ids[:, :k], num_steps=2, generator=torch.Generator().manual_seed(0)).images
        assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)


def test_ordered_decode_runs_the_transformer_once_per_stretch_not_per_step():
    tok = ordered_tokenizer()
    ids = tok.encode(tiny_images()).ids
    calls = []
    handle = tok.decoder.register_forward_hook(lambda *_: calls.append(1))
    stretches = tok.config["num_tokens"]  # N - 1 entry times cut [1, 0] into N stretches
    for steps, iters in ((1, 1), (8, 1), (8, 2)):
        calls.clear()
        tok.decode(ids, num_steps=steps, num_iters=iters, generator=torch.Generator().manual_seed(0))
        assert len(calls) == stretches * iters
    handle.remove()


def test_prefix_tokens_beyond_the_prefix_do_not_matter_in_ordered_mode():
    tok = ordered_tokenizer(truncation_prob=0.0)  # the tail of a prefix is hidden
    ids = tok.encode(tiny_images()).ids
    other = tok.vocabulary.token_ids[torch.randperm(32, generator=torch.Generator().manual_seed(0))[:4]]
    changed = torch.cat([ids[:, :2], other[None, 2:].expand(3, 2)], dim=1)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # decoding the prefix never reads the tail, whatever it was
    assert torch.equal(tok.decode(ids[:, :2], generator=g()).images, tok.decode(changed[:, :2], generator=g()).images)
    # ... while the full sequence does
    assert not torch.equal(tok.decode(ids, generator=g()).images, tok.decode(changed, generator=g()).images)


def test_prefix_estimate_stops_where_the_first_missing_token_would_enter():
    tok = ordered_tokenizer()  # N = 4 tokens, entering at t_0 = 1 > t_1 > t_2 > t_3
    ids = tok.encode(tiny_images()).ids
    calls = []
    handle = tok.decoder.register_forward_hook(lambda *_: calls.append(1))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for k in (1, 2, 3):
        calls.clear()
        estimate = tok.decode(ids[:, :k], prefix_estimate=True, num_steps=8, generator=g()).images
        # k stretches down to t_k (cut by t_1 .. t_(k-1)), then one pass for the estimate at t_k
        assert len(calls) == k + 1
        assert estimate.shape == (3, 1, 8, 8)
        # 8 Euler steps put more than one step below t_k (with one, the last Euler step is the estimate)
        assert not torch.equal(estimate, tok.decode(ids[:, :k], num_steps=8, generator=g()).images)
    handle.remove()
    # a full sequence has no missing token: the same decode
    assert torch.equal(
        tok.decode(ids, prefix_estimate=True, generator=g()).images, tok.decode(ids, generator=g()).images
    )


def test_prefix_estimate_of_an_unordered_tokenizer_is_the_one_step_estimate_from_noise():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    ids = tok.encode(tiny_images()).ids
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    estimate = tok.decode(ids[:, :2], allow_truncation=True, prefix_estimate=True, num_steps=8, generator=g())
    one_step = tok.decode(ids[:, :2], allow_truncation=True, num_steps=1, generator=g())
    assert torch.allclose(estimate.images, one_step.images, atol=1e-6)
    assert not torch.allclose(estimate.images, tok.decode(ids[:, :2], allow_truncation=True, generator=g()).images)


def test_ordered_mode_round_trips_through_save_pretrained(tmp_path):
    from v2flow import V2FlowTokenizer

    tok = ordered_tokenizer()
    tok.save_pretrained(tmp_path / "ordered")
    loaded = V2FlowTokenizer.from_pretrained(tmp_path / "ordered")
    assert loaded.config["token_order"] == "ordered" and loaded.config["order_stages"] == [1, 3]
    assert loaded.schedule.stage_tokens == (1.0, 3.0)
    ids = tok.encode(tiny_images()).ids
    for k in (2, 4):
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        assert torch.equal(
            tok.decode(ids[:, :k], generator=g()).images, loaded.decode(ids[:, :k], generator=g()).images
        )


def test_bad_prefixes_are_refused():
    from conftest import make_tokenizer

    tok = ordered_tokenizer()
    ids = tok.encode(tiny_images()).ids
    with pytest.raises(ValueError, match="this tokenizer writes N = 4: they come from a different tokenizer"):
        tok.decode(torch.cat([ids, ids[:, :1]], dim=1))
    with pytest.raises(ValueError, match="empty prefix"):
        tok.decode(ids[:, :0])
    unordered = make_tokenizer()
    with pytest.raises(ValueError, match="allow_truncation=True"):
        unordered.decode(ids[:, :2])
    assert unordered.decode(ids[:, :2], allow_truncation=True).images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown token_order"):
        make_tokenizer(token_order="sorted")
    with pytest.raises(ValueError, match="ordered' only"):
        make_tokenizer(order_stages=[1, 2])
    with pytest.raises(ValueError, match="truncation_prob"):
        make_tokenizer(truncation_prob=1.5)


def test_query_modulation_starts_as_the_identity_and_learns():
    from v2flow.encoder import QueryEncoder

    torch.manual_seed(0)
    encoder = QueryEncoder(
        num_patches=4, patch_dim=3, num_tokens=5, hidden_dim=16, depth=2, num_heads=2, query_modulation=True
    )
    patches = torch.randn(2, 4, 3)
    out = encoder(patches)
    modulations, encoder.modulations = encoder.modulations, None
    assert torch.equal(encoder(patches), out)  # zero-initialised modulation = the plain encoder
    encoder.modulations = modulations
    encoder(patches).pow(2).sum().backward()
    assert modulations[0][-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_causal_queries_keep_a_token_prefix_independent_of_later_positions(causal):
    from v2flow.encoder import QueryEncoder

    torch.manual_seed(0)
    encoder = QueryEncoder(
        num_patches=4,
        patch_dim=3,
        num_tokens=6,
        hidden_dim=16,
        depth=2,
        num_heads=2,
        query_modulation=True,
        causal_queries=causal,
    )
    for m in encoder.modulations:  # a trained modulation, not the zero-initialised identity
        torch.nn.init.normal_(m[-1].weight, std=0.1)
    patches = torch.randn(2, 4, 3)
    out = encoder(patches)
    with torch.no_grad():  # change everything that belongs to positions 3, 4 and 5
        encoder.queries[:, 3:] += 1.0
        encoder.index_embed[3:] += 1.0
    changed = encoder(patches)
    assert not torch.allclose(changed[:, 3:], out[:, 3:])  # the later tokens do change
    if causal:
        assert torch.equal(changed[:, :3], out[:, :3])  # the prefix cannot see them
    else:
        assert not torch.allclose(changed[:, :3], out[:, :3])  # full attention: every token sees every query
    # the prefix still depends on the image
    assert not torch.allclose(encoder(patches.flip(1))[:, :3], changed[:, :3])


def test_causal_query_mask_layout():
    from v2flow.encoder import QueryEncoder

    encoder = QueryEncoder(
        num_patches=2, patch_dim=3, num_tokens=3, hidden_dim=8, depth=1, num_heads=2, causal_queries=True
    )
    expected = torch.tensor(
        [  # rows: patches 0-1, then queries 0-2; columns the same
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(encoder.attention_mask(), expected)


def test_causal_queries_round_trip_through_save_and_load(tmp_path):
    from v2flow import V2FlowTokenizer

    tok = ordered_tokenizer(encoder_causal_queries=True)
    tok.save_pretrained(tmp_path / "tok")
    loaded = V2FlowTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config["encoder_causal_queries"] is True and loaded.encoder.causal_queries
    images = tiny_images(2)
    assert torch.equal(loaded.encode(images).soft_embeddings, tok.encode(images).soft_embeddings)


def test_ordered_config_with_query_modulation_builds_and_trains():
    tok = ordered_tokenizer(encoder_query_modulation=True).train()
    tok.loss(tiny_images(2), generator=torch.Generator().manual_seed(0)).loss.backward()
    assert tok.encoder.index_embed.grad is not None


def test_prefix_benchmark_runs_on_tiny_checkpoints(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import make_tokenizer

    size = {"image_size": 32, "patch_size": 8}
    make_tokenizer(**size, token_order="ordered", truncation_prob=0.5).save_pretrained(tmp_path / "ordered")
    make_tokenizer(**size).save_pretrained(tmp_path / "unordered")
    make_tokenizer(**size, num_tokens=1).save_pretrained(tmp_path / "bound")  # trained for N/4 = 1 token
    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, str(root / "benchmarks" / "prefix.py"), "--ordered", str(tmp_path / "ordered")]
    args += ["--unordered", str(tmp_path / "unordered"), "--prefixes", "1", "2", "4", "--limit", "6"]
    args += [
        "--train-limit",
        "12",
        "--ar-steps",
        "2",
        "--batch-size",
        "4",
        "--grid-digits",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--bound",
        str(tmp_path / "bound"),
    ]
    subprocess.run(args, check=True, cwd=root, capture_output=True)
    summary = json.loads((tmp_path / "out" / "prefix.json").read_text())
    assert summary["prefixes"] == [1, 2, 4] and summary["test_images"] == 6
    ordered = summary["results"]["ordered"]
    assert ordered["token_order"] == "ordered" and len(ordered["next_token_entropy_bits"]) == 4
    # prefix estimates: their own decode below N, the same decode for the full sequence (N = 4 here)
    assert ordered["psnr_estimate"]["4"] == ordered["psnr"]["4"]
    assert ordered["psnr_estimate"]["1"] != ordered["psnr"]["1"]
    assert set(summary["checks"]) >= {"gain_at_quarter_db", "gain_at_quarter_db_estimate", "gap_at_full_db"}
    (bound,) = summary["bounds"]
    assert bound["num_tokens"] == 1 and bound["checkpoint"] == str(tmp_path / "bound")
    gap = summary["checks"]["ordered_minus_bound_at_quarter_db"]
    assert gap == pytest.approx(ordered["psnr"]["1"] - bound["psnr"])
    assert (tmp_path / "out" / "prefix_grid.png").exists() and (tmp_path / "out" / "prefix_psnr.png").exists()


def test_ordered_config_fits_with_fast_dev_run(tmp_path):
    from safetensors.torch import save_file

    from v2flow.cli import lightning_cli

    table = tmp_path / "table.safetensors"
    save_file({"embeddings": torch.randn(200, 576, generator=torch.Generator().manual_seed(0))}, table)
    cli = lightning_cli(
        [
            "fit",
            "--config=configs/mnist.yaml",
            "--config=configs/mnist_ordered.yaml",
            f"--model.tokenizer.init_args.vocab_source={table}",
            "--model.tokenizer.init_args.num_entries=64",
            "--model.tokenizer.init_args.num_tokens=8",
            "--data.init_args.train_limit=16",
            "--data.init_args.val_limit=16",
            "--data.init_args.batch_size=8",
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.tokenizer.config["token_order"] == "ordered"
    assert cli.model.tokenizer.encoder.modulations is not None
