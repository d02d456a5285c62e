"""Evaluation metrics against hand-computed values, and the `v2flow evaluate` command at tiny sizes."""

import importlib.util
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import make_tokenizer
from PIL import Image
from torch import nn

from v2flow.cli import main
from v2flow.eval.classifier import DigitClassifier
from v2flow.metrics import (
    INCEPTION_WEIGHTS_NAME,
    InceptionFeatures,
    ReconstructionMetrics,
    entropy_bits,
    evaluate_tokenizer,
    frechet_distance_gaussians,
    inception_extractor,
    kernel_inception_distance,
    ms_ssim_settings,
)


class TinyConvFeatures(nn.Module):
    """A stand-in feature extractor: a random conv net with ``features`` and ``num_features``."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, self.num_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(images))


class FirstPixels(nn.Module):
    """Features = 10 x the first `num_features` pixels of the top row: images carry Gaussian samples / 10."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return 10 * images[:, 0, 0, : self.num_features]


def rand_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------- pixel metrics


def test_psnr_of_known_errors_streams_over_batches():
    target = rand_images(4) * 0.5  # in [-0.5, 0.5], so +-0.4 stays in range
    errors = torch.tensor([0.1, 0.2, 0.4, 0.05])
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    preds = target + (errors * signs)[:, None, None, None]
    expected = float(np.mean([10 * math.log10(4 / e**2) for e in errors.tolist()]))  # data range 2
    m = ReconstructionMetrics()
    m.update(preds[:3], target[:3])
    m.update(preds[3:], target[3:])
    result = m.compute()
    assert result["psnr"] == pytest.approx(expected, abs=1e-4)
    assert result["num_images"] == 4


