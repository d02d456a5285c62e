"""The diffusers VQModel baseline (v2flow.eval.baseline) and the head-to-head benchmark's writers."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from v2flow.cli import _checkpoint_kind, lightning_cli, main
from v2flow.eval import head_to_head as h2h
from v2flow.eval.baseline import VQBaselineModule, VQTokenizer, vq_from_checkpoint
from v2flow.eval.report import merge_json, replace_section

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    image_size=8,
    in_channels=1,
    grid_size=2,
    codebook_size=16,
    latent_channels=8,
    vq_embed_dim=4,
    block_out_channels=(8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
)


def make_vq(**overrides) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(**{**TINY, **overrides}).eval()


def images_for(tok: VQTokenizer, n: int = 3) -> torch.Tensor:
    c, s = tok.config["in_channels"], tok.config["image_size"]
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"grid_size": 3}, "power of two"),
        ({"image_size": 12, "grid_size": 4}, "power of two"),
        ({"block_out_channels": (8, 8)}, "needs 3 entries, got 2"),
        ({"grid_size": 4, "block_out_channels": (8, 8, 8)}, "needs 2 entries"),
        ({"block_out_channels": (8, 6, 8)}, "does not divide"),
        ({"codebook_size": 1}, "codebook_size"),
        ({"vq_embed_dim": 0}, "vq_embed_dim"),
        ({"codebook_init": "kmeans"}, "codebook_init"),
        ({"commitment_beta": -0.1}, "commitment_beta"),
        ({"grid_size": 0}, "grid_size"),
    ],
)
def test_construction_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        VQTokenizer(**{**TINY, **overrides})


def test_module_argument_errors():
    with pytest.raises(ValueError, match="recon_loss"):
        VQBaselineModule(make_vq(), recon_loss="lpips")
    with pytest.raises(ValueError, match="commitment_weight"):
        VQBaselineModule(make_vq(), commitment_weight=-1.0)


def test_quantizer_options_reach_diffusers():
    tok = make_vq(commitment_beta=0.5, legacy=True)
    assert tok.vq.quantize.beta == 0.5 and tok.vq.quantize.legacy is True
    assert tok.bits_per_image == 4 * 4  # 2 x 2 tokens of log2(16) bits


# ---------------------------------------------------------------------------- verbs


@pytest.mark.parametrize("in_channels, image_size, grid_size, blocks", [(1, 8, 2, 3), (3, 8, 4, 2), (3, 16, 2, 4)])
def test_encode_decode_shapes_and_ids(in_channels, image_size, grid_size, blocks):
    tok = make_vq(in_channels=in_channels, image_size=image_size, grid_size=grid_size, block_out_channels=(8,) * blocks)
    x = images_for(tok)
    enc = tok.encode(x)
    assert enc.ids.shape == (3, grid_size**2) and enc.ids.dtype == torch.long
    assert 0 <= int(enc.ids.min()) and int(enc.ids.max()) < 16
    out = tok.decode(enc.ids.to(torch.int32))  # any integer dtype
    assert out.images.shape == x.shape and out.images.abs().max() <= 1
    assert torch.equal(tok.reconstruct(x).images, out.images), "reconstruct is encode then decode"
    # the ids index the codes the training path quantises to: decoding them equals the forward pass
    assert torch.allclose(tok(x).recon.clamp(-1, 1), out.images, atol=1e-5)
    assert torch.equal(tok(x).indices, enc.ids)


def test_decode_and_encode_refuse_bad_inputs():
    tok = make_vq()
    with pytest.raises(ValueError, match=r"codebook indices in \[0, 16\)"):
        tok.decode(torch.full((1, 4), 16))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        tok.decode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        tok.decode(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(torch.full((1, 1, 8, 8), 3.0))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        tok.encode(torch.zeros(1, 3, 8, 8))


def test_codebook_init_from_data():
    tok = make_vq()
    x = images_for(tok, n=8)  # 8 x 2 x 2 = 32 encoder outputs >= 16 codes: drawn without replacement
    tok.init_codebook_from(x, generator=torch.Generator().manual_seed(0))
    rows = tok.latents(x).permute(0, 2, 3, 1).reshape(-1, 4)
    assert (tok.codebook.detach()[:, None] - rows[None]).abs().amax(-1).min(1).values.max() < 1e-6  # each a row
    assert len(tok.encode(x).ids.unique()) > 1


def test_save_load_round_trip_is_bit_exact(tmp_path):
    from diffusers import VQModel

    tok = make_vq(commitment_beta=0.3)
    with torch.no_grad():
        for p in tok.parameters():  # away from the initialisation, so a skipped load would show
            p.add_(torch.randn_like(p) * 0.01)
    x = images_for(tok)
    path = tok.save_pretrained(tmp_path / "vq")
    tok.save_pretrained(tmp_path / "vq")  # replacing an export works
    assert {"config.json", "diffusion_pytorch_model.safetensors", "v2flow_vq.json"} <= {p.name for p in path.iterdir()}
    loaded = VQTokenizer.from_pretrained(path)
    assert loaded.config == tok.config and loaded.vq.quantize.beta == 0.3
    for (name, a), (_, b) in zip(tok.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = tok.encode(x).ids
    assert torch.equal(loaded.encode(x).ids, ids)
    assert torch.equal(loaded.decode(ids).images, tok.decode(ids).images)
    assert isinstance(VQModel.from_pretrained(path), VQModel), "the export is a plain diffusers VQModel too"
    with pytest.raises(FileNotFoundError, match="v2flow_vq.json"):
        VQTokenizer.from_pretrained(tmp_path)


def test_dead_code_restart_moves_unused_codes_to_encoder_outputs(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    tok = make_vq(codebook_init="uniform").train()
    before = tok.codebook.detach().clone()
    module = VQBaselineModule(tok, restart_dead_codes_every=1, warmup_steps=1)
    data = DataLoader(TensorDataset(images_for(tok, n=4), torch.zeros(4)), batch_size=2)
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(module, data)
    restarted = int(trainer.callback_metrics["train/restarted_codes"])
    assert restarted >= 16 - 2 * 4, "a batch of 2 images x 4 tokens leaves at least 8 of 16 codes unused"
    moved = (tok.codebook.detach() - before).abs().amax(1) > 0.01  # an optimiser step moves a code by ~lr
    assert int(moved.sum()) == restarted
    with pytest.raises(ValueError, match="restart_dead_codes_every"):
        VQBaselineModule(make_vq(), restart_dead_codes_every=-1)


# ---------------------------------------------------------------------------- training through the CLI


def test_cli_fast_dev_run_and_export(tmp_path):
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "vq_mnist_16.yaml"),
            "--model.tokenizer.init_args.block_out_channels=[16, 16, 16, 16]",
            "--model.tokenizer.init_args.latent_channels=16",
            "--model.tokenizer.init_args.codebook_size=64",
            "--data.init_args.train_limit=16",
            "--data.init_args.val_limit=8",
            "--data.init_args.batch_size=8",
            "--data.init_args.eval_batch_size=8",
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        task="vq",
    )
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert {"train/recon", "train/commit", "val/psnr", "val/ssim", "val/distinct_ids", "val/perplexity"} <= set(metrics)
    assert list(tmp_path.rglob("reconstructions/val_step*.png")), "validation must write a grid"
    ckpt = tmp_path / "vq.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    assert _checkpoint_kind(str(ckpt)) == "vq"
    assert main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    exported = VQTokenizer.from_pretrained(tmp_path / "export")
    direct = vq_from_checkpoint(ckpt)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert exported.config["codebook_size"] == 64
    assert torch.equal(exported.encode(x).ids, direct.encode(x).ids)


# ---------------------------------------------------------------------------- head-to-head writers


def _entry(fd_ours: float | None, psnr_ours: float) -> dict:
    def model(kind: str, tokens: int, fd, psnr) -> dict:
        return {
            "model": kind,
            "kind": kind,
            "train": {"train_images_per_second": 100.0},
            "eval": {
                "tokens": tokens,
                "bits_per_image": tokens * 12.0,
                "params": 1_800_000,
                "psnr": psnr,
                "ssim": 0.5,
                "fd": fd,
                "distinct_ids": 10,
                "vocabulary_entries": 4096,
                "encode_images_per_second": 1000.0,
                "decode_images_per_second": 50.0,
                "decode_setting": "1 decoder pass",
            },
        }

    models = [model("v2flow", 16, fd_ours, psnr_ours), model("vq", 16, 2.0, 20.0)]
    settings = {"max_steps": 20, "batch_size": 16, "device": "cpu", "date": "today", "eval_images": 200}
    return {"settings": {**settings, "speed_batch": 64, "repeats": 3}, "fd_note": "note", "models": models}


def test_head_to_head_decode_settings_give_one_verdict_each():
    assert h2h.parse_decode("default") == {}
    assert h2h.parse_decode("num_steps=2,temperature=0,solver=rk4") == {
        "num_steps": 2,
        "temperature": 0.0,
        "solver": "rk4",
    }
    for bad in ("steps=2", "num_steps", "num_steps=two"):
        with pytest.raises(argparse.ArgumentTypeError, match="num_steps|steps=2"):
            h2h.parse_decode(bad)
    models = _entry(1.0, 19.5)["models"]
    second = {**models[0], "eval": {**models[0]["eval"], "psnr": 21.0, "fd": 3.0, "decode_setting": "2 steps, T=0"}}
    verdict = h2h.goal_verdicts([models[0], second, models[1]])["16"]
    assert (
        "(goal lower: met)" in verdict
        and "v2flow (2 steps, T=0) vs VQ: FD 3.000 vs 2.000 (goal lower: not met)" in verdict
    )


def test_head_to_head_goal_and_section_replacement(tmp_path):
    assert (
        "FD 1.000 vs 2.000 (goal lower: met); PSNR 19.50 vs 20.00 dB (-0.50 dB; goal >= -1 dB: met)"
        in (h2h.goal_verdicts(_entry(1.0, 19.5)["models"])["16"])
    )
    assert "not met" in h2h.goal_verdicts(_entry(3.0, 18.0)["models"])["16"]
    assert "FD not measured" in h2h.goal_verdicts(_entry(None, 20.0)["models"])["16"]

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    entry = _entry(1.0, 19.5)
    entry["goal"] = h2h.goal_verdicts(entry["models"])
    replace_section(out, "head_to_head:mnist", h2h.markdown_section("mnist", entry))
    replace_section(out, "head_to_head:photos", "photos section\n")
    first = out.read_text()
    assert first.startswith("# Benchmarks\n\nkept text\n") and "| v2flow | 16 | 192 | 1.80M |" in first
    entry = _entry(3.0, 18.0)
    entry["goal"] = h2h.goal_verdicts(entry["models"])
    replace_section(out, "head_to_head:mnist", h2h.markdown_section("mnist", entry))
    second = out.read_text()
    assert second.count("<!-- head_to_head:mnist:start -->") == 1 and second.count("photos section") == 1
    assert "| 3.000 |" in second and "| 1.000 |" not in second, "the mnist section is replaced, not appended"
    assert second.index("mnist:start") < second.index("photos:start"), "the section keeps its place"

    merge_json(tmp_path / "r.json", "mnist", {"a": 1})
    merge_json(tmp_path / "r.json", "photos", {"b": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"mnist": {"a": 1}, "photos": {"b": 2}}
