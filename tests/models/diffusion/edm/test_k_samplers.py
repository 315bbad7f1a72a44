import pytest
import torch

from ldm.models.diffusion.edm import k_samplers
from ldm.models.diffusion.edm.brownian import BrownianTreeNoiseSampler
from ldm.models.diffusion.edm.discretization import EDMDiscretization
from tests.models.diffusion.edm.reference import default_float64, k_sampling

MEAN, STD = 0.3, 0.5  # the Gaussian data of the analytic tests


def nonlinear_denoiser(x, sigma, scale=1.0):
    """A smooth stand-in denoiser with x- and sigma-dependence, so that every solver coefficient matters."""
    s = sigma.view(-1, *[1] * (x.ndim - 1))
    return scale * torch.tanh(x / (1 + s)) * (0.7 + 0.1 * torch.cos(s)) + 0.05 * x.mean(dim=tuple(range(1, x.ndim)),
                                                                                         keepdim=True)


def gaussian_denoiser(x, sigma):
    """The exact D(x; sigma) = E[x0 | x0 + sigma n = x] for x0 ~ N(MEAN, STD^2)."""
    s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
    return MEAN + STD ** 2 / (STD ** 2 + s2) * (x - MEAN)


def _noise_sampler(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda x: (lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, dtype=x.dtype))


CASES = [("euler", {}), ("euler", {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}),
         ("heun", {}), ("heun", {"s_churn": 40.0, "s_noise": 1.0}), ("euler_ancestral", {"eta": 1.0}),
         ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}), ("dpmpp_2s_ancestral", {"eta": 1.0}),
         ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_2m", {}), ("lms", {}), ("lms", {"order": 2}),
         ("dpm_2", {}), ("dpm_2", {"s_churn": 20.0, "s_noise": 1.003}), ("dpm_2_ancestral", {"eta": 1.0}),
         ("dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9})]
SDE_CASES = [("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.5, "s_noise": 0.9, "r": 0.3}), ("dpmpp_sde", {"eta": 0.0}),
             ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}),
             ("dpmpp_2m_sde", {"eta": 0.4, "s_noise": 1.1, "solver_type": "heun"}), ("dpmpp_2m_sde", {"eta": 0.0}),
             ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.3, "s_noise": 0.9}), ("dpmpp_3m_sde", {"eta": 0.0})]


@pytest.mark.parametrize("name, options", CASES + SDE_CASES)
@pytest.mark.parametrize("append_zero", [True, False])
def test_trajectories_equal_k_diffusion(name, options, append_zero):
    """Same denoiser, sigmas and noise in float64: every step's x and denoised equal k-diffusion's (atol 1e-6). The
    SDE solvers draw from a Brownian tree of the same seed (ours against k-diffusion's), the others from one stream."""
    reference_module = k_sampling()
    sigmas = EDMDiscretization(0.01, 20.0, 7.0)(12, do_append_zero=append_zero)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20.0
    trajectories = []
    trees = (BrownianTreeNoiseSampler, reference_module.BrownianTreeNoiseSampler)
    for sampler, tree in zip((getattr(k_samplers, f"sample_{name}"), getattr(reference_module, f"sample_{name}")),
                             trees):
        steps = []
        kwargs = dict(options)
        if (name, options) in SDE_CASES:
            kwargs["noise_sampler"] = tree(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=5)
        elif "eta" in options:
            kwargs["noise_sampler"] = _noise_sampler(1)(x)
        torch.manual_seed(2)  # the churn noise of euler / heun comes from the global generator in both
        with default_float64():
            out = sampler(nonlinear_denoiser, x.clone(), sigmas, extra_args={"scale": 1.5},
                          callback=lambda step: steps.append((step["x"].clone(), step["denoised"].clone())),
                          disable=True, **kwargs)
        trajectories.append((out, steps))
    (out, steps), (reference, reference_steps) = trajectories
    assert len(steps) == len(reference_steps) == len(sigmas) - 1
    for (x_i, d_i), (x_ref, d_ref) in zip(steps, reference_steps):
        torch.testing.assert_close(x_i, x_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(d_i, d_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("lms", 2),
                                         ("dpmpp_2s_ancestral", 2), ("dpm_2", 2), ("dpm_2_ancestral", 2),
                                         ("dpmpp_sde", 2), ("dpmpp_2m_sde", 2)])
