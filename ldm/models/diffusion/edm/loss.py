"""The denoising score-matching loss of Karras et al. 2022, eq. 2 with the weights lambda(sigma) of eq. 8:
E_{sigma, n} lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 (or the L1 norm)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.models.diffusion.edm.denoiser import Denoiser, Network, append_dims
from ldm.models.diffusion.gaussian_diffusion import LOSS_TYPES, sample_noise
from ldm.util import instantiate_from_config


class StandardDiffusionLoss:
    """sigma ~ `sigma_sampler_config`, lambda = `loss_weighting_config`; `offset_noise_level`: strength of the
    per-(item, channel) noise offset (`gaussian_diffusion.sample_noise`); loss_type l2 or l1."""

    def __init__(self, sigma_sampler_config: Mapping[str, Any], loss_weighting_config: Mapping[str, Any] | None = None,
                 loss_type: str = "l2", offset_noise_level: float = 0.0):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        self.sigma_sampler = instantiate_from_config(sigma_sampler_config)
        weighting = loss_weighting_config or {"target": "ldm.models.diffusion.edm.loss_weighting.UnitWeighting"}
        self.loss_weighting = instantiate_from_config(weighting)
        self.loss_type = loss_type
        self.offset_noise_level = offset_noise_level

    def __call__(self, network: Network, denoiser: Denoiser, cond: Any, x0: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-item loss for clean x0: (B, C, *spatial) -> (B,), mean over the non-batch elements; float32, or float64
        for float64 x0 (a bf16 network output is compared in float32)."""
        sigma = self.sigma_sampler(x0.shape[0], device=x0.device, generator=generator).to(x0.dtype)
        noise = sample_noise(x0, self.offset_noise_level, generator)
        denoised = denoiser(network, x0 + noise * append_dims(sigma, x0.ndim), sigma, cond)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        weight = append_dims(self.loss_weighting(sigma), x0.ndim).to(dtype)
        error = denoised.to(dtype) - x0.to(dtype)
        error = error ** 2 if self.loss_type == "l2" else error.abs()
        return (weight * error).flatten(1).mean(dim=1)
