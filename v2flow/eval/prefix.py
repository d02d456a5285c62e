"""Measures of prefix decoding: do a tokenizer's first k tokens hold a coarse version of the image?

* :func:`prefix_quality`: PSNR/SSIM of ``decode(ids[:, :k])`` against the images.
* :func:`denoising_gain`: per noise level t, how much the tokens visible at t improve the velocity head's
  one-step data estimate over no tokens: where along the trajectory tokens can still steer the decode.
* :func:`position_entropy`: entropy of the token distribution at each position.
* :func:`next_token_entropy`: per-position next-token cross-entropy of a small causal transformer trained on
  token sequences (Selftok finds ordered tokens get easier to predict along the sequence).

``benchmarks/prefix.py`` runs them on the shipped ordered and unordered checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..layers import unpatchify
from ..metrics import SSIM, psnr_per_image
from ..tokenizer import V2FlowTokenizer


def prefix_quality(
    tok: V2FlowTokenizer, images: torch.Tensor, ids: torch.Tensor, k: int, batch_size: int, **decode_kwargs
) -> dict:
    """PSNR and SSIM of ``decode(ids[:, :k])`` against `images`; `decode_kwargs` override the config's defaults."""
    device = tok.vocabulary.embeddings.device
    ssim = SSIM().to(device)  # the standard way: [0, 1], data range 1
    psnr_sum = 0.0
    for i in range(0, len(images), batch_size):
        x, prefix = images[i : i + batch_size].to(device), ids[i : i + batch_size, :k].to(device)
        y = tok.decode(
            prefix, allow_truncation=True, generator=torch.Generator().manual_seed(i), **decode_kwargs
        ).images
        psnr_sum += float(psnr_per_image(y, x).sum())
        ssim.update(y, x)
    return {"psnr": psnr_sum / len(images), "ssim": float(ssim.compute())}


DENOISE_TIMES = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@torch.no_grad()
def denoising_gain(
    tok: V2FlowTokenizer,
    images: torch.Tensor,
    ids: torch.Tensor,
    times=DENOISE_TIMES,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Where along the trajectory the tokens can still steer the decoder.

    For each noise level t it noises the images' patches, ``x_t = (1 - t) x0 + t eps``, and scores the one-step
    data estimate ``x0_hat = x_t - t v(x_t, t)`` of the velocity head (all patches masked, as in a one-iteration
    decode): PSNR with the tokens the decoder may see at t (ordered mode: the prefix ``k(t)``), and with the
    null condition (no tokens). Their difference is the most the visible tokens add at that level; a token
    that enters where it is small carries little a decode can use.

    Returns:
        ``{"times": [...], "psnr_tokens": [...], "psnr_null": [...], "visible_tokens": [...]}``.
    """
    device = tok.vocabulary.embeddings.device
    size, patch = tok.first_stage.latent_size, tok.config["patch_size"]
    sums = torch.zeros(2, len(times), dtype=torch.float64)  # (with tokens | null, times)
    was_training = tok.training
    tok.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            embeddings = tok.resampler.embed(tok._ids_to_indices(ids[i : i + batch_size].to(device)))
            patches = tok.patches_of(x, None, check_values=False)  # (B, L, P)
            b, length, _ = patches.shape
            mask = torch.ones(b, length, dtype=torch.bool, device=device)
            null_cond = tok.decoder(embeddings, patches, mask, torch.ones(b, dtype=torch.bool, device=device))
            # unordered: every token is visible at every level, so one condition serves them all
            full_cond = tok.decoder(embeddings, patches, mask) if tok.schedule is None else None
            for j, t in enumerate(times):
                g = torch.Generator(device=device).manual_seed(seed + i)  # the same noise at every level
                xt = (1 - t) * patches + t * torch.randn(patches.shape, generator=g, device=device)
                tt = torch.full((b,), t, device=device)
                visible = None if tok.schedule is None else tok.schedule.visibility(tt).to(device)
                cond = full_cond if visible is None else tok.decoder(embeddings, patches, mask, token_mask=visible)
                for row, c in enumerate((cond, null_cond)):
                    v = tok.head(xt.flatten(0, 1), tt.repeat_interleave(length), c.flatten(0, 1))
                    x0 = (xt - t * v.view_as(xt)).float()
                    y = tok.first_stage.decode(unpatchify(x0, patch, size, size)).clamp(-1, 1)
                    sums[row, j] += float(psnr_per_image(y, x).sum())
    finally:
        tok.train(was_training)
    n = tok.config["num_tokens"]
    visible_tokens = [n if tok.schedule is None else int(tok.schedule.num_visible(torch.tensor([t]))) for t in times]
    means = (sums / len(images)).tolist()
    return {"times": list(times), "psnr_tokens": means[0], "psnr_null": means[1], "visible_tokens": visible_tokens}


def position_entropy(indices: torch.Tensor, num_codes: int) -> list[float]:
    """Entropy (bits) of the token distribution at each position over a set of sequences (n, N)."""
    out = []
    for column in indices.T:
        p = torch.bincount(column, minlength=num_codes).double() / len(column)
        out.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
    return out


def next_token_entropy(
    train: torch.Tensor, test: torch.Tensor, num_codes: int, steps: int, seed: int, device: str = "cpu"
) -> list[float]:
    """Per-position next-token cross-entropy (bits) on `test` of a small GPT-2 trained on `train` (n, N).

    Position i is scored on predicting token i from tokens < i (position 0 from a start token alone)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    n = train.shape[1]
    bos = num_codes
    config = GPT2Config(vocab_size=num_codes + 1, n_positions=n + 1, n_embd=128, n_layer=2, n_head=4, bos_token_id=bos)
    model = GPT2LMHeadModel(config).to(device)
    train, test = train.to(device), test.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def with_bos(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full((len(x), 1), bos, device=x.device), x], dim=1)

    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="AR model", leave=False):
        batch = with_bos(train[torch.randint(len(train), (128,), generator=g)])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    total = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for chunk in test.split(500):
            x = with_bos(chunk)
            logits = model(x).logits[:, :-1]  # (B, N, V): position i predicts token i
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, N)
            total += nll.double().sum(0).cpu()
    return (total / len(test) / math.log(2)).tolist()
