"""Solvers of the probability-flow ODE / reverse SDE in sigma space, all with one signature (k-diffusion's):

    sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x at sigmas[-1]

- `model(x, sigma, **extra_args)` is the denoiser D(x; sigma): x (B, C, *spatial), sigma (B,) -> (B, C, *spatial);
- `x`: the start, noise at level sigmas[0] (e.g. sigma_max * N(0, I));
- `sigmas`: (n + 1,) decreasing noise levels, usually ending in 0;
- `callback({"x", "i", "sigma", "sigma_hat", "denoised"})` once per step, after its first model call; `disable`
  turns the progress bar off (None: off when not on a terminal);
- stochastic solvers draw from `noise_sampler(sigma, sigma_next)` -> N(0, I) like x (default `torch.randn_like`;
  for the SDE solvers `dpmpp_sde`, `dpmpp_2m_sde`, `dpmpp_3m_sde` a Brownian path's increments, see `brownian`).
The ODE is dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3 with s(t) = 1, sigma(t) = t).
Adding a solver is adding one function (and, for sgm configs and sample.py, a class in `samplers`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import trange

from ldm.models.diffusion.edm.brownian import BrownianTreeNoiseSampler

Denoiser = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_d(x: torch.Tensor, sigma: torch.Tensor | float, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE's derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                       eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): an ODE step to sigma_down plus fresh noise of std sigma_up lands at level sigma_to,
    sigma_down^2 + sigma_up^2 = sigma_to^2; eta = 1 is the DDPM posterior's noise, eta = 0 the ODE."""
    if not eta:
        return sigma_to, sigma_to * 0
    posterior_std = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_up = torch.minimum(sigma_to, eta * posterior_std)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _noise_sampler(x: torch.Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    return noise_sampler or (lambda sigma, sigma_next: torch.randn_like(x))


def _churn(x: torch.Tensor, sigma: torch.Tensor, gamma: float, s_noise: float,
           noise: NoiseSampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al. 2022, Algorithm 2, lines 5-6: raise the noise level to sigma_hat = (1 + gamma) sigma by adding
    noise of std sqrt(sigma_hat^2 - sigma^2) (times s_noise)."""
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


def _gamma(sigma: torch.Tensor, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """Algorithm 2's gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0."""
    return min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time t = -ln(sigma) (half the log-SNR lambda of Lu et al. 2022, with sigma = 1 / sqrt(SNR))."""
    return -sigma.log()


def _dpmpp_first_order(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                       estimate: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++'s exponential-integrator step with a constant data estimate: (sigma_next / sigma) x -
    (e^-h - 1) estimate, h = t_next - t (exact for D constant over the step)."""
    return (sigma_next / sigma) * x - torch.expm1(_t(sigma) - _t(sigma_next)) * estimate


# One step of a single-step solver from sigma to sigma_next given denoised = D(x; sigma); `denoise(x, sigma)` calls
# the model for the second-order ones. The churn and ancestral loops below run these steps.
Step = Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor,
                 torch.Tensor], torch.Tensor]


def _euler_step(denoise, x, sigma, sigma_next, denoised):
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma)


def _heun_step(denoise, x, sigma, sigma_next, denoised):
    """Karras et al. 2022, Algorithm 2, lines 7-11 (Euler to sigma_next = 0, where the correction would divide by 0)."""
    if sigma_next == 0:
        return _euler_step(denoise, x, sigma, sigma_next, denoised)
    d = to_d(x, sigma, denoised)
    x_euler = x + d * (sigma_next - sigma)
    d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))
    return x + (d + d_next) / 2 * (sigma_next - sigma)


def _dpm_2_step(denoise, x, sigma, sigma_next, denoised):
    """DPM-Solver-2 in Karras' ODE form (Lu et al. 2022; Karras et al. 2022, Appendix D.2): the derivative at the
    geometric midpoint sigma_mid = sqrt(sigma sigma_next), reached by an Euler step, carries x the whole step."""
    if sigma_next == 0:
        return _euler_step(denoise, x, sigma, sigma_next, denoised)
    sigma_mid = (sigma * sigma_next).sqrt()
    x_mid = x + to_d(x, sigma, denoised) * (sigma_mid - sigma)
    return x + to_d(x_mid, sigma_mid, denoise(x_mid, sigma_mid)) * (sigma_next - sigma)


