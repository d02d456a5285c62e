"""What the ids carry: a one-pass regression decoder trained on a frozen tokenizer's ids.

The flow decoder reconstructs far worse than a plain VQ-VAE at equal bits. That loss can sit in the encoder and
resampler (the ids hold little of the image) or in the decoder (the ids hold the image, the decoder does not
read it out). This module separates the two: it freezes a tokenizer, so its ids are fixed, trains a small
regression decoder with MSE from the ids alone to the image, and scores it next to the flow decoder on the same
images.

* :class:`IdDecoder`: ids (B, N) -> first-stage latents (B, c, h, w) in one pass (an MLP over the N token
  vectors, which start as the tokenizer's own frozen token embeddings).
* :func:`measure_token_information`: encode once, train the :class:`IdDecoder`, report its test PSNR.
* :func:`flow_decoder_psnr`: the flow decoder's own PSNR on the same images, at the tokenizer's decode defaults.

The regression PSNR is a lower bound on what the ids carry (a better decoder or more data could read out
more), and it is the posterior mean: it does not pay the up to 3 dB a posterior sample loses against it. So a
regression decoder far above the flow decoder says the decoder is the bottleneck; one close to the flow decoder
or to the mean image says the ids are. ``benchmarks/token_information.py`` runs both on the shipped checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm import tqdm

from ..layers import Mlp
from ..metrics import psnr_per_image
from ..tokenizer import V2FlowTokenizer

EMBEDDINGS = ("frozen", "learned")
LOSS_CURVE_POINTS = 20  # the train-loss curve is reported as this many window means


# ---------------------------------------------------------------------------- the regression decoder


class IdDecoder(nn.Module):
    """Token indices (B, N) -> first-stage latents (B, c, h, w) in one pass, trained with MSE.

    Each index is embedded (B, N, d) and layer-normed, the N vectors are concatenated in their positions (a
    query encoder gives each token position its own role, so position is kept rather than pooled), and a
    residual MLP of `depth` blocks at width `hidden_dim` maps them to all c * h * w latents at once. The output
    layer starts at zero (the decoder first predicts 0) and holds ``hidden_dim * c * h * w`` weights: sized for
    small latent grids (MNIST pixels, an autoencoder's latents), not for large pixel images.

    Args:
        num_tokens: N, tokens per image.
        num_codes: K, size of the id space (vocabulary rows or vq codes).
        token_dim: d, width of the token embeddings.
        out_channels: c, channels of the first-stage latents (image channels for a pixel tokenizer).
        out_size: h = w, side of the first-stage latents.
        hidden_dim: width of the MLP.
        depth: residual MLP blocks.
        train_embedding: learn the token embeddings; False keeps them as they are (see :meth:`from_tokenizer`).
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        num_codes: int,
        token_dim: int,
        out_channels: int,
        out_size: int,
        hidden_dim: int = 1024,
        depth: int = 2,
        dropout: float = 0.0,
        train_embedding: bool = True,
    ) -> None:
        super().__init__()
        sizes = dict(
            num_tokens=num_tokens,
            num_codes=num_codes,
            token_dim=token_dim,
            out_channels=out_channels,
            out_size=out_size,
            hidden_dim=hidden_dim,
        )
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad or depth < 0:
            raise ValueError(f"IdDecoder sizes must be >= 1 (depth >= 0), got {bad or {'depth': depth}}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.out_channels, self.out_size = out_channels, out_size
        self.embedding = nn.Embedding(num_codes, token_dim)
        self.embedding.weight.requires_grad_(train_embedding)
        self.token_norm = nn.LayerNorm(token_dim)
        self.proj_in = nn.Linear(num_tokens * token_dim, hidden_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(depth))
        self.blocks = nn.ModuleList(Mlp(hidden_dim, hidden_dim) for _ in range(depth))
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, out_channels * out_size**2)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embedding.weight, std=1.0)
        # zero output: training starts from a constant prediction and the residual blocks from the identity
        nn.init.zeros_(self.proj_out.weight)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: V2FlowTokenizer,
        *,
        embedding: str = "frozen",
        hidden_dim: int = 1024,
        depth: int = 2,
        dropout: float = 0.0,
    ) -> IdDecoder:
        """An IdDecoder sized for `tokenizer`'s ids and first-stage latents.

        Args:
            embedding: ``"frozen"``: the embedding table is ``tokenizer.resampler.embed`` of every index, the
                vectors the flow decoder reads, kept fixed; ``"learned"``: a fresh table trained with the rest
                (what the ids alone carry, without the geometry the tokenizer gave them).
        """
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {EMBEDDINGS}")
        resampler = tokenizer.resampler
        decoder = cls(
            num_tokens=tokenizer.config["num_tokens"],
            num_codes=resampler.num_codes,
            token_dim=resampler.embed_dim,
            out_channels=tokenizer.first_stage.latent_channels,
            out_size=tokenizer.first_stage.latent_size,
            hidden_dim=hidden_dim,
            depth=depth,
            dropout=dropout,
            train_embedding=embedding == "learned",
        )
        if embedding == "frozen":
            with torch.no_grad():
                device = tokenizer.vocabulary.embeddings.device
                table = resampler.embed(torch.arange(resampler.num_codes, device=device))  # (K, d)
                decoder.embedding.weight.copy_(table.float().cpu())
        return decoder

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, N) int64 in [0, K) -> latents (B, c, h, w)."""
        x = self.token_norm(self.embedding(indices))  # (B, N, d)
        x = self.proj_in(self.dropout(rearrange(x, "b n d -> b (n d)")))  # (B, hidden)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + self.dropout(block(norm(x)))
        out = self.proj_out(self.norm_out(x))  # (B, c*h*w)
        return rearrange(out, "b (c h w) -> b c h w", c=self.out_channels, h=self.out_size)


# ---------------------------------------------------------------------------- helpers


def _check_split(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (n, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{name} must be a non-empty (n, C, H, W) tensor of images, got shape {tuple(images.shape)}")


@torch.no_grad()
def encode_for_regression(
    tokenizer: V2FlowTokenizer, images: torch.Tensor, batch_size: int = 500, progress: bool = True, desc: str = "encode"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (n, N) and first-stage latents (n, c, h, w) of images (n, C, H, W) in [-1, 1], on the CPU.

    Batch by batch on the tokenizer's device; the tokenizer checks the images (range, size, dtype)."""
    device = tokenizer.vocabulary.embeddings.device
    pixels = tokenizer.config["first_stage"] == "pixels"
    indices, latents = [], []
    for chunk in tqdm(images.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = chunk.to(device)
        if pixels:
            indices.append(tokenizer.encode(x).indices.cpu())
            latents.append(x.float().cpu())
        else:
            tokenizer.check_images(x)
            z = tokenizer.first_stage.encode(x)  # (B, c, h, w), encoded once for ids and targets
            indices.append(tokenizer.encode(latents=z).indices.cpu())
            latents.append(z.float().cpu())
    return torch.cat(indices), torch.cat(latents)


@torch.no_grad()
def _latent_psnr(
    tokenizer: V2FlowTokenizer, latents: torch.Tensor, images: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """(n,) PSNR of first-stage latents (n, c, h, w), decoded to images and clipped, against images (n, C, H, W)."""
    device = tokenizer.vocabulary.embeddings.device
    out = []
    for z, x in zip(latents.split(batch_size), images.split(batch_size), strict=True):
        y = tokenizer.first_stage.decode(z.to(device)).clamp(-1, 1)
        out.append(psnr_per_image(y.float(), x.to(device).float()).cpu())
    return torch.cat(out)


@torch.no_grad()
def _predict(decoder: IdDecoder, indices: torch.Tensor, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    was_training = decoder.training
    decoder.eval()
    out = torch.cat([decoder(chunk.to(device)).cpu() for chunk in indices.split(batch_size)])
    decoder.train(was_training)
    return out


def _cosine_with_warmup(steps: int) -> Callable[[int], float]:
    """Learning-rate factor of a step: linear warm-up over the first 5 % of `steps`, then cosine decay to 0."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def _train(
    decoder: IdDecoder,
    indices: torch.Tensor,
    latents: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    progress: bool,
) -> list[list[float]]:
    """AdamW + MSE on batches drawn with replacement; returns ``[step, mean loss]`` per window of steps."""
    device = next(decoder.parameters()).device
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(steps))
    generator = torch.Generator().manual_seed(seed)
    window = max(1, math.ceil(steps / LOSS_CURVE_POINTS))
    losses, curve = [], []
    decoder.train()
    bar = tqdm(range(steps), desc="regression decoder", unit="step", disable=not progress, leave=False)
    for step in bar:
        pick = torch.randint(len(indices), (batch_size,), generator=generator)
        loss = F.mse_loss(decoder(indices[pick].to(device)), latents[pick].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) == window or step == steps - 1:
            curve.append([step + 1, sum(losses) / len(losses)])
            bar.set_postfix(mse=f"{curve[-1][1]:.4f}")
            losses = []
    decoder.eval()
    return curve


# ---------------------------------------------------------------------------- the measures


def measure_token_information(
    tokenizer: V2FlowTokenizer,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | torch.device | None = None,
    embedding: str = "frozen",
    hidden_dim: int = 1024,
    depth: int = 2,
    dropout: float = 0.2,
    progress: bool = True,
) -> dict:
    """How much of the image a frozen tokenizer's ids carry: the test PSNR of an :class:`IdDecoder` trained on them.

    The tokenizer is used as it is (eval mode, no gradients), so its ids are fixed. Every image is encoded once;
    the decoder then trains with AdamW (warm-up over the first 5 % of steps, cosine decay to 0) on MSE between
    its prediction and the first-stage latents (the pixels, for a pixel tokenizer), on batches of `batch_size`
    training ids drawn with replacement. The same `seed` and device give the same numbers.

    Args:
        tokenizer: a :class:`~v2flow.V2FlowTokenizer` with its vocabulary (and autoencoder, for
            ``first_stage="autoencoder"``) installed.
        train_images, test_images: (n, C, H, W) in [-1, 1], in the tokenizer's dtype; n >= 1.
        steps: optimiser steps, >= 1.
        batch_size: training ids per step, >= 1.
        lr, weight_decay: AdamW's.
        seed: seeds the decoder's initialisation and the batch draws (the global RNG is left as it was).
        device: where the decoder trains; None: the tokenizer's device (the tokenizer runs where it is).
        embedding, hidden_dim, depth, dropout: the decoder (:meth:`IdDecoder.from_tokenizer`). The dropout
            default is for small training sets: on 10k MNIST digits and 32 ids of 4,096 the decoder over-fits
            (train PSNR 2-3 dB above test), and dropout 0.2 gave +0.3 dB on the test digits.
        progress: show progress bars.

    Returns:
        ``regression_psnr`` (mean per-image test PSNR, dB, data range 2, after decoding the predicted latents
        through the first stage and clipping to [-1, 1]), ``train_psnr`` (the same on up to as many training
        images: the gap to ``regression_psnr`` shows over-fitting), ``mean_image_psnr`` (test PSNR of the mean
        training latent: what no information gets), ``distinct_ids`` (on training and test images together),
        ``distinct_test_ids_unseen`` (test ids never seen in training), ``bits_per_image`` (N log2 K),
        ``num_tokens``, ``num_codes``, ``num_train``, ``num_test``, ``steps``, ``batch_size``, ``lr``,
        ``weight_decay``, ``seed``, ``embedding``, ``hidden_dim``, ``depth``, ``dropout``, ``parameters`` (trained ones),
        ``encode_seconds``, ``seconds`` (training and scoring), and ``loss_curve``: ``[step, mean train MSE]``
        over :data:`LOSS_CURVE_POINTS` windows of the steps.
    """
    _check_split("train_images", train_images)
    _check_split("test_images", test_images)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {embedding!r}; choose one of {EMBEDDINGS}")
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        start = time.perf_counter()
        train_idx, train_lat = encode_for_regression(tokenizer, train_images, progress=progress, desc="encode train")
        test_idx, test_lat = encode_for_regression(tokenizer, test_images, progress=progress, desc="encode test")
        encode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        device = torch.device(device) if device is not None else tokenizer.vocabulary.embeddings.device
        # the seed fixes the initialisation and the dropout masks without touching the caller's RNG state
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            decoder = IdDecoder.from_tokenizer(
                tokenizer, embedding=embedding, hidden_dim=hidden_dim, depth=depth, dropout=dropout
            ).to(device)
            curve = _train(decoder, train_idx, train_lat, steps, batch_size, lr, weight_decay, seed, progress)
        seen = train_idx.unique()
        test_ids = test_idx.unique()
        n_check = min(len(train_images), len(test_images))
        mean_latent = train_lat.mean(0, keepdim=True).expand_as(test_lat)
        result = {
            "regression_psnr": float(_latent_psnr(tokenizer, _predict(decoder, test_idx, device), test_images).mean()),
            "train_psnr": float(
                _latent_psnr(tokenizer, _predict(decoder, train_idx[:n_check], device), train_images[:n_check]).mean()
            ),
            "mean_image_psnr": float(_latent_psnr(tokenizer, mean_latent, test_images).mean()),
            "distinct_ids": int(torch.cat([seen, test_ids]).unique().numel()),
            "distinct_test_ids_unseen": int((~torch.isin(test_ids, seen)).sum()),
            "bits_per_image": tokenizer.config["num_tokens"] * math.log2(tokenizer.resampler.num_codes),
            "num_tokens": tokenizer.config["num_tokens"],
            "num_codes": tokenizer.resampler.num_codes,
            "num_train": len(train_images),
            "num_test": len(test_images),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "embedding": embedding,
            "hidden_dim": hidden_dim,
            "depth": depth,
            "dropout": dropout,
            "parameters": sum(p.numel() for p in decoder.parameters() if p.requires_grad),
            "encode_seconds": encode_seconds,
            "seconds": time.perf_counter() - start,
            "loss_curve": curve,
        }
    finally:
        tokenizer.train(was_training)
    return result


@torch.no_grad()
def flow_decoder_psnr(
    tokenizer: V2FlowTokenizer,
    images: torch.Tensor,
    *,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = True,
    **decode_kwargs,
) -> dict:
    """The flow decoder's own reconstruction PSNR: ``tokenizer.reconstruct`` of every image, one generator
    seeded with `seed` for the whole stream.

    Args:
        images: (n, C, H, W) in [-1, 1], n >= 1.
        decode_kwargs: for :meth:`~v2flow.V2FlowTokenizer.decode` (``num_steps``, ``temperature``, ...); those
            left out take the tokenizer's decode defaults.

    Returns:
        ``flow_psnr`` (mean per-image PSNR, dB, data range 2), ``decode`` (the decode settings, defaults
        included), ``seconds``.
    """
    _check_split("images", images)
    device = tokenizer.vocabulary.embeddings.device
    names = {f.name for f in fields(tokenizer.decode_defaults)}
    settings = tokenizer.decode_defaults.resolve(**{k: v for k, v in decode_kwargs.items() if k in names})
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    total = 0.0
    for chunk in tqdm(images.split(batch_size), desc="flow decoder", unit="batch", disable=not progress, leave=False):
        x = chunk.to(device)
        y = tokenizer.reconstruct(x, generator=generator, **decode_kwargs).images
        total += float(psnr_per_image(y.float(), x.float()).sum())
    return {
        "flow_psnr": total / len(images),
        "decode": settings.as_dict(),
        "seconds": time.perf_counter() - start,
    }
