import json
import warnings

import pytest
import torch
from conftest import TINY, make_tokenizer

from v2flow import V2FlowTokenizer


@pytest.mark.parametrize(
    "overrides",
    [{}, {"estimator": "softmax"}, {"estimator": "softmax", "gumbel": True}, {"quantizer": "vq"}],
    ids=["projected", "softmax", "gumbel", "vq"],
)
def test_shapes_and_ids_inside_vocabulary(overrides, images):
    tok = make_tokenizer(**overrides)
    out = tok.encode(images, return_probs=True)
    b, n, k = images.shape[0], TINY["num_tokens"], TINY["num_entries"]
    assert out.ids.shape == out.indices.shape == (b, n)
    assert out.soft_embeddings.shape == (b, n, TINY["llm_dim"])
    assert out.probs.shape == (b, n, k)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(b, n))
    if tok.config["quantizer"] == "vocab":
        assert torch.isin(out.ids, tok.vocabulary.token_ids).all()
        torch.testing.assert_close(tok.vocabulary.token_ids[out.indices], out.ids)
    else:
        assert out.ids.max() < tok.config["codebook_size"]
    rec = tok.decode(out.ids, generator=torch.Generator().manual_seed(0)).images
    assert rec.shape == images.shape and rec.min() >= -1 and rec.max() <= 1


@pytest.mark.parametrize("overrides", [{}, {"estimator": "softmax", "gumbel": True}, {"quantizer": "vq"}])
def test_training_loss_backward(overrides, images):
    tok = make_tokenizer(**overrides).train()
    out = tok.loss(images, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    assert "flow" in out.parts and "aux" in out.parts
    out.loss.backward()
    grads = [p.grad for p in tok.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "no gradient reaches the encoder through the quantiser"


def test_encode_is_deterministic_and_ignores_gumbel(images):
    tok = make_tokenizer(estimator="softmax", gumbel=True)
    a, b = tok.encode(images).ids, tok.encode(images).ids
    assert torch.equal(a, b)


def test_decode_determinism_with_generator(tokenizer, images):
    ids = tokenizer.encode(images).ids
    kw = dict(num_steps=3, num_iters=2)
    a = tokenizer.decode(ids, generator=torch.Generator().manual_seed(7), **kw).images
    b = tokenizer.decode(ids, generator=torch.Generator().manual_seed(7), **kw).images
    c = tokenizer.decode(ids, generator=torch.Generator().manual_seed(8), **kw).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_save_load_round_trip_bit_exact(tmp_path, images):
    tok = make_tokenizer()
    # move weights away from their init so the test is not trivially satisfied by zero-initialised layers
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    loaded = V2FlowTokenizer.from_pretrained(path)
    for (ka, va), (kb, vb) in zip(tok.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    ids = tok.encode(images).ids
    assert torch.equal(ids, loaded.encode(images).ids)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(tok.decode(ids, generator=g()).images, loaded.decode(ids, generator=g()).images)
    assert loaded.vocabulary.llm_name == "tiny-llm"
    assert loaded.token_strings(ids[:1]) == tok.token_strings(ids[:1])


def test_save_pretrained_replaces_existing_directory(tmp_path):
    tok = make_tokenizer()
    target = tmp_path / "tok"
    tok.save_pretrained(target)
    (target / "stale.txt").write_text("x")
    tok.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_cfg_scale_changes_output(tokenizer, images):
    ids = tokenizer.encode(images).ids
    with torch.no_grad():
        tokenizer.decoder.null_tokens.add_(1.0)
        for p in tokenizer.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = tokenizer.decode(ids, cfg_scale=1.0, generator=g()).images
    b = tokenizer.decode(ids, cfg_scale=3.0, generator=g()).images
    assert not torch.equal(a, b)


def test_token_usefulness_gap(tokenizer, images):
    same = images[:1].expand(3, -1, -1, -1).contiguous()  # identical tokens: shuffling changes nothing
    assert tokenizer.token_usefulness(same)["shuffle_gap"] == 0.0
    with torch.no_grad():  # make the velocity depend on the condition, then different tokens must matter
        for p in tokenizer.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert tokenizer.token_usefulness(images)["shuffle_gap"] != 0.0


def test_all_samples_dropped_gives_finite_loss(images):
    tok = make_tokenizer(cond_drop_prob=0.999).train()
    out = tok.loss(images, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.parts["aux"] == 0


def test_untrained_tokenizer_without_vocabulary_refuses(images):
    tok = V2FlowTokenizer(**TINY)
    with pytest.raises(RuntimeError, match="no vocabulary rows"):
        tok.encode(images)
    with pytest.raises(RuntimeError, match="no vocabulary rows"):
        tok.loss(images)


def test_aux_head_absent_when_unused(images):
    tok = make_tokenizer(aux_weight=0.0).train()
    assert tok.patch_predictor is None
    assert "aux" not in tok.loss(images).parts


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 8, 8), "4 axes"),
        (torch.zeros(2, 3, 8, 8), "3 channels"),
        (torch.zeros(2, 1, 10, 10), "10x10"),
        (torch.full((2, 1, 8, 8), 2.0), r"\[-1, 1\]"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_are_named(tokenizer, bad, match):
    with pytest.raises(ValueError, match=match):
        tokenizer.encode(bad)


def test_images_are_not_silently_clipped(tokenizer):
    with pytest.raises(ValueError, match="x \\* 2 - 1"):
        tokenizer.encode(torch.full((1, 1, 8, 8), 1.5))


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros(2, 4), "integer"),
        (torch.zeros(2, 5, dtype=torch.long), "this tokenizer writes N = 4: they come from a different tokenizer"),
        (torch.zeros(2, 4, 1, dtype=torch.long), r"shape \(B, 4\)"),
        (torch.full((2, 4), 10_000), "not token ids"),
        (torch.full((2, 4), -1), "not token ids"),
    ],
)
def test_bad_ids_are_named(tokenizer, ids, match):
    with pytest.raises(ValueError, match=match):
        tokenizer.decode(ids)


