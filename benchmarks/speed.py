"""Speed, scaling and model FLOPs utilisation of v2flow on this machine.

    python benchmarks/speed.py throughput      # encode/decode/training images/s (shipped checkpoint, a config)
    python benchmarks/speed.py mfu             # FLOPs of one training step, measured matmul peak, MFU, profile
    python benchmarks/speed.py quality-cost    # PSNR vs decode seconds/image over solvers x steps x iters (+ PNG)
    python benchmarks/speed.py scaling         # time and peak memory per image vs image size and token count

Shared flags, after the sub-command: ``--device cpu|cuda``, ``--dtype fp32|bf16`` (bf16 runs under
``torch.autocast``; the ODE state stays float32), ``--compile`` (``torch.compile`` of the encoder, resampler,
masked transformer and velocity head, in place: parameter names do not change), ``--threads N`` (torch CPU
threads; 0 = torch's default), ``--repeats``, ``--clock wall|cpu``, ``--output FILE.json``. Every sub-command
prints JSON and a markdown table. Timings are the best (and median) of ``--repeats`` runs after a warm-up, in
wall time and in CPU seconds of the process; on a CPU shared with other work, run with one thread
(``OMP_NUM_THREADS=1``) and read the CPU seconds (``--clock cpu``), and re-run on a quiet machine for numbers
to publish. On a GPU:

    python benchmarks/speed.py mfu --device cuda --dtype bf16 [--compile]
    python benchmarks/speed.py scaling --device cuda --dtype bf16 [--compile]

Without a sub-command, ``throughput`` runs (``python benchmarks/speed.py --repeats 1`` is ``throughput --repeats 1``).
The measures: :mod:`v2flow.eval.speed` and :mod:`v2flow.eval.flops`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from v2flow import V2FlowTokenizer
from v2flow.data import load_mnist
from v2flow.eval.flops import count_flops, matmul_peak, mfu, register_cpu_attention_flops
from v2flow.eval.report import replace_section
from v2flow.eval.speed import (
    DTYPES,
    Env,
    loglog_slope,
    markdown_section,
    pareto,
    peak_memory,
    random_tokenizer,
    timings,
    train_step_fn,
)
from v2flow.hub import write_text_atomic
from v2flow.metrics import psnr_per_image

COMMANDS = ("throughput", "mfu", "quality-cost", "scaling")
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product")  # prefixes of aten ops counted as matmul


# ------------------------------------------------------------------ helpers


def tokenizer_init(config_path: str) -> tuple[dict, dict]:
    """(tokenizer init args, the whole config) of a Lightning CLI config."""
    cfg = yaml.safe_load(open(config_path))
    return dict(cfg["model"]["tokenizer"]["init_args"]), cfg


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def mnist_images(split: str, n: int, env: Env) -> torch.Tensor:
    images, _ = load_mnist(split)
    return images[:n].to(env.device)


# ------------------------------------------------------------------ throughput


def cmd_throughput(a, env: Env) -> tuple[dict, str]:
    tok = env.prepare(V2FlowTokenizer.from_pretrained(a.checkpoint))
    x = mnist_images("test", a.batch_size, env)
    with env.autocast():
        ids = tok.encode(x).ids
    result = {"machine": env.describe(), "batch_size": a.batch_size, "decode": []}

    def encode() -> None:
        with env.autocast():
            tok.encode(x)

    result["encode_images_per_s"] = a.batch_size / timings(encode, env, a.repeats)["best"]
    for iters in a.iters:
        for steps in a.steps:
            g = torch.Generator(device=env.device).manual_seed(0)

            def decode(s=steps, n=iters, g=g) -> None:
                with env.autocast():
                    tok.decode(ids, num_steps=s, num_iters=n, solver="euler", generator=g)

            seconds = timings(decode, env, a.repeats)["best"]
            result["decode"].append({"num_steps": steps, "num_iters": iters, "images_per_s": a.batch_size / seconds})
    init, cfg = tokenizer_init(a.config)
    train_tok = random_tokenizer(init, env)
    b = cfg["data"]["init_args"]["batch_size"]
    step = train_step_fn(train_tok, mnist_images("train", b, env), env, cfg)
    seconds = timings(lambda: [step() for _ in range(a.train_steps)], env, a.repeats)["best"] / a.train_steps
    result["train"] = {"config": a.config, "batch_size": b, "train_images_per_s": b / seconds}
    text = (
        f"encode: {result['encode_images_per_s']:.0f} images/s; train ({a.config}, batch {b}): "
        f"{result['train']['train_images_per_s']:.1f} images/s\n\n"
    )
    rows = []
    for iters in a.iters:
        row = [d["images_per_s"] for d in result["decode"] if d["num_iters"] == iters]
        rows.append([f"num_iters={iters} (images/s)", *(f"{v:.0f}" for v in row)])
    return result, text + markdown_table(["decode (Euler)", *(f"{s} steps" for s in a.steps)], rows)


# ------------------------------------------------------------------ mfu


def profile_table(fn: Callable[[], object], env: Env, top: int) -> tuple[list[dict], float]:
    """Top ops by self time over one call of `fn`, and the share of self time spent in matmul-class ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        env.sync()
    attr = "self_device_time_total" if env.device.type == "cuda" else "self_cpu_time_total"
    averages = [e for e in prof.key_averages() if getattr(e, attr) > 0 and e.key.startswith("aten::")]
    total = sum(getattr(e, attr) for e in averages)
    matmul = sum(getattr(e, attr) for e in averages if e.key.removeprefix("aten::").startswith(MATMUL_OPS))
    averages.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [
        {"op": e.key, "self_ms": getattr(e, attr) / 1e3, "calls": e.count, "share": getattr(e, attr) / total}
        for e in averages[:top]
    ]
    return rows, matmul / total if total else 0.0


