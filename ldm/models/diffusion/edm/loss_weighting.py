"""Loss weights lambda(sigma) of the denoising loss lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2: (B,) -> (B,)."""
from __future__ import annotations

import torch


class UnitWeighting:
    """lambda = 1."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)


class EDMWeighting:
    """lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Karras et al. 2022, Table 1): the
    network's effective target has unit weight at every sigma."""

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"EDMWeighting: sigma_data must be positive, got {sigma_data}")
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class VWeighting(EDMWeighting):
    """lambda = (sigma^2 + 1) / sigma^2: the v-prediction loss written on x0 (`EDMWeighting` with sigma_data = 1)."""

    def __init__(self):
        super().__init__(sigma_data=1.0)


class EpsWeighting:
    """lambda = 1 / sigma^2: the eps-prediction loss written on x0."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma ** -2.0
