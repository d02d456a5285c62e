"""Do ordered tokens run coarse to fine? Prefix decoding of an ordered and an unordered tokenizer.

    python benchmarks/prefix.py --ordered checkpoints/mnist-ordered-32 --unordered checkpoints/mnist-smollm2-32

For each checkpoint and each prefix length k it decodes the first k tokens of every MNIST test digit (the
unordered tokenizer with its tail masked the same way, ``allow_truncation=True``) and reports PSNR/SSIM
against the exact 32x32 inputs. It also reports, per token position, the entropy of the token distribution
over the test set and the next-token entropy (cross-entropy, bits) of a small causal transformer trained on
the training set's token sequences: Selftok finds ordered tokens get easier to predict along the sequence.

Prints JSON and a markdown table; writes ``prefix_grid.png`` (per digit: an ordered row above an unordered
row, one column per k, the original last) and ``prefix_psnr.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.image import StructuralSimilarityIndexMeasure
from tqdm import tqdm

from v2flow import V2FlowTokenizer
from v2flow.data import load_mnist
from v2flow.lm_training import encode_images
from v2flow.metrics import psnr_per_image
from v2flow.utils import save_image_grid


def prefix_quality(
    tok: V2FlowTokenizer, images: torch.Tensor, ids: torch.Tensor, k: int, batch_size: int, **decode_kwargs
) -> dict:
    """PSNR and SSIM of ``decode(ids[:, :k])`` against `images`; `decode_kwargs` override the config's defaults."""
    device = tok.vocabulary.embeddings.device
    ssim = StructuralSimilarityIndexMeasure(data_range=2.0).to(device)
    psnr_sum = 0.0
    for i in range(0, len(images), batch_size):
        x, prefix = images[i : i + batch_size].to(device), ids[i : i + batch_size, :k].to(device)
        y = tok.decode(
            prefix, allow_truncation=True, generator=torch.Generator().manual_seed(i), **decode_kwargs
        ).images
        psnr_sum += float(psnr_per_image(y, x).sum())
        ssim.update(y, x)
    return {"psnr": psnr_sum / len(images), "ssim": float(ssim.compute())}


def position_entropy(indices: torch.Tensor, num_codes: int) -> list[float]:
    """Entropy (bits) of the token distribution at each position over a set of sequences (n, N)."""
    out = []
    for column in indices.T:
        p = torch.bincount(column, minlength=num_codes).double() / len(column)
        out.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
    return out


