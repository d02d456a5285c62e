"""Bad-input fuzzing of the public verbs: seeded cases over image tensors, id tensors and image files, each judged
ok / clear_error / crash / wrong (the case spaces and the rule: :mod:`v2flow.eval.fuzz_cases`).

    python benchmarks/fuzz_cases.py                       # a tiny random tokenizer, 200 cases of each kind
    python benchmarks/fuzz_cases.py --checkpoint checkpoints/mnist-smollm2-32 --n 100 --seed 0

Prints JSON (counts per kind and outcome, and the cases that were not ``ok`` / ``clear_error``) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a tokenizer directory (from_pretrained); default a tiny random tokenizer")
    p.add_argument("--n", type=int, default=200, help="cases per kind")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from v2flow import V2FlowTokenizer
    from v2flow.eval.fuzz_cases import OUTCOMES, sweep
    from v2flow.testing import tiny_tokenizer

    tokenizer = V2FlowTokenizer.from_pretrained(a.checkpoint) if a.checkpoint else tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        result = sweep(tokenizer, a.n, a.seed, tmp)
    result.update(checkpoint=a.checkpoint or "tiny random tokenizer", n_per_kind=a.n, seed=a.seed)
    print(json.dumps(result, indent=1))
    print("\n| kind | " + " | ".join(OUTCOMES) + " |\n|---|" + "---|" * len(OUTCOMES))
    for kind, counts in result["counts"].items():
        print(f"| {kind} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")


if __name__ == "__main__":
    main()