def test_ids_outside_visual_vocabulary(tokenizer):
    outside = [i for i in range(100) if i not in set(tokenizer.vocabulary.token_ids.tolist())][0]
    ids = tokenizer.vocabulary.token_ids[:4][None].clone()
    ids[0, 1] = outside
    with pytest.raises(ValueError, match="not in\nthis|not in this tokenizer"):
        tokenizer.decode(ids)


def test_constructor_validates():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        V2FlowTokenizer(**{**TINY, "image_size": 10})
    with pytest.raises(ValueError, match="not divisible"):
        V2FlowTokenizer(**{**TINY, "encoder_dim": 18, "encoder_heads": 4})
    with pytest.raises(ValueError, match="unknown quantizer"):
        V2FlowTokenizer(**{**TINY, "quantizer": "lfq"})
    with pytest.raises(ValueError, match="decode defaults are invalid: unknown solver"):
        V2FlowTokenizer(**{**TINY, "decode": {"solver": "heun"}})
    with pytest.raises(ValueError, match="unknown decode settings \\['steps'\\]"):
        V2FlowTokenizer(**{**TINY, "decode": {"steps": 3}})
    with pytest.raises(ValueError, match="gumbel=True applies only"):
        V2FlowTokenizer(**{**TINY, "gumbel": True})
    with pytest.raises(ValueError, match="decode num_iters must be in"):
        V2FlowTokenizer(**{**TINY, "decode": {"num_iters": 5}})
    with pytest.raises(ValueError, match="unknown time_sampling"):
        V2FlowTokenizer(**{**TINY, "time_sampling": "beta"})


