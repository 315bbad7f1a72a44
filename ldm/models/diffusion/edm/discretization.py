"""Noise-level tables sigma_0 > ... > sigma_{n-1} (> 0 = sigma_n when a zero is appended) for samplers and discrete
denoisers."""
from __future__ import annotations

import torch

from ldm.models.diffusion.schedules import make_beta_schedule


class Discretization:
    """`discretization(n)`: n noise levels, decreasing, then 0 if `do_append_zero`; `flip` reverses the result
    (increasing, the order of timestep indices). Returns (n [+ 1],) float64."""

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, n: int, do_append_zero: bool = True, device: torch.device | str = "cpu",
                 flip: bool = False) -> torch.Tensor:
        if n < 1:
            raise ValueError(f"{type(self).__name__}: the number of noise levels must be >= 1, got {n}")
        sigmas = self.get_sigmas(n, device)
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return sigmas.flip(0) if flip else sigmas


class EDMDiscretization(Discretization):
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, i = 0..n-1 (k-diffusion's `get_sigmas_karras`)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDMDiscretization: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if rho <= 0:
            raise ValueError(f"EDMDiscretization: rho must be positive, got {rho}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
        min_inv_rho, max_inv_rho = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho


class LegacyDDPMDiscretization(Discretization):
    """The DDPM schedule (CompVis `linear`, linear in sqrt(beta)) as noise levels sigma_t = sqrt((1 - alpha_bar_t) /
    alpha_bar_t). With n < num_timesteps the timesteps floor(linspace(T - 1, 0, n, endpoint=False)) are kept, as sgm
    spaces them; `alphas_cumprod`: (num_timesteps,) float64."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        with torch.device("cpu"):  # a host table, also when a model is built under another default device (meta)
            self.alphas_cumprod = torch.cumprod(1 - make_beta_schedule("linear", num_timesteps, linear_start,
                                                                       linear_end), dim=0)

    def timesteps(self, n: int) -> torch.Tensor:
        """The n timesteps kept, increasing: (n,) int64."""
        if n > self.num_timesteps:
            raise ValueError(f"LegacyDDPMDiscretization: {n} noise levels asked of a {self.num_timesteps}-step "
                             f"schedule")
        if n == self.num_timesteps:
            return torch.arange(n, device="cpu")
        step = (self.num_timesteps - 1) / n
        return (self.num_timesteps - 1 - step * torch.arange(n, dtype=torch.float64, device="cpu")).long().flip(0)

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        alphas_cumprod = self.alphas_cumprod[self.timesteps(n)]
        return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().flip(0).to(device)
