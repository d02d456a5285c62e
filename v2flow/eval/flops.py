"""Model FLOPs and model FLOPs utilisation (MFU), as in nanoGPT's ``estimate_mfu`` but measured, not estimated.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention;
elementwise work is not counted: MFU measures how much of the run is spent at matmul speed). The peak is
measured on the same device, dtype and thread count with large square matmuls, so MFU = achieved FLOP/s over
the measured peak, not over a datasheet number.

torch counts the attention of CUDA's kernels but not of the CPU flash-attention kernel that
``F.scaled_dot_product_attention`` runs on CPUs; :func:`register_cpu_attention_flops` adds it (same formula).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def register_cpu_attention_flops() -> None:
    """Count ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward) like the CUDA kernels:
    4 b h s_q s_k d forward (two products), 10 b h s_q s_k d backward (five). Idempotent."""
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(forward)
        def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)

    if backward is not None and backward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(backward)
        def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


@dataclass
class FlopCount:
    """total: FLOPs of one call; by_op: per aten op; by_module: per module path (forward only, see
    :func:`count_flops`), the outermost module named ``Global``."""

    total: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)


def count_flops(fn: Callable[[], object], depth: int | None = None) -> FlopCount:
    """FLOPs of one call of `fn` (forward and, if `fn` calls it, backward).

    `by_module` is meaningful for forward passes only: torch's module tracker attributes backward work to the
    wrong modules (seen with torch 2.13), so count the forward alone when a per-module breakdown is wanted.
    """
    register_cpu_attention_flops()
    with FlopCounterMode(display=False, depth=depth) as counter:
        fn()
    counts = counter.get_flop_counts()
    by_op: dict[str, int] = {}
    for op, n in counts.get("Global", {}).items():
        name = str(op).removeprefix("aten.")
        by_op[name] = by_op.get(name, 0) + int(n)
    by_module = {module: int(sum(ops.values())) for module, ops in counts.items()}
    return FlopCount(int(counter.get_total_flops()), by_op, by_module)


def linear_flops(n: int, in_features: int, out_features: int, backward: bool = False) -> int:
    """Closed form of ``nn.Linear(in, out)`` on (n, in): 2 n in out forward; backward adds the input and weight
    gradients, 2 n in out each (3x in all). Bias additions are not counted (torch does not count them)."""
    forward = 2 * n * in_features * out_features
    return 3 * forward if backward else forward


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    size: int = 2048,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    min_seconds: float = 0.2,
    timer: Callable[[], float] = time.perf_counter,
) -> float:
    """Measured matmul FLOP/s: the best of `repeats` timings of (size x size) @ (size x size) products, each
    timing at least `min_seconds` long, on the current thread count. `timer` is the clock: wall time by
    default; ``time.process_time`` (CPU time of the process) is steadier on a CPU shared with other work."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size**3
    a @ b  # warm-up (allocations, kernel selection)
    synchronize(device)
    start = timer()
    a @ b
    synchronize(device)
    calls = max(1, int(min_seconds / max(timer() - start, 1e-9)))
    best = 0.0
    for _ in range(repeats):
        start = timer()
        for _ in range(calls):
            a @ b
        synchronize(device)
        best = max(best, flops * calls / max(timer() - start, 1e-9))
    return best


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (`flops_per_step` / `seconds_per_step`) over the peak."""
    if seconds_per_step <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"seconds and peak must be > 0, got {seconds_per_step} and {peak_flops_per_s}")
    return flops_per_step / seconds_per_step / peak_flops_per_s
