"""Which ordered-mode settings buy the most? Train variants of ``configs/mnist_ordered.yaml`` side by side on one
device and score their prefixes against the shipped unordered tokenizer.

    python benchmarks/ordered_sweep.py --accelerator gpu --parallel 6 --time-limit 440 \
        --vocab-source checkpoints/mnist-smollm2-32 --json benchmarks/results/ordered_sweep.json

Each variant is ``NAME=STAGES:TRUNCATION_PROB:PREFIX_SAMPLING[:KEY=VALUE,...]`` (e.g. ``B=8,4,2,1,1:0.5:uniform``
or ``B2=8,4,2,1,1:0.5:uniform:interval_times=true``) and overrides ``order_stages``, ``truncation_prob``,
``prefix_sampling`` and any further tokenizer keys it names; everything else (sizes, batch, steps) is the
config's, so variants differ only there. ``--parallel`` runs go through the project's Lightning
CLI at once (``v2flow fit`` subprocesses; small models leave a GPU mostly idle, so several share it). A run
stopped by ``--time-limit`` seconds is scored at the step it reached, which the table states: compare variants
at equal steps only. Two runs of one config differed by 0.75 dB at k = N (``checkpoints/README.md``,
``mnist-ordered-32``), so compare settings over several ``--seeds`` (``seed_everything`` values: each variant trains once
per seed, as ``NAME_seedS``, and the table gives the mean over seeds and its standard deviation).
``--vocab-source checkpoints/mnist-smollm2-32`` takes the 4,096 SmolLM2 rows from the
shipped tokenizer (the same rows, in the same order, as ``smollm2`` with fps selection) on machines without
the bundled LLM.

Scored: PSNR on the first ``--limit`` MNIST test digits of ``decode(ids[:, :k])`` for k in 1, 2, 4, ..., N, at
the decode the checkpoints ship with (2 Euler steps from the noise mean), the EMA weights of each run's
``last.ckpt``; the unordered reference decodes with its tail masked, as in ``benchmarks/prefix.py``. Prints
JSON and a markdown table with the issue's two margins, ordered minus unordered at k = N/4 and k = N. The
variants, commands and scores: :mod:`v2flow.eval.ordered_sweep`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from v2flow.eval.ordered_sweep import DECODE, fit_command, over_seeds, parse_variant, run_name, score
from v2flow.eval.report import device_name, merge_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = (
    "A=4,3,2,1,0.5:0.5:uniform",
    "B=8,4,2,1,1:0.5:uniform",
    "C=4,3,2,1,0.5:0.5:pow2",
    "D=8,4,2,1,1:0.5:pow2",
    "E=2,2,2,1,1:0.5:pow2",
    "F=8,4,2,1,1:0.3:pow2",
)


def train(variants: list[tuple], a: argparse.Namespace) -> None:
    """Run the fits (each variant once per seed), at most `a.parallel` at a time, each stopped after
    `a.time_limit` seconds."""
    pending = [(v, seed) for v in variants for seed in a.seeds]
    running = []
    while pending or running:
        while pending and len(running) < a.parallel:
            (name, *rest), seed = pending.pop(0)
            v = (run_name(name, seed, a.seeds), *rest)
            log = open(a.runs_dir / f"{v[0]}.log", "w")  # closed when the run ends
            command = fit_command(v, a.config, a.runs_dir, a.accelerator, a.vocab_source, a.max_steps, seed)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, log, time.time()))
        time.sleep(2)
        for proc, log, start in list(running):
            if proc.poll() is None and a.time_limit and time.time() - start > a.time_limit:
                proc.terminate()  # the last checkpoint stays: it is scored at the step it reached
                proc.wait()
            if proc.poll() is not None:
                log.close()
                running.remove((proc, log, start))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument(
        "--config",
        type=Path,
        nargs="+",
        default=[ROOT / "configs" / "mnist.yaml", ROOT / "configs" / "mnist_ordered.yaml"],
        help="the configs in merge order (default: configs/mnist.yaml, then its override configs/mnist_ordered.yaml)",
    )
    p.add_argument("--unordered", default=str(ROOT / "checkpoints" / "mnist-smollm2-32"))
    p.add_argument("--vocab-source", default="smollm2")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--max-steps", type=int, default=0, help="0 = the config's")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=0, help="seconds per run (0 = none)")
    p.add_argument("--limit", type=int, default=2000, help="first n MNIST test digits")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/ordered_sweep"))
    p.add_argument("--skip-training", action="store_true", help="score the runs already in --runs-dir")
    p.add_argument("--json", type=Path, help="merge the results into this JSON file under 'ordered_sweep'")
    p.add_argument(
        "--seeds", type=int, nargs="+", help="seed_everything of each variant's runs (default: the config's)"
    )
    a = p.parse_args()
    if a.seeds and len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds repeats a seed: {a.seeds}")
    a.seeds = a.seeds or [None]
    variants = [parse_variant(s) for s in a.variants]
    a.runs_dir.mkdir(parents=True, exist_ok=True)
    if not a.skip_training:
        train(variants, a)

    from v2flow import V2FlowTokenizer
    from v2flow.data import load_mnist
    from v2flow.training import tokenizer_from_checkpoint

    device = "cuda" if a.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
    images = load_mnist("test")[0][: a.limit]
    ref = score(V2FlowTokenizer.from_pretrained(a.unordered).to(device), images, a.batch_size)
    n = max(ref)
    results = {"unordered": {"checkpoint": a.unordered, "psnr": ref}}
    for name, stages, prob, sampling, extra in variants:
        runs = []
        for seed in a.seeds:
            run = a.runs_dir / run_name(name, seed, a.seeds)
            ckpts = sorted(run.glob("version_*/checkpoints/last.ckpt"))
            if not ckpts:
                print(f"{run.name}: no checkpoint in {run} (see {run}.log)", file=sys.stderr)
                continue
            step = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["global_step"]
            tok = tokenizer_from_checkpoint(ckpts[-1], weights="ema").to(device)
            runs.append({"seed": seed, "step": step, "psnr": score(tok, images, a.batch_size)})
        if not runs:
            continue
        psnr, psnr_std = over_seeds([r["psnr"] for r in runs])
        ks = sorted(psnr)
        results[name] = {
            "order_stages": stages,
            "truncation_prob": prob,
            "prefix_sampling": sampling,
            "overrides": extra,
            "step": min(r["step"] for r in runs),
            "seeds": runs,
            "psnr": psnr,
            "psnr_std": psnr_std,
            "non_decreasing": all(psnr[j] >= psnr[i] for i, j in zip(ks[:-1], ks[1:], strict=True)),
            "margin_quarter_db": round(psnr[n // 4] - ref[n // 4], 3),
            "margin_full_db": round(psnr[n] - ref[n], 3),
        }
    summary = {"device": device_name(device), "test_images": len(images), "decode": DECODE, "results": results}
    print(json.dumps(summary))
    ks = sorted(ref)
    print(
        f"\nseeds per variant: {a.seeds} (None: the config's); step: the fewest any of a variant's runs reached"
        "\n| run | stages | trunc. | lengths | other | step | "
        + " | ".join(f"k={k}" for k in ks)
        + " | k=N/4 margin | k=N margin |"
    )
    print("|---|---|---|---|---|---|" + "---|" * (len(ks) + 2))
    print("| unordered | | | | | | " + " | ".join(f"{ref[k]:.2f}" for k in ks) + " | | |")
    for name, r in results.items():
        if name != "unordered":
            stages = ", ".join(f"{s:g}" for s in r["order_stages"])
            spread = len(r["seeds"]) > 1
            cells = " | ".join(f"{r['psnr'][k]:.2f}" + (f" ± {r['psnr_std'][k]:.2f}" if spread else "") for k in ks)
            other = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
            print(
                f"| {name} | {stages} | {r['truncation_prob']:g} | {r['prefix_sampling']} | {other} | {r['step']} "
                f"| {cells} "
                f"| {r['margin_quarter_db']:+.2f} | {r['margin_full_db']:+.2f} |"
            )
    if a.json:
        merge_json(a.json, "ordered_sweep", summary)


if __name__ == "__main__":
    main()
