"""The VQ baseline: diffusers' ``VQModel`` (a VQ-VAE with the VQGAN convolutional architecture) as a tokenizer,
trained with the project's Lightning harness (``v2flow vq fit --config configs/vq_mnist_16.yaml``).

* :class:`VQTokenizer`: the model, built from typed keyword arguments; the verbs ``encode`` / ``decode`` /
  ``reconstruct`` match :class:`~v2flow.V2FlowTokenizer`'s (ids (B, N) are codebook indices, row-major over
  the ``grid_size x grid_size`` latent grid); saved as diffusers' own ``config.json`` +
  ``diffusion_pytorch_model.safetensors`` (loadable by ``diffusers.VQModel.from_pretrained``) plus
  ``v2flow_vq.json`` with the arguments here.
* :class:`VQBaselineModule`: reconstruction (MSE or L1) + diffusers' VQ codebook/commitment loss, the same
  AdamW warm-up + cosine schedule as :class:`~v2flow.training.V2FlowModule`, validation PSNR/SSIM, codebook
  usage and a PNG grid; works with :class:`~v2flow.training.EMA`.

No adversarial or perceptual (LPIPS) loss: LPIPS needs pretrained VGG weights, which are not available
offline, and a GAN term would make the baseline a different method from the plain-reconstruction VQ-VAE
that this compares with at equal bits and steps.

Codebook usage. diffusers' ``VectorQuantizer`` is a plain nearest-neighbour quantizer (Euclidean ``cdist``; no
l2-normalised lookup, EMA codebook or dead-code restart; its ``remap`` option only renames indices of an already
trained model). It initialises the codebook uniformly in ``±1/K``, and large codebooks trained that way are
prone to collapse (few codes used). Two of its own options are used: low-dimensional codes (``vq_embed_dim`` through its ``quant_conv``,
the factorised codes of ViT-VQGAN) and ``legacy=False`` (the VQ-VAE loss: codebook term at weight 1,
commitment at ``beta``; ``legacy=True``, VQModel's default, swaps them). Two standard remedies that change no
diffusers code are added: ``codebook_init="data"`` (the codebook starts as encoder outputs of the first
training batch) and ``restart_dead_codes_every`` (codes unused for that many steps move to encoder outputs of
the current batch, as in Jukebox and SoundStream). Whether these help at the full budget is what
``val/distinct_ids`` of a run shows; ``benchmarks/head_to_head.py`` reports codes used per model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..checks import check_image_range
from ..hub import staged_directory
from ..layers import draw
from ..resampler import perplexity
from ..tokenizer import DecodeOutput, ReconstructOutput
from ..training import TokenizerEvalModule, adamw_warmup_cosine

EXTRAS_NAME = "v2flow_vq.json"  # our arguments, beside diffusers' config.json + diffusion_pytorch_model.safetensors
CODEBOOK_INITS = ("uniform", "data")
RECON_LOSSES = ("mse", "l1")


# ---------------------------------------------------------------------------- outputs


@dataclass
class VQEncodeOutput:
    """ids (B, N): codebook indices, row-major over the latent grid (N = grid_size ** 2); indices: the same
    tensor (the name :class:`~v2flow.EncodeOutput` uses for row indices)."""

    ids: torch.Tensor
    indices: torch.Tensor


@dataclass
class VQForwardOutput:
    """recon (B, C, H, W) unclipped decoder output; commit_loss: diffusers' codebook + commitment term (scalar);
    indices (B, N) the codes used; latents (B, vq_embed_dim, g, g) the encoder outputs before quantisation."""

    recon: torch.Tensor
    commit_loss: torch.Tensor
    indices: torch.Tensor
    latents: torch.Tensor


# ---------------------------------------------------------------------------- helpers


def sample_rows(rows: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(k, D) rows drawn from `rows` (M, D): without replacement when M >= k, else with replacement plus
    Gaussian noise of 1 % of the rows' std (so that copies of one row are distinct codes)."""
    rows = rows.float()
    if len(rows) >= k:
        return rows[draw(torch.randperm, len(rows), generator=generator, device=rows.device)[:k]]
    pick = draw(torch.randint, len(rows), (k,), generator=generator, device=rows.device)
    noise = draw(torch.randn, k, rows.shape[1], generator=generator, device=rows.device)
    return rows[pick] + 0.01 * rows.std(0, keepdim=True).nan_to_num(1.0) * noise


