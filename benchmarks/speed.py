"""Throughput on this machine: encode and decode images/s for num_steps x num_iters (Euler), and training
images/s of a config's tokenizer.

    python benchmarks/speed.py --checkpoint checkpoints/mnist-smollm2-32 --config configs/mnist.yaml

Prints JSON and a markdown table. Each number is the best of `--repeats` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import yaml

from v2flow import LLMVocabulary, V2FlowTokenizer
from v2flow.data import load_mnist


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def training_throughput(config_path: str, batch_size: int | None, steps: int, repeats: int) -> dict:
    """Images/s of forward + backward + AdamW step of the tokenizer in `config_path` (random vocabulary rows of
    the configured shape: the throughput does not depend on their values)."""
    cfg = yaml.safe_load(open(config_path))
    init = cfg["model"]["tokenizer"]["init_args"]
    tok = V2FlowTokenizer(**init).train()
    k, d = tok.config["num_entries"], tok.config["llm_dim"]
    tok.set_vocabulary(LLMVocabulary(torch.randn(k, d), torch.arange(k), "random", k))
    b = batch_size or cfg["data"]["init_args"]["batch_size"]
    images, _ = load_mnist("train")
    x = images[:b]
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def run():
        for _ in range(steps):
            loss = tok.loss(x, generator=g).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = best_time(run, repeats)
    return {"config": config_path, "batch_size": b, "train_images_per_s": b * steps / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/mnist-smollm2-32")
    p.add_argument("--config", default="configs/mnist.yaml")
    p.add_argument("--batch-size", type=int, default=256, help="images per encode/decode call")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--iters", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=3)
    a = p.parse_args()
    tok = V2FlowTokenizer.from_pretrained(a.checkpoint)
    images, _ = load_mnist("test")
    x = images[: a.batch_size]
    ids = tok.encode(x).ids
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "batch_size": a.batch_size,
        "encode_images_per_s": a.batch_size / best_time(lambda: tok.encode(x), a.repeats),
        "decode": [],
    }
    for iters in a.iters:
        for steps in a.steps:
            g = torch.Generator().manual_seed(0)
            seconds = best_time(
                lambda s=steps, n=iters, g=g: tok.decode(ids, num_steps=s, num_iters=n, solver="euler", generator=g),
                a.repeats,
            )
            result["decode"].append({"num_steps": steps, "num_iters": iters, "images_per_s": a.batch_size / seconds})
    result["train"] = training_throughput(a.config, None, a.train_steps, a.repeats)
    print(json.dumps(result, indent=1))
    print(
        f"\nencode: {result['encode_images_per_s']:.0f} images/s; train ({a.config}, batch "
        f"{result['train']['batch_size']}): {result['train']['train_images_per_s']:.1f} images/s\n"
    )
    print("| decode (Euler) | " + " | ".join(f"{s} steps" for s in a.steps) + " |")
    print("|---|" + "---|" * len(a.steps))
    for iters in a.iters:
        row = [d["images_per_s"] for d in result["decode"] if d["num_iters"] == iters]
        print(f"| num_iters={iters} (images/s) | " + " | ".join(f"{v:.0f}" for v in row) + " |")


if __name__ == "__main__":
    main()
