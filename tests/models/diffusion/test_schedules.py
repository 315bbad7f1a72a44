import math

import pytest
import torch

from ldm.models.diffusion.schedules import make_beta_schedule, rescale_zero_terminal_snr

T = 1000


def test_linear_is_linear_in_sqrt_beta():
    """CompVis' `linear`: betas_i = (sqrt(b0) + i / (T-1) (sqrt(b1) - sqrt(b0)))^2."""
    betas = make_beta_schedule("linear", T, 0.00085, 0.012)
    i = torch.arange(T, dtype=torch.float64)
    expected = (0.00085 ** 0.5 + i / (T - 1) * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2
    torch.testing.assert_close(betas, expected, rtol=1e-12, atol=1e-15)
    assert betas.dtype == torch.float64


def test_sqrt_linear_and_sqrt():
    i = torch.arange(T, dtype=torch.float64)
    plain = 1e-4 + i / (T - 1) * (2e-2 - 1e-4)
    torch.testing.assert_close(make_beta_schedule("sqrt_linear", T, 1e-4, 2e-2), plain, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(make_beta_schedule("sqrt", T, 1e-4, 2e-2), plain.sqrt(), rtol=1e-12, atol=1e-15)


def test_cosine_alpha_bar_matches_closed_form():
    """Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi / 2)."""
    s = 0.008
    betas = make_beta_schedule("cosine", T, cosine_s=s)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)  # clipped at the end


def test_zero_terminal_snr_rescale():
    betas = make_beta_schedule("linear", T, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    old = torch.cumprod(1 - betas, 0).sqrt()
    new = torch.cumprod(1 - rescaled, 0).sqrt()
    assert new[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert new[0].item() == pytest.approx(old[0].item(), rel=1e-12)
    # An affine map of the old sqrt(alpha_bar): (old - old_T) * old_0 / (old_0 - old_T)
    torch.testing.assert_close(new, (old - old[-1]) * old[0] / (old[0] - old[-1]), rtol=1e-10, atol=1e-12)
    assert rescaled[-1].item() == pytest.approx(1.0)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*linear, cosine, sqrt_linear, sqrt"):
        make_beta_schedule("quadratic", 10)
