import numpy as np
import pytest
import torch

from ldm.models.diffusion.edm.discretization import EDMDiscretization, LegacyDDPMDiscretization
from ldm.models.diffusion.schedules import make_beta_schedule
from tests.models.diffusion.edm.reference import default_float64, k_sampling


@pytest.mark.parametrize("n, sigma_min, sigma_max, rho", [(10, 0.002, 80.0, 7.0), (25, 0.03, 14.6, 3.0),
                                                         (2, 0.1, 1, 7)])
def test_edm_discretization_equals_k_diffusion_karras(n, sigma_min, sigma_max, rho):
    sigmas = EDMDiscretization(sigma_min, sigma_max, rho)(n)
    with default_float64():
        reference = k_sampling().get_sigmas_karras(n, sigma_min, sigma_max, rho)
    torch.testing.assert_close(sigmas, reference, rtol=1e-12, atol=1e-12)


def test_edm_discretization_end_points_and_order():
    sigmas = EDMDiscretization(0.002, 80.0, 7.0)(18, do_append_zero=False)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 18
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-1].item() == pytest.approx(0.002)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    flipped = EDMDiscretization()(5, do_append_zero=True, flip=True)
    assert flipped[0] == 0 and bool((flipped[1:] > flipped[:-1]).all())


def test_legacy_ddpm_sigmas_are_the_ddpm_noise_to_signal_ratios():
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of the CompVis linear schedule, all 1000 of them."""
    alpha_bar = torch.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012), 0)
    sigmas = LegacyDDPMDiscretization()(1000, do_append_zero=False, flip=True)
    torch.testing.assert_close(sigmas, ((1 - alpha_bar) / alpha_bar).sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 7, 50, 999])
def test_legacy_ddpm_subsampled_timesteps(n):
    """The kept timesteps are numpy's linspace(T - 1, 0, n, endpoint=False) truncated, increasing."""
    discretization = LegacyDDPMDiscretization(num_timesteps=1000)
    expected = np.linspace(999, 0, n, endpoint=False).astype(int)[::-1].copy()
    np.testing.assert_array_equal(discretization.timesteps(n).numpy(), expected)
    alpha_bar = discretization.alphas_cumprod[torch.from_numpy(expected)]
    torch.testing.assert_close(discretization(n)[:-1], ((1 - alpha_bar) / alpha_bar).sqrt().flip(0))


def test_bad_discretization_arguments():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMDiscretization(1.0, 0.5)
    with pytest.raises(ValueError, match=">= 1"):
        EDMDiscretization()(0)
    with pytest.raises(ValueError, match="1001 noise levels"):
        LegacyDDPMDiscretization()(1001)
