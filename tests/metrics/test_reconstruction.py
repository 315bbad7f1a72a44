import math

import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric

from ldm.metrics.reconstruction import ms_ssim, ms_ssim_settings, ms_ssim_weights, psnr, ssim

SHAPES = [(2, 1, 16, 16), (2, 3, 32, 32), (2, 1, 16, 16, 16), (1, 1, 32, 32, 32)]


def images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("shape", SHAPES)
def test_identical_images_score_perfectly(shape):
    x = images(shape)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(shape[0]))
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(shape[0]))


@pytest.mark.parametrize("shape", SHAPES)
def test_noise_lowers_similarity(shape):
    x = images(shape)
    noisy = (x + 0.5 * images(shape, seed=1)).clamp(-1, 1)
    for metric in (ssim, ms_ssim):
        value = metric(x, noisy)
        assert value.shape == (shape[0],) and bool(((value > 0) & (value < 0.99)).all())


def test_psnr_of_constant_offset_is_the_closed_form():
    x = images((3, 1, 8, 8, 8)) * 0.5
    offset = torch.tensor([0.1, 0.2, 0.4]).view(3, 1, 1, 1, 1)
    expected = torch.tensor([10 * math.log10(2.0 ** 2 / c ** 2) for c in (0.1, 0.2, 0.4)])
    torch.testing.assert_close(psnr(x + offset, x), expected)


def test_ms_ssim_equals_monai_defaults_on_large_images():
    x = images((2, 1, 176, 176))
    y = (x + 0.3 * images((2, 1, 176, 176), seed=1)).clamp(-1, 1)
    assert ms_ssim_settings((176, 176)) == (11, 5)
    reference = MultiScaleSSIMMetric(spatial_dims=2, data_range=2.0, reduction="none")(x, y).reshape(2)
    torch.testing.assert_close(ms_ssim(x, y), reference)


def test_ms_ssim_settings_fit_small_images():
    assert ms_ssim_settings((32, 32, 32)) == (7, 3)
    assert ms_ssim_settings((64, 64, 64)) == (7, 4)
    assert ms_ssim_settings((32, 32), num_scales=2) == (11, 2)
    assert sum(ms_ssim_weights(3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(12, 12\)"):
        ms_ssim_settings((12, 12))
    with pytest.raises(ValueError, match="5 scales"):
        ms_ssim_settings((32, 32), num_scales=5)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16\) vs \(1, 1, 16, 17\)"):
        psnr(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 17))
