"""Can an LLM learn to write images in our tokens, and does initialising them from the LLM's vocabulary
help? Fine-tunes SmolLM2-135M with ``configs/lm_mnist.yaml`` at the same step budget in three settings:

* ``shared``: image tokens are SmolLM2's own tokens (the resampler picked them from its table);
* ``new-vocab``: one new token per visual entry, initialised from its vector in SmolLM2's embedding space;
* ``new-random``: the control, new tokens with random rows of the same norm statistics.

Then, per setting, it writes ``--per-digit`` images for each prompt "a handwritten digit <word>", decodes
them with the image tokenizer and judges them with the project's MNIST classifier:
prompt-following accuracy (fraction classified as the prompted digit) and the Frechet distance between
generated and real test digits in the classifier's penultimate features (with the distance between two
real sets of the same size as a floor).

    python benchmarks/llm_generation.py --settings shared     # 450 steps of 16, AdamW 5e-4: about 50 CPU minutes

Prints JSON and a markdown table; writes ``loss_curves.png`` and one ``grid_<setting>.png`` (a row per
prompt) into ``--out``; ``--save-best DIR`` keeps the best setting's fine-tuned LM as an ImageLM directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from v2flow.cli import lightning_cli
from v2flow.data import load_mnist
from v2flow.eval.classifier import DigitClassifier
from v2flow.metrics import frechet_distance
from v2flow.utils import save_image_grid

SETTINGS = {"shared": ("shared", "vocab"), "new-vocab": ("new", "vocab"), "new-random": ("new", "random")}


def loss_curve(log_dir: Path) -> list[tuple[int, float]]:
    with open(log_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def run(setting: str, a: argparse.Namespace, real: torch.Tensor, judge: DigitClassifier) -> dict:
    mode, init = SETTINGS[setting]
    args = [
        "fit",
        "--config",
        a.config,
        f"--trainer.max_steps={a.max_steps}",
        f"--trainer.val_check_interval={a.max_steps}",
        "--trainer.limit_val_batches=2",
        f"--trainer.logger.init_args.save_dir={a.out}",
        f"--trainer.logger.init_args.name={setting}",
        f"--trainer.default_root_dir={a.out}",
        f"--model.vocab_mode={mode}",
        f"--model.init={init}",
        f"--model.lr={a.lr}",
        f"--model.warmup_steps={a.warmup_steps}",
        f"--model.loss_vocabulary={a.loss_vocabulary}",
        f"--data.init_args.batch_size={a.batch_size}",
        "--model.eval_samples_per_digit=0",
        f"--seed_everything={a.seed}",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
    ]
    start = time.perf_counter()
    cli = lightning_cli(args, task="lm")
    train_s = time.perf_counter() - start
    module = cli.model.eval()
    start = time.perf_counter()
    result = module.write_digits(a.per_digit, seed=a.seed, temperature=a.temperature, top_k=a.top_k)
    generate_s = time.perf_counter() - start
    images, labels = result["images"].cpu(), result["labels"]
    predictions = judge.predict(images)
    per_digit = [float((predictions[labels == d] == d).float().mean()) for d in range(10)]
    grid_rows = torch.cat([images[labels == d][: a.grid_columns] for d in range(10)])
    save_image_grid(grid_rows, a.out / f"grid_{setting}.png", nrow=a.grid_columns)
    metrics = cli.trainer.callback_metrics
    return {
        "setting": setting,
        "steps": int(cli.trainer.global_step),
        "loss_vocabulary": a.loss_vocabulary,
        "batch_size": a.batch_size,
        "train_seconds": round(train_s, 1),
        "generate_seconds": round(generate_s, 1),
        "final_train_loss": float(metrics["train/loss"]),
        "val_loss": float(metrics["val/loss"]),
        "val_token_accuracy": float(metrics["val/token_accuracy"]),
        "prompt_accuracy": float((predictions == labels).float().mean()),
        "per_digit_accuracy": per_digit,
        "frechet_distance": frechet_distance(judge, real, images),
        "loss_curve": loss_curve(Path(cli.trainer.logger.log_dir)),
        "module": module,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        steps, losses = zip(*r["loss_curve"], strict=True)
        ax.plot(steps, losses, label=f"{r['setting']} (acc {r['prompt_accuracy']:.0%})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"train loss (image tokens; softmax over the {results[0]['loss_vocabulary']} vocabulary)")
    ax.set_title("SmolLM2-135M learning to write MNIST tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/lm_mnist.yaml")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--max-steps", type=int, default=450)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--loss-vocabulary", default="image", choices=["image", "full"], help="see ImageLM.loss")
    p.add_argument("--per-digit", type=int, default=100, help="generations per digit prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--grid-columns", type=int, default=10)
    p.add_argument("--judge", default="checkpoints/mnist-classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/llm_generation"))
    p.add_argument("--save-best", type=Path, default=None, help="write the best setting's ImageLM here")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    judge = DigitClassifier.from_pretrained(a.judge)
    real, _ = load_mnist("test")
    val, _ = load_mnist("val")
    floor = frechet_distance(judge, real, val[: 10 * a.per_digit])
    results = []
    for setting in a.settings:
        results.append(run(setting, a, real, judge))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("module", "loss_curve")}), flush=True)
    plot(results, a.out / "loss_curves.png")
    best = max(results, key=lambda r: r["prompt_accuracy"])
    if a.save_best is not None:
        best["module"].image_lm.save_pretrained(a.save_best)
    summary = {
        "config": a.config,
        "max_steps": a.max_steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "warmup_steps": a.warmup_steps,
        "loss_vocabulary": a.loss_vocabulary,
        "generations_per_digit": a.per_digit,
        "temperature": a.temperature,
        "top_k": a.top_k,
        "device": str(best["module"].device),
        "frechet_distance_real_val_vs_test": floor,
        "best": best["setting"],
        "results": [{k: v for k, v in r.items() if k != "module"} for r in results],
    }
    (a.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    print(
        "\n| setting | steps | train s | final loss | val token acc | prompt acc | FD (real floor "
        f"{floor:.2f}) |\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['setting']} | {r['steps']} | {r['train_seconds']:.0f} | {r['final_train_loss']:.3f} | "
            f"{r['val_token_accuracy']:.3f} | {r['prompt_accuracy']:.1%} | {r['frechet_distance']:.2f} |"
        )


if __name__ == "__main__":
    main()