def _dpmpp_2s_step(denoise, x, sigma, sigma_next, denoised):
    """DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1, midpoint r = 1/2): a first-order step to the midpoint in t, the
    data estimate there carries x the whole step."""
    if sigma_next == 0:
        return _euler_step(denoise, x, sigma, sigma_next, denoised)
    sigma_mid = (sigma * sigma_next).sqrt()  # t_mid = (t + t_next) / 2
    denoised_mid = denoise(_dpmpp_first_order(x, sigma, sigma_mid, denoised), sigma_mid)
    return _dpmpp_first_order(x, sigma, sigma_next, denoised_mid)


def _sample_with_churn(step: Step, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                       extra_args: dict[str, Any] | None, callback, disable: bool | None, s_churn: float,
                       s_tmin: float, s_tmax: float, s_noise: float,
                       noise_sampler: NoiseSampler | None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2's loop: churn the level up to sigma_hat, denoise there, `step` to sigma_i+1."""
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _noise_sampler(x, noise_sampler)
    denoise = lambda x, sigma: model(x, sigma * s_in, **extra_args)  # noqa: E731
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], _gamma(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax), s_noise, noise)
        denoised = denoise(x, sigma_hat)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = step(denoise, x, sigma_hat, sigmas[i + 1], denoised)
    return x


