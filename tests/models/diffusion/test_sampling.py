import numpy as np
import pytest
import torch

from ldm.models.diffusion.conditioning import Conditioning, classifier_free_guidance
from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.models.diffusion.sampling import get_sampler, sample_ddim, sample_ddpm, timestep_schedule
from ldm.models.diffusion.schedules import make_beta_schedule, rescale_zero_terminal_snr

T = 1000
MU, STD = 0.5, 0.3  # the data distribution N(MU, STD^2), per element


def analytic_model(diffusion: GaussianDiffusion):
    """The exact network for data ~ N(MU, STD^2): E[x0 | x_t] and E[eps | x_t] in closed form, output in the
    diffusion's parameterization."""
    def model(x_t, t):
        a = diffusion.alpha_bar(t, x_t.ndim)
        variance = a * STD ** 2 + 1 - a
        centred = x_t.double() - a.sqrt() * MU
        x0 = MU + a.sqrt() * STD ** 2 * centred / variance
        eps = (1 - a).sqrt() * centred / variance
        output = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[diffusion.parameterization]
        return output.float()
    return model


def _diffusion(parameterization: str, zero_snr: bool = False) -> GaussianDiffusion:
    betas = make_beta_schedule("linear", T, 0.0015, 0.0195)
    return GaussianDiffusion(rescale_zero_terminal_snr(betas) if zero_snr else betas, parameterization)


def _draws(spatial, seed=0) -> torch.Tensor:
    return torch.randn(2_000, 1, *spatial, generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("single_thread")


def ancestral_moments(alpha_bars: list[float]) -> tuple[float, float]:
    """Mean and std of ancestral samples for data ~ N(MU, STD^2), visiting `alpha_bars` (then clean data).

    Each step is linear-Gaussian: x_s = c_x0 E[x0 | x_t] + c_xt x_t + N(0, 1 / precision), with the posterior from
    Bayes' rule (prior N(sqrt(ab_s) x0, 1 - ab_s), likelihood N(x_t; sqrt(ab_t / ab_s) x_s, 1 - ab_t / ab_s)).
    """
    mean, variance = 0.0, 1.0
    for a_t, a_s in zip(alpha_bars, alpha_bars[1:] + [1.0]):
        a_ts = a_t / a_s
        if a_s == 1.0:
            c_x0, c_xt, noise_var = 1.0, 0.0, 0.0
        else:
            precision = 1 / (1 - a_s) + a_ts / (1 - a_ts)
            c_x0, c_xt = a_s ** 0.5 / (1 - a_s) / precision, a_ts ** 0.5 / (1 - a_ts) / precision
            noise_var = 1 / precision
        k = a_t ** 0.5 * STD ** 2 / (a_t * STD ** 2 + 1 - a_t)  # E[x0 | x_t] = MU + k (x_t - sqrt(a_t) MU)
        gain = c_x0 * k + c_xt
        mean = c_x0 * (MU - k * a_t ** 0.5 * MU) + gain * mean
        variance = gain ** 2 * variance + noise_var
    return mean, variance ** 0.5


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("spatial", [(2, 2), (2, 2, 2)])
@pytest.mark.parametrize("steps", [T, 50])
def test_ancestral_sampling_follows_the_exact_reverse_moments(parameterization, spatial, steps):
    """DDPM samples have the moments of the exact recursion; over all T steps that is the data distribution, up to
    the ~3 % too small std of the posterior-variance choice (Ho et al.'s beta-tilde) for data with STD < 1."""
    diffusion = _diffusion(parameterization)
    timesteps = timestep_schedule(T, steps)
    expected_mean, expected_std = ancestral_moments(diffusion.alphas_cumprod[timesteps].tolist())
    x_T = _draws(spatial)
    samples = sample_ddpm(analytic_model(diffusion), x_T, timesteps, diffusion,
                          generator=torch.Generator().manual_seed(1))
    assert samples.shape == x_T.shape and samples.dtype == torch.float32
    assert samples.mean().item() == pytest.approx(expected_mean, abs=0.01)
    assert samples.std().item() == pytest.approx(expected_std, rel=0.03)
    if steps == T:
        assert (expected_mean, expected_std) == pytest.approx((MU, STD), rel=0.04)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("spatial", [(2, 2), (2, 2, 2)])
def test_deterministic_ddim_over_all_steps_reaches_the_data_distribution(parameterization, spatial):
    diffusion = _diffusion(parameterization)
    samples = sample_ddim(analytic_model(diffusion), _draws(spatial), timestep_schedule(T, T), diffusion)
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    # Sampling error of the std is ~1 %; Euler's discretisation error is 1.6 % at 1000 steps.
    assert samples.std().item() == pytest.approx(STD, rel=0.04)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["uniform", "quad"])
