"""Teach the bundled SmolLM2-135M to write handwritten digits in the shipped tokenizer's tokens, then
ask it for each digit by name.

    python examples/generate_digits.py                      # fine-tune (configs/lm_mnist.yaml), then write
    python examples/generate_digits.py --image-lm DIR       # write with an already fine-tuned ImageLM

Writes ``digits.png`` (one row per prompt "a handwritten digit <word>", ``--per-digit`` columns) and
``digits.json`` (the prompts, the classifier judge's accuracy, the seconds spent) into ``--out``; with
``--save DIR`` it also keeps the fine-tuned ImageLM. The first fine-tune caches the image tokens of the
training digits (a few minutes on a CPU, once per image tokenizer; see ``--train-limit``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-lm", type=Path, default=None, help="a fine-tuned ImageLM directory (skips training)")
    p.add_argument("--config", default="configs/lm_mnist.yaml", help="the Lightning CLI config of the fine-tune")
    p.add_argument("--llm", default=None, help="the LM to fine-tune: 'smollm2' or a directory (default: the config's)")
    p.add_argument(
        "--vocab-mode",
        default="shared",
        choices=["shared", "new"],
        help="image tokens as the LM's own tokens (shared) or as new rows appended to its vocabulary (new)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    p.add_argument(
        "--train-limit", type=int, default=None, help="fine-tune on the first N training digits (default: all)"
    )
    p.add_argument(
        "--val-limit", type=int, default=None, help="validate on the first N validation digits (default: all)"
    )
    p.add_argument("--tokenizer", default="checkpoints/mnist-smollm2-32", help="the pretrained image tokenizer")
    p.add_argument(
        "--judge",
        default="checkpoints/mnist-classifier",
        help="a digit classifier that scores the images, if it exists",
    )
    p.add_argument("--per-digit", type=int, default=10, help="images written per digit (columns of digits.png)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the LM (> 0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling and the decoding noise")
    p.add_argument("--out", type=Path, default=Path("runs/generate_digits"), help="folder for the PNG, JSON and run")
    p.add_argument("--save", type=Path, default=None, help="write the fine-tuned ImageLM here")
    a = p.parse_args()
    for name in ("max_steps", "train_limit", "val_limit", "per_digit"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.temperature <= 0:
        p.error(f"--temperature must be > 0, got {a.temperature}")

    # imported after parsing, so --help and bad options answer at once
    import torch

    from v2flow import V2FlowTokenizer
    from v2flow.eval.classifier import DigitClassifier
    from v2flow.llm import ImageLM
    from v2flow.lm_training import DIGIT_WORDS, digit_caption
    from v2flow.utils import save_image_grid

    start = time.perf_counter()
    if a.image_lm is not None:
        image_lm = ImageLM.from_pretrained(a.image_lm)
    else:
        from v2flow.cli import lightning_cli

        args = [
            "fit",
            "--config",
            a.config,
            f"--model.vocab_mode={a.vocab_mode}",
            f"--model.image_tokenizer={a.tokenizer}",
            f"--trainer.default_root_dir={a.out}",
            f"--trainer.logger.init_args.save_dir={a.out}",
        ]
        if a.llm is not None:
            args.append(f"--model.llm={a.llm}")
        if Path(a.judge).exists():
            args += ["--model.judge=v2flow.eval.classifier.PretrainedClassifier", f"--model.judge.path={a.judge}"]
        else:  # validation then scores no generations
            args += ["--model.judge=null", "--model.eval_samples_per_digit=0"]
        if a.max_steps is not None:
            args += [
                f"--trainer.max_steps={a.max_steps}",
                f"--trainer.val_check_interval={a.max_steps}",
                f"--trainer.log_every_n_steps={max(1, min(10, a.max_steps // 5))}",
            ]
        for split, limit in (("train", a.train_limit), ("val", a.val_limit)):
            if limit is not None:
                args.append(f"--data.init_args.{split}_limit={limit}")
        image_lm = lightning_cli(args, task="lm").model.image_lm
        if a.save is not None:
            image_lm.save_pretrained(a.save)
    train_s = time.perf_counter() - start

    tokenizer = V2FlowTokenizer.from_pretrained(a.tokenizer)
    prompts = [digit_caption(d) for d in range(10) for _ in range(a.per_digit)]
    out = image_lm.generate(prompts, seed=a.seed, do_sample=True, temperature=a.temperature)
    print(
        "first image of 'a handwritten digit zero' as LM tokens:",
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
