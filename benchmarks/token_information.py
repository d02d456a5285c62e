"""What the ids carry: a one-pass regression decoder trained on a frozen tokenizer's ids, next to the flow decoder.

    python benchmarks/token_information.py
    python benchmarks/token_information.py --checkpoint checkpoints/mnist-smollm2-32 --steps 2000 --train-limit 10000

For each checkpoint it encodes the first ``--train-limit`` MNIST training digits and ``--test-limit`` test
digits once with the frozen tokenizer, trains an MLP regression decoder (``v2flow.eval.token_information.IdDecoder``:
the tokenizer's own frozen token embeddings, concatenated, to all pixels at once) with MSE on the training ids,
and scores it on the test digits. On the same test digits it reconstructs with the flow decoder at the checkpoint's
decode defaults (or ``--temperature`` / ``--mode``). PSNR is the mean of per-image PSNR on [-1, 1] (data range
2), against exactly the 32x32 padded digits the model was given.

How to read it: the regression PSNR is what a plain decoder reads out of the ids (a lower bound on what they
carry; a posterior mean, so it does not pay the up to 3 dB a sample loses). Far above the flow decoder: the decoder
is the bottleneck. Close to it (``gap`` near 0): the ids are. ``no-information PSNR`` is the mean training digit's
score, the floor; ``regression train PSNR`` above the test figure shows the decoder over-fitting its training ids.

Prints JSON and a markdown table; merges each checkpoint's entry into ``--out`` under its path.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from v2flow import V2FlowTokenizer
from v2flow.data import load_mnist
from v2flow.eval.report import device_name, merge_json
from v2flow.eval.token_information import EMBEDDINGS, flow_decoder_psnr, measure_token_information

DEFAULT_CHECKPOINTS = ["checkpoints/mnist-smollm2-32", "checkpoints/mnist-ordered-32"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", action="append", default=None, help=f"repeatable (default: {' and '.join(DEFAULT_CHECKPOINTS)})"
    )
    p.add_argument("--train-limit", type=int, default=10_000, help="first n MNIST training digits (0 = all 50,000)")
    p.add_argument("--test-limit", type=int, default=1000, help="first n MNIST test digits (0 = all 10,000)")
    p.add_argument("--steps", type=int, default=2000, help="regression decoder optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="regression decoder batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--hidden-dim", type=int, default=1024)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--embedding", choices=EMBEDDINGS, default="frozen", help="frozen tokenizer embeddings or learned")
    p.add_argument(
        "--temperature", type=float, default=None, help="flow decode temperature (default: the checkpoint's)"
    )
    p.add_argument(
        "--mode", choices=["sample", "mean"], default=None, help="flow decode mode (default: the checkpoint's)"
    )
    p.add_argument("--decode-batch-size", type=int, default=500, help="images per encode / flow-decode batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the tokenizer and the regression decoder run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="benchmarks/results/token_information.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    checkpoints = a.checkpoint or DEFAULT_CHECKPOINTS
    train, _ = load_mnist("train")
    test, _ = load_mnist("test")
    train, test = train[: a.train_limit or len(train)], test[: a.test_limit or len(test)]
    decode = {k: v for k, v in {"temperature": a.temperature, "mode": a.mode}.items() if v is not None}
    results = {}
    for path in checkpoints:
        tok = V2FlowTokenizer.from_pretrained(path).to(a.device).eval()
        start = time.perf_counter()
        flow = flow_decoder_psnr(tok, test, batch_size=a.decode_batch_size, seed=a.seed, **decode)
        regression = measure_token_information(
            tok,
            train,
            test,
            steps=a.steps,
            batch_size=a.batch_size,
            lr=a.lr,
            weight_decay=a.weight_decay,
            seed=a.seed,
            device=a.device,
            embedding=a.embedding,
            hidden_dim=a.hidden_dim,
            depth=a.depth,
            dropout=a.dropout,
        )
        results[path] = {
            "device": device_name(a.device),
            "flow_psnr": flow["flow_psnr"],
            "flow_decode": flow["decode"],
            "flow_seconds": flow["seconds"],
            **regression,
            "gap": regression["regression_psnr"] - flow["flow_psnr"],
            "total_seconds": time.perf_counter() - start,
        }
        merge_json(a.out, path, results[path])
    print(json.dumps(results, indent=1))
    print(
        "\n| checkpoint | N | bits/image | distinct ids | flow-decoder PSNR (dB) | regression PSNR (dB) | gap (dB) "
        "| no-information PSNR (dB) | regression train PSNR (dB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for path, r in results.items():
        print(
            f"| {path} | {r['num_tokens']} | {r['bits_per_image']:.0f} | {r['distinct_ids']} | {r['flow_psnr']:.2f} "
            f"| {r['regression_psnr']:.2f} | {r['gap']:+.2f} | {r['mean_image_psnr']:.2f} | {r['train_psnr']:.2f} |"
        )


if __name__ == "__main__":
    main()
