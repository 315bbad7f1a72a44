import pytest
import torch

from ldm.models.diffusion.edm.denoiser import DiscreteDenoiser, Denoiser
from ldm.models.diffusion.edm.scalings import EDMScaling, EpsScaling, VScaling, VScalingWithEDMcNoise
from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.models.diffusion.schedules import make_beta_schedule

SIGMAS = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
EDM = "ldm.models.diffusion.edm.scalings."
LEGACY = {"target": "ldm.models.diffusion.edm.discretization.LegacyDDPMDiscretization"}


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_scaling_table_1(sigma_data):
    """Table 1's EDM column, and the properties it was derived from (Appendix B.6): unit-variance network inputs
    c_in^2 (sigma^2 + sigma_data^2) = 1 and unit-variance training targets, c_skip^2 + ... i.e. the target
    (x0 - c_skip x) / c_out of x = x0 + sigma n has variance ((1 - c_skip)^2 sigma_data^2 + c_skip^2 sigma^2) / c_out^2
    = 1, minimised over c_skip by the table's value."""
    c_skip, c_out, c_in, c_noise = EDMScaling(sigma_data)(SIGMAS)
    assert c_skip.dtype == torch.float64
    s2, d2 = SIGMAS ** 2, sigma_data ** 2
    torch.testing.assert_close(c_skip, d2 / (s2 + d2), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_out, SIGMAS * sigma_data / (s2 + d2).sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4, rtol=1e-14, atol=0)
    torch.testing.assert_close(c_in ** 2 * (s2 + d2), torch.ones_like(SIGMAS), rtol=1e-14, atol=0)
    target_variance = ((1 - c_skip) ** 2 * d2 + c_skip ** 2 * s2) / c_out ** 2
    torch.testing.assert_close(target_variance, torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    derivative = -2 * (1 - c_skip) * d2 + 2 * c_skip * s2  # d/dc_skip of the target variance's numerator
    torch.testing.assert_close(derivative, torch.zeros_like(SIGMAS), rtol=0, atol=1e-12)


def test_eps_and_v_scalings_table_1():
    c_skip, c_out, c_in, c_noise = EpsScaling()(SIGMAS)
    assert bool((c_skip == 1).all()) and torch.equal(c_out, -SIGMAS) and torch.equal(c_noise, SIGMAS)
    torch.testing.assert_close(c_in, (1 + SIGMAS ** 2) ** -0.5, rtol=1e-14, atol=0)
    v_skip, v_out, v_in, v_noise = VScaling()(SIGMAS)
    edm_skip, edm_out, edm_in, _ = EDMScaling(1.0)(SIGMAS)  # v prediction is EDM preconditioning at sigma_data = 1,
    torch.testing.assert_close(v_skip, edm_skip, rtol=1e-14, atol=0)  # with the output's sign flipped (v = -F)
    torch.testing.assert_close(v_out, -edm_out, rtol=1e-14, atol=0)
    torch.testing.assert_close(v_in, edm_in, rtol=1e-14, atol=0)
    assert torch.equal(v_noise, SIGMAS)
    *same, c_noise = VScalingWithEDMcNoise()(SIGMAS)
    for mine, reference in zip(same, (v_skip, v_out, v_in)):
        assert torch.equal(mine, reference)
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4, rtol=1e-14, atol=0)


def _network(x_in, c_noise, cond):
    """A fixed nonlinear 'network' of its input and noise input: what the denoiser sees, it passes on."""
    return torch.sin(3 * x_in) + 1e-3 * c_noise.to(x_in.dtype).view(-1, *[1] * (x_in.ndim - 1)) + cond


@pytest.mark.parametrize("parameterization, scaling", [("eps", "EpsScaling"), ("v", "VScaling")])
@pytest.mark.parametrize("shape", [(4, 2, 3, 3), (4, 1, 2, 3, 3)])
def test_discrete_denoiser_is_the_ddpm_x0_estimate(parameterization, scaling, shape):
    """At sigma_t of the DDPM schedule, D(x0 + sigma_t n; sigma_t) = the x0 that GaussianDiffusion reads from the same
    network's output at x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) n and timestep t, in float64."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    denoiser = DiscreteDenoiser({"target": EDM + scaling}, 1000, LEGACY)
    sigma = denoiser.sigmas[t]
    x = x0 + sigma.view(-1, *[1] * (len(shape) - 1)) * noise
    denoised = denoiser(_network, x, sigma, 0.25)

    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000, 0.00085, 0.012), parameterization)
    alpha_bar = diffusion.alpha_bar(t, len(shape))
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    output = _network(x_t, t, 0.25)
    if parameterization == "eps":
        expected = (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    else:
        expected = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    torch.testing.assert_close(denoised, expected, rtol=1e-10, atol=1e-10)
    # The float32 path of GaussianDiffusion itself agrees to float32 precision.
    x0_hat, _ = diffusion.predict(x_t.float(), t, output.float())
    torch.testing.assert_close(denoised.float(), x0_hat, rtol=1e-4, atol=1e-4)


def test_discrete_denoiser_rounds_sigma_to_the_nearest_level_and_passes_its_index():
    denoiser = DiscreteDenoiser({"target": EDM + "EpsScaling"}, 1000, LEGACY)
    seen = {}

    def network(x_in, c_noise, cond):
        seen["c_noise"] = c_noise
        return torch.zeros_like(x_in)

    levels = denoiser.sigmas
    between = torch.stack([levels[3] * 0.9 + levels[4] * 0.1, levels[700] * 0.2 + levels[701] * 0.8])
    denoiser(network, torch.zeros(2, 1, 2, 2, dtype=torch.float64), between, None)
    assert seen["c_noise"].tolist() == [3, 701] and seen["c_noise"].dtype == torch.int64
    assert torch.equal(denoiser.possibly_quantize_sigma(between), levels[[3, 701]])
    assert denoiser.sigmas.dtype == torch.float64
    assert denoiser.to(torch.bfloat16).sigmas.dtype == torch.float64  # a table, not a buffer cast with the weights


def test_continuous_edm_denoiser_is_exact_for_gaussian_data():
    """For data N(0, sigma_data^2), the ideal denoiser is sigma_data^2 / (sigma^2 + sigma_data^2) x = c_skip x: with
    EDM preconditioning the network's ideal output is 0 at every sigma."""
    denoiser = Denoiser({"target": EDM + "EDMScaling", "params": {"sigma_data": 0.7}})
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    denoised = denoiser(lambda x_in, c_noise, cond: torch.zeros_like(x_in), x, SIGMAS, None)
    torch.testing.assert_close(denoised, 0.49 / (SIGMAS ** 2 + 0.49).view(-1, 1, 1, 1) * x)


def test_unknown_scaling_is_a_config_error_naming_it():
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="EpsScalng"):
        Denoiser({"target": EDM + "EpsScalng"})