def test_few_step_ddim_is_euler_on_the_probability_flow_ode(parameterization, spacing):
    """Deterministic DDIM is Euler's method on dx/dsigma = eps(x), x = x_t / sqrt(alpha_bar), sigma = sqrt(1 / alpha_bar
    - 1) (Karras et al. 2022). For Gaussian data eps = sigma (x - MU) / (STD^2 + sigma^2), so every Euler step scales
    x - MU by 1 + (sigma_next - sigma) sigma / (STD^2 + sigma^2): each sample is an affine function of its x_T."""
    diffusion = _diffusion(parameterization)
    timesteps = timestep_schedule(T, 50, spacing)
    alpha_bar = torch.cat([diffusion.alphas_cumprod[timesteps], torch.ones(1, dtype=torch.float64)])
    sigmas = (1 / alpha_bar - 1).sqrt().tolist()
    gain = 1.0
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        gain *= 1 + (sigma_next - sigma) * sigma / (STD ** 2 + sigma ** 2)
    x_T = _draws((2, 2, 2))
    samples = sample_ddim(analytic_model(diffusion), x_T, timesteps, diffusion, eta=0.0)
    torch.testing.assert_close(samples, MU + gain * (x_T / alpha_bar[0].sqrt().item() - MU), rtol=1e-3, atol=1e-4)
    assert gain / alpha_bar[0].sqrt().item() == pytest.approx(STD, rel=0.15)  # and 50 steps are close to the data


def _exact_flow(x_T: torch.Tensor, alpha_bar_T: float, alpha_bar_end: float) -> torch.Tensor:
    """The probability-flow ODE solution at alpha_bar_end from x_T: x / sqrt(alpha_bar) - MU grows like
    sqrt(STD^2 + sigma^2), sigma^2 = 1 / alpha_bar - 1."""
    sigma_sq_T, sigma_sq_end = 1 / alpha_bar_T - 1, 1 / alpha_bar_end - 1
    scale = ((STD ** 2 + sigma_sq_end) / (STD ** 2 + sigma_sq_T)) ** 0.5
    return alpha_bar_end ** 0.5 * (MU + (x_T / alpha_bar_T ** 0.5 - MU) * scale)


def _log_snr_uniform(diffusion: GaussianDiffusion, steps: int, end: int) -> torch.Tensor:
    """About `steps` intervals evenly spaced in lambda = log(sqrt(alpha_bar / (1 - alpha_bar))) from T - 1 to `end`."""
    alpha_bar = diffusion.alphas_cumprod
    lam = 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))
    targets = torch.linspace(lam[-1].item(), lam[end].item(), steps + 1)
    return torch.stack([(lam - target).abs().argmin() for target in targets]).unique().flip(0)


def test_convergence_orders_of_ddim_and_dpmpp_2m():
    """Halving the step in lambda halves DDIM's error (first order) and quarters DPM-Solver++(2M)'s (second order).
    The state after the step that lands on t = 50 is compared with the exact ODE solution there."""
    diffusion, end = _diffusion("eps"), 50
    x_T = _draws((2, 2))
    errors = {"ddim": [], "dpmpp_2m": []}
    for steps in (20, 40):
        timesteps = _log_snr_uniform(diffusion, steps, end)
        exact = _exact_flow(x_T, diffusion.alphas_cumprod[timesteps[0]].item(), diffusion.alphas_cumprod[end].item())
        for name, found in errors.items():
            states = {}
            get_sampler(name)(analytic_model(diffusion), x_T, timesteps, diffusion,
                              callback=lambda step: states.__setitem__(step["i"], step["x"]))
            found.append((states[len(timesteps) - 2] - exact).abs().max().item())
    assert errors["ddim"][0] / errors["ddim"][1] == pytest.approx(2.0, rel=0.15)
    assert errors["dpmpp_2m"][0] / errors["dpmpp_2m"][1] == pytest.approx(4.0, rel=0.2)
    assert errors["dpmpp_2m"][1] < errors["ddim"][1] / 10


@pytest.mark.parametrize("spatial", [(2, 2), (2, 2, 2)])
def test_plms_is_far_more_accurate_than_ddim_for_the_same_steps(spatial):
    diffusion = _diffusion("eps")
    timesteps = timestep_schedule(T, 50)
    x_T = _draws(spatial)
    exact = _exact_flow(x_T, diffusion.alphas_cumprod[timesteps[0]].item(), 1.0)
    ddim = sample_ddim(analytic_model(diffusion), x_T, timesteps, diffusion)
    plms = get_sampler("plms")(analytic_model(diffusion), x_T, timesteps, diffusion)
    assert plms.std().item() == pytest.approx(exact.std().item(), rel=0.02)
    assert plms.mean().item() == pytest.approx(MU, abs=0.01)
    assert abs(ddim.std().item() / exact.std().item() - 1) > 0.1


@pytest.mark.parametrize("name", ["ddim", "plms", "dpmpp_2m"])
def test_deterministic_samplers_do_not_depend_on_the_parameterization(name):
    timesteps = timestep_schedule(T, 20)
    x_T = _draws((2, 2, 2))[:64]
    outputs = [get_sampler(name)(analytic_model(_diffusion(p)), x_T, timesteps, _diffusion(p)) for p in ("eps", "x0", "v")]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs[2], outputs[0], atol=1e-4, rtol=1e-4)


