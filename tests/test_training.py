import pytest
import torch
from conftest import make_tokenizer

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