def test_ssim_and_ms_ssim_of_identical_images_are_one():
    images = rand_images(3, size=32)
    m = ReconstructionMetrics()
    m.update(images, images)
    result = m.compute()
    assert result["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert result["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert (result["ms_ssim_scales"], result["ms_ssim_sigma"]) == (3, 0.75)
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    m.reset()
    m.update(noisy, images)
    assert 0 < m.compute()["ssim"] < 0.9 and 0 < m.compute()["ms_ssim"] < 0.95


@pytest.mark.parametrize(
    "side, scales, standard", [(8, None, None), (15, None, None), (16, 2, False), (32, 3, False), (64, 4, False),
                               (128, 5, False), (176, 5, True), (256, 5, True)]
)  # fmt: skip
def test_ms_ssim_settings(side, scales, standard):
    s = ms_ssim_settings(side, side + 40)
    if scales is None:
        assert s is None
        return
    assert (s["scales"], s["standard"]) == (scales, standard)
    assert sum(s["betas"]) == pytest.approx(1.0, abs=1e-3) and len(s["betas"]) == scales


def test_ms_ssim_is_omitted_with_a_reason_on_small_images():
    images = rand_images(2, size=8)
    m = ReconstructionMetrics()
    m.update(images, images)
    result = m.compute()
    assert result["ms_ssim"] is None and "too small" in result["ms_ssim_note"]
    with pytest.raises(ValueError, match="too small for MS-SSIM"):
        ReconstructionMetrics(ms_ssim=True).update(images, images)
    off = ReconstructionMetrics(ms_ssim=False)
    off.update(rand_images(2, size=32), rand_images(2, size=32, seed=1))
    assert off.compute()["ms_ssim"] is None and off.compute()["ms_ssim_note"] == "switched off"


# ---------------------------------------------------------------------------- Frechet distance and KID


def test_frechet_distance_gaussians_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    # isotropic: |mu1 - mu2|^2 + F (s1 - s2)^2 = 5 + 3 * (2 - 0.5)^2
    fd = frechet_distance_gaussians(mu1, 4 * torch.eye(3), mu2, 0.25 * torch.eye(3))
    assert fd == pytest.approx(5 + 3 * 1.5**2, abs=1e-9)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T, b @ b.T  # non-commuting covariances: against scipy's matrix square root
    ref = 5 + float(np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())).real)
    assert frechet_distance_gaussians(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance_gaussians(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance_gaussians(mu1, s1, mu2[:2], s2)


@pytest.mark.slow
def test_fd_and_kid_of_identical_sets_are_zero():
    images = rand_images(200)
    m = ReconstructionMetrics(feature_extractor=TinyConvFeatures(), kid_subset_size=50)
    m.update(images, images)
    same = m.compute()
    assert same["fd"] == pytest.approx(0.0, abs=1e-6)
    far = ReconstructionMetrics(feature_extractor=TinyConvFeatures(), kid_subset_size=50)
    far.update(images * 0.5 + 0.4, images)  # brighter, less contrast
    far = far.compute()
    assert far["fd"] > 1e-3 and far["kid_mean"] > 0
    assert abs(same["kid_mean"]) < 0.05 * far["kid_mean"]
    assert same["kid_subset_size"] == 50 and "6-d TinyConvFeatures" in same["fd_note"]


def test_fd_of_shifted_gaussians_matches_the_closed_form():
    f, n = 4, 4000
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.zeros(f), torch.tensor([0.5, -0.3, 0.2, 0.0])
    l1 = torch.eye(f)
    l2 = torch.tensor([[1.2, 0, 0, 0], [0.3, 0.8, 0, 0], [0, 0.2, 1.0, 0], [0.1, 0, 0.4, 0.9]])
    x = mu1 + torch.randn(n, f, generator=g) @ l1.T  # real features
    y = mu2 + torch.randn(n, f, generator=g) @ l2.T  # reconstruction features

    def as_images(feats):  # the extractor reads them back from the top row, x 10
        images = torch.zeros(n, 1, 8, 8)
        images[:, 0, 0, :f] = feats / 10
        return images

    m = ReconstructionMetrics(feature_extractor=FirstPixels(f), ms_ssim=False)
    for xs, ys in zip(as_images(x).split(1000), as_images(y).split(1000), strict=True):
        m.update(ys, xs)
    fd = m.compute()["fd"]
    xr, yr = 10 * (x / 10), 10 * (y / 10)  # the float32 round trip the extractor sees
    sample = frechet_distance_gaussians(
        xr.double().mean(0), xr.double().T.cov(), yr.double().mean(0), yr.double().T.cov()
    )
    assert fd == pytest.approx(sample, rel=1e-4)  # torchmetrics' streaming sums = the sample statistics
    population = frechet_distance_gaussians(mu1, l1 @ l1.T, mu2, l2 @ l2.T)
    assert fd == pytest.approx(population, rel=0.1)  # sampling error of 4000 draws


def cubic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel, in float64: cubic polynomial, gamma 1/F, coef 1 (torchmetrics' default)."""
    a, b = a.double(), b.double()
    return (a @ b.T / a.shape[1] + 1) ** 3


def paired_kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """The U-statistic over pairs i != j, written out term by term."""
    n = len(x)
    h = cubic(x, x) + cubic(y, y) - cubic(x, y) - cubic(y, x)
    return float((h * (1 - torch.eye(n, dtype=h.dtype))).sum() / (n * (n - 1)))


def test_kid_matches_a_hand_computed_u_statistic_and_jackknife():
    images, recon = rand_images(12), rand_images(12, seed=1)
    extractor = TinyConvFeatures()
    m = ReconstructionMetrics(feature_extractor=extractor)
    m.update(recon[:5], images[:5])
    m.update(recon[5:], images[5:])
    result = m.compute()
    with torch.no_grad():
        fx, fy = extractor.features(images).double(), extractor.features(recon).double()
    scale = float(fx.square().mean().sqrt())  # the real features' RMS coordinate
    fx, fy = fx / scale, fy / scale
    loo = torch.tensor([paired_kid(fx[torch.arange(12) != i], fy[torch.arange(12) != i]) for i in range(12)])
    jackknife = float(((12 - 1) / 12 * (loo - loo.mean()).square().sum()).sqrt())
    assert result["kid_subset_size"] == 12 and result["kid_feature_scale"] == pytest.approx(scale, rel=1e-6)
    assert result["kid_mean"] == pytest.approx(paired_kid(fx, fy), rel=1e-5, abs=1e-9)
    assert result["kid_std"] == pytest.approx(jackknife, rel=1e-5)
    assert "standard error" in result["kid_note"] and "not x 1000" in result["kid_note"]
    # torchmetrics' estimator on the whole set keeps the 12 kernels between an input and its own
    # reconstruction (i = j); without them it is this one: the same kernel and normalisation otherwise
    from torchmetrics.image.kid import poly_mmd

    k_xy = cubic(fx, fy)
    with_pairs = float(poly_mmd(fx, fy))
    assert with_pairs == pytest.approx(
        paired_kid(fx, fy) + 2 * float(k_xy.sum() - k_xy.trace()) / (12 * 11) - 2 * float(k_xy.sum()) / 12**2,
        rel=1e-9,
        abs=1e-9,
    )


def test_kid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    assert kernel_inception_distance(x, x) == pytest.approx((0.0, 0.0), abs=1e-12)  # every h_ij is zero
    kids = [kernel_inception_distance(x, x + shift) for shift in (0.1, 0.3, 0.6, 1.0)]
    assert all(0 < a[0] < b[0] for a, b in zip(kids, kids[1:], strict=False))
    assert all(kid > 3 * std for kid, std in kids[1:]), "a clear shift stands out of its standard error"
    # subsets: the mean agrees with the whole-set value, the spread is that of a KID on 50 pairs
    whole, _ = kernel_inception_distance(x, x + 0.3)
    mean, spread = kernel_inception_distance(x, x + 0.3, 50, 200, torch.Generator().manual_seed(0))
    assert mean == pytest.approx(whole, rel=0.1) and spread > kids[1][1]
    with pytest.raises(ValueError, match="subset_size must be in"):
        kernel_inception_distance(x, x, subset_size=301)
    with pytest.raises(ValueError, match="n reconstructions"):
        kernel_inception_distance(x, x[:5])


def test_kid_standard_error_matches_the_spread_over_repeated_samples():
    """Over 200 independent draws of 60 (input, reconstruction) pairs, the jackknife standard error is the
    standard deviation of the estimate, and the estimate is unbiased where the two distributions agree."""
    g = torch.Generator().manual_seed(0)
    kids, errors = [], []
    for _ in range(200):
        x = torch.randn(60, 4, generator=g)
        y = x + 0.5 * torch.randn(60, 4, generator=g)  # a noisy "reconstruction" of each input
        kid, err = kernel_inception_distance(x, y)
        kids.append(kid)
        errors.append(err)
    kids, errors = torch.tensor(kids), torch.tensor(errors)
    assert 0.8 < float(errors.mean() / kids.std()) < 1.25
    null = []
    for _ in range(200):  # the same distribution: KID near 0 in mean, within its error
        x, y = torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g)
        null.append(kernel_inception_distance(x, y))
    values = torch.tensor([k for k, _ in null])
    assert abs(float(values.mean())) < 3 * float(values.std()) / 200**0.5
    assert sum(abs(k) < 2 * e for k, e in null) >= 0.9 * 200


def test_kid_does_not_depend_on_the_extractors_scale_but_inception_features_are_used_as_they_are():
    images, recon = rand_images(40, size=8), rand_images(40, size=8, seed=1) * 0.8

    class Scaled(FirstPixels):
        def __init__(self, factor: float) -> None:
            super().__init__(6)
            self.factor = factor

        def features(self, images):
            return self.factor * super().features(images)

    results = []
    for factor in (0.01, 1.0, 40.0):
        m = ReconstructionMetrics(feature_extractor=Scaled(factor))
        m.update(recon, images)
        results.append(m.compute())
    for r in results[1:]:
        assert r["kid_mean"] == pytest.approx(results[0]["kid_mean"], rel=1e-4)
        assert r["kid_std"] == pytest.approx(results[0]["kid_std"], rel=1e-4)
    assert results[2]["kid_feature_scale"] == pytest.approx(4000 * results[0]["kid_feature_scale"], rel=1e-5)
    assert "divided by" in results[0]["kid_note"]
    fixed = Scaled(40.0)
    fixed.kid_feature_scale = 1.0  # as InceptionFeatures declares: the standard KID, on raw features
    m = ReconstructionMetrics(feature_extractor=fixed)
    m.update(recon, images)
    raw = m.compute()
    with torch.no_grad():
        expected = paired_kid(fixed.features(images), fixed.features(recon))
    assert raw["kid_feature_scale"] == 1.0 and "as they are" in raw["kid_note"]
    assert raw["kid_mean"] == pytest.approx(expected, rel=1e-4)
    assert InceptionFeatures.kid_feature_scale == 1.0


def test_kid_subsets_report_their_spread():
    images, recon = rand_images(30), rand_images(30, seed=1)
    m = ReconstructionMetrics(feature_extractor=TinyConvFeatures(), kid_subset_size=10, kid_subsets=20, seed=3)
    m.update(recon, images)
    first = m.compute()
    assert first["kid_subset_size"] == 10 and first["kid_std"] > 0
    assert "20 subsets of 10 images" in first["kid_note"] and "not the error of kid_mean" in first["kid_note"]
    assert m.compute()["kid_mean"] == first["kid_mean"], "the subsets are drawn with the seed"
    with pytest.raises(ValueError, match="kid_subset_size None"):
        ReconstructionMetrics(kid_subset_size=1)


def test_fd_needs_two_images_and_an_extractor():
    m = ReconstructionMetrics(feature_extractor=TinyConvFeatures())
    m.update(rand_images(1), rand_images(1, seed=1))
    assert m.compute()["fd"] is None and ">= 2 images" in m.compute()["fd_note"]
    plain = ReconstructionMetrics()
    plain.update(rand_images(2), rand_images(2, seed=1))
    assert plain.compute()["fd"] is None and plain.compute()["fd_note"] == "no feature extractor given"
    with pytest.raises(TypeError, match="features"):
        ReconstructionMetrics(feature_extractor=nn.Linear(2, 2))


# ---------------------------------------------------------------------------- vocabulary statistics


def test_token_statistics_on_hand_made_ids():
    m = ReconstructionMetrics()
    m.update_tokens(torch.tensor([[0, 1], [0, 2]]), num_codes=4)
    m.update_tokens(torch.tensor([[0, 3], [0, 0]]), num_codes=4)
    r = m.compute()
    assert r["per_position_entropy"] == [0.0, 2.0]  # position 0 always code 0; position 1 uniform over 4
    assert r["mean_position_entropy"] == pytest.approx(1.0)
    pooled = -(5 / 8 * math.log2(5 / 8) + 3 * (1 / 8) * math.log2(1 / 8))  # counts 5, 1, 1, 1
    assert r["perplexity"] == pytest.approx(2**pooled)
    assert (r["distinct_ids"], r["bits_per_image"], r["position_entropy_bound"]) == (4, 4.0, 2.0)
    assert "psnr" not in r and r["num_token_images"] == 4
    assert entropy_bits(torch.tensor([[2, 2], [4, 0]])).tolist() == [1.0, 0.0]


def test_evaluate_tokenizer_scores_a_prefix_and_counts_every_token():
    tok = make_tokenizer(token_order="ordered", order_stages=[1, 3])
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    r = evaluate_tokenizer(tok, images.split(3), ReconstructionMetrics(), prefix=2, num_steps=2, generator=g())
    r = r.compute()
    generator = g()  # the same stream, batch by batch, as the evaluation drew it
    decoded = [tok.decode(tok.encode(x).ids[:, :2], num_steps=2, generator=generator).images for x in images.split(3)]
    expected = ReconstructionMetrics()
    expected.update(torch.cat(decoded), images)
    assert r["psnr"] == pytest.approx(expected.compute()["psnr"], abs=1e-5)
    assert len(r["per_position_entropy"]) == 4  # token statistics over the whole sequence
    full = evaluate_tokenizer(tok, images.split(3), ReconstructionMetrics(), num_steps=2, generator=g()).compute()
    assert full["psnr"] != r["psnr"]


def test_bad_tokens_are_refused():
    m = ReconstructionMetrics()
    with pytest.raises(ValueError, match="integer"):
        m.update_tokens(torch.zeros(2, 3), num_codes=4)
    with pytest.raises(ValueError, match="outside"):
        m.update_tokens(torch.tensor([[0, 4]]), num_codes=4)
    m.update_tokens(torch.tensor([[0, 1]]), num_codes=4)
    with pytest.raises(ValueError, match="earlier batches"):
        m.update_tokens(torch.tensor([[0, 1, 2]]), num_codes=4)


def test_bad_images_are_refused():
    m = ReconstructionMetrics()
    with pytest.raises(ValueError, match="nothing to compute"):
        m.compute()
    with pytest.raises(ValueError, match="same shape"):
        m.update(rand_images(2), rand_images(3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m.update(rand_images(2)[0], rand_images(2)[0])
    with pytest.raises(ValueError, match="empty batch"):
        m.update(rand_images(0), rand_images(0))
    with pytest.raises(ValueError, match=r"clamp"):
        m.update(rand_images(2) * 1.5, rand_images(2))
    nan = rand_images(2)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        m.update(rand_images(2), nan)
    m.update(rand_images(2), rand_images(2))
    with pytest.raises(ValueError, match="earlier batches"):
        m.update(rand_images(2, size=32), rand_images(2, size=32))


# ---------------------------------------------------------------------------- Inception plumbing


class FakeInception(nn.Module):
    """Stands in for the Inception network: uint8 RGB in, 8 features (channel means, 8 px) out, not 2048, which
    would make the test's FD a 2048 x 2048 eigenproblem."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.uint8 and pixels.shape[1] == 3
        return torch.cat([pixels.float().mean((2, 3)), pixels[:, 0, 0, :5].float()], 1)


def test_inception_features_plumbing():
    extractor = InceptionFeatures(FakeInception())
    extractor.num_features = 8
    grey = torch.stack([-torch.ones(1, 8, 8), torch.ones(1, 8, 8)])
    assert extractor.features(grey)[:, :3].tolist() == [[0.0] * 3, [255.0] * 3]  # [-1, 1] -> 8 bits, grey -> RGB
    m = ReconstructionMetrics(feature_extractor=extractor, kid_subset_size=4)
    images = rand_images(4)
    m.update(images, images)
    assert m.compute()["fd"] == pytest.approx(0.0, abs=1e-3)


def test_inception_extractor_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_NAME):
        inception_extractor(tmp_path / "nowhere.pth")
    junk = tmp_path / INCEPTION_WEIGHTS_NAME
    torch.save({"not": torch.zeros(1)}, junk)
    if importlib.util.find_spec("torch_fidelity") is None:
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            inception_extractor(junk)
    else:
        with pytest.raises(ValueError, match="not the FID Inception"):
            inception_extractor(junk)


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tok"
    make_tokenizer().save_pretrained(path)  # 8x8 grey images, 4 tokens of 32 entries
    return path


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def run_evaluate(capsys, *args) -> tuple[dict, list[str]]:
    assert main(["evaluate", *map(str, args)]) == 0
    out = capsys.readouterr().out
    text, _, table = out.partition("\n\n")
    return json.loads(text), table.strip().splitlines()


def test_evaluate_a_folder(tmp_path, capsys, tiny_checkpoint, tiny_folder):
    out_json = tmp_path / "eval" / "metrics.json"
    r, table = run_evaluate(
        capsys, "--checkpoint", tiny_checkpoint, "--data", tiny_folder, "--batch-size", 4, "--output", out_json
    )
    assert json.loads(out_json.read_text()) == r
    assert r["num_images"] == 6 and math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    assert r["ms_ssim"] is None and "too small" in r["ms_ssim_note"]
    assert r["fd"] is None and r["fd_note"].startswith("no --features given: FD/KID need a feature extractor")
    assert r["features"]["kind"] == "none" and r["policy"] == "the images as stored (no crop, no resize)"
    assert r["decode"]["num_steps"] == 2 and len(r["per_position_entropy"]) == 4
    assert r["bits_per_image"] == pytest.approx(4 * math.log2(32))
    assert len(table) == 3 and table[1].startswith("|---|") and table[2].count("|") == table[0].count("|")
    assert " 6 | 2 | euler |" in table[2]

    judge = tmp_path / "judge"
    DigitClassifier(image_size=8, width=4, feature_dim=8).save_pretrained(judge)
    r, _ = run_evaluate(
        capsys, "--checkpoint", tiny_checkpoint, "--data", tiny_folder, "--features", "classifier", judge,
        "--limit", 5, "--num-steps", 1, "--solver", "midpoint",
    )  # fmt: skip
    assert r["num_images"] == 5 and r["fd"] >= 0 and r["kid_subset_size"] == 5 and r["features"]["num_features"] == 8
    assert (r["decode"]["num_steps"], r["decode"]["solver"]) == (1, "midpoint")


def test_evaluate_mnist_uses_the_shipped_classifier(tmp_path, capsys):
    make_tokenizer(image_size=32, patch_size=8).save_pretrained(tmp_path / "tok")
    r, _ = run_evaluate(capsys, "--checkpoint", tmp_path / "tok", "--data", "mnist-test", "--limit", 8)
    assert r["num_images"] == 8 and r["features"]["kind"] == "classifier" and r["features"]["num_features"] == 128
    assert r["fd"] > 0 and r["ms_ssim_scales"] == 3 and "padded" in r["policy"]


def test_evaluate_photos_test(tmp_path, capsys):
    make_tokenizer(in_channels=3, image_size=16).save_pretrained(tmp_path / "tok")
    r, _ = run_evaluate(capsys, "--checkpoint", tmp_path / "tok", "--data", "photos-test", "--limit", 3)
    assert r["num_images"] == 3 and "chelsea" in r["policy"] and r["ms_ssim_scales"] == 2
    assert r["features"] == {"kind": "none"} and r["fd"] is None


def test_evaluate_bad_inputs(tmp_path, capsys, tiny_checkpoint, tiny_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ["--checkpoint", tiny_checkpoint, "--data", empty],  # no images
        ["--checkpoint", tmp_path / "missing", "--data", tiny_folder],
        ["--checkpoint", tiny_checkpoint, "--data", tmp_path / "nowhere"],
        ["--checkpoint", tiny_checkpoint, "--data", tiny_folder, "--features", "resnet"],
        ["--checkpoint", tiny_checkpoint, "--data", tiny_folder, "--features", "inception", tmp_path / "x.pth"],
        ["--checkpoint", tiny_checkpoint, "--data", "mnist-test"],  # an 8x8 tokenizer cannot take MNIST
        ["--checkpoint", tiny_checkpoint, "--data", "photos-test"],  # nor RGB photos
        ["--checkpoint", tiny_checkpoint, "--data", tiny_folder, "--batch-size", 0],
    ]
    for args in cases:
        assert main(["evaluate", *map(str, args)]) == 2, args
        assert "v2flow evaluate: error:" in capsys.readouterr().err
