import inspect

import pytest
import torch

from ldm.models.diffusion.edm import k_samplers
from ldm.models.diffusion.edm.guiders import IdentityGuider, VanillaCFG
from ldm.models.diffusion.edm.samplers import (ETA_SAMPLERS, SAMPLERS, DPMPP2MSampler, DPMPP2MSDESampler,
                                                DPMPPSDESampler, EulerEDMSampler)
from ldm.util import instantiate_from_config

EDM = "ldm.models.diffusion.edm."
DISCRETIZATION = {"target": EDM + "discretization.EDMDiscretization", "params": {"sigma_min": 0.01, "sigma_max": 10.0}}
OPTIONS = {"euler": {"s_churn": 10.0, "s_noise": 1.01}, "heun": {"s_churn": 5.0, "s_tmin": 0.1, "s_tmax": 5.0},
           "euler_ancestral": {"eta": 0.7, "s_noise": 0.95}, "dpmpp_2s_ancestral": {"eta": 0.5},
           "dpmpp_2m": {}, "lms": {"order": 3}, "dpm_2": {"s_churn": 5.0}, "dpm_2_ancestral": {"eta": 0.8},
           "dpmpp_sde": {"eta": 0.6, "s_noise": 1.02, "r": 0.4}, "dpmpp_2m_sde": {"eta": 0.9, "solver_type": "heun"},
           "dpmpp_3m_sde": {"eta": 0.5}}


def conditional_denoiser(x, sigma, cond):
    """A denoiser that shifts by the conditioning vector's mean: (B, C, H, W), (B,), {"vector": (B, V)}."""
    shift = cond["vector"].mean(dim=1).view(-1, 1, 1, 1)
    return torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1))) + shift


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_class_is_its_solver_on_the_discretization(name):
    """sampler(denoiser, x, cond) = the solver with the class's options, over discretization(num_steps) (then 0), from
    x sqrt(1 + sigma_0^2), on the conditional denoiser."""
    sampler = instantiate_from_config({"target": EDM + "samplers." + SAMPLERS[name].__name__,
                                       "params": {"num_steps": 7, "discretization_config": DISCRETIZATION,
                                                  **OPTIONS[name]}})
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    cond = {"vector": torch.tensor([[0.5, 1.5], [-1.0, 0.0]])}
    torch.manual_seed(3)
    out = sampler(conditional_denoiser, x, cond)
    sigmas = instantiate_from_config(DISCRETIZATION)(7).float()
    assert sigmas[-1] == 0 and len(sigmas) == 8
    torch.manual_seed(3)
    expected = getattr(k_samplers, f"sample_{name}")(lambda x, s: conditional_denoiser(x, s, cond),
                                                     x * (1 + sigmas[0] ** 2).sqrt(), sigmas, disable=True,
                                                     **OPTIONS[name])
    torch.testing.assert_close(out, expected)


def test_vanilla_cfg_combines_both_passes():
    cond, uncond = {"vector": torch.full((2, 3), 2.0)}, {"vector": torch.zeros(2, 3)}
    x, sigma = torch.randn(2, 1, 2, 2), torch.tensor([3.0, 0.5])
    calls = []

    def denoiser(x_in, s, c):
        calls.append(x_in.shape[0])
        return conditional_denoiser(x_in, s, c)

    guided = VanillaCFG(scale=4.0)(denoiser, cond, uncond)(x, sigma)
    d_c, d_u = conditional_denoiser(x, sigma, cond), conditional_denoiser(x, sigma, uncond)
    torch.testing.assert_close(guided, d_u + 4.0 * (d_c - d_u))
    assert calls == [4]  # one batched pass
    torch.testing.assert_close(IdentityGuider()(conditional_denoiser, cond, uncond)(x, sigma), d_c)


def test_guided_sampler_uses_the_guider():
    cond, uncond = {"vector": torch.ones(1, 2)}, {"vector": torch.zeros(1, 2)}
    x = torch.randn(1, 1, 2, 2)
    guided = DPMPP2MSampler(DISCRETIZATION, 5, {"target": EDM + "guiders.VanillaCFG", "params": {"scale": 3.0}})
    plain = DPMPP2MSampler(DISCRETIZATION, 5)
    def denoiser(x_in, sigma, c):  # D = the conditioning's mean everywhere; the last step to 0 lands on D
        return torch.zeros_like(x_in) + c["vector"].mean(dim=1).view(-1, 1, 1, 1)

    torch.testing.assert_close(guided(denoiser, x, cond, uncond), torch.full_like(x, 3.0))  # 0 + 3 (1 - 0)
    torch.testing.assert_close(plain(denoiser, x, cond), torch.full_like(x, 1.0))


def test_sampler_errors():
    with pytest.raises(ValueError, match="needs an unconditional conditioning"):
        VanillaCFG(2.0)(conditional_denoiser, {"vector": torch.ones(1, 2)}, None)
    with pytest.raises(ValueError, match="num_steps is not set"):
        EulerEDMSampler(discretization_config=DISCRETIZATION)(conditional_denoiser, torch.zeros(1, 1, 2, 2),
                                                              {"vector": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="num_steps: must be >= 1"):
        EulerEDMSampler(num_steps=0)
    with pytest.raises(ValueError, match="solver_type: must be 'midpoint' or 'heun', got 'rk4'"):
        DPMPP2MSDESampler(solver_type="rk4")
    with pytest.raises(ValueError, match=r"r: must be in \(0, 1\], got 1.5"):
        DPMPPSDESampler(r=1.5)


def test_eta_samplers_are_the_ones_whose_solver_takes_eta():
    """`sample.py --eta` is accepted exactly for the samplers whose solver has an eta parameter."""
    takes_eta = {name for name, cls in SAMPLERS.items() if "eta" in inspect.signature(cls.solver).parameters}
    assert set(ETA_SAMPLERS) == takes_eta
    assert {"euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"} <= takes_eta
