"""Solvers of the probability-flow ODE / reverse SDE in sigma space, all with one signature (k-diffusion's):

    sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x at sigmas[-1]

- `model(x, sigma, **extra_args)` is the denoiser D(x; sigma): x (B, C, *spatial), sigma (B,) -> (B, C, *spatial);
- `x`: the start, noise at level sigmas[0] (e.g. sigma_max * N(0, I));
- `sigmas`: (n + 1,) decreasing noise levels, usually ending in 0;
- `callback({"x", "i", "sigma", "sigma_hat", "denoised"})` once per step, after its first model call; `disable`
  turns the progress bar off (None: off when not on a terminal);
- stochastic solvers draw from `noise_sampler(sigma, sigma_next)` -> N(0, I) like x (default `torch.randn_like`).
The ODE is dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3 with s(t) = 1, sigma(t) = t).
Adding a solver is adding one function (and, for sgm configs and sample.py, a class in `samplers`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import trange

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


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                 callback=None, disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Euler steps of the ODE (Algorithm 2 without its second-order correction), with optional churn."""
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _noise_sampler(x, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], _gamma(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax), s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                callback=None, disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0,
                noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2: Heun's second-order method (Euler on the last step, to sigma = 0)."""
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _noise_sampler(x, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], _gamma(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax), s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigmas[i + 1], model(x_euler, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict[str, Any] | None = None, callback=None, disable: bool | None = None,
                           eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """An Euler step to sigma_down, then noise of std sigma_up (`get_ancestral_step`)."""
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _noise_sampler(x, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time t = -ln(sigma) (half the log-SNR lambda of Lu et al. 2022, with sigma = 1 / sqrt(SNR))."""
    return -sigma.log()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                              extra_args: dict[str, Any] | None = None, callback=None, disable: bool | None = None,
                              eta: float = 1.0, s_noise: float = 1.0,
                              noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1, single-step, midpoint r = 1/2) to sigma_down, then noise of std
    sigma_up; an Euler step where sigma_down is 0."""
    extra_args, s_in, noise = extra_args or {}, x.new_ones([x.shape[0]]), _noise_sampler(x, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            sigma_mid = (-(t + h / 2)).exp()
            x_mid = (sigma_mid / sigmas[i]) * x - torch.expm1(-h / 2) * denoised
            denoised_mid = model(x_mid, sigma_mid * s_in, **extra_args)
            x = (sigma_down / sigmas[i]) * x - torch.expm1(-h) * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


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
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            estimate = denoised
            if old_denoised is not None:
                r = (t - _t(sigmas[i - 1])) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        old_denoised = denoised
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

