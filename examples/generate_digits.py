"""Teach the bundled SmolLM2-135M to write handwritten digits in the shipped tokenizer's tokens, then
ask it for each digit by name.

    python examples/generate_digits.py                      # fine-tune (configs/lm_mnist.yaml), then write
    python examples/generate_digits.py --image-lm DIR       # write with an already fine-tuned ImageLM

Writes ``digits.png`` (one row per prompt "a handwritten digit <word>", ``--per-digit`` columns) and
``digits.json`` (the prompts, the classifier judge's accuracy) into ``--out``; with ``--save DIR`` it also
keeps the fine-tuned ImageLM.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from v2flow import V2FlowTokenizer
from v2flow.classifier import DigitClassifier
from v2flow.cli import lightning_cli
from v2flow.llm import ImageLM
from v2flow.lm_training import DIGIT_WORDS, digit_caption
from v2flow.utils import save_image_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-lm", type=Path, default=None, help="a fine-tuned ImageLM directory (skips training)")
    p.add_argument("--config", default="configs/lm_mnist.yaml")
    p.add_argument("--vocab-mode", default="shared", choices=["shared", "new"])
    p.add_argument("--max-steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    p.add_argument("--tokenizer", default="checkpoints/mnist-smollm2-32")
    p.add_argument("--judge", default="checkpoints/mnist-classifier")
    p.add_argument("--per-digit", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/generate_digits"))
    p.add_argument("--save", type=Path, default=None, help="write the fine-tuned ImageLM here")
    a = p.parse_args()

    start = time.perf_counter()
    if a.image_lm is not None:
        image_lm = ImageLM.from_pretrained(a.image_lm)
    else:
        args = [
            "fit",
            "--config",
            a.config,
            f"--model.vocab_mode={a.vocab_mode}",
            f"--model.image_tokenizer={a.tokenizer}",
        ]
        args += [f"--trainer.default_root_dir={a.out}", f"--trainer.logger.init_args.save_dir={a.out}"]
        if a.max_steps is not None:
            args += [f"--trainer.max_steps={a.max_steps}", f"--trainer.val_check_interval={a.max_steps}"]
        image_lm = lightning_cli(args, task="lm").model.image_lm
        if a.save is not None:
            image_lm.save_pretrained(a.save)
    train_s = time.perf_counter() - start

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer)
    prompts = [digit_caption(d) for d in range(10) for _ in range(a.per_digit)]
    out = image_lm.generate(prompts, seed=a.seed, do_sample=True, temperature=a.temperature)
    print(
        "first image of 'a handwritten digit zero' as SmolLM2 tokens:",
        tokenizer.token_strings(out.ids[:1])[0][:8],
        "...",
    )
    images = tokenizer.decode(out.ids, generator=torch.Generator().manual_seed(a.seed)).images
    grid = save_image_grid(images, a.out / "digits.png", nrow=a.per_digit)
    report = {"prompts": [digit_caption(d) for d in range(10)], "per_digit": a.per_digit, "grid": str(grid)}
    if Path(a.judge).exists():
        predicted = DigitClassifier.from_pretrained(a.judge).predict(images)
        labels = torch.arange(10).repeat_interleave(a.per_digit)
        report["judge_accuracy"] = float((predicted == labels).float().mean())
        report["judged_as"] = {DIGIT_WORDS[d]: predicted[labels == d].tolist() for d in range(10)}
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["fine_tune_seconds"] = round(train_s, 1)
    (a.out / "digits.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
