"""The `v2flow` command: Lightning CLI subcommands and the tokenizer tools, run in-process."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from v2flow import V2FlowTokenizer
from v2flow.cli import lightning_cli, main

QUICK = "configs/quickstart.yaml"


def test_quickstart_fast_dev_run(tmp_path):
    cli = lightning_cli(
        ["fit", "--config", QUICK, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.tokenizer.vocabulary.llm_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_config_key_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", QUICK, "--model.tokenizer.init_args.num_tokenz=3"])
    assert "num_tokenz" in capsys.readouterr().err


def test_omegaconf_interpolation(tmp_path, tiny_run):
    cfg = tmp_path / "interp.yaml"
    cfg.write_text(
        "model:\n  tokenizer:\n    init_args:\n      encoder_dim: 32\n"
        "      decoder_dim: ${model.tokenizer.init_args.encoder_dim}\n"
    )
    cli = lightning_cli([*tiny_run, "--config", str(cfg), "--trainer.fast_dev_run=true"], run=False)
    assert cli.model.tokenizer.config["decoder_dim"] == cli.model.tokenizer.config["encoder_dim"] == 32


@pytest.mark.slow
def test_fit_resume_export_and_tools(tmp_path, tiny_run):
    ckpt_cb = [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=2",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--model.statistics_images=24",  # 3 batches of 8: not reached by step 2, reached after resuming
    ]
    cli = lightning_cli(["fit", *tiny_run, *ckpt_cb, "--trainer.max_steps=2"])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert metrics["val/distinct_ids"] > 0 and metrics["val/perplexity"] >= 1
    assert {"val/psnr", "val/ssim", "val/shuffle_gap", "val/flow", "val/aux"} <= set(metrics)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()
    saved = torch.load(last, weights_only=False)
    assert saved["v2flow_tokenizer_config"]["input_statistics"]["num_images"] == 16  # what step 2 had seen
    assert sum(len(f) for f in saved["v2flow_input_features"]) == 16  # ... and gathering goes on after a resume
    grids = list((tmp_path / "logs").rglob("reconstructions/val_step*.png"))
    assert grids, "validation must write a reconstruction grid"
    # resume: training continues from step 2, with the optimiser state restored
    cli = lightning_cli(["fit", *tiny_run, *ckpt_cb, "--trainer.max_steps=4", f"--ckpt_path={last}"])
    assert cli.trainer.global_step == 4
    statistics = cli.model.tokenizer.config["input_statistics"]
    assert statistics["num_images"] == 24 and statistics["data"].startswith("MNIST training digits")
    # validate and test subcommands
    with pytest.raises(
        ValueError, match=r"last\.ckpt does not fit this tokenizer config \(num_tokens: checkpoint 4, config 6"
    ):
        lightning_cli(["fit", *tiny_run, "--model.tokenizer.init_args.num_tokens=6", f"--ckpt_path={last}"])
    lightning_cli(["validate", *tiny_run, f"--ckpt_path={last}"])
    lightning_cli(["test", *tiny_run, f"--ckpt_path={last}"])

    out = tmp_path / "export"
    assert main(["export", str(last), str(out)]) == 0
    tok = V2FlowTokenizer.from_pretrained(out)
    assert tok.config["num_tokens"] == 4
    assert tok.config["input_statistics"] == statistics  # the export knows its training data
    assert main(["export", str(last), str(out)]) == 2, "export over an existing directory must refuse"
    assert main(["export", str(last), str(out), "--overwrite", "--set", "num_steps=3"]) == 0
    assert V2FlowTokenizer.from_pretrained(out).config["decode"]["num_steps"] == 3
    assert V2FlowTokenizer.from_pretrained(out).decode_defaults.num_steps == 3
    assert main(["export", str(last), str(out), "--overwrite", "--set", "solver=heun"]) == 2
    # a training weight that merely starts with "sample_" is not a decode default
    assert main(["export", str(last), str(out), "--overwrite", "--set", "sample_entropy_weight=0"]) == 2
    raw = tmp_path / "export_raw"
    assert main(["export", str(last), str(raw), "--weights", "current"]) == 0
    ema_w = tok.encoder.patch_embed.weight
    raw_w = V2FlowTokenizer.from_pretrained(raw).encoder.patch_embed.weight
    assert not torch.equal(ema_w, raw_w), "EMA and raw weights must differ after training"

    folder = tmp_path / "digits"
    folder.mkdir()
    from v2flow.data import load_mnist

    digits, _ = load_mnist("test")
    for i in range(3):
        Image.fromarray(((digits[i, 0] + 1) * 127.5).round().byte().numpy()).save(folder / f"d{i}.png")
    ids_json = tmp_path / "ids.json"
    assert main(["encode", str(out), str(folder), "-o", str(ids_json)]) == 0
    payload = json.loads(ids_json.read_text())
    assert np.array(payload["ids"]).shape == (3, 4) and len(payload["files"]) == 3
    assert torch.isin(torch.tensor(payload["ids"]), tok.vocabulary.token_ids).all()
    assert main(["encode", str(out), str(folder), "-o", str(tmp_path / "ids.pt")]) == 0
    assert main(["decode", str(out), str(ids_json), "-o", str(tmp_path / "dec"), "--num-steps", "2"]) == 0
    assert len(list((tmp_path / "dec").glob("*.png"))) == 3
    assert main(["decode", str(out), str(tmp_path / "ids.pt"), "-o", str(tmp_path / "dec2")]) == 0
    assert main(["reconstruct", str(out), str(folder), "-o", str(tmp_path / "rec"), "--num-steps", "2"]) == 0
    metrics = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert set(metrics) == {"psnr", "ssim"} and (tmp_path / "rec" / "comparison.png").exists()

    # bad inputs get a named error and exit code 2
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "small.png")
    assert main(["encode", str(out), str(folder / "small.png"), "-o", str(tmp_path / "x.json")]) == 2
    assert main(["encode", str(out), str(folder / "small.png"), "-o", str(tmp_path / "x.json"), "--resize"]) == 0
    (tmp_path / "bad_ids.json").write_text(json.dumps({"ids": [[10**6] * 4]}))
    assert main(["decode", str(out), str(tmp_path / "bad_ids.json"), "-o", str(tmp_path / "d3")]) == 2
    assert main(["encode", str(out), str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.json")]) == 2
    torch.save({"no": 1}, tmp_path / "junk.ckpt")
    assert main(["export", str(tmp_path / "junk.ckpt"), str(tmp_path / "e2")]) == 2


def test_streaming_commands_return_freed_heap_after_every_batch(tmp_path, monkeypatch):
    """encode / reconstruct hand freed heap back to the OS once per batch (glibc otherwise keeps it, and the
    resident set climbs with the folder size: benchmarks/memory.py)."""
    import v2flow.utils
    from v2flow.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    calls = []
    monkeypatch.setattr(v2flow.utils, "release_heap_memory", lambda: calls.append(1))
    tok, ids = str(tmp_path / "tok"), str(tmp_path / "ids.pt")
    assert main(["encode", tok, str(folder), "-o", ids, "--batch-size", "2"]) == 0
    assert len(calls) == 3  # batches of 2, 2 and 1
    assert torch.load(ids, weights_only=True)["ids"].shape == (5, 4)
    calls.clear()
    assert main(["reconstruct", tok, str(folder), "-o", str(tmp_path / "rec"), "--batch-size", "4"]) == 0
    assert len(calls) == 2
    monkeypatch.undo()
    v2flow.utils.release_heap_memory()  # the real call: glibc's malloc_trim here, a no-op elsewhere


@pytest.mark.parametrize("decoder", ["mlp", "transformer"])
def test_fast_dev_run_of_each_velocity_decoder(tmp_path, tiny_run, decoder):
    options = [f"--model.tokenizer.init_args.velocity_decoder={decoder}"]
    if decoder == "transformer":
        options += ["--model.tokenizer.init_args.mask_ratio_min=1.0", "--model.tokenizer.init_args.head_width=32"]
    cli = lightning_cli(["fit", *tiny_run, *options, "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert (
        type(cli.model.tokenizer.head).__name__
        == {"mlp": "VelocityHead", "transformer": "ImageVelocityTransformer"}[decoder]
    )