def test_unknown_config_key_and_missing_files(tmp_path):
    tok = make_tokenizer()
    path = tok.save_pretrained(tmp_path / "tok")
    config = json.loads((path / "config.json").read_text())
    config["num_tokenz"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown config keys \\['num_tokenz'\\]"):
        V2FlowTokenizer.from_pretrained(path)
    tok.save_pretrained(path)
    (path / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        V2FlowTokenizer.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="no pretrained tokenizer"):
        V2FlowTokenizer.from_pretrained(tmp_path / "nowhere")


def test_vocabulary_shape_mismatch_is_refused():
    from conftest import tiny_vocabulary

    tok = V2FlowTokenizer(**TINY)
    with pytest.raises(ValueError, match="num_entries x llm_dim"):
        tok.set_vocabulary(tiny_vocabulary(16, 24))


def test_zero_temperature_is_deterministic(tokenizer, images):
    ids = tokenizer.encode(images).ids
    a = tokenizer.decode(ids, temperature=0.0, generator=torch.Generator().manual_seed(1)).images
    b = tokenizer.decode(ids, temperature=0.0, generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        tokenizer.decode(ids, temperature=-1.0)


# ---------------------------------------------------------------------------- clear errors and warnings


def test_wrongly_typed_config_value_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"patch_size='four' \(str; expected int\)"):
        V2FlowTokenizer.from_config({**tokenizer.config, "patch_size": "four"})
    with pytest.raises(ValueError, match=r"num_tokens=4.0 \(float; expected int\)"):
        V2FlowTokenizer.from_config({**tokenizer.config, "num_tokens": 4.0})
    V2FlowTokenizer.from_config({**tokenizer.config, "temperature": 1})  # an int where a float goes is fine


def test_damaged_pretrained_directories_are_named(tokenizer, tmp_path):
    path = tokenizer.save_pretrained(tmp_path / "tok")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file .* truncated"):
        V2FlowTokenizer.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        V2FlowTokenizer.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="is a file; a pretrained tokenizer is a directory"):
        V2FlowTokenizer.from_pretrained(path / "vocab.json")


def test_hub_id_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local directory, and fetching it as a Hugging Face Hub"):
        V2FlowTokenizer.from_pretrained("no-such-owner/no-such-tokenizer")


def test_range_error_shows_the_values_that_are_out(tokenizer):
    images = torch.full((1, 1, 8, 8), 0.5)
    images[0, 0, 0, 0] = -1.0014  # beyond the tolerance, but "-1" at 3 significant digits
    with pytest.raises(ValueError, match=r"got values in \[-1.0014, 0.5\]"):
        tokenizer.encode(images)


def test_off_distribution_input_warns(tokenizer, images):
    from v2flow.checks import image_features, input_statistics

    # training data: dark images with a little bright ink, like MNIST
    g = torch.Generator().manual_seed(0)
    train = -0.8 + 0.3 * torch.rand(200, 1, 8, 8, generator=g)
    tokenizer.config["input_statistics"] = input_statistics(image_features(train), "dark test images")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.encode(train[:4])  # like the training data: silent
    for wrong in ((train[:4] + 1) / 2, -train[:4]):  # [0, 1] instead of [-1, 1]; inverted
        with pytest.warns(UserWarning, match=r"4 of 4 images look unlike .*\(dark test images\)"):
            tokenizer.encode(wrong)
    with pytest.raises(ValueError, match="input_statistics must be a dict"):
        V2FlowTokenizer.from_config({**tokenizer.config, "input_statistics": {"mean": 0}})


def test_shipped_checkpoints_know_their_data():
    from v2flow.data import load_mnist

    tok = V2FlowTokenizer.from_pretrained("checkpoints/mnist-smollm2-32")
    assert "MNIST" in tok.config["input_statistics"]["data"]
    digits = load_mnist("test")[0][:64]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(digits)
    with pytest.warns(UserWarning, match="look unlike"):
        tok.encode((digits + 1) / 2)