def test_zero_terminal_snr_with_trailing_steps():
    diffusion = _diffusion("v", zero_snr=True)
    samples = sample_ddim(analytic_model(diffusion), _draws((2, 2)), timestep_schedule(T, T, "trailing"), diffusion,
                          generator=torch.Generator().manual_seed(1), eta=1.0)
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    assert samples.std().item() == pytest.approx(STD, rel=0.03)
    # DPM-Solver++ starts from alpha_bar = 0 too (lambda = -inf: its first step is exact); PLMS cannot.
    x_T, timesteps, states = _draws((2, 2)), timestep_schedule(T, 100, "trailing"), {}
    get_sampler("dpmpp_2m")(analytic_model(diffusion), x_T, timesteps, diffusion,
                            callback=lambda step: states.__setitem__(step["i"], step["x"]))
    exact = _exact_flow(x_T.double(), 1e-300, diffusion.alphas_cumprod[timesteps[-1]].item())
    torch.testing.assert_close(states[len(timesteps) - 2].double(), exact, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="plms cannot start at alpha_bar = 0"):
        get_sampler("plms")(analytic_model(diffusion), x_T, timestep_schedule(T, 20, "trailing"), diffusion)


def test_timestep_tables_match_the_papers_code():
    """DDIM's code: seq = range(0, T, T // steps); quad: (linspace(0, sqrt(0.8 T), steps) ** 2).astype(int);
    trailing (Lin et al. 2024, Table 2): round(arange(T, 0, -T / steps)) - 1."""
    assert timestep_schedule(T, 50).tolist() == list(range(0, T, 20))[::-1]
    quad = np.unique((np.linspace(0, np.sqrt(T * 0.8), 50) ** 2).astype(int))  # its repeats at 0 dropped
    assert timestep_schedule(T, 50, "quad").tolist() == quad.tolist()[::-1]
    trailing = (np.round(np.arange(T, 0, -T / 50)) - 1).astype(int)
    assert timestep_schedule(T, 50, "trailing").tolist() == trailing.tolist()
    assert timestep_schedule(T, T).tolist() == list(range(T))[::-1]
    with pytest.raises(ValueError, match="steps must be in"):
        timestep_schedule(T, 0)
    with pytest.raises(ValueError, match="spacing 'log'"):
        timestep_schedule(T, 10, "log")


def test_ddim_is_deterministic_and_calls_the_model_once_per_step():
    diffusion = _diffusion("eps")
    model = analytic_model(diffusion)
    calls = []
    x_T = torch.randn(4, 1, 2, 2, 2)
    first = sample_ddim(model, x_T, timestep_schedule(T, 10), diffusion, callback=calls.append)
    second = sample_ddim(model, x_T, timestep_schedule(T, 10), diffusion)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert [c["i"] for c in calls] == list(range(10))
    assert [int(c["t"][0]) for c in calls] == timestep_schedule(T, 10).tolist()
    torch.testing.assert_close(first, calls[-1]["x0"])  # the last step lands on the x0 prediction


def test_ddpm_and_ddim_eta1_draw_the_same_noise_path():
    """With eta = 1 the DDIM step's variance is the posterior's and its mean is the posterior mean, so both
    samplers give the same result for the same generator."""
    diffusion = _diffusion("x0")
    x_T = torch.randn(8, 1, 3, 3)
    steps = timestep_schedule(T, 20)
    ddpm = sample_ddpm(analytic_model(diffusion), x_T, steps, diffusion, generator=torch.Generator().manual_seed(3))
    ddim = sample_ddim(analytic_model(diffusion), x_T, steps, diffusion, generator=torch.Generator().manual_seed(3),
                       eta=1.0)
    torch.testing.assert_close(ddpm, ddim, atol=1e-4, rtol=1e-4)


def test_timesteps_must_decrease_and_sampler_names():
    diffusion = _diffusion("eps")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_ddim(analytic_model(diffusion), torch.randn(1, 1, 2, 2), torch.tensor([1, 5]), diffusion)
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm, ddim, plms, dpmpp_2m"):
        get_sampler("euler")


def test_classifier_free_guidance():
    """scale 1 is the conditional model alone; otherwise uncond + scale * (cond - uncond) from one batched call."""
    batch_sizes = []

    def model(x, t, cond):
        batch_sizes.append(len(x))
        return x + cond.context[:, 0, :1, None, None]
    cond, uncond = Conditioning(context=torch.full((2, 1, 3), 2.0)), Conditioning(context=torch.zeros(2, 1, 3))
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 3])
    torch.testing.assert_close(classifier_free_guidance(model, cond, uncond, 1.0)(x, t), x + 2)
    torch.testing.assert_close(classifier_free_guidance(model, cond, uncond, 3.0)(x, t), x + 6)
    assert batch_sizes == [2, 4]
