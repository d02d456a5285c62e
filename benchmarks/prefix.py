"""Do ordered tokens run coarse to fine? Prefix decoding of an ordered and an unordered tokenizer.

    python benchmarks/prefix.py --ordered checkpoints/mnist-ordered-32 --unordered checkpoints/mnist-smollm2-32

For each checkpoint and each prefix length k it decodes the first k tokens of every MNIST test digit (the
unordered tokenizer with its tail masked the same way, ``allow_truncation=True``) and reports PSNR/SSIM
against the exact 32x32 inputs, at each model's decode defaults and as the prefix estimate
(``decode(..., prefix_estimate=True)``: the one-step estimate of the clean digit at the noise level where
the first missing token would enter, the decoder's guess at the mean of the digits the prefix allows). It
also reports, per token position, the entropy of the token distribution over the test set and the
next-token entropy (cross-entropy, bits) of a small causal transformer trained on the training set's token
sequences: Selftok finds ordered tokens get easier to predict along the sequence.
Last, per noise level t, the PSNR of the velocity head's one-step data estimate from truly noised digits with
the tokens visible at t and with no tokens (``denoising_gain``): it shows where along the trajectory tokens
can still steer the decode, which bounds what the late tokens of an ordered tokenizer can add.
With ``--bound``, tokenizers trained for fewer tokens (``configs/mnist_8.yaml``: N/4 = 8) decode their full
sequences as well: what k tokens of the same vocabulary hold when the whole training budget goes to k tokens,
against which the k-token prefixes of both 32-token checkpoints can be read.

Prints JSON and a markdown table; writes ``prefix_grid.png`` (per digit: an ordered row above an unordered
row, one column per k, the original last) and ``prefix_psnr.png`` into ``--out``. The measures:
:mod:`v2flow.eval.prefix`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from v2flow import V2FlowTokenizer
from v2flow.data import load_mnist
from v2flow.eval.prefix import denoising_gain, next_token_entropy, position_entropy, prefix_quality
from v2flow.lm_training import encode_images
from v2flow.utils import save_image_grid


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
    p.add_argument(
        "--bound",
        nargs="*",
        default=[],
        help="checkpoints of tokenizers trained for fewer tokens, scored on their full sequences",
    )
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
        # the one-step estimate where the first missing token would enter (a full sequence decodes as above)
        estimate = {
            k: prefix_quality(tok, test, ids, k, a.batch_size, prefix_estimate=True) if k < n else quality[k]
            for k in tqdm(prefixes, desc=f"prefix estimates ({mode})")
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
            "psnr_estimate": {k: q["psnr"] for k, q in estimate.items()},
            "ssim_estimate": {k: q["ssim"] for k, q in estimate.items()},
            "denoising": denoising_gain(tok, test, ids, batch_size=a.batch_size, seed=a.seed),
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
    bounds = []
    for path in a.bound:
        tok = V2FlowTokenizer.from_pretrained(path).to(a.device)
        start = time.perf_counter()
        ids = encode_images(tok, test, a.batch_size, desc=f"encoding (bound {path})")
        full = prefix_quality(tok, test, ids, ids.shape[1], a.batch_size)
        bounds.append({"checkpoint": path, "num_tokens": ids.shape[1], **full})
        bounds[-1]["seconds"] = round(time.perf_counter() - start, 1)
    rows = torch.stack([grid_rows["ordered"], grid_rows["unordered"]], dim=1).flatten(0, 2)
    columns = grid_rows["ordered"].shape[1]
    save_image_grid(rows, a.out / "prefix_grid.png", nrow=columns)
    n = results["ordered"]["num_tokens"]
    ordered, unordered = results["ordered"]["psnr"], results["unordered"]["psnr"]
    ordered_est, unordered_est = results["ordered"]["psnr_estimate"], results["unordered"]["psnr_estimate"]
    ks = sorted(ordered)
    nan = float("nan")
    checks = {
        "ordered_psnr_non_decreasing": all(ordered[b] >= ordered[a_] for a_, b in zip(ks[:-1], ks[1:], strict=True)),
        "gain_at_quarter_db": ordered.get(n // 4, nan) - unordered.get(n // 4, nan),
        "gap_at_full_db": ordered.get(n, nan) - unordered.get(n, nan),
        # prefix estimates, against the unordered tokenizer's better decode of the same prefix
        "ordered_estimate_non_decreasing": all(
            ordered_est[b] >= ordered_est[a_] for a_, b in zip(ks[:-1], ks[1:], strict=True)
        ),
        "gain_at_quarter_db_estimate": ordered_est.get(n // 4, nan)
        - max(unordered.get(n // 4, nan), unordered_est.get(n // 4, nan)),
    }
    quarter = [b["psnr"] for b in bounds if b["num_tokens"] == n // 4]
    if quarter:  # the first N/4 ordered tokens against a tokenizer trained for N/4 tokens
        checks["ordered_minus_bound_at_quarter_db"] = ordered.get(n // 4, nan) - quarter[0]
        checks["ordered_estimate_minus_bound_at_quarter_db"] = ordered_est.get(n // 4, nan) - quarter[0]
    _plot(results, bounds, a.out / "prefix_psnr.png")
    summary = {"test_images": len(test), "prefixes": ks, "checks": checks, "results": results, "bounds": bounds}
    (a.out / "prefix.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    print("\n| mode | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for mode in ("ordered", "unordered"):
        print(f"| {mode} PSNR (dB) | " + " | ".join(f"{results[mode]['psnr'][k]:.2f}" for k in ks) + " |")
    for mode in ("ordered", "unordered"):
        cells = " | ".join(f"{results[mode]['psnr_estimate'][k]:.2f}" for k in ks)
        print(f"| {mode} PSNR, prefix estimate (dB) | {cells} |")
    for b in bounds:
        cells = " | ".join(f"{b['psnr']:.2f}" if k == b["num_tokens"] else "" for k in ks)
        print(f"| trained for {b['num_tokens']} tokens, full sequence (dB) | {cells} |")
    times = results["ordered"]["denoising"]["times"]
    print("\n| one-step x0 estimate, PSNR (dB) | " + " | ".join(f"t={t}" for t in times) + " |")
    print("|---|" + "---|" * len(times))
    for mode in ("ordered", "unordered"):
        d = results[mode]["denoising"]
        cells = [f"{a_:.2f} ({k})" for a_, k in zip(d["psnr_tokens"], d["visible_tokens"], strict=True)]
        print(f"| {mode}, visible tokens (their count) | " + " | ".join(cells) + " |")
    d = results["unordered"]["denoising"]
    print("| no tokens (null condition, unordered) | " + " | ".join(f"{v:.2f}" for v in d["psnr_null"]) + " |")


def _plot(results: dict, bounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for mode, r in results.items():
        d = r["denoising"]
        axes[2].plot(d["times"], d["psnr_tokens"], marker="o", label=f"{mode}: visible tokens")
        ks = sorted(r["psnr"])
        line = axes[0].plot(ks, [r["psnr"][k] for k in ks], marker="o", label=mode)[0]
        estimates = [r["psnr_estimate"][k] for k in ks]
        axes[0].plot(ks, estimates, marker=".", linestyle="--", color=line.get_color(), label=f"{mode}: estimate")
        axes[1].plot(r["next_token_entropy_bits"], label=f"{mode}: next-token")
        axes[1].plot(r["position_entropy_bits"], linestyle=":", label=f"{mode}: marginal")
    for b in bounds:
        label = f"trained for {b['num_tokens']} tokens"
        axes[0].plot([b["num_tokens"]], [b["psnr"]], marker="*", markersize=12, linestyle="", label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("prefix length k")
    axes[0].set_ylabel("PSNR (dB)")
    axes[1].set_xlabel("token position")
    axes[1].set_ylabel("entropy (bits)")
    d = results["unordered"]["denoising"]
    axes[2].plot(d["times"], d["psnr_null"], linestyle=":", color="gray", label="no tokens")
    axes[2].invert_xaxis()
    axes[2].set_xlabel("noise level t (1 = noise)")
    axes[2].set_ylabel("one-step x0 estimate, PSNR (dB)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