def test_deterministic_solvers_converge_to_the_exact_flow(name, order):
    """For Gaussian data the probability-flow ODE is solved in closed form: x - MEAN grows as sqrt(STD^2 + sigma^2),
    so x(0) = MEAN + (x(sigma_max) - MEAN) STD / sqrt(STD^2 + sigma_max^2) for every start. Doubling the steps
    divides the error by about 2^order (lms, of order 4 with a first-order start, does better than 2)."""
    sigma_max = 80.0
    start = MEAN + torch.linspace(-3, 3, 64, dtype=torch.float64).view(64, 1, 1, 1) * (STD ** 2 + sigma_max ** 2) ** 0.5
    exact = MEAN + (start - MEAN) * STD / (STD ** 2 + sigma_max ** 2) ** 0.5
    options = {"eta": 0.0} if "ancestral" in name or "sde" in name else {}
    errors = []
    for steps in (40, 80):
        sigmas = EDMDiscretization(0.002, sigma_max, 7.0)(steps)
        out = getattr(k_samplers, f"sample_{name}")(gaussian_denoiser, start, sigmas, disable=True, **options)
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.06 / 2 ** (order - 1)
    assert errors[0] / errors[1] > 0.85 * 2 ** order


def test_third_order_multistep_beats_second_order():
    """DPM-Solver++(3M) without noise against (2M) on the exact Gaussian flow: its extrapolation from three
    denoised values makes it several times more accurate at every step count (its convergence ratio is irregular:
    two lower-order start steps and the last step to sigma = 0, which returns D, take part of the error)."""
    sigma_max = 80.0
    start = MEAN + torch.linspace(-3, 3, 64, dtype=torch.float64).view(64, 1, 1, 1) * (STD ** 2 + sigma_max ** 2) ** 0.5
    exact = MEAN + (start - MEAN) * STD / (STD ** 2 + sigma_max ** 2) ** 0.5
    for steps in (20, 40, 80):
        sigmas = EDMDiscretization(0.002, sigma_max, 7.0)(steps)
        third = k_samplers.sample_dpmpp_3m_sde(gaussian_denoiser, start, sigmas, disable=True, eta=0.0)
        second = k_samplers.sample_dpmpp_2m(gaussian_denoiser, start, sigmas, disable=True)
        assert (third - exact).abs().max() < (second - exact).abs().max() / 3


@pytest.mark.parametrize("name, options, steps", [("euler", {"s_churn": 30.0}, 800), ("heun", {"s_churn": 30.0}, 100),
                                                  ("euler_ancestral", {}, 800), ("dpmpp_2s_ancestral", {}, 100),
                                                  ("dpmpp_2m", {}, 100), ("lms", {}, 100),
                                                  ("dpm_2", {"s_churn": 30.0}, 100), ("dpm_2_ancestral", {}, 100),
                                                  ("dpmpp_sde", {}, 30), ("dpmpp_2m_sde", {}, 100),
                                                  ("dpmpp_2m_sde", {"solver_type": "heun"}, 100),
                                                  ("dpmpp_3m_sde", {}, 100)])
def test_samples_have_the_data_mean_and_variance(name, options, steps):
    """Gaussian data N(MEAN, STD^2) from noise N(MEAN, STD^2 + sigma_max^2): 20k samples' mean and std (first-order
    solvers get more steps: their bias on the std is about 4 / steps). dpmpp_sde draws its default Brownian noise
    (its two draws per step are increments over overlapping intervals); the multistep SDE solvers' one draw per step
    covers disjoint intervals, whose Brownian increments are independent, so plain draws stand in (a Brownian tree
    over 20k samples costs seconds)."""
    torch.manual_seed(0)
    sigmas = EDMDiscretization(0.002, 80.0, 7.0)(steps)
    x = MEAN + torch.randn(20_000, 1, 1, 1, dtype=torch.float64) * (STD ** 2 + 80.0 ** 2) ** 0.5
    if name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        options = {**options, "noise_sampler": lambda sigma, sigma_next: torch.randn_like(x)}
    out = getattr(k_samplers, f"sample_{name}")(gaussian_denoiser, x, sigmas, disable=True, **options)
    assert out.mean().item() == pytest.approx(MEAN, abs=0.015)
    assert out.std().item() == pytest.approx(STD, rel=0.03)


def test_ancestral_step_lands_at_the_next_level():
    sigma_from, sigma_to = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    for eta in (0.0, 0.3, 1.0):
        down, up = k_samplers.get_ancestral_step(sigma_from, sigma_to, eta)
        assert (down ** 2 + up ** 2).item() == pytest.approx(0.49)
    down, up = k_samplers.get_ancestral_step(sigma_from, sigma_to, 1.0)  # DDPM posterior: up^2 = s^2 (1 - s^2 / t^2)
    assert (up ** 2).item() == pytest.approx(0.49 * (1 - 0.49 / 4))
