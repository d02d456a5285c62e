"""Lightning training of a V2FlowTokenizer: the LightningModule, the EMA callback, a replica check, the
checkpoint callback of every config, and the progress bar and model summary every v2flow module shows.

The module holds training logic only: the objective is ``tokenizer.loss``; this file adds the optimiser
schedule, temperature annealing, logging of the named loss parts and of vocabulary usage, and validation
reconstructions (PSNR/SSIM with torchmetrics, a PNG grid per validation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichModelSummary, RichProgressBar, WeightAveraging
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from torchmetrics import MeanMetric

from .checks import image_features, input_statistics
from .metrics import SSIM, psnr_per_image
from .tokenizer import V2FlowTokenizer
from .utils import save_image_grid


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine decay to ``lr * min_lr_ratio`` at `total_steps`
    (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, max(total_steps, warmup_steps + 1), min_lr_rate=min_lr_ratio
    )


def adamw_warmup_cosine(trainer: L.Trainer, decay: list, no_decay: list, hparams: Any) -> dict[str, Any]:
    """``configure_optimizers`` output: AdamW over two parameter groups (weight decay on `decay` only) and the
    :func:`warmup_cosine` schedule over the run, stepped per optimiser step. `hparams` carries ``lr``,
    ``weight_decay``, ``warmup_steps``, ``min_lr_ratio`` and optionally ``betas`` (default AdamW's)."""
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hparams.lr,
        betas=tuple(getattr(hparams, "betas", (0.9, 0.999))),
    )
    total = max(int(trainer.estimated_stepping_batches), 1)
    scheduler = warmup_cosine(optimizer, hparams.warmup_steps, total, hparams.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class EMA(WeightAveraging):
    """Exponential moving average of the weights (Lightning's WeightAveraging).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so the average does not keep
    the random initialisation for thousands of steps. Parameters are averaged; buffers (the frozen
    vocabulary rows and their LLM ids, the vq codebook's EMA statistics) are copied from the live model
    after every update: they are state, not weights. Validation runs on the averaged weights, and
    checkpoints store them as ``state_dict`` (the raw weights go to ``current_model_state``, so resuming
    restores both).

    Strategies that replicate the weights (single device, DDP; tested) work. Those that shard them (FSDP,
    ModelParallel, DeepSpeed ZeRO-3) are refused at setup: Lightning's weight averaging keeps an unsharded
    copy built before wrapping and would average it against the local shards.
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        super().__init__(use_buffers=True, avg_fn=self._average)

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        n = float(num_averaged)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        return torch.lerp(averaged, current.to(averaged.dtype), 1.0 - decay)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and _shards_weights(trainer.strategy):
            raise ValueError(
                f"the EMA callback does not support {type(trainer.strategy).__name__}, which shards the weights "
                "(Lightning's weight averaging would average an unsharded copy against the local shards). The "
                "tokenizers fit on one device: train with --trainer.strategy=ddp, or remove the EMA callback"
            )
        super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._average_model is not None:
            with torch.no_grad():
                for averaged, current in zip(self._average_model.module.buffers(), pl_module.buffers(), strict=True):
                    averaged.copy_(current)


def _shards_weights(strategy: Any) -> bool:
    """Whether a Lightning strategy shards the parameters across ranks (FSDP, ModelParallel, DeepSpeed ZeRO-3)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
        return True
    if isinstance(strategy, DeepSpeedStrategy):
        return (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage", 0) == 3
    return False


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose ``last.ckpt`` (with ``save_last``) always holds the state at the end of
    fit, which ``v2flow export .../last.ckpt`` and ``--ckpt_path .../last.ckpt`` read.

    Lightning writes ``last.ckpt`` only next to another checkpoint (every `every_n_train_steps`, at
    validation) and at the end of training only when it wrote none before; a run stopped by ``max_steps``
    between two saves (``--trainer.max_steps 250`` with saves every 200) therefore kept the step-200 state as
    its "last". This callback saves it when training ends, unless the final step was already saved (and, as
    Lightning's saves, not under ``fast_dev_run``). All of ModelCheckpoint's arguments apply.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar with an epoch label that reads right in runs bounded by steps.

    Lightning labels the training bar ``Epoch e/{max_epochs - 1}``; a run bounded by ``max_steps`` alone has
    ``max_epochs=-1`` and showed "Epoch 0/-2". This bar writes ``Epoch e`` when the epochs are unbounded and
    ``Epoch e/last`` (0-based, as Lightning) when they are bounded.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}"
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        # as Lightning: padded to the validation label's width, so the bar does not jump between the two
        return description.ljust(len(self.validation_description))


class ModelSummary(RichModelSummary if _RICH_AVAILABLE else LightningModelSummary):
    """Lightning's model summary (rich when ``rich`` is installed, as Lightning's default), without FLOPs it did
    not count.

    Lightning counts FLOPs only by running the module's ``forward`` on ``example_input_array``. The v2flow
    modules have no single forward (training calls ``tokenizer.loss``, an LM step builds its batch from
    captions), so Lightning printed a FLOPs column of zeros and "Total FLOPs: 0", which read as a
    measurement. When the count is zero the column and the total are left out; a module that does set
    ``example_input_array`` keeps them. Measured training FLOPs and MFU: ``benchmarks/speed.py mfu``.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if not total_flops:
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        totals = [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", str(total_training_modes["train"])),
            ("Modules in eval mode", str(total_training_modes["eval"])),
        ]
        if total_flops:
            totals.append(("Total FLOPs", get_human_readable_count(int(total_flops))))
        if not _RICH_AVAILABLE:
            table = _format_summary_table(
                total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
            )
            if not total_flops:  # its last line is the FLOPs total
                table = table.rsplit("\n", 1)[0]
            _summary_log.info("\n" + table)
            return
        from rich import get_console
        from rich.table import Table

        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in summary_data:
            justify = "right" if name in ("Params", "Params per Device", "FLOPs", "In sizes", "Out sizes") else "left"
            table.add_column(name, justify=justify, style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in summary_data), strict=True):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in totals:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)


_summary_log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class DisplayCallbacks(L.LightningModule):
    """Mixin of the v2flow LightningModules: replaces Lightning's rich progress bar and its model summary (the
    defaults, or the same classes named in a config) with :class:`ProgressBar` and :class:`ModelSummary`,
    keeping their settings (see those classes for why). ``enable_progress_bar=false`` and
    ``enable_model_summary=false`` still switch them off: there is nothing to replace then."""

    def configure_callbacks(self) -> list[L.Callback]:
        callbacks: list[L.Callback] = []
        trainer = self._trainer
        if trainer is None:
            return callbacks
        for callback in trainer.callbacks:
            if type(callback) is RichProgressBar:  # Lightning's TQDM bar, the default without rich, labels right
                bar = ProgressBar(callback._refresh_rate, callback._leave, callback.theme, callback._console_kwargs)
                callbacks.append(bar)
            elif type(callback) in (LightningModelSummary, RichModelSummary):
                callbacks.append(ModelSummary(callback._max_depth, **callback._summarize_kwargs))
        return callbacks


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weight_checksums(module: torch.nn.Module, prefix: str = "") -> tuple[list[str], torch.Tensor]:
    """Bit-exact checksums of a module's parameters and buffers: (names, int64 (T,) on the module's device).

    Each tensor's bit patterns are summed as integers, so any change of a single element changes its checksum
    (a change that cancels over several elements is astronomically unlikely).
    """
    names, sums = [], []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        bits = t.detach().contiguous().view(-1)
        if bits.is_complex():
            bits = torch.view_as_real(bits).view(-1)
        names.append(prefix + name)
        sums.append(bits.view(_BITS[bits.element_size()]).to(torch.int64).sum())
    return names, torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


class ReplicaCheck(L.Callback):
    """Checks that all data-parallel ranks hold the same weights; raises on every rank, naming the step and the
    tensors, when they do not.

    Every `every_n_steps` optimiser steps and when training ends, each rank takes bit-exact checksums
    (:func:`weight_checksums`) of the module's parameters and buffers and, when a
    :class:`~lightning.pytorch.callbacks.WeightAveraging` callback (such as :class:`EMA`) runs, of the
    averaged copy; the checksums (one int64 per tensor) are all-gathered and compared. DDP keeps gradients
    and (at every forward) buffers in step, so a difference means state that a rank updated from its own
    data alone (an unreduced statistic, a rank-local random draw, a non-deterministic kernel). A single
    process has nothing to compare and skips the check. For strategies that replicate the weights (DDP), not
    for those that shard them (FSDP, DeepSpeed ZeRO-3). Add it from the CLI with
    ``--trainer.callbacks+=v2flow.training.ReplicaCheck --trainer.callbacks.every_n_steps=500``.

    Args:
        every_n_steps: check interval in optimiser steps; 0 checks only at the end of training.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_checked = -1

    def _states(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[str, torch.nn.Module]]:
        states = [("", pl_module)]
        for callback in trainer.callbacks:
            average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
            if average is not None:
                states.append((f"{type(callback).__name__}:", average.module))
        return states

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, where: str) -> None:
        """Compare the ranks now (collective: every rank must call it); `where` names the point in the error."""
        if trainer.world_size < 2:
            return
        names, sums = [], []
        for prefix, module in self._states(trainer, pl_module):
            n, s = weight_checksums(module, prefix)
            names += n
            sums.append(s.to(pl_module.device))
        gathered = pl_module.all_gather(torch.cat(sums))  # (world, T)
        differ = (gathered != gathered[:1]).any(0).nonzero().flatten().tolist()
        if differ:
            shown = ", ".join(names[i] for i in differ[:8])
            more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
            raise RuntimeError(
                f"data-parallel ranks diverged {where} (global step {trainer.global_step}): "
                f"{len(differ)} of {len(names)} tensors differ between ranks: {shown}{more}"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_checked:
            self._last_checked = step  # once per optimiser step, also with gradient accumulation
            self.check(trainer, pl_module, f"after step {step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module, "at the end of training")


class TokenizerEvalModule(DisplayCallbacks):
    """Validation and test bookkeeping shared by the tokenizer modules (:class:`V2FlowModule` and the VQ
    baseline's ``VQBaselineModule``).

    Vocabulary usage is counted over every rank's images, reconstructions are scored with PSNR/SSIM (reduced
    across ranks by torchmetrics) and the first batch is written as a grid. Subclasses set ``tokenizer``,
    call :meth:`_init_eval` in their constructor and define :meth:`_eval_step`.
    """

    def _init_eval(self, num_codes: int) -> None:
        """The metrics (mean per-image PSNR, as benchmarks/reconstruction.py reports it; SSIM) and the usage
        counts, one per vocabulary entry or code."""
        self.psnr = MeanMetric()
        self.ssim = SSIM()  # the standard way: [0, 1], data range 1
        # a plain attribute, not a buffer: the EMA callback swaps every buffer in and out around validation
        self._val_counts = torch.zeros(num_codes, dtype=torch.long)

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros_like(self._val_counts, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _score(self, recon: torch.Tensor, images: torch.Tensor) -> None:
        self.psnr.update(psnr_per_image(recon, images))
        self.ssim.update(recon, images)

    def _write_grid(self, images: torch.Tensor, recon: torch.Tensor, stage: str, n: int) -> None:
        """Rank 0 writes the grid; every rank must call this: ``trainer.log_dir`` is a broadcast under DDP."""
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "reconstructions"
        if not self.trainer.is_global_zero:
            return
        n = min(n, len(images))
        save_image_grid(torch.cat([images[:n], recon[:n]]), root / f"{stage}_step{self.global_step:07d}.png", nrow=n)

    def _log_eval_epoch(self, stage: str) -> None:
        counts = self._val_counts.clone()
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        usage = self.tokenizer.usage_from_counts(counts.cpu())
        # every rank holds the gathered counts and logs the same value (so monitors work on every rank); the
        # sync is a mean of equal values, there only to tell Lightning the value is global
        self.log(f"{stage}/distinct_ids", float(usage["distinct_ids"]), sync_dist=True)
        self.log(f"{stage}/perplexity", usage["perplexity"], sync_dist=True)
        if self.ssim.update_called:  # compute() reduces over ranks (torchmetrics): equal values, as above
            self.log(f"{stage}/psnr", self.psnr.compute(), prog_bar=True, sync_dist=True)
            self.log(f"{stage}/ssim", self.ssim.compute(), sync_dist=True)
        self.psnr.reset()
        self.ssim.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")


class V2FlowModule(TokenizerEvalModule):
    """Trains a :class:`V2FlowTokenizer`.

    Args:
        tokenizer: the model (built by the CLI from ``class_path``/``init_args``).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases, norms, embeddings and queries).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        temperature_end: if set, the resampler's softmax temperature is annealed geometrically from its
            config value to this over ``temperature_anneal_steps``.
        temperature_anneal_steps: length of the anneal.
        val_decode: decode settings of the validation reconstructions, by their :class:`DecodeSettings` names
            (e.g. ``{num_steps: 8}``); the rest, or all when None, are the tokenizer's ``decode`` defaults.
        val_recon_batches: validation batches that are reconstructed (PSNR/SSIM); the rest only give losses
            and vocabulary usage.
        grid_size: digits in the validation PNG grid.
        seed: seed of the per-step generator (noise, masks, times), so runs are reproducible.
        statistics_images: how many of the first training images give the tokenizer's ``input_statistics``
            (per-image pixel mean and spread, :func:`v2flow.checks.input_statistics`), against which
            ``encode`` warns on images far from the training data; 0 stores none.
    """

    def __init__(
        self,
        tokenizer: V2FlowTokenizer,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        temperature_end: float | None = None,
        temperature_anneal_steps: int = 0,
        val_decode: dict | None = None,
        val_recon_batches: int = 2,
        grid_size: int = 16,
        seed: int = 0,
        statistics_images: int = 10000,
    ) -> None:
        super().__init__()
        if statistics_images < 0 or statistics_images == 1:
            raise ValueError(f"statistics_images must be 0 (none) or >= 2, got {statistics_images}")
        if temperature_end is not None and temperature_end <= 0:
            raise ValueError(f"temperature_end must be > 0, got {temperature_end}")
        tokenizer.decode_defaults.resolve(**(val_decode or {}))  # unknown names and bad values fail here
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        # the frozen parts must be in place before callbacks (EMA) copy the module, which Lightning does before
        # any hook of the module runs: so here, through the tokenizer's one loader
        tokenizer.install_frozen_parts()
        self._init_eval(tokenizer.resampler.num_codes)
        self._input_features: list[torch.Tensor] = []  # (n, 2) per-image pixel mean and spread, until stored

    # ------------------------------------------------------------------ steps

    def _generator(self, batch_idx: int) -> torch.Generator:
        """Per-step random stream: distinct for every step, micro-batch and rank, reproducible across runs."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 7_919 + batch_idx * 97 + self.global_rank)
        return g

    def anneal_temperature(self, step: int) -> float:
        """Set the resampler's temperature for `step`: geometric from the config value to `temperature_end`."""
        start, end, steps = (
            self.tokenizer.config["temperature"],
            self.hparams.temperature_end,
            self.hparams.temperature_anneal_steps,
        )
        temperature = start if end is None or steps <= 0 else start * (end / start) ** min(step / steps, 1.0)
        self.tokenizer.resampler.temperature = temperature
        return temperature

    @staticmethod
    def _inputs(batch) -> dict[str, torch.Tensor]:
        """``{"images": ...}`` from an (images, labels) batch, or ``{"latents": ...}`` from a latent-cache batch."""
        if isinstance(batch, dict):
            if "latents" not in batch:
                raise ValueError(f"a dict batch must hold 'latents' (a latent cache); got keys {sorted(batch)}")
            return {"latents": batch["latents"]}
        return {"images": batch[0] if isinstance(batch, (list, tuple)) else batch}

    def _step(self, batch, stage: str, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self._inputs(batch)
        size = next(iter(inputs.values())).shape[0]
        if stage == "train":
            generator = self._generator(batch_idx)
        else:  # the same masks, times and noise at every validation: comparable numbers across a run
            generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)
        out = self.tokenizer.loss(generator=generator, **inputs)
        log = {f"{stage}/{k}": v.detach() for k, v in out.parts.items()}
        log[f"{stage}/loss"] = out.loss.detach()
        sync = stage != "train"
        self.log_dict(log, prog_bar=False, sync_dist=sync, batch_size=size)
        self.log(f"{stage}_loss", out.loss.detach(), prog_bar=True, sync_dist=sync, batch_size=size)
        return out.loss, out.indices

    def _gather_input_statistics(self, inputs: dict[str, torch.Tensor]) -> None:
        """Collect the first `statistics_images` training images' features; store the statistics once full."""
        wanted = self.hparams.statistics_images
        if "images" not in inputs or wanted == 0 or self.tokenizer.config["input_statistics"] is not None:
            return
        seen = sum(len(f) for f in self._input_features)
        self._input_features.append(image_features(inputs["images"][: wanted - seen]).cpu())
        if seen + len(self._input_features[-1]) >= wanted:
            self.tokenizer.config["input_statistics"] = self._input_statistics()
            self._input_features = []

    def _input_statistics(self) -> dict | None:
        """The statistics of the training images gathered so far (None before two)."""
        features = torch.cat(self._input_features) if self._input_features else torch.empty(0, 2)
        if len(features) < 2:
            return None
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "description", None) or f"training images of {type(datamodule).__name__}"
        return input_statistics(features, data)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.anneal_temperature(self.global_step)
        self._gather_input_statistics(self._inputs(batch))
        loss, indices = self._step(batch, "train", batch_idx)
        if batch_idx % 50 == 0:  # occasional: counting distinct ids syncs with the device
            if self.trainer.world_size > 1:  # the global batch: every rank reaches the same batch_idx
                indices = self.all_gather(indices)
            self.log("train/temperature", self.tokenizer.resampler.temperature)
            self.log("train/batch_distinct_ids", float(indices.unique().numel()))
        return loss

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        inputs = self._inputs(batch)
        self._step(batch, stage, batch_idx)
        ids = self.tokenizer.encode(**inputs)
        self._val_counts += torch.bincount(ids.indices.flatten(), minlength=self._val_counts.numel())
        if batch_idx >= self.hparams.val_recon_batches:
            return
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        recon = self.tokenizer.decode(
            ids.ids,
            **(self.hparams.val_decode or {}),
            generator=generator,
        ).images
        # from a latent cache the reference is the autoencoder's decoding of the cached latents (the pixels the
        # tokenizer was given), so PSNR/SSIM measure the tokenizer alone
        images = (
            inputs["images"]
            if "images" in inputs
            else self.tokenizer.first_stage.decode(inputs["latents"]).clamp(-1, 1)
        )
        self._score(recon, images)
        if batch_idx == 0:
            name, x = next(iter(inputs.items()))
            useful = self.tokenizer.token_usefulness(**{name: x[: max(2, min(len(x), 128))]})
            self.log(f"{stage}/shuffle_gap", useful["shuffle_gap"], sync_dist=True)
            self._write_grid(images, recon, stage, self.hparams.grid_size)

    # ------------------------------------------------------------------ optimiser

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.tokenizer.named_parameters():
            if not p.requires_grad:
                continue
            (
                no_decay
                if p.ndim < 2
                or name.endswith(
                    ("pos", "pos_embed", "queries", "null_tokens", "mask_token", "truncation_token", "index_embed")
                )
                else decay
            ).append(p)
        return adamw_warmup_cosine(self.trainer, decay, no_decay, self.hparams)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # remembered for load_state_dict, which Lightning calls next: a mismatch then names the file and the keys
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        saved = checkpoint.get("v2flow_tokenizer_config")
        if saved is None:
            raise ValueError(
                f"checkpoint {path or ''} has no 'v2flow_tokenizer_config': it was not written by a tokenizer run "
                "(an LM, classifier or vq checkpoint goes to `v2flow lm|classifier|vq`)"
            )
        current = self.tokenizer.current_config()
        learned = ("temperature", "input_statistics")  # what training sets, not the config
        differs = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and k not in learned}
        # statistics still being gathered resume from their features; complete ones come back as they were
        self._input_features = list(checkpoint.get("v2flow_input_features", []))
        self.tokenizer.config["input_statistics"] = None if self._input_features else saved.get("input_statistics")
        self._loading_from = (path, differs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            path, differs = getattr(self, "_loading_from", (None, {}))
            detail = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in differs.items())
            raise ValueError(
                f"checkpoint {path or '(given state dict)'} does not fit this tokenizer config"
                + (f" ({detail})" if detail else "")
                + f"; resume with the config it was trained with. {err}"
            ) from err

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        vocab = self.tokenizer.vocabulary
        config = self.tokenizer.current_config()
        if config["input_statistics"] is None:  # a run shorter than statistics_images: what it saw so far
            config["input_statistics"] = self._input_statistics()
        checkpoint["v2flow_tokenizer_config"] = config
        checkpoint["v2flow_input_features"] = list(self._input_features)  # empty once the statistics are stored
        checkpoint["v2flow_vocab"] = {
            "llm_name": vocab.llm_name,
            "llm_vocab_size": vocab.llm_vocab_size,
            "token_strings": vocab.token_strings,
        }


def tokenizer_from_checkpoint(path: str | Path, map_location: str = "cpu", weights: str = "ema") -> V2FlowTokenizer:
    """Rebuild the trained tokenizer from a Lightning checkpoint.

    Args:
        weights: ``"ema"``: the averaged weights when the run used :class:`EMA` (its ``state_dict``), else the
            raw ones; ``"current"``: the raw training weights.
    """
    if weights not in ("ema", "current"):
        raise ValueError(f"weights must be 'ema' or 'current', got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    for key in ("state_dict", "v2flow_tokenizer_config", "v2flow_vocab"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} has no {key!r}; is it a v2flow training checkpoint?")
    tokenizer = V2FlowTokenizer.from_config(ckpt["v2flow_tokenizer_config"])
    prefix = "tokenizer."
    source = ckpt.get("current_model_state", ckpt["state_dict"]) if weights == "current" else ckpt["state_dict"]
    state = {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}
    try:
        tokenizer.load_trained(state, ckpt["v2flow_vocab"])  # the autoencoder comes from where the config says
    except (KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {path} does not match its tokenizer config: {err}") from err
    return tokenizer.eval()
