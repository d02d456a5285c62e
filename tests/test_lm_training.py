"""The LM fine-tune and the MNIST judge through the Lightning CLI, on tiny random models."""

import json

import pytest
import torch
from conftest import TINY
from test_llm import LM_DIM, text_tokenizer, tiny_lm

from v2flow import LLMVocabulary, V2FlowTokenizer
from v2flow.cli import lightning_cli, main
from v2flow.eval.classifier import DigitClassifier, random_translate
from v2flow.llm import ImageLM
from v2flow.lm_training import MNISTTokenDataModule, digit_caption, image_lm_from_checkpoint
from v2flow.metrics import frechet_distance


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """A tiny LM directory, a tiny 32x32 image tokenizer on that LM's rows, a tiny judge; a private cache."""
    monkeypatch.setenv("V2FLOW_CACHE", str(tmp_path / "cache"))
    model = tiny_lm("llama")
    model.config.max_position_embeddings = 64
    lm_dir = tmp_path / "lm"
    model.save_pretrained(lm_dir)
    text_tokenizer().save_pretrained(lm_dir)
    torch.manual_seed(0)
    image_tok = V2FlowTokenizer(**{**TINY, "image_size": 32, "patch_size": 8, "llm_dim": LM_DIM})
    ids = torch.arange(2, 34)
    image_tok.set_vocabulary(LLMVocabulary(model.get_input_embeddings().weight.detach()[ids], ids, "tiny", 100))
    image_tok.save_pretrained(tmp_path / "image_tok")
    DigitClassifier(width=4, feature_dim=8).save_pretrained(tmp_path / "judge")
    return {
        "lm": str(lm_dir),
        "image_tok": str(tmp_path / "image_tok"),
        "judge": str(tmp_path / "judge"),
        "root": tmp_path,
    }