def next_token_entropy(
    train: torch.Tensor, test: torch.Tensor, num_codes: int, steps: int, seed: int, device: str = "cpu"
) -> list[float]:
    """Per-position next-token cross-entropy (bits) on `test` of a small GPT-2 trained on `train` (n, N).

    Position i is scored on predicting token i from tokens < i (position 0 from a start token alone)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    n = train.shape[1]
    bos = num_codes
    config = GPT2Config(vocab_size=num_codes + 1, n_positions=n + 1, n_embd=128, n_layer=2, n_head=4, bos_token_id=bos)
    model = GPT2LMHeadModel(config).to(device)
    train, test = train.to(device), test.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def with_bos(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full((len(x), 1), bos, device=x.device), x], dim=1)

    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="AR model", leave=False):
        batch = with_bos(train[torch.randint(len(train), (128,), generator=g)])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    total = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for chunk in test.split(500):
            x = with_bos(chunk)
            logits = model(x).logits[:, :-1]  # (B, N, V): position i predicts token i
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, N)
            total += nll.double().sum(0).cpu()
    return (total / len(test) / math.log(2)).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ordered", default="checkpoints/mnist-ordered-32")
    p.add_argument("--unordered", default="checkpoints/mnist-smollm2-32")
    p.add_argument("--prefixes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--limit", type=int, default=0, help="first n test digits (0 = all 10,000)")
    p.add_argument("--train-limit", type=int, default=10_000, help="training sequences for the AR model")
    p.add_argument("--ar-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--grid-digits", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the tokenizers and the AR model run (cpu, cuda, ...)")
    p.add_argument("--out", type=Path, default=Path("runs/prefix"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    test, _ = load_mnist("test")
    test = test[: a.limit or len(test)]
    train, _ = load_mnist("train")
    train = train[: a.train_limit]
    results, grid_rows = {}, {}
    for mode, path in (("ordered", a.ordered), ("unordered", a.unordered)):
        tok = V2FlowTokenizer.from_pretrained(path).to(a.device)
        n = tok.config["num_tokens"]
        start = time.perf_counter()
        ids = encode_images(tok, test, a.batch_size, desc=f"encoding ({mode})")
        indices = tok._ids_to_indices(ids.to(a.device)).cpu()
        prefixes = [k for k in a.prefixes if k <= n]
        quality = {
            k: prefix_quality(tok, test, ids, k, a.batch_size) for k in tqdm(prefixes, desc=f"prefixes ({mode})")
        }
        train_ids = encode_images(tok, train, a.batch_size, desc=f"encoding train ({mode})")
        train_indices = tok._ids_to_indices(train_ids.to(a.device)).cpu()
        num_codes = tok.resampler.num_codes
        results[mode] = {
            "checkpoint": path,
            "token_order": tok.config["token_order"],
            "num_tokens": n,
            "psnr": {k: q["psnr"] for k, q in quality.items()},
            "ssim": {k: q["ssim"] for k, q in quality.items()},
            "position_entropy_bits": position_entropy(indices, num_codes),
            "next_token_entropy_bits": next_token_entropy(
                train_indices, indices, num_codes, a.ar_steps, a.seed, a.device
            ),
            "seconds": round(time.perf_counter() - start, 1),
        }
        digits = test[: a.grid_digits]
        decoded = [
            tok.decode(
                ids[: a.grid_digits, :k].to(a.device), allow_truncation=True, generator=torch.Generator().manual_seed(0)
            ).images.cpu()
            for k in prefixes
        ]
        grid_rows[mode] = torch.stack([*decoded, digits], dim=1)  # (digits, columns, C, H, W)
    rows = torch.stack([grid_rows["ordered"], grid_rows["unordered"]], dim=1).flatten(0, 2)
    columns = grid_rows["ordered"].shape[1]
    save_image_grid(rows, a.out / "prefix_grid.png", nrow=columns)
    n = results["ordered"]["num_tokens"]
    ordered, unordered = results["ordered"]["psnr"], results["unordered"]["psnr"]
    ks = sorted(ordered)
    checks = {
        "ordered_psnr_non_decreasing": all(ordered[b] >= ordered[a_] for a_, b in zip(ks[:-1], ks[1:], strict=True)),
        "gain_at_quarter_db": ordered.get(n // 4, float("nan")) - unordered.get(n // 4, float("nan")),
        "gap_at_full_db": ordered.get(n, float("nan")) - unordered.get(n, float("nan")),
    }
    _plot(results, a.out / "prefix_psnr.png")
    summary = {"test_images": len(test), "prefixes": ks, "checks": checks, "results": results}
    (a.out / "prefix.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    print("\n| mode | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for mode in ("ordered", "unordered"):
        print(f"| {mode} PSNR (dB) | " + " | ".join(f"{results[mode]['psnr'][k]:.2f}" for k in ks) + " |")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, r in results.items():
        ks = sorted(r["psnr"])
        axes[0].plot(ks, [r["psnr"][k] for k in ks], marker="o", label=mode)
        axes[1].plot(r["next_token_entropy_bits"], label=f"{mode}: next-token")
        axes[1].plot(r["position_entropy_bits"], linestyle=":", label=f"{mode}: marginal")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("prefix length k")
    axes[0].set_ylabel("PSNR (dB)")
    axes[1].set_xlabel("token position")
    axes[1].set_ylabel("entropy (bits)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
