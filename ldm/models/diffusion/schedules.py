"""Noise schedules: the betas of the forward process, named as in CompVis latent-diffusion.

Mind the original naming, kept so that configs port unchanged: `linear` is linear in sqrt(beta) (what diffusers calls
`scaled_linear`), `sqrt_linear` is linear in beta, and `sqrt` is linear in beta**2.
"""
from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> torch.Tensor:
    """Betas of `schedule` for `n_timestep` steps: (n_timestep,) float64.

    cosine: Nichol & Dhariwal's alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped to 0.999.
    """
    if n_timestep < 1:
        raise ValueError(f"make_beta_schedule: timesteps must be >= 1, got {n_timestep}")
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    if schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep
        alphas_cumprod = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0.0, 0.999)
    raise ValueError(f"beta_schedule: unknown schedule {schedule!r} (expected one of {', '.join(BETA_SCHEDULES)})")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that the last step has SNR 0 and the first keeps its value.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1. betas: (T,) -> (T,),
    with betas[-1] == 1 (x_T is pure noise, so training matches sampling from N(0, I)).
    """
    sqrt_alphas_cumprod = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas
