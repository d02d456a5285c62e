"""Fine-tuning a causal LLM to write images: the token data module and the LightningModule.

``v2flow lm fit --config configs/lm_mnist.yaml`` trains :class:`ImageLMModule` on
:class:`MNISTTokenDataModule`: (caption, image-token) pairs whose image tokens were computed once with the
image tokenizer and cached. The loss is next-token cross-entropy on the image tokens and
``<|image_end|>`` only. When a judge is given (any object with ``predict(images) -> digits``, see
:class:`DigitJudge`; the config builds one from a saved MNIST classifier), every validation also writes images
from the prompts, decodes them and reports prompt-following accuracy (the fraction judged to be the prompted
digit) and a PNG grid (one row per prompt).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .data import ResumableDataLoader, ResumableSampler, load_mnist, training_seed
from .llm import LOSS_VOCABULARIES, ImageLM, check_vocab_mode, load_causal_lm
from .tokenizer import V2FlowTokenizer
from .training import DisplayCallbacks, adamw_warmup_cosine
from .utils import releasing_heap, save_image_grid
from .vocab import BUNDLED_SMOLLM2, cache_dir

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_CAPTIONS = ("a handwritten digit {word}",)


class DigitJudge(Protocol):
    """What validation needs of a judge: the digit each generated image shows."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B,) predicted digits."""
        ...


def digit_caption(label: int, template: str = DEFAULT_CAPTIONS[0]) -> str:
    """The caption of digit `label`; templates may use ``{word}`` ("seven") and ``{digit}`` ("7")."""
    return template.format(word=DIGIT_WORDS[label], digit=label)


# ---------------------------------------------------------------------------- cached image tokens


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(
    tokenizer: V2FlowTokenizer,
    images: torch.Tensor,
    batch_size: int = 500,
    desc: str = "encoding",
    leave: bool = False,
) -> torch.Tensor:
    """(n, C, H, W) images -> (n, N) image-tokenizer ids, batch by batch with a progress bar (in images, with
    the time left; `leave` keeps it on screen when done)."""
    device = next(tokenizer.parameters()).device
    out = []
    with tqdm(total=len(images), desc=desc, unit="img", unit_scale=True, leave=leave) as bar:
        for chunk in releasing_heap(images.split(batch_size)):
            out.append(tokenizer.encode(chunk.to(device)).ids.cpu())
            bar.update(len(chunk))
    return torch.cat(out)


