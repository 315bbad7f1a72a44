"""Noise levels drawn for training: `sampler(n)` -> sigma: (n,) float32."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.util import instantiate_from_config


class EDMSampling:
    """ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1, "Noise distribution")."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if p_std <= 0:
            raise ValueError(f"EDMSampling: p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, n: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        log_sigma = self.p_mean + self.p_std * torch.randn(n, device=device, generator=generator)
        return log_sigma.exp()


class DiscreteSampling:
    """sigma uniform over the `num_idx` levels of `discretization_config` (DDPM's uniform timesteps)."""

    def __init__(self, discretization_config: Mapping[str, Any], num_idx: int, do_append_zero: bool = False,
                 flip: bool = True):
        self.num_idx = num_idx
        self.sigmas = instantiate_from_config(discretization_config)(num_idx, do_append_zero=do_append_zero, flip=flip)

    def __call__(self, n: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, self.num_idx, (n,), device=device, generator=generator)
        return self.sigmas.to(device)[idx].float()
