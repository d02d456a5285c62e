"""SSIM the standard way: images in [-1, 1] are measured in [0, 1] with data range 1."""

import pytest
import torch

from v2flow.metrics import MSSSIM, SSIM, psnr_ssim, ssim


def test_ssim_of_flat_images_matches_the_hand_computed_luminance_term():
    # flat images: no variance, no covariance, so SSIM is its luminance term (2 mx my + C1) / (mx^2 + my^2 + C1)
    preds, target = torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)  # 0.5 and 1.0 in [0, 1]
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 1.0 + c1) / (0.5**2 + 1.0**2 + c1)  # 0.80002
    assert float(ssim(preds, target)) == pytest.approx(expected, abs=1e-5)
    # on [-1, 1] with data range 2 (not the standard way) the same pair would score about 0.0004
    assert abs(expected - (2 * 0.0 * 1.0 + (0.02) ** 2) / (0.0 + 1.0 + 0.02**2)) > 0.79


def test_streaming_ssim_equals_the_batch_value_and_multiscale_runs():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    preds = (target + 0.2 * torch.randn(6, 1, 32, 32, generator=g)).clamp(-1, 1)
    metric = SSIM()
    for i in range(0, 6, 2):
        metric.update(preds[i : i + 2], target[i : i + 2])
    assert float(metric.compute()) == pytest.approx(float(ssim(preds, target)), abs=1e-6)
    assert psnr_ssim(target, target)["ssim"] == pytest.approx(1.0)
    ms = MSSSIM(kernel_size=3, sigma=0.5, betas=(0.5, 0.5))
    ms.update(preds, target)
    assert 0 < float(ms.compute()) < 1
