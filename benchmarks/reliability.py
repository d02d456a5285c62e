"""Reliability in one run: exact resume, DDP agreement across processes, bad-input fuzzing, bounded memory.

    python benchmarks/reliability.py                      # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/reliability.py --skip memory        # without the 10,000-image folders

* resume: a tiny fit stopped mid-epoch and resumed from its checkpoint against an uninterrupted one
  (losses, raw and EMA weights compared bit for bit; :func:`v2flow.eval.reliability.resume_check`);
* ddp: 2 training steps plus a validation on 2 CPU processes (gloo), for the vocab and vq quantizers; the
  ranks' weights, EMA and codebook buffers compared (:func:`v2flow.eval.reliability.ddp_check`);
* fuzz: a seeded sweep of bad image tensors, id tensors and image files through the public verbs, each
  classified ok / clear_error / crash / wrong (:func:`v2flow.eval.fuzz_cases.sweep`; the same case space
  drives the hypothesis tests in ``tests/test_fuzz.py``);
* memory: peak RSS of ``v2flow encode`` and ``v2flow reconstruct`` on folders of 1,000 and 10,000 digits,
  each in a fresh process (:func:`memory.memory_check`).

Prints JSON and a markdown table; ``--output`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from benchmarks import memory  # noqa: E402
from v2flow import V2FlowTokenizer  # noqa: E402
from v2flow.eval import fuzz_cases, reliability  # noqa: E402
from v2flow.testing import tiny_tokenizer  # noqa: E402

CHECKS = ("resume", "ddp", "fuzz", "memory")


def run(checks: list[str], fuzz_n: int, checkpoint: str, sizes: list[int], workdir: Path) -> dict:
    results: dict = {}
    if "resume" in checks:
        results["resume"] = reliability.resume_check(workdir / "resume")
    if "ddp" in checks:
        results["ddp"] = reliability.ddp_check(workdir / "ddp")
    if "fuzz" in checks:
        sweep = {}
        for name, tokenizer in (
            ("unordered", tiny_tokenizer()),
            ("ordered", tiny_tokenizer(token_order="ordered", truncation_prob=0.5)),
            ("shipped", V2FlowTokenizer.from_pretrained(checkpoint)),
        ):
            (workdir / f"fuzz-{name}").mkdir(parents=True)
            sweep[name] = fuzz_cases.sweep(tokenizer, fuzz_n, seed=0, tmp_dir=workdir / f"fuzz-{name}")
        results["fuzz"] = sweep
    if "memory" in checks:
        results["memory"] = memory.memory_check(checkpoint, sizes, ["encode", "reconstruct"], workdir / "memory")
    return results


def table(results: dict) -> str:
    rows = ["| check | measured | verdict |", "|---|---|---|"]
    if "resume" in results:
        r = results["resume"]
        rows.append(
            f"| exact resume | steps {r['steps_compared'][0]}-{r['steps_compared'][-1]} after a mid-epoch stop, "
            f"max loss diff {r['max_abs_loss_diff']:.1e} | {'bit-exact' if r['bit_exact'] else 'NOT exact'} |"
        )
    if "ddp" in results:
        r = results["ddp"]
        rows.append(
            f"| DDP {r['world_size']} processes | max weight diff {r['max_abs_weight_diff']:.1e}, validation "
            f"metrics reduced: {r['val_metrics_agree'] and r['val_counts_global']} | "
            f"{'ranks agree' if r['ranks_agree'] else 'RANKS DIVERGE'} |"
        )
    if "fuzz" in results:
        for name, sweep in results["fuzz"].items():
            for kind, counts in sweep["counts"].items():
                total = sum(counts.values())
                bad = counts.get("crash", 0) + counts.get("wrong", 0)
                detail = ", ".join(f"{k} {v}" for k, v in counts.items())
                rows.append(f"| fuzz {name}: {kind} | {total} cases: {detail} | {'pass' if not bad else 'FAIL'} |")
    if "memory" in results:
        by = {}
        for r in results["memory"]:
            by.setdefault(r["command"], []).append(r)
        for command, runs in by.items():
            detail = ", ".join(f"{r['images']} images: {r['peak_rss_mb']:.0f} MB ({r['seconds']} s)" for r in runs)
            growth = runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"]
            rows.append(f"| peak RSS, v2flow {command} | {detail} | {growth:+.0f} MB |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", nargs="*", default=[], choices=CHECKS)
    p.add_argument("--fuzz-n", type=int, default=200, help="cases per kind and tokenizer")
    p.add_argument("--checkpoint", default="checkpoints/mnist-smollm2-32")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--output", default=None, help="also write the JSON here")
    a = p.parse_args()
    checks = [c for c in CHECKS if c not in a.skip]
    with tempfile.TemporaryDirectory() as tmp:
        results = run(checks, a.fuzz_n, a.checkpoint, a.sizes, Path(tmp))
    text = json.dumps(results, indent=1, default=str)
    print(text)
    print()
    print(table(results))
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
