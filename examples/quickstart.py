"""The main job on the embedded default, end to end:

1. tokenize real MNIST test digits with the shipped checkpoint and print tokens as SmolLM2's own strings;
2. decode them, write a PNG grid (originals above reconstructions) and a JSON of PSNR/SSIM;
3. run a short training of configs/quickstart.yaml through the Lightning CLI and show the loss going down.

    python examples/quickstart.py [--skip-training]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from v2flow import V2FlowTokenizer
from v2flow.cli import lightning_cli
from v2flow.data import load_mnist
from v2flow.metrics import psnr_ssim
from v2flow.utils import save_image_grid

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mnist-smollm2-32"))
    parser.add_argument("--num-images", type=int, default=256, help="test digits to tokenize and score")
    parser.add_argument("--output", default="outputs/quickstart")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
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
    metrics["decode"] = {k: tok.config[k] for k in tok.config if k.startswith("sample_")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    grid = save_image_grid(torch.cat([images[:16], recon[:16]]), out / "reconstructions.png", nrow=16)
    print(json.dumps({k: metrics[k] for k in ("psnr", "ssim", "distinct_ids")}), f"-> {grid}")

    if args.skip_training:
        return
    save_dir = out / "runs"
    sys.argv = sys.argv[:1]  # this script's own options are not Lightning CLI arguments
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            f"--trainer.logger.init_args.save_dir={save_dir}",
        ]
    )
    log = Path(cli.trainer.logger.log_dir) / "metrics.csv"
    losses = [(int(r["step"]), float(r["train/flow"])) for r in csv.DictReader(log.open()) if r.get("train/flow")]
    first, last = losses[0], losses[-1]
    print(
        f"quickstart training: flow loss {first[1]:.3f} at step {first[0]} -> {last[1]:.3f} at step {last[0]} ({log})"
    )
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
