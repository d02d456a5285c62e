"""Reliability checks of tokenizer training, as plain functions returning dicts (the tests and
``benchmarks/reliability.py`` call the same code).

* :func:`resume_check`: a run stopped mid-epoch and resumed from its checkpoint continues bit-exactly like an
  uninterrupted run (same losses, same raw and EMA weights; CPU, deterministic algorithms).
* :func:`ddp_check`: a few DDP steps plus a validation on CPU processes (gloo); every rank must end with the
  same raw and EMA weights and vq codebook buffers, and the logged vocabulary usage must count every rank's
  validation images.

    python benchmarks/reliability_checks.py resume
    python benchmarks/reliability_checks.py ddp

Both use a tiny tokenizer (8x8 images, 4 tokens, a random 32-row vocabulary) on random images.

``ddp_check`` starts one process per rank itself (``python -m v2flow.eval.reliability ddp-worker``), with the
environment a launcher such as ``torchrun`` or ``srun`` gives (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``NODE_RANK``): Lightning then joins the processes instead of spawning them, which is the
multi-node code path; all ranks import torch at the same time, and the processes are killed if one fails
instead of leaving the others hanging in a collective.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from ..data import _ImageDataModule
from ..resampler import perplexity
from ..testing import tiny_tokenizer
from ..training import EMA, ReplicaCheck, V2FlowModule

# ---------------------------------------------------------------------------- tiny fits


class RandomImagesDataModule(_ImageDataModule):
    """Seeded random (n, 1, size, size) images in [-1, 1] behind the library's loaders (resumable training order).

    Args:
        train_size, val_size: images per split.
        image_size: side of the images.
        batch_size, eval_batch_size, num_workers: the loaders.
    """

    def __init__(
        self,
        train_size: int = 48,
        val_size: int = 8,
        image_size: int = 8,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.sizes, self.image_size = (train_size, val_size), image_size

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(1234)
        n = sum(self.sizes)
        images = torch.rand(n, 1, self.image_size, self.image_size, generator=g) * 2 - 1
        labels = torch.full((n,), -1)
        train = self.sizes[0]
        self.train_set = TensorDataset(images[:train], labels[:train])
        self.val_set = self.test_set = TensorDataset(images[train:], labels[train:])


class StepRecorder(L.Callback):
    """Records the training loss of every optimiser step and the raw and EMA weights after the last one."""

    def __init__(self) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.raw: dict[str, torch.Tensor] = {}
        self.ema: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses[trainer.global_step] = outputs["loss"].detach().clone()
        self.raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        for callback in trainer.callbacks:  # runs after EMA (listed after it): the average of this step
            if isinstance(callback, EMA) and callback._average_model is not None:
                self.ema = {k: v.detach().clone() for k, v in callback._average_model.module.state_dict().items()}


class StopAfter(L.Callback):
    """Stops training after optimiser step `step`, as an interrupted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the block, then the previous setting."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def tiny_fit(
    root: str | Path,
    *,
    max_steps: int,
    callbacks: Sequence[L.Callback] = (),
    ckpt_path: str | Path | None = None,
    quantizer: str = "vocab",
    data: dict | None = None,
    val_every: int = 3,
    **trainer_kwargs,
) -> L.Trainer:
    """Fit the tiny tokenizer (seed 0: same weights, data order and noise every call) with EMA and `callbacks`
    on :class:`RandomImagesDataModule` (``**data``).

    Validation (one batch) runs every `val_every` steps, so the checks also cover the EMA swap around it.
    """
    L.seed_everything(0, verbose=False)  # also the seed of the training order (PL_GLOBAL_SEED)
    module = V2FlowModule(tiny_tokenizer(quantizer=quantizer).train(), warmup_steps=2, val_recon_batches=1, grid_size=2)
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        default_root_dir=str(root),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer = L.Trainer(callbacks=[EMA(decay=0.9), *callbacks], **{**options, **trainer_kwargs})
    trainer.fit(module, datamodule=RandomImagesDataModule(**(data or {})), ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------------------- exact resume


def resume_check(
    tmp_dir: str | Path,
    steps: int = 8,
    stop_at: int = 4,
    train_size: int = 48,
    batch_size: int = 4,
    num_workers: int = 0,
) -> dict:
    """Fit `steps` steps uninterrupted; fit again but stop after `stop_at` steps (checkpoint), resume to `steps`.

    The defaults stop in the middle of a 12-batch epoch; ``train_size=24`` makes 6-batch epochs, so the resumed
    run also crosses into a reseeded epoch (and ``stop_at=6`` stops exactly at an epoch's end).

    Returns:
        dict: ``steps_compared`` (the resumed steps), ``batches_per_epoch``, ``max_abs_loss_diff``,
        ``bit_exact`` (every resumed loss, the raw and the EMA weights equal the uninterrupted run's),
        ``weights_equal``, ``ema_equal``, ``seconds``.
    """
    root = Path(tmp_dir)
    data = {"train_size": train_size, "batch_size": batch_size, "num_workers": num_workers}
    start = time.perf_counter()
    with deterministic():
        full = StepRecorder()
        tiny_fit(root / "full", max_steps=steps, callbacks=[full], data=data)
        first = StepRecorder()
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", filename="stop", every_n_train_steps=stop_at, save_top_k=-1)
        tiny_fit(root / "first", max_steps=steps, callbacks=[first, StopAfter(stop_at), ckpt], data=data)
        resumed = StepRecorder()
        last = root / "ckpt" / "stop.ckpt"
        tiny_fit(root / "resumed", max_steps=steps, callbacks=[resumed], ckpt_path=last, data=data)
    compared = sorted(resumed.losses)
    if compared != list(range(stop_at + 1, steps + 1)):
        raise RuntimeError(f"the resumed run trained steps {compared}, expected {stop_at + 1}..{steps}")
    if sorted(first.losses) != list(range(1, stop_at + 1)):
        raise RuntimeError(f"the interrupted run trained steps {sorted(first.losses)}, expected 1..{stop_at}")
    diffs = [(resumed.losses[s] - full.losses[s]).abs().item() for s in compared]
    losses_equal = all(torch.equal(resumed.losses[s], full.losses[s]) for s in compared)
    weights_equal = _states_equal(resumed.raw, full.raw)
    ema_equal = bool(full.ema) and _states_equal(resumed.ema, full.ema)
    return {
        "steps_compared": compared,
        "batches_per_epoch": train_size // batch_size,
        "max_abs_loss_diff": max(diffs),
        "bit_exact": losses_equal and weights_equal and ema_equal,
        "weights_equal": weights_equal,
        "ema_equal": ema_equal,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


# ---------------------------------------------------------------------------- DDP


class RankDump(L.Callback):
    """Writes this rank's raw and EMA weights, local validation counts and logged usage to `out_dir`."""

    def __init__(self, out_dir: str | Path, tag: str) -> None:
        self.path = Path(out_dir)
        self.tag = tag
        self.recorder = StepRecorder()
        self.val_counts: torch.Tensor | None = None
        self.logged: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.recorder.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_counts = pl_module._val_counts.detach().clone()  # this rank's images only

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        self.logged = {
            k: float(m[k]) for k in ("val/distinct_ids", "val/perplexity", "val/loss", "val/psnr", "val/ssim") if k in m
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {"raw": self.recorder.raw, "ema": self.recorder.ema, "val_counts": self.val_counts}
        state |= {"logged": self.logged, "losses": self.recorder.losses, "world_size": trainer.world_size}
        torch.save(state, self.path / f"{self.tag}_rank{trainer.global_rank}.pt")


def _ddp_worker(out_dir: str, quantizers: Sequence[str], steps: int, world_size: int) -> None:
    """One rank: fit every quantizer in turn (one process group), dumping its state after each fit."""
    for quantizer in quantizers:
        callbacks = [RankDump(out_dir, quantizer), ReplicaCheck(every_n_steps=1)]
        if quantizer == "vq":
            callbacks.insert(0, _RestartAllCodes())
        tiny_fit(
            Path(out_dir) / quantizer,
            max_steps=steps,
            callbacks=callbacks,
            quantizer=quantizer,
            val_every=steps,
            limit_val_batches=1.0,
            devices=world_size,
            strategy="ddp",
        )


class _RestartAllCodes(L.Callback):
    """Marks every vq code dead at every step, so the (rank-local) restart draws run and must agree."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.tokenizer.resampler.codebook.dead_threshold = 2.0  # cluster sizes restart at 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(cmd: list[str], env: dict, out: Path, world_size: int, timeout: float) -> None:
    """Start `world_size` ranks of `cmd` (logs under `out`) and wait; a RuntimeError with each rank's log tail
    when one fails or they outlive `timeout` seconds (the others would wait forever in a collective)."""
    start = time.perf_counter()
    logs = [open(out / f"rank{r}.log", "w") for r in range(world_size)]  # noqa: SIM115 (closed below)
    procs = [
        subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(r)}, stdout=log, stderr=subprocess.STDOUT)
        for r, log in enumerate(logs)
    ]
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed or time.perf_counter() - start > timeout:
                break  # a rank failed or hangs: the others would wait forever in a collective
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = "\n".join(
            f"--- rank {r} (exit {c}):\n{(out / f'rank{r}.log').read_text()[-3000:]}" for r, c in enumerate(codes)
        )
        raise RuntimeError(f"DDP workers failed (exit codes {codes}):\n{tails}")


def ddp_check(
    tmp_dir: str | Path,
    world_size: int = 2,
    steps: int = 2,
    quantizers: Sequence[str] = ("vocab", "vq"),
    timeout: float = 300,
) -> dict:
    """Train `steps` DDP steps and validate on `world_size` CPU processes (gloo), per quantizer; compare the ranks.

    Returns:
        dict: ``world_size``, ``ranks_agree`` (raw and EMA weights and buffers bit-identical on every rank, for
        every quantizer), ``max_abs_weight_diff``, ``val_counts_global`` (the logged distinct ids and perplexity
        are those of all ranks' validation images together, not of rank 0's), ``val_metrics_agree`` (every rank
        logged the same validation loss, PSNR, SSIM and usage: reduced, not rank-local), ``per_quantizer``,
        ``seconds``.
    """
    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    cmd = [sys.executable, "-m", "v2flow.eval.reliability", "ddp-worker", str(out), "--steps", str(steps)]
    cmd += ["--world-size", str(world_size), "--quantizers", *quantizers]
    start = time.perf_counter()
    _run_ranks(cmd, env, out, world_size, timeout)
    per_quantizer, agree, max_diff, counts_ok, metrics_ok = {}, True, 0.0, True, True
    for quantizer in quantizers:
        dumps = [torch.load(out / f"{quantizer}_rank{r}.pt", weights_only=False) for r in range(world_size)]
        ref = dumps[0]
        same = all(_states_equal(d["raw"], ref["raw"]) and _states_equal(d["ema"], ref["ema"]) for d in dumps)
        diff = max(max(_max_abs_diff(d["raw"], ref["raw"]), _max_abs_diff(d["ema"], ref["ema"])) for d in dumps)
        total = sum(d["val_counts"] for d in dumps)
        expected = {"val/distinct_ids": float((total > 0).sum()), "val/perplexity": perplexity(total)}
        logged_ok = all(math.isclose(d["logged"][k], v, rel_tol=1e-6) for d in dumps for k, v in expected.items())
        per_quantizer[quantizer] = {
            "ranks_agree": same,
            "max_abs_weight_diff": diff,
            "val_tokens_per_rank": [int(d["val_counts"].sum()) for d in dumps],
            "logged_usage": ref["logged"],
            "usage_of_all_ranks": expected,
            "usage_of_rank0_only": {
                "val/distinct_ids": float((ref["val_counts"] > 0).sum()),
                "val/perplexity": perplexity(ref["val_counts"]),
            },
            "logged_usage_is_global": logged_ok,
            "val_metrics_agree": all(d["logged"] == ref["logged"] for d in dumps),
            "losses_rank0": {s: float(v) for s, v in ref["losses"].items()},
        }
        agree &= same
        metrics_ok &= per_quantizer[quantizer]["val_metrics_agree"]
        counts_ok &= logged_ok
        max_diff = max(max_diff, diff)
    return {
        "world_size": world_size,
        "ranks_agree": agree,
        "max_abs_weight_diff": max_diff,
        "val_counts_global": counts_ok,
        "val_metrics_agree": metrics_ok,
        "per_quantizer": per_quantizer,
        "seconds": round(time.perf_counter() - start, 1),
    }


# ---------------------------------------------------------------------------- one rank


def main(argv: list[str] | None = None) -> int:
    """``python -m v2flow.eval.reliability ddp-worker OUT_DIR ...``: one rank of :func:`ddp_check`, started by it."""
    parser = argparse.ArgumentParser(description="one rank of v2flow.eval.reliability.ddp_check (started by it)")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("ddp-worker", help="one rank of ddp_check")
    w.add_argument("out_dir")
    w.add_argument("--steps", type=int, default=2)
    w.add_argument("--world-size", type=int, default=2)
    w.add_argument("--quantizers", nargs="+", default=["vocab", "vq"])
    a = parser.parse_args(argv)
    _ddp_worker(a.out_dir, a.quantizers, a.steps, a.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
