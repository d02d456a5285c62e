"""Reconstruction, distribution and vocabulary metrics (torchmetrics), streamed over batches.

Policy: every image metric compares a reconstruction with the exact tensor the model was given, after any
crop, pad or resize that produced that tensor; never with a differently cropped or resized original. (Some
published numbers compare reconstructions of centre crops with full or differently resized originals; such
numbers mix the resize error into the tokenizer's and are not comparable with these.)

* :class:`ReconstructionMetrics`: the streaming accumulator every evaluation uses (the ``evaluate`` command,
  ``benchmarks/reconstruction.py``, baselines): PSNR, SSIM, MS-SSIM, Frechet distance and KID over a
  pluggable feature extractor, vocabulary statistics. It knows nothing of the model that made the images.
* :func:`evaluate_tokenizer`: encode -> decode every batch of a stream into a :class:`ReconstructionMetrics`.
* Feature extractors: any ``nn.Module`` with ``features(images) -> (B, F)`` and an int ``num_features``
  (for MNIST, the project's ``DigitClassifier``); :func:`inception_extractor` builds the standard
  FID Inception-v3 from a local weights file.
* Pure helpers: :func:`psnr_per_image`, :func:`psnr_ssim`, :func:`frechet_distance_gaussians` (closed form),
  :func:`kernel_inception_distance` (with its standard error), :func:`entropy_bits`, :func:`ms_ssim_settings`,
  :func:`frechet_distance` (two image sets at once).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, StructuralSimilarityIndexMeasure

from .checks import check_image_range

DATA_RANGE = 2.0  # images live in [-1, 1]: PSNR's data range
STANDARD_MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------------------- pure helpers


def psnr_per_image(preds: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR in dB of images in [-1, 1] (data range 2)."""
    return peak_signal_noise_ratio(preds, target, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))


def to_unit(images: Tensor) -> Tensor:
    """Images in [-1, 1] mapped to [0, 1], where SSIM is computed (SSIM's luminance term is not shift-invariant,
    so the standard convention, [0, 1] with data range 1, is not the same number as [-1, 1] with range 2)."""
    return (images + 1) / 2