def cmd_mfu(a, env: Env) -> tuple[dict, str]:
    register_cpu_attention_flops()
    init, cfg = tokenizer_init(a.config)
    tok = random_tokenizer(init, env, compile=False)  # FLOPs are counted eagerly: compiled kernels hide ops
    b = a.batch_size or cfg["data"]["init_args"]["batch_size"]
    images = mnist_images("train", b, env)
    step = train_step_fn(tok, images, env, cfg, a.optimizer)
    step()
    flops = count_flops(step)
    generator = torch.Generator(device=env.device).manual_seed(0)

    def forward() -> None:
        with env.autocast():
            tok.loss(images, generator=generator)

    forward_flops = count_flops(forward, depth=2)
    if env.compile:
        env.compile_parts(tok)
    for _ in range(a.warmup):
        step()
    env.sync()
    # interleave peak and step timings so both see the same machine load
    step_times, peaks, step_cpu, peaks_cpu = [], [], [], []
    for _ in range(a.rounds):
        peaks.append(matmul_peak(a.peak_size, env.dtype, env.device, repeats=1, min_seconds=a.peak_seconds))
        if env.device.type == "cpu":
            peak_cpu = matmul_peak(a.peak_size, env.dtype, env.device, 1, a.peak_seconds, time.process_time)
            peaks_cpu.append(peak_cpu)
        t = timings(step, env, a.steps, warmup=0)
        step_times.append(t["best"])
        step_cpu.append(t["cpu_best"])
    best_step, median_step = min(step_times), statistics.median(step_times)
    best_peak, median_peak = max(peaks), statistics.median(peaks)
    total_forward = forward_flops.total or 1
    modules = {
        name: n / total_forward
        for name, n in forward_flops.by_module.items()
        if name != "Global" and name.count(".") < 1
    }
    result = {
        "machine": env.describe(),
        "config": a.config,
        "batch_size": b,
        "optimizer": a.optimizer,
        "flops_per_step": flops.total,
        "flops_by_op": flops.by_op,
        "forward_flops": forward_flops.total,
        "forward_flops_share_by_module": dict(sorted(modules.items(), key=lambda kv: -kv[1])),
        "forward_flops_by_module": forward_flops.by_module,
        "step_seconds": {"best": best_step, "median": median_step, "all": step_times},
        "train_images_per_s": b / best_step,
        "achieved_flops_per_s": flops.total / best_step,
        "peak_matmul_flops_per_s": {"best": best_peak, "median": median_peak, "size": a.peak_size, "all": peaks},
        "mfu": mfu(flops.total, best_step, best_peak),
        "mfu_median": mfu(flops.total, median_step, median_peak),
    }
    if peaks_cpu:  # the same ratio in CPU seconds of the process: steadier when other work shares the CPU
        result["step_cpu_seconds"] = {"best": min(step_cpu), "median": statistics.median(step_cpu), "all": step_cpu}
        result["peak_matmul_flops_per_cpu_s"] = {"best": max(peaks_cpu), "all": peaks_cpu}
        result["mfu_cpu_time"] = mfu(flops.total, min(step_cpu), max(peaks_cpu))
    text = markdown_table(
        ["config", "batch", "GFLOP/step", "step s (best)", "images/s", "achieved GFLOP/s", "peak GFLOP/s", "MFU"],
        [
            [
                a.config,
                b,
                f"{flops.total / 1e9:.2f}",
                f"{best_step:.3f}",
                f"{b / best_step:.1f}",
                f"{flops.total / best_step / 1e9:.1f}",
                f"{best_peak / 1e9:.1f}",
                f"{result['mfu']:.1%} (median {result['mfu_median']:.1%})",
            ]
        ],
    )
    if "mfu_cpu_time" in result:
        text += (
            f"\n\nin CPU seconds of this process (steadier on a shared CPU): step {min(step_cpu):.3f} s, "
            f"peak {max(peaks_cpu) / 1e9:.1f} GFLOP/s, MFU {result['mfu_cpu_time']:.1%}"
        )
    text += "\n\nforward FLOPs by module: " + ", ".join(
        f"{k} {v:.0%}" for k, v in result["forward_flops_share_by_module"].items()
    )
    if a.profile:
        rows, matmul_share = profile_table(step, env, a.top)
        result["profile"] = {"top_ops": rows, "matmul_time_share": matmul_share}
        text += f"\n\nself time in matmul-class ops (mm, addmm, bmm, attention): {matmul_share:.1%}\n\n"
        text += markdown_table(
            ["op", "self ms", "calls", "share"],
            [[r["op"], f"{r['self_ms']:.1f}", r["calls"], f"{r['share']:.1%}"] for r in rows],
        )
    return result, text