def lm_args(assets, *extra):
    root = assets["root"]
    return [
        "fit",
        "--config",
        "configs/lm_mnist.yaml",
        f"--model.llm={assets['lm']}",
        f"--model.image_tokenizer={assets['image_tok']}",
        "--model.judge=v2flow.eval.classifier.PretrainedClassifier",
        f"--model.judge.path={assets['judge']}",
        "--model.eval_samples_per_digit=1",
        "--data.init_args.train_limit=32",
        "--data.init_args.val_limit=16",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=8",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.mark.parametrize("mode", [("shared", "vocab"), ("new", "vocab"), ("new", "random")])
def test_lm_fit_fast_dev_run(assets, mode):
    cli = lightning_cli(
        lm_args(assets, "--trainer.fast_dev_run=1", f"--model.vocab_mode={mode[0]}", f"--model.init={mode[1]}"),
        task="lm",
    )
    assert cli.trainer.global_step == 1
    assert cli.model.image_lm.layout.mode == mode[0]
    assert "val/prompt_accuracy" in cli.trainer.callback_metrics
    assert cli.datamodule.image_tokenizer == assets["image_tok"]  # linked from the model's


def test_lm_fit_checkpoint_exports_and_reloads(assets):
    root = assets["root"]
    lightning_cli(
        lm_args(assets, "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--model.warmup_steps=1"), task="lm"
    )
    ckpt = next((root / "logs").rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert all(k.startswith("lm.") for k in state["state_dict"])  # only the trained LM is saved
    image_lm = image_lm_from_checkpoint(ckpt)
    assert main(["export", str(ckpt), str(root / "exported")]) == 0
    loaded = ImageLM.from_pretrained(root / "exported")
    assert loaded.layout == image_lm.layout
    for a, b in zip(image_lm.model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    out = loaded.generate([digit_caption(3)], seed=0)
    assert out.ids.shape == (1, TINY["num_tokens"])
    # a checkpoint whose layout no longer matches the image tokenizer is refused
    state["v2flow_lm_layout"]["lm_ids"] = state["v2flow_lm_layout"]["lm_ids"][::-1]
    torch.save(state, root / "moved.ckpt")
    with pytest.raises(ValueError, match="another token layout"):
        image_lm_from_checkpoint(root / "moved.ckpt")
    # resuming continues from the saved step
    cli = lightning_cli(
        lm_args(assets, "--trainer.max_steps=3", "--trainer.val_check_interval=3", f"--ckpt_path={ckpt}"), task="lm"
    )
    assert cli.trainer.global_step == 3


def test_token_cache_is_computed_once_says_so_and_keeps_only_what_training_reads(assets, monkeypatch):
    import v2flow.lm_training
    from v2flow.data import load_mnist

    said = []
    monkeypatch.setattr(v2flow.lm_training, "rank_zero_info", said.append)
    dm = MNISTTokenDataModule(
        assets["image_tok"], batch_size=4, train_limit=8, val_limit=8, captions=["{digit} as {word}"]
    )
    dm.prepare_data()
    files = sorted((assets["root"] / "cache" / "tokens").iterdir())
    assert len(files) == 2
    # two lines per split: what is cached where (and how long it takes) before, the time and size after
    assert len(said) == 4 and "Caching the image tokens of 8 MNIST train digits" in said[0]
    assert str(files[0]) in said[0] and "min" in said[0] and "the bar shows the time left" in said[0]
    assert said[1].startswith("Cached 8 x 4 image tokens in") and "MB" in said[1]
    payload = torch.load(files[0], weights_only=True)
    assert payload["ids"].dtype == torch.int32 and payload["labels"].dtype == torch.uint8
    # the labels were a slice of the split's 50,000: saved alone, not with the whole storage (400 kB as int64)
    assert files[0].stat().st_size < 4_000

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached split must not be encoded again")

    monkeypatch.setattr(v2flow.lm_training, "encode_images", no_encoding)
    dm.setup("fit")
    assert len(said) == 4, "loading the cache says nothing"
    ids, captions = next(iter(dm.train_dataloader()))
    assert ids.shape == (4, TINY["num_tokens"]) and all(" as " in c for c in captions)
    tok = V2FlowTokenizer.from_pretrained(assets["image_tok"])
    images, labels = load_mnist("val")
    ids, cached_labels = dm.sets["val"].tensors
    assert torch.equal(ids, tok.encode(images[:8]).ids) and ids.dtype == torch.long
    assert torch.equal(cached_labels, labels[:8]) and cached_labels.dtype == torch.long


def test_bad_lm_settings_are_refused(assets):
    from v2flow.lm_training import ImageLMModule

    with pytest.raises(ValueError, match="vocab_mode"):
        ImageLMModule(vocab_mode="mixed")
    with pytest.raises(ValueError, match="needs a judge"):
        ImageLMModule(eval_samples_per_digit=2)
    with pytest.raises(ValueError, match="may only use"):
        MNISTTokenDataModule(captions=["digit {number}"])


def test_classifier_fit_and_export(tmp_path):
    args = [
        "fit",
        "--config",
        "configs/classifier_mnist.yaml",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--data.init_args.train_limit=64",
        "--data.init_args.val_limit=100",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=50",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
    ]
    cli = lightning_cli(args, task="classifier")
    assert "val/accuracy" in cli.trainer.callback_metrics
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    assert main(["export", str(ckpt), str(tmp_path / "judge"), "--weights", "current"]) == 2, "no EMA to choose"
    assert main(["export", str(ckpt), str(tmp_path / "judge")]) == 0
    assert json.loads((tmp_path / "judge" / "config.json").read_text())["class"] == "DigitClassifier"
    judge = DigitClassifier.from_pretrained(tmp_path / "judge")
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    assert torch.equal(judge(images), cli.model.classifier.eval()(images))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        judge(torch.rand(5, 3, 32, 32))


def test_random_translate_keeps_content_and_background():
    images = -torch.ones(4, 1, 8, 8)
    images[:, :, 3:5, 3:5] = 1.0
    shifted = random_translate(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.equal((shifted == 1).sum(dim=(1, 2, 3)), torch.full((4,), 4))


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    judge = DigitClassifier(width=4, feature_dim=8).eval()
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 1, 32, 32, generator=g) * 2 - 1
    assert frechet_distance(judge, real, real) == pytest.approx(0.0, abs=1e-6)
    near = frechet_distance(judge, real, (real + 0.01 * torch.randn(real.shape, generator=g)).clamp(-1, 1))
    far = frechet_distance(judge, real, -real)
    assert 0 <= near < far
    with pytest.raises(ValueError, match=">= 2 images"):
        frechet_distance(judge, real[:1], real)
