import pytest
import torch
from torch.nn import functional as F

from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion, sample_noise
from ldm.models.diffusion.schedules import make_beta_schedule, rescale_zero_terminal_snr

T = 1000
BETAS = make_beta_schedule("linear", T, 0.0015, 0.0195)
ALPHA_BAR = torch.cumprod(1 - BETAS, 0)


def _diffusion(parameterization: str = "eps") -> GaussianDiffusion:
    return GaussianDiffusion(BETAS, parameterization)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_mean_and_variance(t):
    """x_t | x0 ~ N(sqrt(alpha_bar_t) x0, 1 - alpha_bar_t), checked on 200k draws."""
    generator = torch.Generator().manual_seed(t)
    x0 = torch.full((200_000, 1), 0.7)
    x_t = _diffusion().q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=generator))
    a = ALPHA_BAR[t].item()
    assert x_t.mean().item() == pytest.approx(a ** 0.5 * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.03, abs=1e-4)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (3, 2, 4, 4, 4)])
def test_q_sample_uses_each_items_timestep(shape):
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0, 500, 999])
    x_t = _diffusion().q_sample(x0, t, noise)
    for b in range(3):
        a = ALPHA_BAR[t[b]].float()
        torch.testing.assert_close(x_t[b], a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b])


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("shape", [(6, 2, 4, 4), (6, 2, 2, 4, 4)])
def test_conversions_invert_each_other(parameterization, shape):
    diffusion = _diffusion(parameterization)
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    v = diffusion.get_v(x0, noise, t)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, t, x0), noise, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.predict_x0_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion.predict_eps_from_v(x_t, t, v), noise, atol=1e-5, rtol=1e-5)
    predicted_x0, predicted_eps = diffusion.predict(x_t, t, diffusion.target(x0, noise, t))
    torch.testing.assert_close(predicted_x0, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(predicted_eps, noise, atol=2e-4, rtol=1e-4)


def test_posterior_matches_bayes_rule_for_any_step_pair():
    """q(x_s | x_t, x0) from the prior N(sqrt(ab_s) x0, 1 - ab_s) times the likelihood
    N(x_t; sqrt(ab_t / ab_s) x_s, 1 - ab_t / ab_s)."""
    diffusion = _diffusion()
    t = torch.tensor([1, 10, 500, 999, 999])
    s = torch.tensor([0, 3, 480, 998, 0])
    x0, x_t = torch.randn(5, 1, 3, 3), torch.randn(5, 1, 3, 3)
    mean, variance = diffusion.posterior(x0, x_t, t, s)
    ab_t, ab_s = ALPHA_BAR[t].view(-1, 1, 1, 1), ALPHA_BAR[s].view(-1, 1, 1, 1)
    a_ts = ab_t / ab_s
    precision = 1 / (1 - ab_s) + a_ts / (1 - a_ts)
    expected_mean = (ab_s.sqrt() * x0.double() / (1 - ab_s) + a_ts.sqrt() * x_t.double() / (1 - a_ts)) / precision
    torch.testing.assert_close(variance.double(), 1 / precision, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-4, atol=1e-5)


def test_posterior_default_step_is_ho_et_al():
    """s = t - 1: variance beta_t (1 - ab_{t-1}) / (1 - ab_t); at t = 0 the posterior is x0 itself."""
    diffusion = _diffusion()
    t = torch.tensor([0, 1, 700])
    x0, x_t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    mean, variance = diffusion.posterior(x0, x_t, t)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ALPHA_BAR[:-1]])
    expected_var = BETAS * (1 - ab_prev) / (1 - ALPHA_BAR)
    coef_x0 = BETAS * ab_prev.sqrt() / (1 - ALPHA_BAR)
    coef_xt = (1 - ab_prev) * (1 - BETAS).sqrt() / (1 - ALPHA_BAR)
    torch.testing.assert_close(variance.flatten().double(), expected_var[t], rtol=1e-5, atol=0)
    expected_mean = coef_x0[t].view(-1, 1, 1, 1) * x0 + coef_xt[t].view(-1, 1, 1, 1) * x_t
    torch.testing.assert_close(mean, expected_mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean[0], x0[0])


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weighting_is_min_snr_times_x0_error(parameterization):
    """For x0_hat = x0 + delta, every parameterization's weighted loss is min(SNR, gamma) * mean(delta^2)."""
    diffusion, gamma = _diffusion(parameterization), 5.0
    x0, noise, delta = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8), 0.1 * torch.randn(4, 2, 8, 8)
    t = torch.tensor([5, 100, 400, 990])
    x_t = diffusion.q_sample(x0, t, noise)
    x0_hat = x0 + delta
    eps_hat = diffusion.predict_eps_from_x0(x_t, t, x0_hat)
    output = {"eps": eps_hat, "x0": x0_hat, "v": diffusion.get_v(x0_hat, eps_hat, t)}[parameterization]
    snr = ALPHA_BAR[t] / (1 - ALPHA_BAR[t])
    expected = snr.clamp(max=gamma).float() * delta.pow(2).flatten(1).mean(1)
    loss = diffusion.training_loss(output, x0, noise, t, "l2", snr_gamma=gamma)
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=1e-6)


def test_l1_and_l2_losses_match_torch():
    diffusion = _diffusion("eps")
    x0, noise, output = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4)
    t = torch.tensor([1, 2, 3])
    l2 = diffusion.training_loss(output, x0, noise, t, "l2")
    l1 = diffusion.training_loss(output, x0, noise, t, "l1")
    torch.testing.assert_close(l2, F.mse_loss(output, noise, reduction="none").flatten(1).mean(1))
    torch.testing.assert_close(l1, F.l1_loss(output, noise, reduction="none").flatten(1).mean(1))
    with pytest.raises(ValueError, match="loss_type: 'huber'"):
        diffusion.training_loss(output, x0, noise, t, "huber")


def test_offset_noise_adds_a_per_channel_constant():
    x = torch.zeros(2000, 3, 4, 4)
    noise = sample_noise(x, offset_noise=0.5, generator=torch.Generator().manual_seed(0))
    channel_means = noise.mean(dim=(2, 3))
    # Var of a channel mean: offset^2 + 1 / (4 * 4) from the white part.
    assert channel_means.var().item() == pytest.approx(0.25 + 1 / 16, rel=0.1)
    assert sample_noise(x, 0.0).mean(dim=(2, 3)).var().item() == pytest.approx(1 / 16, rel=0.1)


def test_eps_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="'eps' cannot be used with a zero terminal SNR"):
        GaussianDiffusion(rescale_zero_terminal_snr(BETAS), "eps")
    diffusion = GaussianDiffusion(rescale_zero_terminal_snr(BETAS), "v")
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([999, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, noise)  # pure noise at the last step
    torch.testing.assert_close(diffusion.predict(x_t, t, diffusion.target(x0, noise, t))[0], x0)


def test_unknown_parameterization():
    with pytest.raises(ValueError, match="parameterization: 'score'"):
        GaussianDiffusion(BETAS, "score")
