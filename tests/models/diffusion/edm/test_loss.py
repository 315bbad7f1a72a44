import pytest
import torch

from ldm.models.diffusion.edm.denoiser import Denoiser, DiscreteDenoiser
from ldm.models.diffusion.edm.loss import StandardDiffusionLoss
from ldm.models.diffusion.edm.loss_weighting import EDMWeighting, EpsWeighting, UnitWeighting, VWeighting
from ldm.models.diffusion.edm.scalings import EDMScaling
from ldm.models.diffusion.edm.sigma_sampling import DiscreteSampling, EDMSampling
from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion, sample_noise
from ldm.models.diffusion.schedules import make_beta_schedule

EDM = "ldm.models.diffusion.edm."
LEGACY = {"target": EDM + "discretization.LegacyDDPMDiscretization"}
SIGMAS = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)


def test_weightings():
    torch.testing.assert_close(UnitWeighting()(SIGMAS), torch.ones_like(SIGMAS))
    torch.testing.assert_close(EpsWeighting()(SIGMAS), 1 / SIGMAS ** 2, rtol=1e-14, atol=0)
    torch.testing.assert_close(VWeighting()(SIGMAS), (SIGMAS ** 2 + 1) / SIGMAS ** 2, rtol=1e-14, atol=0)
    for sigma_data in (0.5, 2.0):  # Table 1: lambda = 1 / c_out^2
        c_out = EDMScaling(sigma_data)(SIGMAS)[1]
        torch.testing.assert_close(EDMWeighting(sigma_data)(SIGMAS), c_out ** -2, rtol=1e-13, atol=0)


def test_edm_sampling_is_log_normal():
    sigma = EDMSampling(-1.2, 1.2)(200_000, generator=torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)


def test_discrete_sampling_draws_every_level_uniformly():
    sampler = DiscreteSampling(LEGACY, num_idx=10)
    sigma = sampler(50_000, generator=torch.Generator().manual_seed(0))
    levels = sampler.sigmas.float()
    index = (sigma[:, None] - levels[None]).abs().argmin(1)
    torch.testing.assert_close(levels[index], sigma)
    counts = torch.bincount(index, minlength=10).float() / len(sigma)
    torch.testing.assert_close(counts, torch.full((10,), 0.1), rtol=0, atol=0.01)


def _network(x_in, c_noise, cond):
    return 0.5 * x_in - 1e-3 * c_noise.to(x_in.dtype).view(-1, *[1] * (x_in.ndim - 1))


@pytest.mark.parametrize("parameterization, scaling, weighting", [("eps", "EpsScaling", "EpsWeighting"),
                                                                  ("v", "VScaling", "VWeighting")])
@pytest.mark.parametrize("loss_type, offset", [("l2", 0.0), ("l1", 0.0), ("l2", 0.3)])
def test_discrete_loss_is_the_ddpm_loss(parameterization, scaling, weighting, loss_type, offset):
    """DiscreteSampling + DiscreteDenoiser with the matching weighting: lambda ||D - x0||^2 is the DDPM loss of the
    same network output on eps / v (in L2; L1 is ||D - x0||_1 weighted the same way)."""
    shape = (5, 2, 4, 4)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    loss_fn = StandardDiffusionLoss({"target": EDM + "sigma_sampling.DiscreteSampling",
                                     "params": {"discretization_config": LEGACY, "num_idx": 1000}},
                                    {"target": EDM + "loss_weighting." + weighting}, loss_type, offset)
    denoiser = DiscreteDenoiser({"target": EDM + "scalings." + scaling}, 1000, LEGACY)
    loss = loss_fn(_network, denoiser, None, x0, torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (5,), generator=generator)
    noise = sample_noise(x0, offset, generator)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000, 0.00085, 0.012), parameterization)
    output = _network(diffusion.q_sample(x0, t, noise), t, None)
    if loss_type == "l2":
        expected = diffusion.training_loss(output, x0, noise, t, "l2")
    else:
        sigma = denoiser.sigmas[t].float().view(-1, 1, 1, 1)
        x0_hat, _ = diffusion.predict(diffusion.q_sample(x0, t, noise), t, output)
        expected = (loss_fn.loss_weighting(sigma) * (x0_hat - x0).abs()).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=1e-5)


def test_edm_loss_is_unit_weighted_on_the_network_target():
    """Karras et al. eq. 8: lambda ||D - x0||^2 = ||F - (x0 - c_skip x) / c_out||^2 with lambda = 1 / c_out^2."""
    x0 = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    loss_fn = StandardDiffusionLoss({"target": EDM + "sigma_sampling.EDMSampling"},
                                    {"target": EDM + "loss_weighting.EDMWeighting", "params": {"sigma_data": 0.5}})
    denoiser = Denoiser({"target": EDM + "scalings.EDMScaling", "params": {"sigma_data": 0.5}})
    seen = {}

    def network(x_in, c_noise, cond):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.cos(x_in)

    loss = loss_fn(network, denoiser, None, x0, torch.Generator().manual_seed(3))
    sigma = (4 * seen["c_noise"]).exp().view(-1, 1, 1, 1)
    c_skip, c_out, c_in, _ = EDMScaling(0.5)(sigma)
    x = seen["x_in"] / c_in
    expected = ((torch.cos(seen["x_in"]) - (x0 - c_skip * x) / c_out) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="loss_type: 'l3'"):
        StandardDiffusionLoss({"target": EDM + "sigma_sampling.EDMSampling"}, None, "l3")
    with pytest.raises(ValueError, match="p_std"):
        EDMSampling(0.0, 0.0)
