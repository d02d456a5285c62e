"""One reliability check of tokenizer training at a time (the checks: :mod:`v2flow.eval.reliability`).

    python benchmarks/reliability_checks.py resume        # a run stopped mid-epoch resumes bit-exactly
    python benchmarks/reliability_checks.py ddp           # DDP ranks on CPU processes end with equal weights

Prints the check's JSON. ``benchmarks/reliability.py`` runs both with bad-input fuzzing and memory checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("resume", help="exact resume check")
    p = sub.add_parser("ddp", help="DDP replica check")
    p.add_argument("--world-size", type=int, default=2)
    a = parser.parse_args(argv)

    from v2flow.eval.reliability import ddp_check, resume_check

    with tempfile.TemporaryDirectory() as tmp:
        result = resume_check(tmp) if a.command == "resume" else ddp_check(tmp, world_size=a.world_size)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
