"""The main job on the embedded default, end to end:

1. tokenize real MNIST test digits with the shipped checkpoint and print tokens as SmolLM2's own strings;
2. decode them, write a PNG grid (originals above reconstructions) and a JSON of PSNR/SSIM;
3. run a short training of configs/quickstart.yaml through the Lightning CLI and show the loss going down.

    python examples/quickstart.py [--skip-training]

Writes ``metrics.json`` and ``reconstructions.png`` into ``--output``; the training writes
``quickstart_loss.png`` there and its logs and ``last.ckpt`` under ``--output``/runs, which
``v2flow export`` turns into a tokenizer directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        default=str(ROOT / "checkpoints" / "mnist-smollm2-32"),
        help="the pretrained tokenizer directory of steps 1 and 2",
    )
    parser.add_argument("--num-images", type=int, default=256, help="test digits to tokenize and score")
    parser.add_argument("--output", default="outputs/quickstart", help="folder for the PNGs, JSON and training run")
    parser.add_argument("--skip-training", action="store_true", help="stop after step 2")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="training steps of step 3 (default: the config's 150)"
    )
    parser.add_argument(
        "--val-limit", type=int, default=None, help="validation digits of step 3 (default: the config's 500)"
    )
    args = parser.parse_args()
    if args.num_images < 3:
        parser.error(f"--num-images must be >= 3 (three digits are printed as tokens), got {args.num_images}")
    for name in ("max_steps", "val_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import torch

    from v2flow import V2FlowTokenizer
    from v2flow.data import load_mnist
    from v2flow.metrics import psnr_ssim
    from v2flow.utils import save_image_grid

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tok = V2FlowTokenizer.from_pretrained(args.checkpoint)
    images, labels = load_mnist("test")
    images, labels = images[: args.num_images], labels[: args.num_images]
    encoded = tok.encode(images)
    print(f"tokenizer: {tok.config['num_tokens']} tokens per image, ids from {tok.vocabulary.llm_name}")
    for i in range(3):
        strings = tok.token_strings(encoded.ids[i : i + 1])[0]
        print(f"digit {int(labels[i])} -> ids {encoded.ids[i, :8].tolist()} ...")
        print(f"          as SmolLM2 tokens: {strings[:12]!r} ...")
    recon = tok.decode(encoded.ids, generator=torch.Generator().manual_seed(0)).images
    metrics = {**psnr_ssim(recon, images), "num_images": len(images), **tok.usage(encoded.indices)}
    metrics["decode"] = tok.decode_defaults.as_dict()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shown = min(16, len(images))  # originals above their reconstructions
    grid = save_image_grid(torch.cat([images[:shown], recon[:shown]]), out / "reconstructions.png", nrow=shown)
    print(json.dumps({k: metrics[k] for k in ("psnr", "ssim", "distinct_ids")}), f"-> {grid}")

    if args.skip_training:
        return
    from v2flow.cli import lightning_cli

    save_dir = out / "runs"
    sys.argv = sys.argv[:1]  # this script's own options are not Lightning CLI arguments
    overrides = [f"--trainer.logger.init_args.save_dir={save_dir}"]
    if args.max_steps is not None:
        overrides += [
            f"--trainer.max_steps={args.max_steps}",
            f"--trainer.val_check_interval={args.max_steps}",
            f"--trainer.log_every_n_steps={max(1, min(10, args.max_steps // 5))}",  # a loss curve of >= 5 points
        ]
    if args.val_limit is not None:
        overrides.append(f"--data.init_args.val_limit={args.val_limit}")
    cli = lightning_cli(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *overrides])
    log = Path(cli.trainer.logger.log_dir) / "metrics.csv"
    losses = [(int(r["step"]), float(r["train/flow"])) for r in csv.DictReader(log.open()) if r.get("train/flow")]
    first, last = losses[0], losses[-1]
    print(
        f"quickstart training: flow loss {first[1]:.3f} at step {first[0]} -> {last[1]:.3f} at step {last[0]} ({log})"
    )
    print(f"export it: v2flow export {Path(cli.trainer.logger.log_dir) / 'checkpoints' / 'last.ckpt'} my-tokenizer")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(*zip(*losses, strict=True))
    ax.set(xlabel="step", ylabel="train flow loss", title="configs/quickstart.yaml")
    fig.tight_layout()
    fig.savefig(out / "quickstart_loss.png", dpi=120)


if __name__ == "__main__":
    main()