def _sample_ancestral(step: Step, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                      extra_args: dict[str, Any] | None, callback, disable: bool | None, eta: float, s_noise: float,
                      noise_sampler: NoiseSampler | None) -> torch.Tensor:
    """The ancestral loop: denoise at sigma_i, `step` down to sigma_down, add fresh noise of std sigma_up
    (`get_ancestral_step`) unless sigma_i+1 is 0. (k-diffusion's dpm_2_ancestral also skips the noise where
    sigma_down is 0 above sigma_i+1 = 0, which only eta > 1 reaches.)"""
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _noise_sampler(x, noise_sampler)
    denoise = lambda x, sigma: model(x, sigma * s_in, **extra_args)  # noqa: E731
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = step(denoise, x, sigmas[i], sigma_down, denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                 callback=None, disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Euler steps of the ODE (Algorithm 2 without its second-order correction), with optional churn."""
    return _sample_with_churn(_euler_step, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                              s_noise, noise_sampler)


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                callback=None, disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0,
                noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2: Heun's second-order method (Euler on the last step, to sigma = 0)."""
    return _sample_with_churn(_heun_step, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                              s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                 callback=None, disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver-2 steps (second order, midpoint in log sigma) in Algorithm 2's loop, with optional churn."""
    return _sample_with_churn(_dpm_2_step, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                              s_noise, noise_sampler)


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict[str, Any] | None = None, callback=None, disable: bool | None = None,
                           eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """An Euler step to sigma_down, then noise of std sigma_up (`get_ancestral_step`)."""
    return _sample_ancestral(_euler_step, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_2_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict[str, Any] | None = None, callback=None, disable: bool | None = None,
                           eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """A DPM-Solver-2 step to sigma_down, then noise of std sigma_up."""
    return _sample_ancestral(_dpm_2_step, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                              extra_args: dict[str, Any] | None = None, callback=None, disable: bool | None = None,
                              eta: float = 1.0, s_noise: float = 1.0,
                              noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """A DPM-Solver++(2S) step to sigma_down, then noise of std sigma_up; an Euler step where sigma_down is 0."""
    return _sample_ancestral(_dpmpp_2s_step, model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                             noise_sampler)


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                    callback=None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): x_next = (sigma_next / sigma) x - (e^-h - 1) D_hat with
    h = t_next - t and D_hat the second-order extrapolation (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_last / h; first
    order on the first step and on a last step to sigma = 0."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised  # the first-order step's limit: sigma_next / sigma = 0 and e^-h = 0
        else:
            estimate = denoised
            if old_denoised is not None:
                r = (_t(sigmas[i]) - _t(sigmas[i - 1])) / (_t(sigmas[i + 1]) - _t(sigmas[i]))
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = _dpmpp_first_order(x, sigmas[i], sigmas[i + 1], estimate)
        old_denoised = denoised
    return x


def _brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    """The SDE solvers' default noise: one Brownian path over the positive levels of sigmas, seeded from torch's
    global generator (`brownian`); with fewer than two positive levels no step draws noise."""
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    if positive.numel() < 2 or positive.min() == positive.max():
        return _noise_sampler(x, None)
    return BrownianTreeNoiseSampler(x, positive.min(), positive.max())


@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                     callback=None, disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                     noise_sampler: NoiseSampler | None = None, r: float = 0.5) -> torch.Tensor:
    """Stochastic DPM-Solver++ (single-step, second order): an ancestral first-order step to the intermediate level
    sigma^(1 - r) sigma_next^r (t + r h), then from sigma an ancestral step to sigma_next with the data estimate
    (1 - 1/(2r)) D + 1/(2r) D_mid. eta scales the ancestral noise (0: the ODE); the noise is a Brownian path's
    increments (default `brownian.BrownianTreeNoiseSampler`). An Euler step to sigma = 0."""
    if not 0 < r <= 1:
        raise ValueError(f"sample_dpmpp_sde: r (where the intermediate level lies, in t) must be in (0, 1], got {r}")
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _brownian_noise(x, sigmas, noise_sampler)
    weight = 1 / (2 * r)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = _euler_step(None, x, sigma, sigma_next, denoised)
            continue
        sigma_mid = sigma ** (1 - r) * sigma_next ** r
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_mid, eta)
        x_mid = _dpmpp_first_order(x, sigma, sigma_down, denoised) + noise(sigma, sigma_mid) * s_noise * sigma_up
        denoised_mid = model(x_mid, sigma_mid * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        estimate = (1 - weight) * denoised + weight * denoised_mid
        x = _dpmpp_first_order(x, sigma, sigma_down, estimate) + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                        extra_args: dict[str, Any] | None = None, callback=None, disable: bool | None = None,
                        eta: float = 1.0, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) for the reverse SDE (Lu et al. 2022, SDE-DPM-Solver++(2M)), its noise scaled by eta:
    x_next = (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D + c (D - D_last) / r + sigma_next
    sqrt(1 - e^(-2 eta h)) n, with c = (1 - e^(-(1 + eta) h)) / 2 (`midpoint`) or 1 - (1 - e^(-(1 + eta) h)) /
    ((1 + eta) h) (`heun`), r = h_last / h. eta = 1 is the SDE, eta = 0 the ODE (with `midpoint`: DPM-Solver++(2M)).
    First order on the first step; the last step to sigma = 0 returns D."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"sample_dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _brownian_noise(x, sigmas, noise_sampler)
    denoised_last, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        decay = -torch.expm1(-(1 + eta) * h)
        x = (sigma_next / sigma) * (-eta * h).exp() * x + decay * denoised
        if denoised_last is not None:
            slope = (denoised - denoised_last) * (h / h_last)
            x = x + (decay / 2 if solver_type == "midpoint" else decay / (-(1 + eta) * h) + 1) * slope
        if eta:
            x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise
        denoised_last, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                        extra_args: dict[str, Any] | None = None, callback=None, disable: bool | None = None,
                        eta: float = 1.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) for the reverse SDE: `sample_dpmpp_2m_sde`'s step with the data estimate's first and second
    divided differences over the last three denoised (phi_2 = (e^-g - 1) / g + 1, phi_3 = phi_2 / g - 1/2,
    g = (1 + eta) h); second order on the second step, first on the first; the last step to sigma = 0 returns D."""
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _brownian_noise(x, sigmas, noise_sampler)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (denoised, h) of the last two steps, newest first
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        g = (1 + eta) * h
        x = (-g).exp() * x - torch.expm1(-g) * denoised
        phi_2 = torch.expm1(-g) / g + 1
        if len(history) == 2:
            (denoised_1, h_1), (denoised_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / g - 0.5) * d2
        elif history:
            denoised_1, h_1 = history[0]
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise
        history = [(denoised, h)] + history[:1]
    return x


def linear_multistep_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j} on the nodes
    sigma_i, ..., sigma_{i-order+1} (exact polynomial integration, float64)."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.poly1d([1.0])
    for node in nodes:
        basis = basis * np.poly1d([1.0, -node]) / (sigmas[i - j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
               callback=None, disable: bool | None = None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth on the non-uniform sigma grid): the derivative's Lagrange interpolant through
    the last `order` steps, integrated over the next step."""
    if order < 1:
        raise ValueError(f"sample_lms: order must be >= 1, got {order}")
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    sigmas_host = sigmas.detach().cpu().double().numpy()
    derivatives: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        derivatives = (derivatives + [to_d(x, sigmas[i], denoised)])[-order:]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        current_order = min(i + 1, order)
        coefficients = [linear_multistep_coefficient(current_order, sigmas_host, i, j) for j in range(current_order)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(derivatives)))
    return x