# ------------------------------------------------------------------ quality-cost


def plot_quality_cost(points: list[dict], front: list[dict], path: Path, title: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    series = sorted({(p["solver"], p["num_iters"]) for p in points})
    for solver, iters in series:
        sel = sorted((p for p in points if (p["solver"], p["num_iters"]) == (solver, iters)), key=lambda p: p["nfe"])
        xs, ys = [p["seconds_per_image"] * 1e3 for p in sel], [p["psnr"] for p in sel]
        ax.plot(xs, ys, marker="o", label=f"{solver}, {iters} iter{'s' if iters > 1 else ''}")
        for p, x, y in zip(sel, xs, ys, strict=True):
            ax.annotate(str(p["num_steps"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.plot(
        [p["seconds_per_image"] * 1e3 for p in front],
        [p["psnr"] for p in front],
        color="black",
        linestyle="--",
        linewidth=2,
        marker="s",
        markerfacecolor="none",
        markersize=10,
        zorder=5,
        label="Pareto front",
    )
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("decode time per image (ms, log scale; labels: ODE steps)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


NFE_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4, "flow_match_euler": 1}


def cmd_quality_cost(a, env: Env) -> tuple[dict, str]:
    tok = env.prepare(V2FlowTokenizer.from_pretrained(a.checkpoint))
    images = mnist_images("test", a.limit, env)
    batches = [images[i : i + a.batch_size] for i in range(0, len(images), a.batch_size)]
    with env.autocast():
        ids = [tok.encode(x).ids for x in batches]
    clock = "best" if a.clock == "wall" else "cpu_best"
    points = []
    for solver in a.solvers:
        for iters in a.iters:
            for steps in a.steps:

                def decode(solver=solver, iters=iters, steps=steps) -> list[torch.Tensor]:
                    g = torch.Generator(device=env.device).manual_seed(a.seed)
                    with env.autocast():
                        return [
                            tok.decode(i, num_steps=steps, num_iters=iters, solver=solver, generator=g).images
                            for i in ids
                        ]

                recon = decode()  # also the warm-up
                psnr = float(
                    torch.cat([psnr_per_image(r.float(), x) for r, x in zip(recon, batches, strict=True)]).mean()
                )
                t = timings(decode, env, a.repeats, warmup=0)
                points.append(
                    {
                        "solver": solver,
                        "num_steps": steps,
                        "num_iters": iters,
                        "nfe": steps * NFE_PER_STEP.get(solver, 1),
                        "psnr": psnr,
                        "seconds_per_image": t[clock] / len(images),
                        "wall_seconds_per_image": t["best"] / len(images),
                        "cpu_seconds_per_image": t["cpu_best"] / len(images),
                    }
                )
                print(
                    f"  {solver:>8} steps={steps:<3} iters={iters}: {psnr:.2f} dB, "
                    f"{t[clock] / len(images) * 1e3:.2f} ms/image ({a.clock})",
                    file=sys.stderr,
                )
    front = pareto(points)
    plot = Path(a.plot)
    cfg = tok.decode_defaults
    title = (
        f"{a.checkpoint}: {len(images)} MNIST test digits, batch {a.batch_size}, cfg {cfg.cfg_scale}, "
        f"temperature {cfg.temperature}, shift {cfg.shift}\n"
        f"{env.describe()['device']} {env.dtype_name}, threads: {torch.get_num_threads()}, {a.clock} time"
    )
    plot_quality_cost(points, front, plot, title)
    result = {
        "machine": env.describe(),
        "checkpoint": a.checkpoint,
        "num_images": len(images),
        "batch_size": a.batch_size,
        "clock": a.clock,
        "decode_defaults": {k: getattr(cfg, k) for k in ("cfg_scale", "temperature", "shift")},
        "points": points,
        "pareto": [(p["solver"], p["num_steps"], p["num_iters"]) for p in front],
        "plot": str(plot),
    }
    on_front = {(p["solver"], p["num_steps"], p["num_iters"]) for p in front}
    rows = [
        [
            p["solver"],
            p["num_steps"],
            p["num_iters"],
            p["nfe"],
            f"{p['psnr']:.2f}",
            f"{p['seconds_per_image'] * 1e3:.2f}",
            "yes" if (p["solver"], p["num_steps"], p["num_iters"]) in on_front else "",
        ]
        for p in points
    ]
    text = markdown_table(["solver", "steps", "iters", "NFE", "PSNR (dB)", "ms/image", "Pareto"], rows)
    return result, text + f"\n\nplot: {plot}"


# ------------------------------------------------------------------ scaling


def measure_point(init: dict, env: Env, a, batch: int) -> dict:
    """Per-image seconds, peak tensor memory and counted FLOPs of encode, decode and a training step."""
    tok = random_tokenizer(init, env, compile=False)  # FLOPs are counted eagerly: compiled kernels hide ops
    images = (torch.rand(batch, init["in_channels"], init["image_size"], init["image_size"]) * 2 - 1).to(env.device)
    with env.autocast():
        ids = tok.encode(images).ids

    def encode() -> None:
        with env.autocast():
            tok.encode(images)

    def decode() -> None:
        g = torch.Generator(device=env.device).manual_seed(0)
        with env.autocast():
            tok.decode(ids, num_steps=a.num_steps, num_iters=1, solver="euler", generator=g)

    phases = {"encode": encode, "decode": decode, "train": train_step_fn(tok, images, env, {"model": {"lr": 1e-4}})}
    counted = {name: count_flops(fn) for name, fn in phases.items()}
    if env.compile:
        env.compile_parts(tok)
    out = {}
    for name, fn in phases.items():
        t = timings(fn, env, a.repeats, warmup=3 if env.compile else 1)
        flops = counted[name]
        attention = sum(v for k, v in flops.by_op.items() if "attention" in k)
        out[name] = {
            "seconds_per_image": t["best" if a.clock == "wall" else "cpu_best"] / batch,
            "wall_seconds_per_image": t["best"] / batch,
            "cpu_seconds_per_image": t["cpu_best"] / batch,
            "peak_bytes_per_image": peak_memory(fn, env) / batch,
            "gflops_per_image": flops.total / batch / 1e9,
            "attention_flops_share": attention / flops.total if flops.total else 0.0,
        }
    return out


def cmd_scaling(a, env: Env) -> tuple[dict, str]:
    register_cpu_attention_flops()
    init, _ = tokenizer_init(a.config)
    runs = [("image_size", s, {"image_size": s, "num_tokens": a.fixed_tokens}) for s in a.sizes]
    runs += [("num_tokens", n, {"image_size": a.fixed_size, "num_tokens": n}) for n in a.tokens]
    points = []
    for axis, value, override in runs:
        point_init = {**init, **override}
        patches = (point_init["image_size"] // point_init["patch_size"]) ** 2
        batch = a.batch or max(1, min(a.max_batch, a.patch_budget // patches))
        print(f"  {axis}={value}: {patches} patches, {point_init['num_tokens']} tokens, batch {batch}", file=sys.stderr)
        point = {
            "axis": axis,
            "value": value,
            "image_size": point_init["image_size"],
            "num_tokens": point_init["num_tokens"],
            "num_patches": patches,
            "batch": batch,
        }
        point.update(measure_point(point_init, env, a, batch))
        points.append(point)
    growth = {}
    for axis in ("image_size", "num_tokens"):
        sel = [p for p in points if p["axis"] == axis]
        if len(sel) < 2:
            continue
        x = [p["num_patches"] if axis == "image_size" else p["num_tokens"] for p in sel]
        for phase in ("encode", "decode", "train"):
            seconds = [p[phase]["seconds_per_image"] for p in sel]
            growth[f"{phase} vs {'patches' if axis == 'image_size' else 'tokens'}"] = {
                "time_exponent": loglog_slope(x, seconds),
                "flops_exponent": loglog_slope(x, [p[phase]["gflops_per_image"] for p in sel]),
                "memory_exponent": loglog_slope(x, [max(p[phase]["peak_bytes_per_image"], 1) for p in sel]),
                # between neighbouring points: the exponent rises where the quadratic attention takes over
                "local_time_exponents": [loglog_slope(x[i : i + 2], seconds[i : i + 2]) for i in range(len(x) - 1)],
            }
    memory_method = (
        "torch.cuda.max_memory_allocated" if env.device.type == "cuda" else "torch.profiler profile_memory events"
    )
    result = {
        "machine": env.describe(),
        "config": a.config,
        "decode": {"solver": "euler", "num_steps": a.num_steps, "num_iters": 1},
        "clock": a.clock,
        "memory": f"peak tensor bytes above the start of the call ({memory_method}), per image",
        "points": points,
        "growth": growth,
    }
    rows = []
    for p in points:
        rows.append(
            [
                f"{p['axis']}={p['value']}",
                p["num_patches"],
                p["num_tokens"],
                p["batch"],
                *(f"{p[ph]['seconds_per_image'] * 1e3:.1f}" for ph in ("encode", "decode", "train")),
                *(f"{p[ph]['peak_bytes_per_image'] / 2**20:.1f}" for ph in ("encode", "decode", "train")),
                f"{p['train']['gflops_per_image']:.2f}",
                f"{p['train']['attention_flops_share']:.0%}",
            ]
        )
    header = [
        "point",
        "patches L",
        "tokens N",
        "batch",
        "encode ms/img",
        "decode ms/img",
        "train ms/img",
        "encode MiB/img",
        "decode MiB/img",
        "train MiB/img",
        "train GFLOP/img",
        "attention share",
    ]
    text = markdown_table(header, rows) + "\n\ngrowth (cost ~ x^k, least squares over the points):\n"
    text += markdown_table(
        ["", "k (time)", "k (counted FLOPs)", "k (peak memory)", "k (time) between neighbours"],
        [
            [
                k,
                fmt(v["time_exponent"]),
                fmt(v["flops_exponent"]),
                fmt(v["memory_exponent"]),
                ", ".join(fmt(e, 2) for e in v["local_time_exponents"]),
            ]
            for k, v in growth.items()
        ],
    )
    return result, text


# ------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    shared.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16 = torch.autocast")
    shared.add_argument("--compile", action="store_true", help="torch.compile the model's parts (in place)")
    shared.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    shared.add_argument("--output", default=None, help="also write the JSON result here")
    shared.add_argument(
        "--markdown",
        default=None,
        help="also write the table into this markdown report (e.g. BENCHMARKS.md), replacing this sub-command's "
        "section for this device, dtype and compile setting",
    )
    shared.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time shown in tables and plots (JSON has both): cpu = CPU seconds of this process, steadier when "
        "other work shares the CPU (with one thread)",
    )
    shared.add_argument(
        "--repeats", type=int, default=None, help="timed runs per measurement (throughput 2, quality-cost 1, scaling 2)"
    )
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("throughput", parents=[shared], help="encode/decode/train images/s")
    t.add_argument("--checkpoint", default="checkpoints/mnist-smollm2-32")
    t.add_argument("--config", default="configs/mnist.yaml")
    t.add_argument("--batch-size", type=int, default=256, help="images per encode/decode call")
    t.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    t.add_argument("--iters", nargs="+", type=int, default=[1, 4])
    t.add_argument("--train-steps", type=int, default=3)

    m = sub.add_parser("mfu", parents=[shared], help="FLOPs of a training step, matmul peak, MFU")
    m.add_argument("--config", default="configs/mnist.yaml")
    m.add_argument("--batch-size", type=int, default=0, help="0 = the config's data batch size")
    m.add_argument("--optimizer", choices=["default", "foreach", "fused"], default="default", help="AdamW impl.")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocations)")
    m.add_argument("--rounds", type=int, default=3, help="rounds of (peak measurement, timed steps), interleaved")
    m.add_argument("--steps", type=int, default=3, help="timed steps per round (best counts)")
    m.add_argument("--peak-size", type=int, default=2048, help="side of the square matmuls of the peak")
    m.add_argument("--peak-seconds", type=float, default=1.0, help="seconds of matmuls per peak measurement")
    m.add_argument("--profile", action="store_true", help="also profile one step: top ops by self time")
    m.add_argument("--top", type=int, default=20, help="rows of the profile table")

    q = sub.add_parser("quality-cost", parents=[shared], help="PSNR vs decode time over solvers/steps/iters")
    q.add_argument("--checkpoint", default="checkpoints/mnist-smollm2-32")
    q.add_argument("--limit", type=int, default=128, help="MNIST test digits")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--solvers", nargs="+", default=["euler", "midpoint", "rk4"])
    q.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    q.add_argument("--iters", nargs="+", type=int, default=[1, 4])
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--plot", default="benchmarks/results/quality_cost.png")

    s = sub.add_parser("scaling", parents=[shared], help="time/memory per image vs image size and tokens")
    s.add_argument("--config", default="configs/mnist.yaml", help="architecture (image size/tokens overridden)")
    s.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 256])
    s.add_argument("--tokens", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    s.add_argument("--fixed-tokens", type=int, default=32, help="tokens of the image-size sweep")
    s.add_argument("--fixed-size", type=int, default=32, help="image size of the token sweep")
    s.add_argument("--num-steps", type=int, default=8, help="Euler steps of the decode")
    s.add_argument("--batch", type=int, default=0, help="images per call; 0 = patch_budget // patches")
    s.add_argument("--patch-budget", type=int, default=1024, help="patches per call when --batch is 0")
    s.add_argument("--max-batch", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["throughput", *argv]  # no sub-command: throughput
    a = parser().parse_args(argv)
    if a.repeats is None:
        a.repeats = {"throughput": 2, "quality-cost": 1, "scaling": 2}.get(a.command, 1)
    if a.threads:
        torch.set_num_threads(a.threads)
    env = Env(a.device, a.dtype, a.compile)
    command = {"throughput": cmd_throughput, "mfu": cmd_mfu, "quality-cost": cmd_quality_cost, "scaling": cmd_scaling}
    result, text = command[a.command](a, env)
    result["command"] = " ".join(["python benchmarks/speed.py", *argv])
    print(json.dumps(result, indent=1))
    print("\n" + text)
    if a.output:
        write_text_atomic(a.output, json.dumps(result, indent=1) + "\n")
    if a.markdown:
        key, section = markdown_section(a.command, result, text, env, Path(a.markdown))
        replace_section(a.markdown, key, section)


if __name__ == "__main__":
    main()
