"""Reconstructions of the same digits for num_steps x solvers in one PNG grid, and PSNR versus steps (PNG).

    python examples/ode_steps.py --checkpoint checkpoints/mnist-smollm2-32 --output outputs/ode_steps

Grid rows: originals, then one row per (solver, num_steps); dopri5 is adaptive and gets a single row.
The plot's PSNR is measured on `--num-images` test digits with the same noise seed for every setting.
Writes ``ode_steps_grid.png``, ``psnr_vs_steps.png`` and ``ode_steps.json`` (one row per setting: solver,
num_steps, psnr, ssim) into ``--output``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/mnist-smollm2-32", help="a pretrained tokenizer directory")
    p.add_argument("--output", default="outputs/ode_steps", help="folder for the PNGs and the JSON")
    p.add_argument("--num-images", type=int, default=200, help="MNIST test digits whose PSNR is plotted")
    p.add_argument(
        "--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="ODE steps per iteration, one row each"
    )
    p.add_argument(
        "--solvers",
        nargs="+",
        default=["euler", "midpoint", "rk4", "flow_match_euler"],
        help="fixed-step solvers (dopri5, adaptive, is always added as one row)",
    )
    p.add_argument("--columns", type=int, default=12, help="digits shown in the grid")
    a = p.parse_args()
    if a.num_images < 1 or a.columns < 1 or min(a.steps) < 1:
        p.error("--num-images, --columns and every --steps value must be >= 1")

    import matplotlib
    import torch

    from v2flow import V2FlowTokenizer
    from v2flow.data import load_mnist
    from v2flow.metrics import psnr_ssim
    from v2flow.utils import save_image_grid

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(a.output)
    tok = V2FlowTokenizer.from_pretrained(a.checkpoint)
    images, _ = load_mnist("test")
    images = images[: a.num_images]
    ids = tok.encode(images).ids

    rows, results = [images[: a.columns]], []
    for solver in [*a.solvers, "dopri5"]:
        for steps in a.steps if solver != "dopri5" else [None]:
            recon = tok.decode(ids, num_steps=steps, solver=solver, generator=torch.Generator().manual_seed(0)).images
            rows.append(recon[: a.columns])
            results.append({"solver": solver, "num_steps": steps, **psnr_ssim(recon, images)})
            print(json.dumps(results[-1]))
    save_image_grid(torch.cat(rows), out / "ode_steps_grid.png", nrow=min(a.columns, len(images)))

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for solver in a.solvers:
        pts = [(r["num_steps"], r["psnr"]) for r in results if r["solver"] == solver]
        ax.plot(*zip(*pts, strict=True), marker="o", label=solver)
    dopri = [r for r in results if r["solver"] == "dopri5"][0]
    ax.axhline(dopri["psnr"], color="gray", linestyle="--", label="dopri5 (adaptive)")
    ax.set(
        xscale="log",
        xlabel="ODE steps per iteration",
        ylabel="PSNR (dB)",
        title=f"{Path(a.checkpoint).name}, {len(images)} test digits",
    )
    ax.set_xticks(a.steps, [str(s) for s in a.steps])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "psnr_vs_steps.png", dpi=120)
    (out / "ode_steps.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'ode_steps_grid.png'} and {out / 'psnr_vs_steps.png'}")


if __name__ == "__main__":
    main()
