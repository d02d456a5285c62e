"""Measures of speed, scaling and model FLOPs utilisation (``benchmarks/speed.py`` is their command line).

* :class:`Env`: a run's device, autocast dtype and compile flag.
* :func:`timings`: best and median wall and CPU seconds of a call; :func:`peak_memory`: peak tensor bytes of one.
* :func:`random_tokenizer`, :func:`train_step_fn`: a tokenizer of a config with random weights, and one training
  step as ``v2flow fit`` runs it, for timing and FLOP counting.
* :func:`loglog_slope`: the exponent k of cost ~ x^k; :func:`pareto`: the quality-cost front.
* :func:`markdown_section`: a measurement's section of the report, one per sub-command x device x setting.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..tokenizer import V2FlowTokenizer
from ..vocab import LLMVocabulary
from .flops import synchronize
from .report import device_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Env:
    """Device, autocast dtype and compile flag of a run."""

    def __init__(self, device: str, dtype: str, compile: bool) -> None:
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.dtype_name = dtype
        self.compile = compile

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self) -> None:
        synchronize(self.device)

    def prepare(self, tok: V2FlowTokenizer, compile: bool | None = None) -> V2FlowTokenizer:
        """Move to the device and, with ``--compile`` (or `compile`), compile the parts."""
        tok = tok.to(self.device)
        if self.compile if compile is None else compile:
            self.compile_parts(tok)
        return tok

    @staticmethod
    def compile_parts(tok: V2FlowTokenizer) -> None:
        """``torch.compile`` the encoder, resampler, masked transformer and velocity head in place (parameter
        names, and so checkpoints, stay as they are)."""
        for module in (tok.encoder, tok.resampler, tok.decoder, tok.head):
            module.compile()

    def describe(self) -> dict:
        info = {
            "device": str(self.device),
            "dtype": self.dtype_name,
            "compile": self.compile,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        }
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info


def timings(fn: Callable[[], object], env: Env, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best and median wall seconds of `fn` over `repeats` runs after `warmup` runs, and the same in CPU seconds
    of this process (``cpu_best``, ``cpu_median``: all its threads; steadier than wall time when other work
    shares the CPU, and equal to it for one busy thread on a quiet machine)."""
    for _ in range(warmup):
        fn()
    env.sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        env.sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "best": min(wall),
        "median": statistics.median(wall),
        "cpu_best": min(cpu),
        "cpu_median": statistics.median(cpu),
    }


def peak_memory(fn: Callable[[], object], env: Env) -> int:
    """Peak bytes of tensors allocated by `fn` above what was alive before it (one extra call).

    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before. CPU: the same quantity from
    the allocation events of ``torch.profiler(profile_memory=True)`` (running sum, its maximum): tensor bytes,
    not the process RSS, which the C allocator's caching makes meaningless per call.
    """
    if env.device.type == "cuda":
        env.sync()
        torch.cuda.reset_peak_memory_stats(env.device)
        before = torch.cuda.memory_allocated(env.device)
        fn()
        env.sync()
        return int(torch.cuda.max_memory_allocated(env.device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def random_tokenizer(init: dict, env: Env, seed: int = 0, compile: bool | None = None) -> V2FlowTokenizer:
    """A tokenizer of config `init` with random weights and random vocabulary rows of the configured shape
    (speed does not depend on their values)."""
    torch.manual_seed(seed)
    tok = V2FlowTokenizer(**init)
    k, d = tok.config["num_entries"], tok.config["llm_dim"]
    rows = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    tok.set_vocabulary(LLMVocabulary(rows, torch.arange(k), "random", k))
    return env.prepare(tok, compile)


def train_step_fn(tok: V2FlowTokenizer, images: torch.Tensor, env: Env, cfg: dict, optimizer: str = "default"):
    """One training step as `v2flow fit` runs it (without Lightning's bookkeeping): loss forward, backward,
    gradient clipping at the config's ``gradient_clip_val``, AdamW step. Every call draws the same mask, times
    and noise (the generator is reseeded), so every step does the work whose FLOPs are counted."""
    model_cfg = cfg.get("model", {})
    kwargs = {"foreach": True} if optimizer == "foreach" else {"fused": True} if optimizer == "fused" else {}
    opt = torch.optim.AdamW(
        tok.parameters(), lr=model_cfg.get("lr", 1e-4), weight_decay=model_cfg.get("weight_decay", 0.0), **kwargs
    )
    clip = cfg.get("trainer", {}).get("gradient_clip_val")
    generator = torch.Generator(device=env.device).manual_seed(0)
    tok.train()

    def step() -> None:
        generator.manual_seed(0)
        with env.autocast():
            loss = tok.loss(images, generator=generator).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(tok.parameters(), clip)
        opt.step()

    return step


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x: cost ~ x ** slope."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats in both seconds/image (lower) and PSNR (higher), by increasing cost."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["seconds_per_image"], -p["psnr"])):
        if p["psnr"] > best:
            front.append(p)
            best = p["psnr"]
    return front


def markdown_section(command: str, result: dict, text: str, env: Env, report: Path) -> tuple[str, str]:
    """(key, markdown) of one measurement in the report `report`: one section per sub-command x device x dtype
    x compile setting, so a GPU run adds its own section next to the CPU one instead of replacing it. A plot
    (quality-cost) is shown as an image, linked relative to the report."""
    setting = f"{env.dtype_name}{', torch.compile' if env.compile else ''}"
    device = device_name(env.device)
    key = f"speed:{command}:{env.device.type}-{env.dtype_name}{'-compile' if env.compile else ''}"
    title = {"throughput": "throughput", "mfu": "model FLOPs utilisation", "quality-cost": "quality vs decode cost"}
    lines = [
        f"### Speed, {title.get(command, command)}: {device}, {setting}",
        "",
        f"`{result['command']}` (torch {torch.__version__}, {time.strftime('%Y-%m-%d')})",
        "",
        text,
    ]
    if "plot" in result:
        plot = Path(os.path.relpath(Path(result["plot"]).resolve(), report.resolve().parent)).as_posix()
        lines += ["", f"![{title.get(command, command)}]({plot})"]
    return key, "\n".join(lines) + "\n"