def cached_mnist_tokens(
    image_tokenizer: str | os.PathLike,
    split: str,
    limit: int = 0,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> dict:
    """Image-tokenizer ids of (the first `limit` images of) an MNIST split, computed once on `device` and
    cached beside the vocabularies (:func:`v2flow.vocab.cache_dir`: ``$V2FLOW_CACHE``, by default
    ``~/.cache/v2flow``), under ``tokens/``.

    The first call encodes the split with a progress bar and logs what it caches where: with the shipped
    32-token tokenizer a CPU takes 3 to 15 ms per digit (2.5 to 12.5 minutes for the 50,000 training digits;
    3.4 ms on two idle cores), and the file holds 6.4 MB (32 int32 ids and a uint8 label per digit). Later
    calls load the file. The cache key is the digest of the tokenizer's weights (and the limit), so
    retraining or re-exporting invalidates it. The device is not part of the key: ids encoded on another
    device can differ where two entries are nearly tied, and the first cache written is kept.

    Returns:
        ``{"ids": (n, N) int32, "labels": (n,) integer}`` (uint8 labels; int64 in caches written before).
    """
    path = Path(image_tokenizer)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing; image_tokenizer must be a V2FlowTokenizer directory")
    target = cache_dir() / "tokens" / f"mnist-{split}-{limit or 'all'}-{_file_digest(weights)}.pt"
    if target.exists():
        return torch.load(target, weights_only=True)
    tokenizer = V2FlowTokenizer.from_pretrained(path).to(device)
    images, labels = load_mnist(split)
    if limit:
        images, labels = images[:limit], labels[:limit]
    n, tokens = len(images), tokenizer.config["num_tokens"]
    rank_zero_info(
        f"Caching the image tokens of {n:,} MNIST {split} digits, once for this image tokenizer: encoding them "
        f"with {path} on {device} (on CPUs 3 to 15 ms per digit, {3e-3 * n / 60:.1f} to {15e-3 * n / 60:.1f} min; "
        f"the bar shows the time left) into {target} ({n * (4 * tokens + 1) / 1e6:.1f} MB). Later runs load it."
    )
    start = time.perf_counter()
    ids = encode_images(tokenizer, images, batch_size, desc=f"caching MNIST {split} tokens", leave=True)
    # only what training reads: int32 ids, uint8 labels, in tensors of their own (a slice would save the
    # whole split's storage)
    payload = {"ids": ids.to(torch.int32), "labels": labels.to(torch.uint8).clone()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    tmp.replace(target)
    seconds = time.perf_counter() - start
    rank_zero_info(
        f"Cached {n:,} x {tokens} image tokens in {seconds:.0f} s ({1e3 * seconds / n:.1f} ms per digit): {target} "
        f"({target.stat().st_size / 1e6:.1f} MB)"
    )
    return payload


@dataclass
class CaptionCollate:
    """Batches ``(ids (B, N), captions)``; training draws a template per sample, evaluation uses the first.
    A plain class, so DataLoader workers can pickle it under any start method."""

    captions: list[str]
    train: bool

    def __call__(self, items) -> tuple[torch.Tensor, list[str]]:
        ids = torch.stack([i for i, _ in items])  # (B, N)
        labels = [int(label) for _, label in items]
        if self.train and len(self.captions) > 1:
            picks = torch.randint(len(self.captions), (len(labels),)).tolist()
        else:
            picks = [0] * len(labels)
        return ids, [digit_caption(y, self.captions[p]) for y, p in zip(labels, picks, strict=True)]


class MNISTTokenDataModule(L.LightningDataModule):
    """(image-token ids, caption) pairs from bundled MNIST.

    Args:
        image_tokenizer: a pretrained :class:`V2FlowTokenizer` directory; its ids are cached per split.
        batch_size, eval_batch_size, num_workers: DataLoader settings.
        captions: caption templates (``{word}``, ``{digit}``); training draws one per sample, evaluation
            uses the first.
        train_limit, val_limit: use only the first n pairs of a split (0 = all).
        encode_device: where the image tokenizer encodes the splits the first time (``"auto"``: the first CUDA
            device when there is one, else the CPU).
    """

    def __init__(
        self,
        image_tokenizer: str = "checkpoints/mnist-smollm2-32",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        captions: list[str] | None = None,
        train_limit: int = 0,
        val_limit: int = 0,
        encode_device: str = "auto",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        captions = list(captions or DEFAULT_CAPTIONS)
        for template in captions:
            try:
                digit_caption(0, template)
            except (KeyError, IndexError) as err:
                raise ValueError(f"caption template {template!r} may only use {{word}} and {{digit}}") from err
        self.image_tokenizer = image_tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.captions = captions
        self.limits = {"train": train_limit, "val": val_limit}
        self.encode_device = encode_device
        self.sets: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        device = self.encode_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        for split in ("train", "val"):
            cached_mnist_tokens(self.image_tokenizer, split, self.limits[split], device=device)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            data = cached_mnist_tokens(self.image_tokenizer, split, self.limits[split])
            self.sets[split] = TensorDataset(data["ids"].long(), data["labels"].long())

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.sets:
            raise RuntimeError("call setup() first")
        collate = CaptionCollate(self.captions, train)
        if train:  # seeded, sharded per rank, position saved in checkpoints (see v2flow.data.ResumableSampler)
            sampler = ResumableSampler(self.sets[split], seed=training_seed())
            return ResumableDataLoader(
                self.sets[split],
                self.batch_size,
                sampler=sampler,
                drop_last=True,
                num_workers=self.num_workers,
                collate_fn=collate,
            )
        return DataLoader(
            self.sets[split], self.eval_batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=collate
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)


# ---------------------------------------------------------------------------- the LightningModule


class ImageLMModule(DisplayCallbacks):
    """Fine-tunes a causal LM to write a :class:`V2FlowTokenizer`'s images (every weight trained).

    The LM is loaded and extended in :meth:`configure_model` (no I/O in the constructor), so the module is
    cheap to build and the Trainer decides where the weights go.

    Args:
        llm: ``"smollm2"`` (bundled), an LM directory or a hub id.
        image_tokenizer: a pretrained :class:`V2FlowTokenizer` directory.
        vocab_mode: ``"shared"`` or ``"new"`` (see :mod:`v2flow.llm`).
        init: ``"vocab"`` or ``"random"``: how new rows start in ``"new"`` mode.
        lr, weight_decay, betas: AdamW settings.
        warmup_steps, min_lr_ratio: the warm-up + cosine schedule.
        gradient_checkpointing: trade compute for activation memory.
        loss_vocabulary: ``"image"`` (softmax over the image tokens and ``<|image_end|>``, what constrained
            generation samples from) or ``"full"`` (the LM's whole vocabulary); see :meth:`ImageLM.loss`.
        judge: a :class:`DigitJudge` (built by the config, e.g. a saved MNIST classifier); enables
            prompt-following accuracy at validation.
        eval_samples_per_digit: images written per digit at each validation (0 disables generation).
        eval_temperature, eval_top_k: sampling settings of those generations.
        decode_steps: ODE steps when decoding generated tokens.
        eval_caption: the prompt template of those generations (``{word}``, ``{digit}``); keep it the data's
            first caption template.
        seed: seeds the random init of new rows and the evaluation generations.
    """

    def __init__(
        self,
        llm: str = BUNDLED_SMOLLM2,
        image_tokenizer: str = "checkpoints/mnist-smollm2-32",
        vocab_mode: str = "shared",
        init: str = "vocab",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        loss_vocabulary: str = "image",
        judge: DigitJudge | None = None,
        eval_samples_per_digit: int = 0,
        eval_temperature: float = 1.0,
        eval_top_k: int | None = None,
        decode_steps: int | None = None,
        eval_caption: str = DEFAULT_CAPTIONS[0],
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_vocab_mode(vocab_mode, init, name="vocab_mode")
        if loss_vocabulary not in LOSS_VOCABULARIES:
            raise ValueError(f"unknown loss_vocabulary {loss_vocabulary!r}; choose one of {LOSS_VOCABULARIES}")
        try:
            digit_caption(0, eval_caption)
        except (KeyError, IndexError) as err:
            raise ValueError(f"eval_caption {eval_caption!r} may only use {{word}} and {{digit}}") from err
        if eval_samples_per_digit and judge is None:
            raise ValueError("eval_samples_per_digit > 0 needs a judge")
        if eval_temperature <= 0:
            raise ValueError(f"eval_temperature must be > 0, got {eval_temperature}")
        self.save_hyperparameters(ignore=["judge"])
        self.image_lm: ImageLM | None = None
        self.lm: torch.nn.Module | None = None
        self.image_tokenizer: V2FlowTokenizer | None = None
        self.judge = judge

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        hp = self.hparams
        image_tokenizer = V2FlowTokenizer.from_pretrained(hp.image_tokenizer).requires_grad_(False)
        model, text_tokenizer = load_causal_lm(hp.llm)
        generator = torch.Generator().manual_seed(hp.seed)
        self.image_lm = ImageLM.extend(model, text_tokenizer, image_tokenizer, hp.vocab_mode, hp.init, generator)
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.lm = model.train()  # from_pretrained returns eval mode, and Lightning keeps submodule modes
        self.image_tokenizer = image_tokenizer.eval()

    # ------------------------------------------------------------------ steps

    def _step(self, batch, stage: str) -> torch.Tensor:
        ids, captions = batch
        inputs = self.image_lm.build_batch(captions, ids)
        out = self.image_lm.loss(inputs, vocabulary=self.hparams.loss_vocabulary)
        sync = stage != "train"
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, sync_dist=sync, batch_size=len(captions))
        self.log(f"{stage}/token_accuracy", out.token_accuracy, sync_dist=sync, batch_size=len(captions))
        return out.loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        k = self.hparams.eval_samples_per_digit
        if not k or self.trainer.sanity_checking:
            return
        result = self.write_digits(k, seed=self.hparams.seed)
        self.log("val/prompt_accuracy", result["accuracy"], prog_bar=True, rank_zero_only=True)
        if self.trainer.is_global_zero:
            root = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "generations"
            save_image_grid(result["images"], root / f"step{self.global_step:07d}.png", nrow=k)

    @torch.no_grad()
    def write_digits(
        self,
        per_digit: int,
        seed: int = 0,
        batch_size: int = 100,
        temperature: float | None = None,
        top_k: int | None = None,
        caption: str | None = None,
    ) -> dict[str, Any]:
        """Write `per_digit` images for each of the ten digit prompts, decode and (with a judge) classify.

        `caption` is the prompt template (default the ``eval_caption`` hyperparameter).

        Returns:
            ``images`` (10 * per_digit, C, H, W) ordered by digit, ``labels``, ``predictions`` (or None),
            ``accuracy`` (fraction classified as the prompted digit, or NaN without a judge).
        """
        temperature = self.hparams.eval_temperature if temperature is None else temperature
        top_k = self.hparams.eval_top_k if top_k is None else top_k
        labels = torch.arange(10).repeat_interleave(per_digit)
        caption = self.hparams.get("eval_caption", DEFAULT_CAPTIONS[0]) if caption is None else caption
        prompts = [digit_caption(int(y), caption) for y in labels]
        images = []
        for i in range(0, len(prompts), batch_size):
            out = self.image_lm.generate(
                prompts[i : i + batch_size], seed=seed + i, do_sample=True, temperature=temperature, top_k=top_k
            )
            g = torch.Generator(device=self.device).manual_seed(seed + i)
            images.append(self.image_tokenizer.decode(out.ids, num_steps=self.hparams.decode_steps, generator=g).images)
        images = torch.cat(images)
        if self.judge is None:
            return {"images": images, "labels": labels, "predictions": None, "accuracy": float("nan")}
        predictions = self.judge.predict(images).cpu()
        return {
            "images": images,
            "labels": labels,
            "predictions": predictions,
            "accuracy": float((predictions == labels).float().mean()),
        }

    # ------------------------------------------------------------------ optimiser and checkpoints

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.lm.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.lm.parameters() if p.requires_grad and p.ndim < 2]
        return adamw_warmup_cosine(self.trainer, decay, no_decay, hp)

    def state_dict(self, *args, **kwargs):
        # only the LM is trained: the image tokenizer reloads from its directory, the judge comes from the config
        return self.lm.state_dict(*args, prefix="lm.", **{k: v for k, v in kwargs.items() if k != "prefix"})

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.configure_model()
        prefix = "lm."
        return self.lm.load_state_dict(
            {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, strict=strict, assign=assign
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["v2flow_lm_layout"] = asdict(self.image_lm.layout)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        saved = checkpoint.get("v2flow_lm_layout")
        if saved is not None and saved != asdict(self.image_lm.layout):
            raise ValueError(
                f"the checkpoint was trained with another token layout than {self.hparams.image_tokenizer!r} gives "
                "now (was the image tokenizer retrained or replaced?); resume with the tokenizer it was trained with"
            )


def image_lm_from_checkpoint(path: str | os.PathLike) -> ImageLM:
    """Rebuild the fine-tuned :class:`ImageLM` from an :class:`ImageLMModule` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "v2flow_lm_layout" not in ckpt:
        raise ValueError(f"{path} is not an ImageLMModule checkpoint (no 'v2flow_lm_layout')")
    hparams = dict(ckpt["hyper_parameters"])
    hparams.pop("_instantiator", None)
    hparams.pop("judge", None)  # exporting needs no judge (some checkpoints hold its directory here)
    hparams.update(eval_samples_per_digit=0)
    module = ImageLMModule(**hparams)
    module.on_load_checkpoint(ckpt)  # refuses a layout that no longer matches the image tokenizer
    module.load_state_dict(ckpt["state_dict"])
    return module.image_lm
