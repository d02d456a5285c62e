"""Bounded memory: peak resident memory of ``v2flow encode`` / ``v2flow reconstruct`` on image folders of
growing size. Each run is a fresh process (its own ``ru_maxrss``), so the numbers do not mix.

    python benchmarks/memory.py --sizes 1000 10000
    python benchmarks/memory.py --sizes 1000 10000 --commands encode --no-release   # without the heap release

The folders hold MNIST test digits written as 32x32 PNG files. Streaming means the peak stays flat as the
folder grows; a command that loaded the whole folder would grow by ~4 KB per 32x32 image in float32 (40 MB
for 10,000), plus whatever it keeps per image. ``--no-release`` turns off the release of freed heap memory
after every batch (:func:`v2flow.utils.release_heap_memory`), to see what it saves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import json, os, resource, sys
import v2flow.utils
from v2flow.cli import main
if os.environ.get("V2FLOW_BENCH_NO_RELEASE") == "1":
    v2flow.utils.release_heap_memory = lambda: None
rc = main(sys.argv[1:])
print("RESULT " + json.dumps({"rc": rc, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_digits(folder: Path, n: int) -> Path:
    """The first `n` MNIST test digits (cycled if n > 10,000) as 32x32 grayscale PNG files."""
    from v2flow.data import load_mnist

    images, _ = load_mnist("test")
    pixels = ((images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(pixels[i % len(pixels)]).save(folder / f"{i:06d}.png")
    return folder


def run_command(argv: list[str], release: bool = True) -> dict:
    """Run ``v2flow <argv>`` in a fresh process; its exit code, peak RSS (MB) and wall time."""
    start = time.perf_counter()
    env = {**os.environ, "V2FLOW_BENCH_NO_RELEASE": "0" if release else "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"v2flow {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return {**json.loads(lines[-1][len("RESULT ") :]), "seconds": round(seconds, 1)}


def memory_check(
    checkpoint: str, sizes: list[int], commands: list[str], workdir: Path, release: bool = True
) -> list[dict]:
    rows = []
    for n in sizes:
        folder = write_digits(workdir / f"digits{n}", n)
        for command in commands:
            out = workdir / f"{command}{n}"
            argv = [command, checkpoint, str(folder), "-o", str(out / "ids.pt" if command == "encode" else out)]
            result = run_command(argv, release)
            rows.append({"command": command, "images": n, "heap_release": release, **result})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/mnist-smollm2-32")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--commands", nargs="+", default=["encode", "reconstruct"], choices=["encode", "reconstruct"])
    p.add_argument("--no-release", action="store_true", help="do not return freed heap memory after each batch")
    p.add_argument("--output", default=None, help="also write the JSON here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = memory_check(a.checkpoint, a.sizes, a.commands, Path(tmp), release=not a.no_release)
    print(json.dumps(rows, indent=1))
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| command | images | peak RSS (MB) | wall (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['images']} | {r['peak_rss_mb']:.0f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