def ssim(preds: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM of (B, C, H, W) images in [-1, 1], the standard way: mapped to [0, 1], data range 1,
    Gaussian window 11 / sigma 1.5."""
    return structural_similarity_index_measure(to_unit(preds), to_unit(target), data_range=1.0)


def psnr_ssim(preds: Tensor, target: Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB, data range 2 on [-1, 1]) and mean SSIM (standard: [0, 1], data range 1)."""
    return {"psnr": float(psnr_per_image(preds, target).mean()), "ssim": float(ssim(preds, target))}


class SSIM(StructuralSimilarityIndexMeasure):
    """torchmetrics' streaming SSIM for images in [-1, 1], computed the standard way (:func:`ssim`): on the
    images mapped to [0, 1], data range 1. A Metric: it moves with its module and reduces over ranks."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_range=1.0, **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(to_unit(preds), to_unit(target))


class MSSSIM(MultiScaleStructuralSimilarityIndexMeasure):
    """torchmetrics' MS-SSIM for images in [-1, 1], on the images mapped to [0, 1], data range 1."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_range=1.0, **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(to_unit(preds), to_unit(target))


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix, by eigendecomposition."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance_gaussians(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in closed form:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1^1/2 sigma2 sigma1^1/2)^1/2)``, in float64.

    Computed through symmetric square roots, independently of torchmetrics' ``eigvals(sigma1 @ sigma2)``,
    so the two can check each other.

    Args:
        mu1, mu2: (F,) means.
        sigma1, sigma2: (F, F) covariances (symmetric positive semi-definite).
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    f = mu1.shape[-1] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(
            f"need means (F,) and covariances (F, F), got {tuple(mu1.shape)}, {tuple(sigma1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    root1 = _sqrtm_psd(sigma1)
    cross = _sqrtm_psd(root1 @ sigma2 @ root1)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross.trace())


def _cubic_kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's kernel ``(a . b / F + 1)^3`` between the rows of (m, F) `a` and (n, F) `b`: (m, n) float64 (the
    products in the features' dtype, the cube in float64)."""
    return (a @ b.T / a.shape[1] + 1).double() ** 3


def _paired_kid(real: Tensor, fake: Tensor, chunk_size: int) -> tuple[float, float | None]:
    """The U-statistic KID of n (input, reconstruction) pairs and its jackknife standard error (see
    :func:`kernel_inception_distance`); the kernel matrices are built `chunk_size` rows at a time."""
    n, d = real.shape
    k_xx = ((real * real).sum(1) / d + 1).double() ** 3  # (n,) the diagonals
    k_yy = ((fake * fake).sum(1) / d + 1).double() ** 3
    k_xy = ((real * fake).sum(1) / d + 1).double() ** 3
    rows = []  # R_i = sum over j != i of h_ij
    for start in range(0, n, chunk_size):
        x, y, i = real[start : start + chunk_size], fake[start : start + chunk_size], slice(start, start + chunk_size)
        rows.append(
            _cubic_kernel(x, real).sum(1)
            - k_xx[i]
            + _cubic_kernel(y, fake).sum(1)
            - k_yy[i]
            - (_cubic_kernel(x, fake).sum(1) - k_xy[i])
            - (_cubic_kernel(y, real).sum(1) - k_xy[i])
        )
    row = torch.cat(rows)  # (n,)
    kid = float(row.sum() / (n * (n - 1)))
    if n < 3:
        return kid, None
    # leaving pair i out gives (S - 2 R_i) / ((n - 1)(n - 2)), S = sum R: the jackknife variance in closed form
    spread = (row - row.mean()).square().sum()
    return kid, float(2 * ((n - 1) / n * spread).sqrt() / ((n - 1) * (n - 2)))


def kernel_inception_distance(
    real: Tensor,
    fake: Tensor,
    subset_size: int | None = None,
    subsets: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> tuple[float, float | None]:
    """Kernel inception distance (Binkowski et al. 2018) between the features of inputs and of their
    reconstructions: the squared maximum mean discrepancy under the cubic kernel ``k(x, y) = (x . y / F +
    1)^3``, as a raw number (papers often print it x 1000). Like the kernel, it assumes features of the scale
    of Inception's pool features; see :class:`ReconstructionMetrics` for other extractors.

    ``real[i]`` and ``fake[i]`` are a pair. The estimate is the unbiased U-statistic over pairs ``i != j``,
    ``sum h_ij / (n (n - 1))`` with ``h_ij = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)``. It leaves
    out ``k(x_i, y_i)``, the kernel between an input and its own reconstruction, which is no draw from the
    two distributions: torchmetrics' ``KernelInceptionDistance`` keeps those terms, which lowers its value by
    about ``2 (mean k(x_i, y_i) - mean k(x, y)) / n`` (0.018 of 0.049 on 500 MNIST test digits, shipped
    tokenizer, digit-classifier features).

    * ``subset_size=None``: over all n pairs; the second number is the estimate's jackknife standard error
      (leave one pair out, in closed form from the row sums of h), so ``kid +- 2 std`` is an approximate 95 %
      interval for the population value. Costs 4 n^2 F multiply-adds, `chunk_size` rows at a time.
    * ``subset_size=m``: the mean over `subsets` draws of m pairs (without replacement, with `generator`), and
      the standard deviation over the draws: the spread of a KID measured on m images, not the uncertainty
      of the mean.

    Args:
        real, fake: (n, F) features of the inputs and of their reconstructions.
        subset_size: None, or the pairs per subset (2 to n).
        subsets: the number of subsets (with `subset_size`).
        generator: the subsets' random stream (CPU).
        chunk_size: rows of the kernel matrices held at once.

    Returns:
        ``(kid, std)``; ``std`` is None for a whole-set estimate of fewer than 3 pairs.
    """
    if real.ndim != 2 or real.shape != fake.shape or len(real) < 2:
        raise ValueError(
            f"KID needs (n, F) features of n >= 2 inputs and of their n reconstructions, got {tuple(real.shape)} "
            f"and {tuple(fake.shape)}"
        )
    if subset_size is None:
        return _paired_kid(real, fake, chunk_size)
    if not 2 <= subset_size <= len(real):
        raise ValueError(f"subset_size must be in [2, {len(real)}] (the number of pairs), got {subset_size}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    scores = []
    for _ in range(subsets):
        pick = torch.randperm(len(real), generator=generator)[:subset_size].to(real.device)
        scores.append(_paired_kid(real[pick], fake[pick], chunk_size)[0])
    kid = torch.tensor(scores, dtype=torch.float64)
    return float(kid.mean()), float(kid.std(unbiased=False))


def entropy_bits(counts: Tensor) -> Tensor:
    """Plug-in entropy in bits of histograms along the last axis: counts (..., K) -> (...).

    With n samples it cannot exceed log2(min(n, K)): compare it with that bound, not only with log2(K)."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp_min(1)
    return -torch.special.xlogy(p, p).sum(-1) / math.log(2)


def ms_ssim_settings(height: int, width: int) -> dict[str, Any] | None:
    """The MS-SSIM configuration this project uses for images of this size, or None when they are too small.

    * shorter side >= 176 px: the standard MS-SSIM (Wang et al. 2003; torchmetrics' default, which needs
      more than 160 px): 5 scales, an 11-tap Gaussian window of sigma 1.5 px, the standard betas.
    * 16 to 175 px: ``min(5, floor(log2(side)) - 2)`` scales, so the coarsest scale keeps >= 8 px (32 px ->
      3 scales, 64 -> 4, 128 -> 5); the standard window at half resolution (sigma 0.75 px, 7 taps); betas the
      first `scales` standard betas (finest first) renormalised to sum to 1. Values are comparable between
      models at the same image size, not with published 5-scale numbers.
    * under 16 px: None (fewer than 2 scales would be plain SSIM).

    Returns:
        ``{"scales", "sigma", "kernel_size", "betas", "standard"}`` or None.
    """
    side = min(height, width)
    if side >= 176:
        return {"scales": 5, "sigma": 1.5, "kernel_size": 11, "betas": STANDARD_MS_SSIM_BETAS, "standard": True}
    if side < 16:
        return None
    scales = min(5, int(math.log2(side)) - 2)
    betas = STANDARD_MS_SSIM_BETAS[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    return {"scales": scales, "sigma": 0.75, "kernel_size": 7, "betas": betas, "standard": False}


# ---------------------------------------------------------------------------- feature extractors


class _Features(nn.Module):
    """Adapts a model with ``features(images)`` and ``num_features`` to torchmetrics' feature interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(model, "features", None)) or not hasattr(model, "num_features"):
            raise TypeError(
                f"a feature extractor needs a features(images) -> (B, F) method and an int num_features; "
                f"{type(model).__name__} lacks them"
            )
        self.model = model
        self.num_features = int(model.num_features)
        self.kid_feature_scale = getattr(model, "kid_feature_scale", None)

    def forward(self, images: Tensor) -> Tensor:
        return self.model.features(images)


class _Precomputed(nn.Module):
    """torchmetrics' FID and KID run their `feature` module on what they are given; this one passes features
    through, so the extractor runs once per image for both metrics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class InceptionFeatures(nn.Module):
    """The FID reference network's 2048 pool features for images in [-1, 1] (build with
    :func:`inception_extractor`).

    Images are quantised to 8 bits, as a PNG would store them, grey ones repeated to RGB, and resized to
    299 x 299 inside the network with TensorFlow-1-compatible bilinear resizing (torch-fidelity's, as the
    original FID code).

    Args:
        network: torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the TF 2015-12-05 graph)
            returning the ``"2048"`` features of uint8 images.
    """

    num_features = 2048
    kid_feature_scale = 1.0  # KID's kernel was made for these features: used as they are, as published KIDs

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def features(self, images: Tensor) -> Tensor:
        """(B, 1 or 3, H, W) in [-1, 1] -> (B, 2048)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.network(pixels.expand(-1, 3, -1, -1)).reshape(len(images), -1)


def inception_extractor(weights_path: str | Path) -> InceptionFeatures:
    """Standard rFID/KID features: Inception-v3 from a local weights file (no download).

    The file is the FID Inception port, ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release
    ``fid_weights``; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` holds the same state
    dict). It goes to torch-fidelity's ``FeatureExtractorInceptionV3(feature_extractor_weights_path=...)``
    through torchmetrics' ``NoTrainInceptionV3``, which is what ``FrechetInceptionDistance(
    feature_extractor_weights_path=...)`` does; KID has no such argument, so the network is built once here
    and shared by both. Needs ``pip install torch-fidelity``.

    Raises:
        FileNotFoundError: no file at `weights_path`.
        ModuleNotFoundError: torch-fidelity is not installed.
        ValueError: the file is not the FID Inception state dict.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {path} do not exist; download {INCEPTION_WEIGHTS_NAME} (pytorch-fid's release "
            f"'fid_weights') on a connected machine and pass its path"
        )
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "Inception features need torch-fidelity: `pip install torch-fidelity` "
            f"(then pass the local weights file {INCEPTION_WEIGHTS_NAME})"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    kwargs = {"name": "inception-v3-compat", "features_list": ["2048"], "feature_extractor_weights_path": str(path)}
    if "antialias" in inspect.signature(NoTrainInceptionV3.__init__).parameters:
        kwargs["antialias"] = False  # TF1-compatible resizing, as the original FID (torchmetrics >= 1.5 default True)
    try:
        network = NoTrainInceptionV3(**kwargs)
    except (RuntimeError, KeyError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not the FID Inception-v3 state dict ({INCEPTION_WEIGHTS_NAME}): {err}") from err
    return InceptionFeatures(network).eval()


# ---------------------------------------------------------------------------- the accumulator


class ReconstructionMetrics:
    """Streaming image and vocabulary metrics over (reconstruction, input) batches, with bounded memory.

    * ``psnr``: mean over images of per-image PSNR (dB, data range 2).
    * ``ssim``: mean per-image SSIM (torchmetrics; 11-tap Gaussian window, sigma 1.5).
    * ``ms_ssim``: mean MS-SSIM with the configuration :func:`ms_ssim_settings` picks for the image size,
      reported as ``ms_ssim_scales`` / ``ms_ssim_sigma`` / ``ms_ssim_standard``; None with ``ms_ssim_note``
      when the images are too small (under 16 px) or it is switched off.
    * ``fd`` (with a feature extractor): Frechet distance between the features of the inputs (real) and of
      the reconstructions (fake), torchmetrics' ``FrechetInceptionDistance``, in squared feature units.
    * ``kid_mean``, ``kid_std``: kernel inception distance, raw (not x 1000), by
      :func:`kernel_inception_distance`: by default over all n (input, reconstruction) pairs with
      ``kid_std`` its standard error; with `kid_subset_size`, the mean and spread over ``kid_subsets``
      subsets of ``min(kid_subset_size, n)`` pairs, drawn with `seed`
      (``kid_subset_size`` says which; ``kid_note`` says it in words). KID's cubic kernel
      ``(x . y / F + 1)^3`` was made for Inception's pool features, whose coordinates are below 1 in root
      mean square; on features a few times larger the cube magnifies every difference (the 128-d MNIST
      classifier's features, 3.85 in RMS, gave KIDs near 25, and a spread as large). So features of any
      extractor but Inception are divided by one number, ``kid_feature_scale``: the root mean square
      coordinate of the real features, which makes KID independent of the extractor's overall scale. The
      scale comes from the inputs only, so models evaluated on the same images share it.
    * FD and KID depend on the number of images: compare them at equal n only. None with ``fd_note`` without
      an extractor or with fewer than 2 images.
    * from :meth:`update_tokens`: ``distinct_ids``, ``perplexity`` (2^entropy of the pooled histogram),
      ``bits_per_image`` (N log2 K, the capacity), ``per_position_entropy`` (list of N, bits) and
      ``mean_position_entropy``, with ``position_entropy_bound`` = log2(min(images, K)), the most a plug-in
      entropy can show with that many images.

    Memory: PSNR/SSIM/MS-SSIM keep sums; FD keeps running sums (F + F^2 float64 per set); KID keeps every
    feature vector (2 x n x F float32: 10k MNIST digits x 128 classifier features = 10 MB, 50k images x 2048
    Inception features = 800 MB); token counts are N x K int64.

    Args:
        feature_extractor: a module with ``features(images) -> (B, F)`` and an int ``num_features``, used in
            eval mode on its own device; None for no FD/KID.
        kid_subset_size: None for KID over all images with its standard error; else images per KID subset
            (fewer when fewer images were seen), for the mean and spread over subsets.
        kid_subsets: KID subsets (with `kid_subset_size`).
        ms_ssim: True to require MS-SSIM (images under 16 px raise), False to skip it, None to compute it when
            the images allow.
        device: where the metric states live; None: the device of the first batch.
        seed: seeds KID's subset draws.
    """

    def __init__(
        self,
        *,
        feature_extractor: nn.Module | None = None,
        kid_subset_size: int | None = None,
        kid_subsets: int = 100,
        ms_ssim: bool | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> None:
        if (kid_subset_size is not None and kid_subset_size < 2) or kid_subsets < 1:
            raise ValueError(
                f"need kid_subset_size None (all images) or >= 2, and kid_subsets >= 1; got {kid_subset_size}, "
                f"{kid_subsets}"
            )
        self.extractor = None if feature_extractor is None else _Features(feature_extractor)
        self.kid_subset_size, self.kid_subsets, self.ms_ssim, self.seed = kid_subset_size, kid_subsets, ms_ssim, seed
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.num_images = 0
        self.image_shape: tuple[int, ...] | None = None
        self._psnr_sum = 0.0
        self._ssim = SSIM()
        self._ms_ssim = None  # built at the first batch, for its size
        self._ms_ssim_settings: dict[str, Any] | None = None
        self._fid = None
        self._kid_real: list[Tensor] = []  # every feature vector: KID needs them all (memory: see above)
        self._kid_fake: list[Tensor] = []
        if self.extractor is not None:
            identity = _Precomputed(self.extractor.num_features)
            self._fid = FrechetInceptionDistance(feature=identity, reset_real_features=True)
        self.token_counts: Tensor | None = None  # (N, K)
        self.num_token_images = 0
        if self.device is not None:
            self._to(self.device)

    def _to(self, device: torch.device) -> None:
        self.device = device
        for metric in (self._ssim, self._ms_ssim, self._fid):
            if metric is not None:
                metric.to(device)

    # ------------------------------------------------------------------ updates

    def _check_images(self, preds: Tensor, target: Tensor) -> None:
        for name, x in (("preds", preds), ("target", target)):
            if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a floating (B, C, H, W) tensor in [-1, 1], got {got}")
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
        if len(target) == 0:
            raise ValueError("an empty batch (B = 0) has nothing to measure")
        for name, x in (("preds", preds), ("target", target)):
            hint = "metrics need them there: clamp decoder outputs to [-1, 1], as an 8-bit image file would"
            check_image_range(x, what=name, hint=hint)
        if self.image_shape is not None and tuple(target.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images are {tuple(target.shape[1:])} but earlier batches were {self.image_shape}; "
                "one ReconstructionMetrics measures one image size"
            )

    def _start(self, target: Tensor) -> None:
        """At the first batch: place the states and pick the MS-SSIM configuration for this image size."""
        self.image_shape = tuple(target.shape[1:])
        settings = None if self.ms_ssim is False else ms_ssim_settings(*target.shape[-2:])
        if settings is None and self.ms_ssim:
            raise ValueError(f"images of {target.shape[-1]}x{target.shape[-2]} are too small for MS-SSIM (< 16 px)")
        if settings is not None:
            self._ms_ssim = MSSSIM(
                kernel_size=settings["kernel_size"],
                sigma=settings["sigma"],
                betas=settings["betas"],
            )
        self._ms_ssim_settings = settings
        self._to(self.device if self.device is not None else target.device)

    @torch.no_grad()
    def _extract(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, F) float32 features on the metrics' device, the extractor in eval mode."""
        model = self.extractor.model
        param = next(iter(model.parameters()), None)
        was_training = model.training
        model.eval()
        try:
            feats = self.extractor(images.to(param.device) if param is not None else images)
        finally:
            model.train(was_training)
        if feats.ndim != 2 or feats.shape != (len(images), self.extractor.num_features):
            raise ValueError(
                f"the feature extractor returned {tuple(feats.shape)}, expected ({len(images)}, "
                f"{self.extractor.num_features}) (its num_features)"
            )
        return feats.float().to(self.device)

    @torch.no_grad()
    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of reconstructions `preds` of the inputs `target`: both (B, C, H, W) in [-1, 1], where
        `target` is exactly what the model was given."""
        self._check_images(preds, target)
        if self.image_shape is None:
            self._start(target)
        preds, target = preds.detach().float().to(self.device), target.detach().float().to(self.device)
        self._psnr_sum += float(psnr_per_image(preds, target).double().sum())
        self._ssim.update(preds, target)
        if self._ms_ssim is not None:
            self._ms_ssim.update(preds, target)
        if self.extractor is not None:
            real, fake = self._extract(target), self._extract(preds)
            self._fid.update(real, real=True)
            self._fid.update(fake, real=False)
            self._kid_real.append(real)
            self._kid_fake.append(fake)
        self.num_images += len(target)

    @torch.no_grad()
    def update_tokens(self, indices: Tensor, num_codes: int) -> None:
        """Count a batch of tokens: `indices` (B, N) rows of a vocabulary / codebook of `num_codes` entries
        (for V2FlowTokenizer, ``encode(images).indices`` and ``resampler.num_codes``), per position."""
        if not isinstance(indices, Tensor) or indices.ndim != 2 or indices.is_floating_point() or indices.is_complex():
            got = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must be an integer (B, N) tensor, got {got}")
        if len(indices) == 0 or indices.shape[1] == 0:
            raise ValueError(f"indices {tuple(indices.shape)} hold no tokens")
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        n = indices.shape[1]
        if self.token_counts is not None and self.token_counts.shape != (n, num_codes):
            raise ValueError(
                f"got {n} tokens of {num_codes} codes but earlier batches had {self.token_counts.shape[0]} of "
                f"{self.token_counts.shape[1]}"
            )
        indices = indices.detach().cpu().long()
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"indices span [{lo}, {hi}], outside [0, {num_codes - 1}]")
        flat = indices + torch.arange(n)[None] * num_codes  # (B, N) -> cell (position, code)
        counts = torch.bincount(flat.flatten(), minlength=n * num_codes).view(n, num_codes)
        self.token_counts = counts if self.token_counts is None else self.token_counts + counts
        self.num_token_images += len(indices)

    # ------------------------------------------------------------------ results

    def compute(self) -> dict[str, Any]:
        """The metrics so far (see the class docstring). Image metrics appear once :meth:`update` was called,
        vocabulary statistics once :meth:`update_tokens` was; values that cannot be computed are None, with a
        ``*_note`` saying why."""
        if not self.num_images and self.token_counts is None:
            raise ValueError("nothing to compute: call update() or update_tokens() first")
        out: dict[str, Any] = {}
        if self.num_images:
            out |= {
                "num_images": self.num_images,
                "psnr": self._psnr_sum / self.num_images,
                "ssim": float(self._ssim.compute()),
            }
            out |= self._ms_ssim_result() | self._distribution_result()
        if self.token_counts is not None:
            out |= self._token_result()
        return out

    def _ms_ssim_result(self) -> dict[str, Any]:
        s = self._ms_ssim_settings
        if s is None:
            h, w = self.image_shape[-2:]
            why = "switched off" if self.ms_ssim is False else f"images of {w}x{h} are too small (< 16 px)"
            return {"ms_ssim": None, "ms_ssim_scales": None, "ms_ssim_sigma": None, "ms_ssim_note": why}
        note = (
            "standard: 5 scales, Gaussian sigma 1.5, standard betas"
            if s["standard"]
            else f"{s['scales']} scales, Gaussian sigma {s['sigma']} ({s['kernel_size']} taps), the first "
            f"{s['scales']} standard betas renormalised: images under 176 px cannot take the standard 5 scales; "
            "comparable at this image size only"
        )
        return {
            "ms_ssim": float(self._ms_ssim.compute()),
            "ms_ssim_scales": s["scales"],
            "ms_ssim_sigma": s["sigma"],
            "ms_ssim_note": note,
        }

    def _distribution_result(self) -> dict[str, Any]:
        keys = ("fd", "kid_mean", "kid_std", "kid_subset_size", "kid_feature_scale", "kid_note")
        none = dict.fromkeys(keys)
        if self.extractor is None:
            return none | {"fd_note": "no feature extractor given"}
        if self.num_images < 2:
            return none | {"fd_note": f"needs >= 2 images, got {self.num_images}"}
        real, fake = torch.cat(self._kid_real), torch.cat(self._kid_fake)
        scale = self.extractor.kid_feature_scale
        if scale is None:  # the real features' RMS coordinate: see the class docstring
            scale = float(real.double().square().mean().sqrt().clamp_min(1e-12))
        subset = None if self.kid_subset_size is None else min(self.kid_subset_size, self.num_images)
        generator = torch.Generator().manual_seed(self.seed)
        kid, std = kernel_inception_distance(real / scale, fake / scale, subset, self.kid_subsets, generator)
        scaled = "as they are" if scale == 1.0 else f"divided by {scale:.4g}, the real features' RMS coordinate"
        if subset is None:
            spread = f"kid_std: its standard error (jackknife over the {self.num_images} pairs)"
        else:
            spread = (
                f"mean over {self.kid_subsets} subsets of {subset} images; kid_std: the spread of a KID on {subset} "
                "images, not the error of kid_mean"
            )
        return {
            "fd": float(self._fid.compute()),
            "kid_mean": kid,
            "kid_std": std,
            "kid_subset_size": subset if subset is not None else self.num_images,
            "kid_feature_scale": scale,
            "kid_note": f"raw MMD^2 (not x 1000), cubic kernel on the features {scaled}; {spread}",
            "fd_note": f"features: {self.extractor.num_features}-d {type(self.extractor.model).__name__}",
        }

    def _token_result(self) -> dict[str, Any]:
        counts = self.token_counts  # (N, K)
        n, k = counts.shape
        per_position = entropy_bits(counts)  # (N,)
        pooled = counts.sum(0)
        out = {
            "distinct_ids": int((pooled > 0).sum()),
            "perplexity": float(2 ** entropy_bits(pooled)),
            "bits_per_image": n * math.log2(k),
            "vocabulary_entries": k,
            "tokens_per_image": n,
            "mean_position_entropy": float(per_position.mean()),
            "position_entropy_bound": math.log2(min(self.num_token_images, k)),
            "per_position_entropy": [round(float(h), 4) for h in per_position],
        }
        if self.num_token_images != self.num_images:
            out["num_token_images"] = self.num_token_images
        return out


# ---------------------------------------------------------------------------- streaming a tokenizer


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: nn.Module,
    batches: Iterable[Tensor],
    metrics: ReconstructionMetrics,
    prefix: int | None = None,
    **decode_kwargs: Any,
) -> ReconstructionMetrics:
    """Encode and decode every batch of `batches` ((B, C, H, W) in [-1, 1], moved to the tokenizer's device)
    and add the reconstructions, inputs and tokens to `metrics`, which is returned.

    Args:
        tokenizer: a :class:`~v2flow.tokenizer.V2FlowTokenizer` (anything with ``encode(images)`` ->
            ``.ids``/``.indices``, ``decode(ids, **decode_kwargs)`` -> ``.images``, and ``resampler.num_codes`` or
            ``config["codebook_size"]``: the VQ baseline's ``VQTokenizer`` works too).
        batches: the input stream; memory stays bounded by one batch plus the metric states.
        metrics: the accumulator.
        prefix: decode only the first `prefix` tokens of each sequence (token statistics still count all of
            them); None decodes the whole sequence.
        decode_kwargs: for ``decode`` (``num_steps``, ``solver``, ``generator``, ...).
    """
    device = next(tokenizer.parameters()).device
    resampler = getattr(tokenizer, "resampler", None)
    num_codes = resampler.num_codes if resampler is not None else tokenizer.config["codebook_size"]
    for images in batches:
        images = images.to(device)
        encoded = tokenizer.encode(images)
        ids = encoded.ids if prefix is None else encoded.ids[:, :prefix]
        recon = tokenizer.decode(ids, **decode_kwargs).images
        metrics.update(recon, images)
        metrics.update_tokens(encoded.indices, num_codes)
    return metrics


# ---------------------------------------------------------------------------- two image sets at once


@torch.no_grad()
def frechet_distance(extractor: nn.Module, real: Tensor, fake: Tensor, batch_size: int = 500) -> float:
    """Frechet distance between the Gaussians fitted to `extractor.features` of two image sets.

    Args:
        extractor: a model with ``features(images) -> (B, F)`` and an int ``num_features`` (for MNIST, the
            project's ``DigitClassifier``).
        real, fake: (B, C, H, W) images in [-1, 1], given to the extractor as they are (on its device).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(real), len(fake)) < 2:
        raise ValueError(f"a Frechet distance needs >= 2 images per set, got {len(real)} and {len(fake)}")
    was_training = extractor.training
    extractor.eval()
    device = next(extractor.parameters()).device
    try:
        metric = FrechetInceptionDistance(feature=_Features(extractor))
        metric.to(device)  # states only: the extractor is already there
        for chunk in real.split(batch_size):
            metric.update(chunk.to(device), real=True)
        for chunk in fake.split(batch_size):
            metric.update(chunk.to(device), real=False)
        return float(metric.compute())
    finally:
        extractor.train(was_training)
