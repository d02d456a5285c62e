"""V2FlowTokenizer: images <-> short 1-D sequences of tokens that are ids of a chosen LLM's vocabulary.

Composes the parts (first stage, query encoder, vocabulary resampler, masked transformer, velocity head)
and offers the public verbs ``encode``, ``decode``, ``reconstruct``, ``loss``, ``save_pretrained`` and
``from_pretrained``. The tokenizer rebuilds from its ``config.json`` alone; weights, including the frozen
vocabulary rows and their LLM token ids, are in ``model.safetensors``; ``vocab.json`` names the LLM and holds
the token strings, so a trained tokenizer loads without the LLM present.

Images are (B, C, H, W) floats in [-1, 1]. Nothing is resized or clipped silently.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import objective
from .checks import (
    check_codes,
    check_ids,
    check_images,
    check_latents,
    check_types,
    distribution_warning,
)
from .config import check_tokenizer_config
from .encoder import QueryEncoder
from .first_stage import build_first_stage
from .hub import (
    AUTOENCODER_DIR,
    CONFIG_NAME,
    VOCAB_NAME,
    WEIGHTS_NAME,
    load_state_checked,
    read_json,
    resolve_pretrained,
    save_weights,
    staged_directory,
)
from .layers import patchify, unpatchify
from .masked_transformer import MaskedTransformer, TokenConditions
from .objective import LossOutput
from .ordering import SELFTOK_STAGES, OrderSchedule
from .outputs import DecodeOutput, EncodeOutput, ReconstructOutput
from .resampler import VocabularyResampler, perplexity
from .sampling import masked_flow_sample
from .settings import DecodeSettings, upgrade_config
from .velocity import VelocityHead
from .velocity_transformer import ImageVelocityTransformer
from .vocab import LLMVocabulary


class V2FlowTokenizer(nn.Module):
    """Discrete visual tokenizer whose tokens live in an LLM's vocabulary, with a rectified-flow decoder.

    Every argument is a ``config.json`` / YAML key.

    Args:
        image_size: height = width of the images (a multiple of ``patch_size``).
        in_channels: image channels (1 for MNIST, 3 for RGB).
        patch_size: side of the square patches the encoder and decoder work on.
        first_stage: ``"pixels"``, or ``"autoencoder"``: tokens of the latents of a frozen diffusers autoencoder
            (see :mod:`v2flow.first_stage`); ``patch_size`` then counts latent pixels.
        autoencoder: the autoencoder's local directory or hub id, where training loads it from
            (``first_stage="autoencoder"``; a pretrained tokenizer carries its own copy).
        autoencoder_subfolder: its sub-directory in `autoencoder` (``"vae"`` in a pipeline repository).
        latent_channels, latent_downsample: the autoencoder's latent channels and spatial compression (checked
            when it is installed).
        num_tokens: N, tokens per image (independent of the image size).
        encoder_dim, encoder_depth, encoder_heads: the query encoder (ViT).
        encoder_query_modulation: give every query position its own shift/scale from an embedding of its
            index before each encoder block (Selftok's position-aware encoder, for ordered tokens).
        encoder_causal_queries: query i attends to the patches and queries 0..i only, patches to patches only
            (FlexTok's causal register mask), so a token prefix never depends on what later positions compute.
        vocab_source: where training loads the LLM vocabulary from (see :class:`LLMVocabulary.load`).
        vocab_selection: how the subset is chosen (``"fps"`` or ``"first"``).
        num_entries: K, vocabulary rows kept.
        llm_dim: width of the LLM's embedding table.
        quantizer: ``"vocab"`` (ids are LLM token ids) or ``"vq"`` (V2Flow's cosine codebook).
        estimator, code_dim, temperature, gumbel, sample_entropy_weight, batch_entropy_weight, codebook_size, commitment_weight:
            see :class:`VocabularyResampler`.
        decoder_dim, decoder_encoder_depth, decoder_depth, decoder_heads, cond_drop_prob: the masked transformer.
        mask_ratio_min, mask_ratio_max, mask_ratio_std: training mask ratio ~ truncated normal with mean
            ``mask_ratio_max`` and this std, cut to [min, max] (MAR's choice).
        head_width, head_depth: width and depth of the velocity network.
        velocity_decoder: ``"mlp"``, V2Flow's per-patch MLP head (each patch's velocity from that patch
            alone), or ``"transformer"``, DiT blocks over all patches of an image (:mod:`v2flow.velocity_transformer`;
            ``decoder_heads`` heads; trains with every patch masked and decodes in one mask iteration).
        batch_mul: noise draws per masked patch in the flow loss.
        time_sampling, time_mean, time_std, time_shift, time_uniform_share: training time distribution (see
            :func:`v2flow.velocity.sample_time`; ``"mixture"`` draws a ``time_uniform_share`` of uniform times).
        x0_loss_weight: weight of a loss on the velocity network's one-step estimate of the clean patches,
            ``x_t - t v`` (what ``mode="mean"`` decodes); 0 trains the flow loss alone.
        aux_weight: weight of the auxiliary loss that makes each patch condition predict its patch.
        token_order: ``"unordered"`` or ``"ordered"`` (Selftok: token positions bound to noise levels, token 0
            the coarsest; at noise level t the decoder sees only the tokens in play at t, see
            :mod:`v2flow.ordering`).
        order_stages: relative token counts of equal stretches of the trajectory, noisiest first (ordered
            mode; default Selftok's 16, 48, 72, 184, 192).
        truncation_prob: probability that a training sample keeps only a random prefix of its tokens (nested
            truncation: any prefix then decodes).
        prefix_sampling: ``"uniform"`` or ``"pow2"``: how the kept prefix length is drawn.
        truncation_tail: what stands in for the tail of a truncated sample, in training and when a prefix is
            decoded: ``"token"``, a learned truncation token at every tail position the sample would otherwise
            see ("these tokens exist and are unknown"), or ``"hidden"``, the tail hidden like tokens that have
            not entered yet (attention key mask, zeroed embeddings). In ordered mode ``"hidden"`` makes a
            prefix of k tokens at a low noise level the same condition as the k tokens in play just above the
            level where token k enters, so the untruncated samples train it too; with ``interval_times`` a truncated
            sample's noise draws then span every level below the entry of its last token.
        interval_times: ordered mode: every noise draw of every masked patch takes its own training time
            inside the stretch of noise levels where its sample's visible tokens stay the same (from the
            training time distribution restricted to that stretch), instead of the sample's one time. The
            condition is valid at all of them, the times keep their distribution, and the flow loss sees
            many noise levels per transformer pass instead of one per sample.
        decode: the default decode settings, by their :class:`v2flow.settings.DecodeSettings` names (e.g.
            ``{num_steps: 2, temperature: 0.0}``); the config stores all of them.
        input_statistics: statistics of the training images (:func:`v2flow.checks.input_statistics`: per-image
            pixel mean and spread, their mean and spread over the data, and what the data were), written by
            training or ``v2flow calibrate``; :meth:`encode` warns when images are far from them.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 1,
        patch_size: int = 4,
        first_stage: str = "pixels",
        autoencoder: str | None = None,
        autoencoder_subfolder: str | None = None,
        latent_channels: int | None = None,
        latent_downsample: int | None = None,
        num_tokens: int = 32,
        encoder_dim: int = 192,
        encoder_depth: int = 4,
        encoder_heads: int = 4,
        encoder_query_modulation: bool = False,
        encoder_causal_queries: bool = False,
        vocab_source: str = "smollm2",
        vocab_selection: str = "fps",
        num_entries: int = 4096,
        llm_dim: int = 576,
        quantizer: str = "vocab",
        estimator: str = "projected",
        code_dim: int = 64,
        temperature: float = 0.02,
        gumbel: bool = False,
        sample_entropy_weight: float = 0.1,
        batch_entropy_weight: float = 0.1,
        codebook_size: int = 4096,
        commitment_weight: float = 0.25,
        decoder_dim: int = 192,
        decoder_encoder_depth: int = 2,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        cond_drop_prob: float = 0.1,
        mask_ratio_min: float = 0.7,
        mask_ratio_max: float = 1.0,
        mask_ratio_std: float = 0.25,
        head_width: int = 256,
        head_depth: int = 3,
        batch_mul: int = 4,
        time_sampling: str = "logit_normal",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float = 1.0,
        aux_weight: float = 1.0,
        token_order: str = "unordered",
        order_stages: list[float] | None = None,
        truncation_prob: float = 0.0,
        prefix_sampling: str = "uniform",
        truncation_tail: str = "token",
        interval_times: bool = False,
        decode: dict | None = None,
        input_statistics: dict | None = None,
        velocity_decoder: str = "mlp",
        time_uniform_share: float = 0.1,
        x0_loss_weight: float = 0.0,
    ) -> None:
        keys = set(self.config_keys())
        config = {k: v for k, v in locals().items() if k in keys}
        check_types(type(self).__init__, config)
        super().__init__()
        self.config = config
        try:
            self.decode_defaults = DecodeSettings.from_config(decode)
        except ValueError as err:
            raise ValueError(f"the config's decode defaults are invalid: {err}") from err
        config["decode"] = self.decode_defaults.as_dict()
        check_tokenizer_config(config, defaults=self.config_defaults())
        self.schedule = OrderSchedule(num_tokens, order_stages or SELFTOK_STAGES) if token_order == "ordered" else None
        self.first_stage = build_first_stage(
            first_stage,
            in_channels=in_channels,
            image_size=image_size,
            latent_channels=latent_channels,
            latent_downsample=latent_downsample,
        )
        latent_size, latent_channels = self.first_stage.latent_size, self.first_stage.latent_channels
        if latent_size % patch_size:
            raise ValueError(f"latent size {latent_size} is not a multiple of patch_size {patch_size}")
        self.num_patches = (latent_size // patch_size) ** 2
        self.patch_dim = latent_channels * patch_size**2
        if not 1 <= self.decode_defaults.num_iters <= self.num_patches:
            raise ValueError(
                f"decode num_iters must be in [1, {self.num_patches}] (the number of patches), "
                f"got {self.decode_defaults.num_iters}"
            )
        self._build_networks(config)
        self.vocabulary_installed = False  # set_vocabulary installs the frozen LLM rows

    def _build_networks(self, c: dict) -> None:
        """The trained networks of config `c`: query encoder, resampler, masked transformer, velocity head."""
        self.encoder = QueryEncoder(
            num_patches=self.num_patches,
            patch_dim=self.patch_dim,
            num_tokens=c["num_tokens"],
            hidden_dim=c["encoder_dim"],
            depth=c["encoder_depth"],
            num_heads=c["encoder_heads"],
            query_modulation=c["encoder_query_modulation"],
            causal_queries=c["encoder_causal_queries"],
        )
        self.resampler = VocabularyResampler(
            input_dim=c["encoder_dim"],
            num_entries=c["num_entries"],
            llm_dim=c["llm_dim"],
            quantizer=c["quantizer"],
            estimator=c["estimator"],
            code_dim=c["code_dim"],
            temperature=c["temperature"],
            gumbel=c["gumbel"],
            sample_entropy_weight=c["sample_entropy_weight"],
            batch_entropy_weight=c["batch_entropy_weight"],
            codebook_size=c["codebook_size"],
            commitment_weight=c["commitment_weight"],
        )
        self.decoder = MaskedTransformer(
            num_patches=self.num_patches,
            patch_dim=self.patch_dim,
            num_tokens=c["num_tokens"],
            token_dim=self.resampler.embed_dim,
            hidden_dim=c["decoder_dim"],
            encoder_depth=c["decoder_encoder_depth"],
            decoder_depth=c["decoder_depth"],
            num_heads=c["decoder_heads"],
            cond_drop_prob=c["cond_drop_prob"],
            truncation=c["truncation_prob"] > 0 and c["truncation_tail"] == "token",
        )
        if c["velocity_decoder"] == "transformer":
            self.head = ImageVelocityTransformer(
                patch_dim=self.patch_dim,
                cond_dim=c["decoder_dim"],
                num_patches=self.num_patches,
                width=c["head_width"],
                depth=c["head_depth"],
                num_heads=c["decoder_heads"],
            )
        else:
            self.head = VelocityHead(
                patch_dim=self.patch_dim, cond_dim=c["decoder_dim"], width=c["head_width"], depth=c["head_depth"]
            )
        # auxiliary: each patch condition predicts its patch (absent when unused: DDP needs every parameter used)
        self.patch_predictor = nn.Linear(c["decoder_dim"], self.patch_dim) if c["aux_weight"] > 0 else None

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocabulary(self) -> LLMVocabulary:
        return self.resampler.vocabulary

    def _require_vocabulary(self) -> None:
        if not self.vocabulary_installed:
            raise RuntimeError(
                "this tokenizer has no vocabulary rows yet (they are all zeros); load a trained one with "
                "from_pretrained, or install rows with tokenizer.set_vocabulary(LLMVocabulary.load(...))"
            )

    def set_vocabulary(self, vocabulary: LLMVocabulary) -> None:
        """Install the frozen rows of an LLM vocabulary (shapes must match ``num_entries`` x ``llm_dim``)."""
        expected = (self.config["num_entries"], self.config["llm_dim"])
        if tuple(vocabulary.embeddings.shape) != expected:
            raise ValueError(
                f"vocabulary of {vocabulary.llm_name!r} is {tuple(vocabulary.embeddings.shape)} but the tokenizer "
                f"expects num_entries x llm_dim = {expected}; set num_entries/llm_dim to match the LLM"
            )
        device = self.vocabulary.embeddings.device
        self.resampler.vocabulary = vocabulary.to(device)
        self.vocabulary_installed = True

    def set_autoencoder(self, autoencoder: nn.Module) -> None:
        """Install the frozen diffusers autoencoder of ``first_stage="autoencoder"`` (checked against the config)."""
        if self.config["first_stage"] != "autoencoder":
            raise ValueError(f"this tokenizer's first_stage is {self.config['first_stage']!r}; it takes no autoencoder")
        self.first_stage.set_autoencoder(autoencoder.to(self.vocabulary.embeddings.device))  # the tokenizer's device

    def check_latents(self, latents: torch.Tensor, check_values: bool = True) -> None:
        """Raise a ValueError naming the problem unless latents are finite floats (B, c, h, w) of the first stage
        (:func:`v2flow.checks.check_latents`); `check_values=False` skips the values (no device sync)."""
        weight = next(self.encoder.parameters())
        c, s = self.first_stage.latent_channels, self.first_stage.latent_size
        check_latents(latents, channels=c, size=s, dtype=weight.dtype, device=weight.device, check_values=check_values)

    def patches_of(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, check_values: bool = True
    ) -> torch.Tensor:
        """Patches (B, L, P) of images (through the first stage) or of given latents; exactly one of the two."""
        if (images is None) == (latents is None):
            raise ValueError("give images or latents (exactly one of the two)")
        if latents is not None:
            self.check_latents(latents, check_values=check_values)
            return patchify(latents, self.config["patch_size"])
        self.check_images(images, check_values=check_values)
        return self._patches(images)

    def token_strings(self, ids: torch.Tensor) -> list:
        """LLM token strings of ids (B, N) (``quantizer="vocab"`` only)."""
        if self.config["quantizer"] != "vocab":
            raise ValueError("token strings exist only for quantizer='vocab'; vq ids are codebook indices")
        self._ids_to_indices(ids)  # validates
        return self.vocabulary.strings(ids)

    # ------------------------------------------------------------------ input checks

    def check_images(self, images: torch.Tensor, check_values: bool = True) -> None:
        """Raise a ValueError naming the problem unless images are (B, C, H, W) floats in [-1, 1] of the
        configured size, in the dtype and on the device of the weights that read them (the autoencoder's, when
        installed): :func:`v2flow.checks.check_images`. `check_values=False` skips the values (no device sync;
        used by the training loss)."""
        autoencoder = getattr(self.first_stage, "autoencoder", None)  # it, when installed, reads the images
        weight = next(self.encoder.parameters())
        dtype = next(autoencoder.parameters()).dtype if autoencoder is not None else weight.dtype
        c, s = self.config["in_channels"], self.config["image_size"]
        check_images(images, channels=c, size=s, dtype=dtype, device=weight.device, check_values=check_values)

    def _ids_to_indices(self, ids: torch.Tensor, prefix: bool = False) -> torch.Tensor:
        """Validate ids (B, N) (or a prefix (B, k) when `prefix`: :func:`v2flow.checks.check_ids`) and map them
        to row indices (B, N) int64 of the vocabulary (or the vq codebook), on the tokenizer's device."""
        check_ids(ids, self.config["num_tokens"], prefix=prefix)
        if self.config["quantizer"] == "vq":
            return check_codes(ids, self.resampler.num_codes).to(self.vocabulary.token_ids.device)
        return self.vocabulary.indices_of(ids)

    def _indices_to_ids(self, indices: torch.Tensor) -> torch.Tensor:
        if self.config["quantizer"] == "vq":
            return indices
        return self.vocabulary.token_ids[indices]

    # ------------------------------------------------------------------ model pieces

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(self.first_stage.encode(images), self.config["patch_size"])  # (B, L, P)

    def sample_mask(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) bool training mask (:func:`v2flow.objective.sample_mask`)."""
        return objective.sample_mask(self.config, self.num_patches, batch_size, device, generator)

    def loss(
        self,
        images: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        latents: torch.Tensor | None = None,
    ) -> LossOutput:
        """Training loss on images (B, C, H, W) or cached first-stage latents (B, c, h, w): flow matching on
        masked patches plus regularisers (:func:`v2flow.objective.tokenizer_loss`)."""
        self._require_vocabulary()
        return objective.tokenizer_loss(self, images, generator, latents=latents)

    def token_usefulness(
        self, images: torch.Tensor | None = None, seed: int = 0, *, latents: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Flow loss with true and with shuffled tokens (:func:`v2flow.objective.token_usefulness`)."""
        self._require_vocabulary()
        return objective.token_usefulness(self, images, seed, latents=latents)

    # ------------------------------------------------------------------ public verbs

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor | None = None, return_probs: bool = False, *, latents: torch.Tensor | None = None
    ) -> EncodeOutput:
        """Images (B, C, H, W) in [-1, 1] (or cached first-stage latents (B, c, h, w)) -> tokens. Deterministic
        (argmax; no noise at inference).

        When the tokenizer stores ``input_statistics`` and at least half of the images are far from them (see
        :func:`v2flow.checks.distribution_warning`), a UserWarning says so: such tokens decode to confident
        garbage.

        Returns:
            :class:`EncodeOutput` with ids (B, N), indices (B, N), soft_embeddings (B, N, d_llm), probs (B, N, K).
        """
        self._require_vocabulary()
        patches = self.patches_of(images, latents, check_values=True)
        statistics = self.config["input_statistics"]
        if images is not None and statistics is not None:
            message = distribution_warning(images, statistics)
            if message is not None:
                warnings.warn(message, stacklevel=3)  # past torch.no_grad's wrapper, at the caller
        was_training = self.training
        self.eval()
        try:
            out = self.resampler(self.encoder(patches))
        finally:
            self.train(was_training)
        return EncodeOutput(
            ids=self._indices_to_ids(out.indices),
            indices=out.indices,
            soft_embeddings=out.soft_embeddings,
            probs=out.probs if return_probs else None,
        )

    @torch.no_grad()
    def decode(
        self,
        ids: torch.Tensor,
        *,
        num_steps: int | None = None,
        solver: str | None = None,
        num_iters: int | None = None,
        cfg_scale: float | None = None,
        shift: float | None = None,
        temperature: float | None = None,
        mode: str | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        allow_truncation: bool = False,
        prefix_estimate: bool = False,
        generator: torch.Generator | None = None,
    ) -> DecodeOutput:
        """Token ids (B, N) -> images (B, C, H, W) in [-1, 1], by integrating the flow ODE over `num_iters`
        mask-schedule iterations. Settings left as None take the config's ``decode`` defaults.

        A prefix (B, k), 1 <= k <= N, decodes too: its tail is replaced by the truncation token when the model
        was trained with nested truncation and ``truncation_tail="token"``, and hidden otherwise. In ordered mode the transformer runs once per
        stretch between the noise levels where the visible tokens change (and per mask iteration), and the
        fixed-grid solvers step on the union of their grid and those levels.

        Args:
            ids: (B, N) LLM token ids (or codebook indices for vq), as returned by :meth:`encode`, or a prefix;
                any integer dtype, B >= 1 (an empty batch is an error, as in :meth:`check_images`).
            num_steps: ODE steps per iteration (fixed-grid solvers and the scheduler).
            solver: ``euler``, ``midpoint``, ``rk4``, ``dopri5`` or ``flow_match_euler``.
            num_iters: mask-schedule iterations (1 = all patches at once).
            cfg_scale: classifier-free guidance scale (1 = none).
            shift: timestep shift of the grid.
            temperature: scale of the starting noise; < 1 trades diversity for fidelity (0 is deterministic).
            mode: ``"sample"`` (the flow sample) or ``"mean"`` (the one-step estimate of the clean image where
                every given token is in play: the fidelity decode; see :class:`v2flow.settings.DecodeSettings`).
            rtol, atol: tolerances of ``dopri5``.
            allow_truncation: decode a prefix with an unordered tokenizer (whose tokens are not coarse to fine).
            prefix_estimate: for a prefix of k < N tokens, integrate only down to the noise level where token k
                would enter (ordered mode; t = 1 for an unordered tokenizer, whose tokens all enter at once) and
                return the velocity head's one-step estimate of the clean image there, ``x_t - t v``. Below
                that level no given token is left to enter, so integrating on only draws detail the prefix
                does not hold: the estimate is blurrier and scores higher in PSNR (the decoder's guess at the
                mean of the images the prefix allows). No effect on a full sequence; ``mode="mean"`` does the
                same for any length.
            generator: for reproducible noise and reveal order.
        """
        given = dict(num_steps=num_steps, solver=solver, num_iters=num_iters, cfg_scale=cfg_scale, shift=shift)
        settings = self.decode_defaults.resolve(**given, temperature=temperature, mode=mode)
        self._require_vocabulary()
        n = self.config["num_tokens"]
        k = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.ndim == 2 else n
        self._check_prefix_length(k, allow_truncation)
        indices = self._ids_to_indices(ids, prefix=True)  # (B, k)
        device, b = self.vocabulary.embeddings.device, ids.shape[0]
        keep = hidden_tail = None
        if k < n:
            indices = torch.cat([indices, indices.new_zeros(b, n - k)], dim=1)  # the tail is never read
            kept = torch.arange(n, device=device)[None, :].expand(b, n) < k  # (B, N)
            keep, hidden_tail = (kept, None) if self.decoder.truncation_token is not None else (None, kept)
        conditions = TokenConditions(
            self.decoder, self.schedule, self.resampler.embed(indices), keep, hidden_tail, settings.cfg_scale
        )
        stop_at, breakpoints = 0.0, []
        if settings.mode == "mean" or (prefix_estimate and k < n):  # where every given token is in play
            stop_at = float(self.schedule.token_times()[min(k, n - 1)]) if self.schedule is not None else 1.0
        if self.schedule is not None:  # the visible tokens change where tokens enter (only up to k if hidden)
            breakpoints = self.schedule.token_times()[1 : (n if hidden_tail is None else k)].tolist()
        was_training = self.training
        self.eval()
        try:
            patches = masked_flow_sample(
                conditions,
                self.head,
                batch_size=b,
                num_patches=self.num_patches,
                patch_dim=self.patch_dim,
                **{k: v for k, v in settings.as_dict().items() if k != "mode"},
                rtol=rtol,
                atol=atol,
                breakpoints=breakpoints,
                stop_at=stop_at,
                grid_order=self.config["velocity_decoder"] == "transformer",
                generator=generator,
                device=device,
            )
        finally:
            self.train(was_training)
        size = self.first_stage.latent_size
        latents = unpatchify(patches, self.config["patch_size"], size, size)  # (B, c, h, w)
        return DecodeOutput(images=self.first_stage.decode(latents).clamp(-1, 1), latents=latents)

    def _check_prefix_length(self, k: int, allow_truncation: bool) -> None:
        """Refuse ids of k tokens per image unless they are a prefix this tokenizer can decode."""
        n = self.config["num_tokens"]
        if k == n:
            return
        if k < 1:
            raise ValueError("an empty prefix holds no tokens; give ids of shape (B, k) with k >= 1")
        if k > n:
            raise ValueError(
                f"ids hold {k} tokens per image but this tokenizer writes N = {n}: they come from a different "
                "tokenizer; decode them with the tokenizer that encoded them"
            )
        if self.schedule is None and not allow_truncation:
            raise ValueError(
                f"ids hold {k} tokens per image but this tokenizer writes N = {n}. If they come from another "
                "tokenizer, decode them with that one. If they are a prefix: this tokenizer is unordered, so "
                f"its first {k} tokens are not a coarse version of the image; to decode them anyway with the "
                "tail masked pass allow_truncation=True (command line: --allow-truncation)"
            )

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, **decode_kwargs) -> ReconstructOutput:
        """encode then decode; `decode_kwargs` go to :meth:`decode`."""
        ids = self.encode(images).ids
        return ReconstructOutput(images=self.decode(ids, **decode_kwargs).images, ids=ids)

    @torch.no_grad()
    def usage(self, indices: torch.Tensor) -> dict[str, float]:
        """Vocabulary usage of entry indices (any shape): distinct entries, perplexity, bits per image."""
        return self.usage_from_counts(torch.bincount(indices.flatten().cpu(), minlength=self.resampler.num_codes))

    def usage_from_counts(self, counts: torch.Tensor) -> dict[str, float]:
        """The same statistics from a usage histogram (K,), for callers that accumulate it over batches."""
        return {
            "distinct_ids": int((counts > 0).sum()),
            "perplexity": perplexity(counts),
            "bits_per_image": self.config["num_tokens"] * math.log2(self.resampler.num_codes),
        }

    # ------------------------------------------------------------------ persistence

    def current_config(self) -> dict:
        """The config with the resampler's current temperature (it may have been annealed in training)."""
        return {**self.config, "temperature": float(self.resampler.temperature)}

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``vocab.json`` to `path` (and ``autoencoder/``, the
        frozen diffusers autoencoder, when ``first_stage="autoencoder"``), atomically
        (:func:`v2flow.hub.staged_directory`: an existing tokenizer directory is replaced only once the new
        one is complete; a directory that is not a saved tokenizer is refused)."""
        self._require_vocabulary()
        with staged_directory(path, marker=CONFIG_NAME) as staged:
            config = {"_class_name": type(self).__name__, **self.current_config()}
            (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            save_weights(self.state_dict(), staged / WEIGHTS_NAME)
            vocab = {
                "llm_name": self.vocabulary.llm_name,
                "llm_vocab_size": self.vocabulary.llm_vocab_size,
                "token_ids": self.vocabulary.token_ids.tolist(),
                "token_strings": self.vocabulary.token_strings,
            }
            (staged / VOCAB_NAME).write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
            if self.config["first_stage"] == "autoencoder":  # the frozen autoencoder, in diffusers' own format
                self.first_stage._require(self.vocabulary.embeddings.device).save_pretrained(staged / AUTOENCODER_DIR)
        return Path(path)

    @classmethod
    def config_keys(cls) -> list[str]:
        """The config keys: the constructor's keyword arguments, which are also the YAML keys."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def config_defaults(cls) -> dict:
        """The default value of every config key."""
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}

    @classmethod
    def from_config(cls, config: dict) -> V2FlowTokenizer:
        """Build an untrained tokenizer from a config dict; unknown keys raise."""
        config = upgrade_config({k: v for k, v in config.items() if not k.startswith("_")})
        keys = cls.config_keys()
        unknown = sorted(set(config) - set(keys))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(keys)}")
        return cls(**config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> V2FlowTokenizer:
        """Load a tokenizer written by :meth:`save_pretrained`: a local directory, or a Hugging Face Hub id
        (``owner/name``; needs network access or a copy in the local hub cache, see :mod:`v2flow.hub`)."""
        directory = resolve_pretrained(path, "tokenizer", (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME))
        config = read_json(directory / CONFIG_NAME)
        model = cls.from_config(config)
        state = load_state_checked(directory / WEIGHTS_NAME, model.state_dict())
        autoencoder = None
        if model.config["first_stage"] == "autoencoder":
            autoencoder = directory / AUTOENCODER_DIR
            if not autoencoder.is_dir():
                raise FileNotFoundError(
                    f"{directory} has no {AUTOENCODER_DIR}/ directory, but its config has first_stage='autoencoder'; "
                    "re-export the tokenizer with save_pretrained after installing the autoencoder"
                )
        model.load_trained(state, read_json(directory / VOCAB_NAME), autoencoder)
        return model.to(map_location).eval()

    def load_trained(
        self, state: dict[str, torch.Tensor], vocab: dict, autoencoder: str | os.PathLike | None = None
    ) -> V2FlowTokenizer:
        """Install trained weights, the one way a pretrained directory and a training checkpoint are read.

        Args:
            state: the tokenizer's ``state_dict`` (its frozen vocabulary rows and their LLM ids included).
            vocab: ``llm_name``, ``llm_vocab_size`` and optionally ``token_strings`` of those rows.
            autoencoder: for ``first_stage="autoencoder"``, a diffusers autoencoder directory (a pretrained
                tokenizer's own copy); None loads it from the config's ``autoencoder`` key.
        """
        rows, ids = state["resampler.vocabulary.embeddings"], state["resampler.vocabulary.token_ids"]
        self.set_vocabulary(
            LLMVocabulary(rows, ids, vocab["llm_name"], vocab["llm_vocab_size"], vocab.get("token_strings"))
        )
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"the weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
        self.install_frozen_parts(autoencoder=autoencoder)
        return self

    def install_frozen_parts(self, autoencoder: str | os.PathLike | None = None) -> V2FlowTokenizer:
        """Install what training never changes and a config names, where it is missing: the LLM vocabulary rows
        (``vocab_source``, ``num_entries``, ``vocab_selection``) and, for ``first_stage="autoencoder"``, the
        frozen diffusers autoencoder (`autoencoder`, or the config's ``autoencoder`` / ``autoencoder_subfolder``).
        Training start, training checkpoints and pretrained directories all come through here."""
        cfg = self.config
        if not self.vocabulary_installed:
            self.set_vocabulary(LLMVocabulary.load(cfg["vocab_source"], cfg["num_entries"], cfg["vocab_selection"]))
        if cfg["first_stage"] == "autoencoder" and not self.first_stage.ready:
            from .first_stage import load_autoencoder

            if autoencoder is not None:
                self.set_autoencoder(load_autoencoder(autoencoder))
            elif cfg["autoencoder"] is None:
                raise ValueError(
                    "first_stage='autoencoder' needs the key autoencoder: a local diffusers autoencoder directory "
                    "or hub id"
                )
            else:
                self.set_autoencoder(load_autoencoder(cfg["autoencoder"], cfg["autoencoder_subfolder"]))
        return self
