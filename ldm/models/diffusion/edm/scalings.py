"""Preconditioning of the denoiser D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),
Karras et al. 2022, Table 1. Each scaling maps sigma: (B,) to (c_skip, c_out, c_in, c_noise), each (B,), in sigma's
dtype.

With sigma = sqrt((1 - alpha_bar) / alpha_bar), c_in x is the DDPM state x_t, and `EpsScaling` / `VScaling` make D
the x0 estimate of a network that predicts eps / v (Salimans & Ho 2022); their c_noise is sigma itself, which a
`DiscreteDenoiser` turns into the timestep index the network was trained on.
"""
from __future__ import annotations

import torch

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def edm_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = ln(sigma) / 4 (Table 1, EDM column)."""
    return 0.25 * sigma.log()


class EDMScaling:
    """Table 1, EDM: c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 +
    sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4."""

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"EDMScaling: sigma_data must be positive, got {sigma_data}")
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        total = sigma ** 2 + self.sigma_data ** 2
        c_skip = self.sigma_data ** 2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = 1 / total.sqrt()
        return c_skip, c_out, c_in, edm_c_noise(sigma)


class EpsScaling:
    """Table 1, VP / DDIM (eps prediction): c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = sigma
    (turned into a timestep by `DiscreteDenoiser`)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), sigma.clone()


class VScaling:
    """v prediction: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1)
    (EDM's scaling with sigma_data = 1), c_noise = sigma (turned into a timestep by `DiscreteDenoiser`)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip = 1 / (sigma ** 2 + 1)
        c_out = -sigma / (sigma ** 2 + 1).sqrt()
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        return c_skip, c_out, c_in, sigma.clone()


class VScalingWithEDMcNoise(VScaling):
    """`VScaling` with EDM's continuous c_noise = ln(sigma) / 4 (SVD's preconditioning)."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip, c_out, c_in, _ = super().__call__(sigma)
        return c_skip, c_out, c_in, edm_c_noise(sigma)
