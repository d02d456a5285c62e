from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_run_args
from lightning.pytorch.callbacks import ModelCheckpoint

from v2flow.training import EMA, V2FlowModule, tokenizer_from_checkpoint


def test_ema_averages_floats_and_copies_integers():
    ema = EMA(decay=0.9)
    avg = ema._average(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor(1000))
    assert avg.item() == pytest.approx(1.1)
    warm = ema._average(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor(0))  # decay warms up: 1/10
    assert warm.item() == pytest.approx(1.9)
    ids = ema._average(torch.tensor([365, 7]), torch.tensor([365, 7]), torch.tensor(1))
    assert ids.dtype == torch.long and ids.tolist() == [365, 7]
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


def test_ema_refuses_strategies_that_shard_the_weights():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    module = V2FlowModule(make_tokenizer())
    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        with pytest.raises(ValueError, match=rf"does not support {type(strategy).__name__}.*strategy=ddp"):
            EMA().setup(SimpleNamespace(strategy=strategy), module, "fit")
    ema = EMA()
    ema.setup(SimpleNamespace(strategy=DDPStrategy()), module, "fit")  # replicated weights: averaged
    assert ema._average_model is not None


def test_ema_refuses_deepspeed_zero3_only():
    """DeepSpeed is not installed here, so the strategy is built without its constructor (which imports it);
    the refusal reads only the strategy's config."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = V2FlowModule(make_tokenizer())
    for stage, sharded in ((3, True), (2, False), (1, False)):
        strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
        strategy.config = {"zero_optimization": {"stage": stage}}
        ema = EMA()
        if sharded:
            with pytest.raises(ValueError, match=r"does not support DeepSpeedStrategy.*strategy=ddp"):
                ema.setup(SimpleNamespace(strategy=strategy), module, "fit")
        else:
            ema.setup(SimpleNamespace(strategy=strategy), module, "fit")
            assert ema._average_model is not None


def test_temperature_anneal_is_geometric_and_saved(tmp_path):
    tok = make_tokenizer(estimator="softmax", temperature=0.5)
    module = V2FlowModule(tok, temperature_end=0.05, temperature_anneal_steps=10)
    assert module.tokenizer.vocabulary.llm_name == "tiny-llm", "an installed vocabulary must not be reloaded"
    assert module.anneal_temperature(0) == pytest.approx(0.5)
    assert module.anneal_temperature(5) == pytest.approx(0.5 * 0.1**0.5)
    assert module.anneal_temperature(10) == pytest.approx(0.05)
    assert module.anneal_temperature(50) == pytest.approx(0.05)
    assert tok.resampler.temperature == pytest.approx(0.05)
    from v2flow import V2FlowTokenizer

    loaded = V2FlowTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "tok"))
    assert loaded.resampler.temperature == pytest.approx(0.05), "the annealed temperature must be saved"
    with pytest.raises(ValueError, match="temperature_end"):
        V2FlowModule(tok, temperature_end=0.0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_from_checkpoint(tmp_path / "none.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="v2flow_tokenizer_config"):
        tokenizer_from_checkpoint(tmp_path / "partial.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        tokenizer_from_checkpoint(tmp_path / "garbage.ckpt")


# ---------------------------------------------------------------------------- what a run shows and leaves


def tiny_fit_args(tmp_path) -> list[str]:
    """The tiny quickstart run of ``conftest.tiny_run_args`` for 3 steps, with the progress bar on."""
    args = [a for a in tiny_run_args(tmp_path) if a != "--trainer.enable_progress_bar=false"]
    return ["fit", *args, "--trainer.max_steps=3"]


def test_a_short_fit_shows_sensible_progress_and_summary_and_leaves_last_ckpt(tmp_path, capsys, monkeypatch):
    """`v2flow fit --config configs/quickstart.yaml --trainer.max_steps N` (what the README's export reads):
    last.ckpt holds the final step, also for a checkpoint that saved two steps earlier (mnist.yaml's every
    200 steps); the bar is not labelled "Epoch 0/-2" and the summary prints no "Total FLOPs: 0"."""
    from v2flow.cli import lightning_cli
    from v2flow.training import ModelSummary, ProgressBar

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    every_2 = [
        "--trainer.callbacks+=v2flow.training.Checkpoint",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=2",
        f"--trainer.callbacks.dirpath={tmp_path / 'every_2'}",
    ]
    cli = lightning_cli([*tiny_fit_args(tmp_path), "--trainer.enable_model_summary=true", *every_2])
    out = capsys.readouterr().out
    assert cli.trainer.global_step == 3 and cli.trainer.max_epochs == -1
    for last in (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", tmp_path / "every_2" / "last.ckpt"):
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3, last
    assert (tmp_path / "every_2" / "epoch=0-step=2.ckpt").exists()
    shown = {type(c) for c in cli.trainer.callbacks}
    assert {ProgressBar, ModelSummary} <= shown
    assert cli.trainer.progress_bar_callback._get_train_description(0).strip() == "Epoch 0"
    assert "Total params" in out and "Trainable params" in out
    assert "FLOPs" not in out and "/-2" not in out


def test_progress_bar_epoch_label():
    from types import SimpleNamespace

    from v2flow.training import ProgressBar

    bar = ProgressBar()
    for max_epochs, label in ((-1, "Epoch 4"), (None, "Epoch 4"), (10, "Epoch 4/9")):
        bar._trainer = SimpleNamespace(max_epochs=max_epochs)
        description = bar._get_train_description(4)
        assert description.strip() == label
        assert len(description) >= len(bar.validation_description), "padded like Lightning's, so it does not jump"


def test_model_summary_prints_flops_only_when_counted(capsys):
    from v2flow.training import ModelSummary

    data = [(" ", ["0"]), ("Name", ["net"]), ("Type", ["Linear"]), ("Params", ["10"]), ("Mode", ["train"])]
    modes = {"train": 1, "eval": 0}
    ModelSummary.summarize([*data, ("FLOPs", ["0"])], 10, 10, 4e-5, modes, total_flops=0)
    out = capsys.readouterr().out
    assert "Linear" in out and "Total params" in out and "FLOPs" not in out
    ModelSummary.summarize([*data, ("FLOPs", ["2.0 K"])], 10, 10, 4e-5, modes, total_flops=2000)
    out = capsys.readouterr().out
    assert "Total FLOPs" in out and "2.0 K" in out


def test_display_callbacks_replace_lightnings_and_keep_their_settings():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
    from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar

    from v2flow.training import DisplayCallbacks, ModelSummary, ProgressBar

    module = DisplayCallbacks()
    assert module.configure_callbacks() == [], "no trainer attached: nothing to replace"
    for summary in (RichModelSummary(max_depth=3), LightningModelSummary(max_depth=3)):
        module._trainer = SimpleNamespace(callbacks=[RichProgressBar(refresh_rate=7, leave=True), summary, EMA()])
        bar, summary = module.configure_callbacks()
        assert type(bar) is ProgressBar and (bar._refresh_rate, bar._leave) == (7, True)
        assert type(summary) is ModelSummary and summary._max_depth == 3
    module._trainer = SimpleNamespace(callbacks=[EMA()])  # enable_progress_bar / enable_model_summary false
    assert module.configure_callbacks() == []


def test_every_config_saves_last_ckpt_when_fit_ends():
    import yaml

    from v2flow.training import Checkpoint

    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for config in configs:
        loaded = yaml.safe_load(config.read_text())
        if "data" not in loaded:  # an override of a base config (e.g. mnist_16.yaml): it keeps the base's callbacks
            assert "callbacks" not in loaded.get("trainer", {}), config.name
            continue
        callbacks = loaded["trainer"].get("callbacks", [])
        saving = [c for c in callbacks if c["class_path"] == "v2flow.training.Checkpoint"]
        assert len(saving) == 1 and saving[0]["init_args"]["save_last"] is True, config.name
        assert not [c for c in callbacks if c["class_path"].endswith(".ModelCheckpoint")], config.name
    assert issubclass(Checkpoint, ModelCheckpoint)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_get_the_permissions_of_ordinary_files(tmp_path, umask):
    """safetensors writes 0600 whatever the umask; an exported model must be as readable as its config.json."""
    import os
    import stat

    from v2flow.utils import current_umask, follow_umask

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
        out = make_tokenizer().save_pretrained(tmp_path / "tok")
        files = sorted(out.iterdir())
        assert {f.name for f in files} == {"config.json", "model.safetensors", "vocab.json"}
        assert {f.name: mode(f) for f in files} == {f.name: mode(tmp_path / "plain.txt") for f in files}
        assert mode(out) == mode(tmp_path / "plain_dir") == 0o777 & ~umask
        script = tmp_path / "run.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o700)
        follow_umask(script)
        assert mode(script) == 0o777 & ~umask, "an executable file stays executable"
    finally:
        os.umask(old)
