"""Every script in examples/ runs, at a tiny size, in its own process from the repository root, and writes
what its docstring promises. (tests/test_readme.py runs the README's Python blocks; none of them runs these
scripts.)"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from PIL import Image
from test_llm import LM_DIM, text_tokenizer, tiny_lm

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def run_example(name: str, *args, env: dict | None = None, timeout: float = 240) -> str:
    """Run examples/`name` with `args` from the repository root; its output, or a failure that shows it."""
    import os

    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_every_example_is_tested():
    assert EXAMPLES == ["generate_digits.py", "ode_steps.py", "quickstart.py"], "a new example needs a test here"


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_is_fast_and_every_option_is_explained(name):
    """Heavy imports wait until the options are parsed: --help answers at once."""
    start = time.perf_counter()
    out = run_example(name, "--help")
    seconds = time.perf_counter() - start
    assert seconds < 2.0, f"{name} --help took {seconds:.1f} s"
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  -")]
    assert len(options) >= 4
    lines = out.split("options:", 1)[1].splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  -") and line.strip() not in ("-h, --help  show this help message and exit",):
            described = len(line.split("  ")) > 2 or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 10))
            assert described, f"{name}: option without help text: {line.strip()}"


@pytest.mark.slow
def test_quickstart_tokenizes_scores_trains_and_leaves_an_exportable_checkpoint(tmp_path):
    out = run_example(
        "quickstart.py", "--num-images", 8, "--max-steps", 3, "--val-limit", 16, "--output", tmp_path / "qs"
    )
    assert "as SmolLM2 tokens" in out and "quickstart training: flow loss" in out
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert metrics["num_images"] == 8 and 15 < metrics["psnr"] < 40 and 0.5 < metrics["ssim"] <= 1
    assert metrics["distinct_ids"] >= 8 and metrics["decode"]["num_steps"] >= 1
    with Image.open(tmp_path / "qs" / "reconstructions.png") as grid:
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)  # the 8 digits above their reconstructions
    assert (tmp_path / "qs" / "quickstart_loss.png").stat().st_size > 1000
    last = next((tmp_path / "qs" / "runs").rglob("checkpoints/last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    assert f"v2flow export {last}" in out
    from v2flow import V2FlowTokenizer
    from v2flow.cli import main

    assert main(["export", str(last), str(tmp_path / "exported")]) == 0
    assert V2FlowTokenizer.from_pretrained(tmp_path / "exported").config["num_tokens"] == 16


@pytest.mark.slow
def test_ode_steps_writes_a_row_per_setting_including_dopri5(tmp_path):
    out_dir = tmp_path / "ode"
    run_example(
        "ode_steps.py", "--num-images", 4, "--steps", 1, 2, "--solvers", "euler", "midpoint", "--columns", 3,
        "--output", out_dir,
    )  # fmt: skip
    rows = json.loads((out_dir / "ode_steps.json").read_text())
    settings = [(r["solver"], r["num_steps"]) for r in rows]
    assert settings == [("euler", 1), ("euler", 2), ("midpoint", 1), ("midpoint", 2), ("dopri5", None)]
    for r in rows:
        assert 15 < r["psnr"] < 40 and 0.1 < r["ssim"] <= 1, r  # SSIM on [0, 1]: a 1-step sample scores ~0.2
    with Image.open(out_dir / "ode_steps_grid.png") as grid:
        assert grid.size == (3 * 34 + 2, 6 * 34 + 2)  # originals + 5 settings, 3 digits each
    assert (out_dir / "psnr_vs_steps.png").stat().st_size > 1000


@pytest.fixture
def tiny_lm_assets(tmp_path):
    """A tiny LM directory, a tiny 32x32 image tokenizer on that LM's rows and a tiny judge."""
    from v2flow import LLMVocabulary, V2FlowTokenizer
    from v2flow.eval.classifier import DigitClassifier

    model = tiny_lm("llama")
    model.save_pretrained(tmp_path / "lm")
    text_tokenizer().save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    image_tok = V2FlowTokenizer(**{**TINY, "image_size": 32, "patch_size": 8, "llm_dim": LM_DIM})
    ids = torch.arange(2, 34)
    strings = text_tokenizer().convert_ids_to_tokens(ids.tolist())  # as a real LM's vocabulary has
    rows = model.get_input_embeddings().weight.detach()[ids]
    image_tok.set_vocabulary(LLMVocabulary(rows, ids, "tiny", model.config.vocab_size, strings))
    image_tok.save_pretrained(tmp_path / "image_tok")
    DigitClassifier(width=4, feature_dim=8).save_pretrained(tmp_path / "judge")
    return tmp_path


@pytest.mark.slow
def test_generate_digits_fine_tunes_writes_and_judges(tiny_lm_assets):
    root = tiny_lm_assets
    out = root / "digits"
    run_example(
        "generate_digits.py", "--llm", root / "lm", "--tokenizer", root / "image_tok", "--judge", root / "judge",
        "--max-steps", 2, "--train-limit", 32, "--val-limit", 16, "--per-digit", 2, "--out", out,
        "--save", root / "image_lm",
        env={"V2FLOW_CACHE": str(root / "cache")},
    )  # fmt: skip
    report = json.loads((out / "digits.json").read_text())
    assert report["prompts"][7] == "a handwritten digit seven" and report["per_digit"] == 2
    assert 0 <= report["judge_accuracy"] <= 1 and sum(len(v) for v in report["judged_as"].values()) == 20
    assert report["seconds"] >= report["fine_tune_seconds"] > 0
    with Image.open(out / "digits.png") as grid:
        assert grid.size == (2 * 34 + 2, 10 * 34 + 2)  # one row per digit
    assert sorted(p.name for p in (root / "cache" / "tokens").iterdir())[0].startswith("mnist-train-32-")
    assert next(out.rglob("checkpoints/last.ckpt")).exists()
    # the saved ImageLM writes again, without training
    again = root / "again"
    run_example(
        "generate_digits.py", "--image-lm", root / "image_lm", "--tokenizer", root / "image_tok",
        "--judge", root / "nowhere", "--per-digit", 1, "--out", again,
    )  # fmt: skip
    report = json.loads((again / "digits.json").read_text())
    assert report["per_digit"] == 1 and "judge_accuracy" not in report and report["fine_tune_seconds"] < 30