# ---------------------------------------------------------------------------- the tokenizer


def _check_vq_config(
    image_size: int,
    in_channels: int,
    grid_size: int,
    codebook_size: int,
    latent_channels: int,
    vq_embed_dim: int | None,
    block_out_channels: list[int],
    layers_per_block: int,
    norm_num_groups: int,
    commitment_beta: float,
    codebook_init: str,
) -> int:
    """Raise a ValueError naming the argument for a VQ tokenizer config that cannot be built; return the
    number of down blocks (each halves the resolution, the last keeps it)."""
    for name, value in (
        ("image_size", image_size),
        ("in_channels", in_channels),
        ("grid_size", grid_size),
        ("latent_channels", latent_channels),
        ("layers_per_block", layers_per_block),
        ("norm_num_groups", norm_num_groups),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    if vq_embed_dim is not None and vq_embed_dim < 1:
        raise ValueError(f"vq_embed_dim must be >= 1 (or None for latent_channels), got {vq_embed_dim}")
    factor, rest = divmod(image_size, grid_size)
    if rest or factor & (factor - 1):
        raise ValueError(
            f"image_size / grid_size must be a power of two (each down block halves the resolution), got "
            f"{image_size} / {grid_size}"
        )
    num_blocks = int(math.log2(factor)) + 1
    if len(block_out_channels) != num_blocks:
        raise ValueError(
            f"image_size {image_size} -> grid_size {grid_size} is {factor}x downsampling: {num_blocks - 1} "
            f"halvings need {num_blocks} down blocks (the last keeps its resolution), so block_out_channels "
            f"needs {num_blocks} entries, got {len(block_out_channels)}: {block_out_channels}"
        )
    bad = [c for c in block_out_channels if c < 1 or c % norm_num_groups]
    if bad:
        raise ValueError(f"norm_num_groups {norm_num_groups} does not divide block_out_channels entries {bad}")
    if not 0.0 <= commitment_beta:
        raise ValueError(f"commitment_beta must be >= 0, got {commitment_beta}")
    if codebook_init not in CODEBOOK_INITS:
        raise ValueError(f"unknown codebook_init {codebook_init!r}; choose one of {CODEBOOK_INITS}")
    return num_blocks


class VQTokenizer(nn.Module):
    """diffusers' :class:`~diffusers.VQModel` as a tokenizer of ``grid_size ** 2`` tokens over ``codebook_size``
    codes (``grid_size ** 2 * log2(codebook_size)`` bits per image).

    Every argument is a YAML / ``v2flow_vq.json`` key. The encoder has one ``DownEncoderBlock2D`` per entry of
    `block_out_channels` and all but the last halve the resolution, so ``image_size / grid_size`` must be
    ``2 ** (len(block_out_channels) - 1)``.

    Args:
        image_size: height = width of the images.
        in_channels: image channels (1 for MNIST, 3 for RGB); the output has as many.
        grid_size: tokens per side of the latent grid.
        codebook_size: K, codebook entries (diffusers' ``num_vq_embeddings``).
        latent_channels: channels of the encoder output and decoder input.
        vq_embed_dim: dimension of the codes (diffusers' ``quant_conv`` maps ``latent_channels`` to it); None
            uses ``latent_channels``.
        block_out_channels: channels of the encoder's down blocks (the decoder mirrors them).
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups (must divide every entry of `block_out_channels`).
        mid_block_add_attention: self-attention in the middle block (VQGAN has it).
        commitment_beta: diffusers' ``beta`` (weight of the commitment term; VQModel fixes it at 0.25).
        legacy: diffusers' ``legacy`` flag: True applies `commitment_beta` to the codebook term instead (the
            original taming-transformers bug, VQModel's default); False is the VQ-VAE paper's loss.
        codebook_init: ``"uniform"`` (diffusers' ``±1/K``) or ``"data"``: :class:`VQBaselineModule` sets the
            codebook to encoder outputs of the first training batch (see :meth:`init_codebook_from`).
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 1,
        grid_size: int = 4,
        codebook_size: int = 4096,
        latent_channels: int = 64,
        vq_embed_dim: int | None = 8,
        block_out_channels: Sequence[int] = (32, 48, 64, 96),
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        mid_block_add_attention: bool = True,
        commitment_beta: float = 0.25,
        legacy: bool = False,
        codebook_init: str = "data",
    ) -> None:
        super().__init__()
        from diffusers import VQModel

        block_out_channels = [int(c) for c in block_out_channels]
        num_blocks = _check_vq_config(
            image_size, in_channels, grid_size, codebook_size, latent_channels, vq_embed_dim, block_out_channels,
            layers_per_block, norm_num_groups, commitment_beta, codebook_init,
        )  # fmt: skip
        self.config = {
            "image_size": image_size,
            "in_channels": in_channels,
            "grid_size": grid_size,
            "codebook_size": codebook_size,
            "latent_channels": latent_channels,
            "vq_embed_dim": vq_embed_dim,
            "block_out_channels": block_out_channels,
            "layers_per_block": layers_per_block,
            "norm_num_groups": norm_num_groups,
            "mid_block_add_attention": mid_block_add_attention,
            "commitment_beta": commitment_beta,
            "legacy": legacy,
            "codebook_init": codebook_init,
        }
        self.vq = VQModel(
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=("DownEncoderBlock2D",) * num_blocks,
            up_block_types=("UpDecoderBlock2D",) * num_blocks,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            sample_size=image_size,
            num_vq_embeddings=codebook_size,
            norm_num_groups=norm_num_groups,
            vq_embed_dim=vq_embed_dim,
            mid_block_add_attention=mid_block_add_attention,
        )
        self._configure_quantizer()

    def _configure_quantizer(self) -> None:
        # VQModel builds its VectorQuantizer with beta=0.25 and legacy=True; both are plain attributes read in
        # its forward, set here (and again after loading, since diffusers' config does not record them)
        self.vq.quantize.beta = self.config["commitment_beta"]
        self.vq.quantize.legacy = self.config["legacy"]

    # ------------------------------------------------------------------ properties

    @property
    def num_tokens(self) -> int:
        return self.config["grid_size"] ** 2

    @property
    def num_codes(self) -> int:
        return self.config["codebook_size"]

    @property
    def bits_per_image(self) -> float:
        return self.num_tokens * math.log2(self.num_codes)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, vq_embed_dim) the code vectors."""
        return self.vq.quantize.embedding.weight

    # ------------------------------------------------------------------ checks

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming the problem unless images are (B, C, H, W) finite floats in [-1, 1] of the
        configured size, dtype and device."""
        c, s = self.config["in_channels"], self.config["image_size"]
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, {c}, {s}, {s}), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1:] != (c, s, s) or images.shape[0] == 0:
            raise ValueError(f"images must be (B, {c}, {s}, {s}) with B >= 1, got shape {tuple(images.shape)}")
        weight = self.codebook
        if images.dtype != weight.dtype or images.device != weight.device:
            raise ValueError(
                f"images are {images.dtype} on {images.device} but this tokenizer computes in {weight.dtype} on "
                f"{weight.device}; use images.to({weight.dtype}).to('{weight.device}')"
            )
        check_image_range(images)

    def _check_ids(self, ids: torch.Tensor) -> None:
        n, k = self.num_tokens, self.num_codes
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] != n or ids.shape[0] == 0:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a (B, {n}) integer tensor with B >= 1, got {shape}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"ids must be codebook indices in [0, {k}), got values in [{lo}, {hi}]")

    # ------------------------------------------------------------------ forward (training)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, vq_embed_dim, g, g) encoder outputs before quantisation."""
        return self.vq.encode(images).latents

    def forward(self, images: torch.Tensor) -> VQForwardOutput:
        """Encode, quantise (straight-through) and decode; the training path (no input-value check)."""
        h = self.latents(images)  # (B, D, g, g)
        z_q, commit_loss, (_, _, indices) = self.vq.quantize(h)
        recon = self.vq.decode(z_q, force_not_quantize=True).sample  # (B, C, H, W)
        return VQForwardOutput(recon, commit_loss, indices.view(len(images), -1), h)

    @torch.no_grad()
    def init_codebook_from(self, images: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Set the codebook to encoder outputs of `images` (B, C, H, W) (see :func:`sample_rows`)."""
        h = rearrange(self.latents(images), "b d h w -> (b h w) d")
        self.codebook.copy_(sample_rows(h, self.num_codes, generator).to(self.codebook.dtype))

    # ------------------------------------------------------------------ public verbs

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> VQEncodeOutput:
        """Images (B, C, H, W) in [-1, 1] -> :class:`VQEncodeOutput` with ids (B, N), N = grid_size ** 2,
        row-major over the latent grid. Deterministic (nearest code)."""
        self.check_images(images)
        was_training = self.training
        self.eval()
        try:
            _, _, (_, _, indices) = self.vq.quantize(self.latents(images))
        finally:
            self.train(was_training)
        ids = indices.view(len(images), -1)  # (B, N)
        return VQEncodeOutput(ids=ids, indices=ids)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> DecodeOutput:
        """Codebook indices (B, N) (any integer dtype) -> :class:`~v2flow.DecodeOutput` with images (B, C, H, W)
        in [-1, 1] (clipped) and latents (B, vq_embed_dim, g, g), the looked-up codes. Deterministic."""
        self._check_ids(ids)
        g = self.config["grid_size"]
        was_training = self.training
        self.eval()
        try:
            ids = ids.to(device=self.codebook.device, dtype=torch.long)
            z_q = self.vq.quantize.get_codebook_entry(ids.flatten(), (len(ids), g, g, self.codebook.shape[1]))
            images = self.vq.decode(z_q, force_not_quantize=True).sample
        finally:
            self.train(was_training)
        return DecodeOutput(images=images.clamp(-1, 1), latents=z_q)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> ReconstructOutput:
        """encode then decode: images (B, C, H, W) -> :class:`~v2flow.ReconstructOutput` (images, ids)."""
        ids = self.encode(images).ids
        return ReconstructOutput(images=self.decode(ids).images, ids=ids)

    def usage_from_counts(self, counts: torch.Tensor) -> dict[str, float]:
        """Codebook usage from a histogram (K,): distinct codes, perplexity, bits per image."""
        return {
            "distinct_ids": int((counts > 0).sum()),
            "perplexity": perplexity(counts),
            "bits_per_image": self.bits_per_image,
        }

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write diffusers' ``config.json`` + ``diffusion_pytorch_model.safetensors`` and ``v2flow_vq.json`` to
        `path`, atomically (:func:`v2flow.hub.staged_directory`: an existing VQ directory is replaced once the
        new one is complete; a directory of other files is refused)."""
        with staged_directory(path, marker=EXTRAS_NAME) as staged:
            self.vq.save_pretrained(staged, safe_serialization=True)
            extras = {"_class_name": type(self).__name__, **self.config}
            (staged / EXTRAS_NAME).write_text(json.dumps(extras, indent=2) + "\n")
        return Path(path)

    @classmethod
    def from_config(cls, config: dict) -> VQTokenizer:
        """Build an untrained tokenizer from a config dict (keys starting with ``_`` are ignored)."""
        return cls(**{k: v for k, v in config.items() if not k.startswith("_")})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VQTokenizer:
        """Load a tokenizer written by :meth:`save_pretrained`; outputs are bit-identical."""
        from diffusers import VQModel

        directory = Path(path)
        if not (directory / EXTRAS_NAME).is_file():
            raise FileNotFoundError(
                f"{directory} has no {EXTRAS_NAME}; is it a VQTokenizer directory (written by save_pretrained)?"
            )
        config = json.loads((directory / EXTRAS_NAME).read_text())
        if config.get("_class_name") != cls.__name__:
            raise ValueError(f"{directory / EXTRAS_NAME} describes a {config.get('_class_name')}, not a {cls.__name__}")
        model = cls.from_config(config)
        loaded = VQModel.from_pretrained(directory)
        ours, theirs = (json.loads(json.dumps(dict(c), default=str)) for c in (model.vq.config, loaded.config))
        differ = sorted(k for k in ours if not k.startswith("_") and ours[k] != theirs.get(k))
        if differ:
            raise ValueError(f"{directory}: diffusers' config.json and {EXTRAS_NAME} disagree on {differ}")
        model.vq.load_state_dict(loaded.state_dict(), strict=True)
        model._configure_quantizer()
        return model.to(map_location).eval()


# ---------------------------------------------------------------------------- Lightning


class VQBaselineModule(TokenizerEvalModule):
    """Trains a :class:`VQTokenizer`: ``loss = recon + commitment_weight * commit``.

    ``recon`` is the pixel MSE or L1 of the straight-through reconstruction; ``commit`` is diffusers' VQ term
    (codebook + ``beta`` x commitment). The optimiser and schedule are :class:`~v2flow.training.V2FlowModule`'s.

    Args:
        tokenizer: the model (built by the CLI from ``class_path``/``init_args``).
        lr, weight_decay, betas: AdamW (no weight decay on biases, norms and the codebook).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
        recon_loss: ``"mse"`` (the VQ-VAE objective; what PSNR measures) or ``"l1"`` (VQGAN's pixel term).
        commitment_weight: weight of diffusers' VQ term.
        restart_dead_codes_every: every this many optimiser steps, the codes that no training token used in
            those steps are moved to encoder outputs of the current batch (the dead-code restart of Jukebox /
            SoundStream; the same codes on every rank); 0 = off.
        val_recon_batches: validation batches reconstructed through the ids (PSNR/SSIM).
        grid_images: images in the validation PNG grid (originals above reconstructions).
        seed: seed of the codebook initialisation and restarts.
    """

    def __init__(
        self,
        tokenizer: VQTokenizer,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        recon_loss: str = "mse",
        commitment_weight: float = 1.0,
        restart_dead_codes_every: int = 50,
        val_recon_batches: int = 2,
        grid_images: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"unknown recon_loss {recon_loss!r}; choose one of {RECON_LOSSES}")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight}")
        if restart_dead_codes_every < 0:
            raise ValueError(f"restart_dead_codes_every must be >= 0 (0 = off), got {restart_dead_codes_every}")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self._init_eval(tokenizer.num_codes)
        # a plain attribute, not a buffer, like the validation counts
        self._train_counts = torch.zeros(tokenizer.num_codes, dtype=torch.long)  # since the last restart
        self._counted_steps = 0  # steps in _train_counts (a resumed run starts counting afresh)
        self._last_latents: torch.Tensor | None = None

    # ------------------------------------------------------------------ steps

    @staticmethod
    def _images(batch) -> torch.Tensor:
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == 0 and batch_idx == 0 and self.tokenizer.config["codebook_init"] == "data":
            # before the first EMA update, which copies the live weights; rank 0's codebook goes to every rank
            generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed)
            self.tokenizer.init_codebook_from(self._images(batch), generator=generator)
            codebook = self.tokenizer.codebook.data
            codebook.copy_(self.trainer.strategy.broadcast(codebook.clone(), src=0))

    def _step(self, batch, stage: str) -> tuple[torch.Tensor, VQForwardOutput]:
        images = self._images(batch)
        out = self.tokenizer(images)
        distance = F.mse_loss if self.hparams.recon_loss == "mse" else F.l1_loss
        recon = distance(out.recon, images)
        loss = recon + self.hparams.commitment_weight * out.commit_loss
        sync = stage != "train"
        parts = {f"{stage}/recon": recon, f"{stage}/commit": out.commit_loss, f"{stage}/loss": loss}
        self.log_dict({k: v.detach() for k, v in parts.items()}, sync_dist=sync, batch_size=len(images))
        self.log(f"{stage}_loss", loss.detach(), prog_bar=True, sync_dist=sync, batch_size=len(images))
        return loss, out

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, out = self._step(batch, "train")
        indices = out.indices
        if self.hparams.restart_dead_codes_every:
            if self._train_counts.device != indices.device:
                self._train_counts = self._train_counts.to(indices.device)
            self._train_counts += torch.bincount(indices.flatten(), minlength=self._train_counts.numel())
            self._counted_steps += 1
            self._last_latents = out.latents.detach()
        if batch_idx % 50 == 0:  # occasional: counting distinct ids syncs with the device
            if self.trainer.world_size > 1:
                indices = self.all_gather(indices)
            self.log("train/batch_distinct_ids", float(indices.unique().numel()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.hparams.restart_dead_codes_every
        if not every or self._counted_steps < every:
            return
        counts = self._train_counts
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        dead = counts == 0  # (K,), equal on every rank
        num_dead = int(dead.sum())
        if num_dead:
            rows = rearrange(self._last_latents, "b d h w -> (b h w) d")
            generator = torch.Generator(device=self.device).manual_seed(
                self.hparams.seed * 1_000_003 + self.global_step
            )
            codes = sample_rows(rows, num_dead, generator)
            codes = self.trainer.strategy.broadcast(codes, src=0)  # rank 0's batch: the same codes everywhere
            with torch.no_grad():
                self.tokenizer.codebook[dead] = codes.to(self.tokenizer.codebook.dtype)
        self.log("train/restarted_codes", float(num_dead))
        self._train_counts = torch.zeros_like(self._train_counts)
        self._counted_steps = 0
        self._last_latents = None

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        images = self._images(batch)
        self._step(batch, stage)
        ids = self.tokenizer.encode(images).ids
        self._val_counts += torch.bincount(ids.flatten(), minlength=self._val_counts.numel())
        if batch_idx >= self.hparams.val_recon_batches:
            return
        recon = self.tokenizer.decode(ids).images  # through the ids: what a user of the tokens gets
        self._score(recon, images)
        if batch_idx == 0:
            self._write_grid(images, recon, stage, self.hparams.grid_images)

    # ------------------------------------------------------------------ optimiser

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.tokenizer.named_parameters():
            if p.requires_grad:  # weight decay would pull unused codes to the origin
                (no_decay if p.ndim < 2 or name.endswith("quantize.embedding.weight") else decay).append(p)
        return adamw_warmup_cosine(self.trainer, decay, no_decay, self.hparams)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["v2flow_vq_config"] = dict(self.tokenizer.config)


def vq_from_checkpoint(path: str | os.PathLike, map_location: str = "cpu", weights: str = "ema") -> VQTokenizer:
    """Rebuild the trained :class:`VQTokenizer` from a :class:`VQBaselineModule` checkpoint.

    Args:
        weights: ``"ema"``: the averaged weights when the run used :class:`~v2flow.training.EMA` (its
            ``state_dict``), else the raw ones; ``"current"``: the raw training weights.
    """
    if weights not in ("ema", "current"):
        raise ValueError(f"weights must be 'ema' or 'current', got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "v2flow_vq_config" not in ckpt:
        raise ValueError(f"{path} is not a VQ baseline checkpoint (no 'v2flow_vq_config')")
    tokenizer = VQTokenizer.from_config(ckpt["v2flow_vq_config"])
    source = ckpt.get("current_model_state", ckpt["state_dict"]) if weights == "current" else ckpt["state_dict"]
    prefix = "tokenizer."
    tokenizer.load_state_dict({k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)})
    return tokenizer.eval()
