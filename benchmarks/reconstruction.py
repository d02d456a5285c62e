"""Reconstruction quality of a pretrained tokenizer on the MNIST test split (10k digits by default).

    python benchmarks/reconstruction.py --checkpoint checkpoints/mnist-smollm2-32 [--num-steps 8 --solver euler]
    python benchmarks/reconstruction.py --checkpoint checkpoints/mnist-ordered-32 --split val --prefix 8

Streams the split in batches (bounded memory) with a progress bar; prints JSON and a markdown table row.
`shuffle_gap` is the relative increase of the flow loss on the first 500 images when their tokens are
shuffled across the batch: how much the decoder relies on its tokens.
PSNR is the mean of per-image PSNR (data range 2 for [-1, 1] images); SSIM is torchmetrics' mean SSIM the
standard way (images mapped to [0, 1], data range 1);
both are computed against exactly the 32x32 padded digits the model was given (no crop or resize), by
`v2flow.metrics.ReconstructionMetrics` (which also gives MS-SSIM and per-position entropies; `v2flow
evaluate --data mnist-test` adds FD/KID over the project's digit classifier).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from v2flow import V2FlowTokenizer
from v2flow.data import load_mnist
from v2flow.metrics import ReconstructionMetrics, evaluate_tokenizer
from v2flow.sampling import SOLVERS


def evaluate(
    tok: V2FlowTokenizer, images: torch.Tensor, batch_size: int, seed: int, prefix: int | None = None, **decode
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batches = tqdm(images.split(batch_size), desc="reconstruct", unit="batch")
    start = time.perf_counter()
    metrics = evaluate_tokenizer(
        tok, batches, ReconstructionMetrics(), prefix=prefix, generator=generator, **decode
    ).compute()
    seconds = time.perf_counter() - start
    useful = tok.token_usefulness(images[:500])
    return {**metrics, "shuffle_gap": useful["shuffle_gap"], "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/mnist-smollm2-32")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=0, help="first n images only (0 = the whole split)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--solver", choices=SOLVERS, default=None)
    p.add_argument("--num-iters", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--shift", type=float, default=None, help="timestep shift of the ODE grid")
    p.add_argument(
        "--mode", choices=["sample", "mean"], default=None, help="sample: the flow sample; mean: the fidelity decode"
    )
    p.add_argument(
        "--prefix",
        type=int,
        default=None,
        help="decode only the first k tokens (an ordered tokenizer's prefix; unordered ones need --allow-truncation)",
    )
    p.add_argument("--allow-truncation", action="store_true", help="decode a prefix of an unordered tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = V2FlowTokenizer.from_pretrained(a.checkpoint)
    images, _ = load_mnist(a.split)
    images = images[: a.limit or len(images)]
    decode = {
        "num_steps": a.num_steps,
        "solver": a.solver,
        "num_iters": a.num_iters,
        "cfg_scale": a.cfg_scale,
        "temperature": a.temperature,
        "shift": a.shift,
        "mode": a.mode,
    }
    used = tok.decode_defaults.resolve(**decode).as_dict()
    if a.prefix is not None and tok.schedule is None and not a.allow_truncation:
        p.error(
            f"{a.checkpoint} is unordered: its prefixes are not coarse images; pass --allow-truncation to mask its tail"
        )
    if a.allow_truncation:
        decode["allow_truncation"] = True
    result = {
        "checkpoint": a.checkpoint,
        "split": a.split,
        "prefix": a.prefix or tok.config["num_tokens"],
        "decode": used,
        **evaluate(tok, images, a.batch_size, a.seed, a.prefix, **decode),
    }
    print(json.dumps(result, indent=1))
    print(
        "\n| checkpoint | split | images | tokens | steps | solver | iters | cfg | temperature | shift | PSNR (dB) | SSIM | distinct ids "
        "| perplexity | bits/image |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {a.checkpoint} | {a.split} | {result['num_images']} | {result['prefix']} | {used['num_steps']} | {used['solver']} | {used['num_iters']} | "
        f"{used['cfg_scale']} | {used['temperature']} | {used['shift']} | {result['psnr']:.2f} | {result['ssim']:.4f} | {result['distinct_ids']} | "
        f"{result['perplexity']:.0f} | {result['bits_per_image']:.0f} |"
    )


if __name__ == "__main__":
    main()
