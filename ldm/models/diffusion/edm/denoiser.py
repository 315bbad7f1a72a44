"""The denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, cond) around a network F (Karras et al. 2022,
eq. 7), continuous (`Denoiser`) or restricted to the noise levels of a discrete schedule (`DiscreteDenoiser`)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ldm.util import instantiate_from_config

#: network(x_in: (B, C, *spatial), c_noise: (B,), cond) -> (B, C, *spatial)
Network = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def append_dims(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims, to broadcast a per-item value over (B, C, *spatial)."""
    return value.reshape(-1, *([1] * (ndim - 1)))


class Denoiser(nn.Module):
    """D(x; sigma) for x: (B, C, *spatial) and sigma: (B,); `scaling_config` builds one of `scalings`.

    The network is called on c_in x cast to its input's dtype; the scalings stay in sigma's dtype, so a float64 sigma
    gives float64 coefficients (the result takes the promoted dtype of x and the network output).
    """

    def __init__(self, scaling_config: Mapping[str, Any]):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return c_noise

    def forward(self, network: Network, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        sigma = self.possibly_quantize_sigma(sigma)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in self.scaling(sigma))
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma.shape))
        return network(x * c_in, c_noise, cond) * c_out + x * c_skip


class DiscreteDenoiser(Denoiser):
    """A denoiser whose network was trained at `num_idx` discrete noise levels (a DDPM): sigma is rounded to the
    nearest level of `discretization_config` and, with `quantize_c_noise`, c_noise becomes that level's index (the
    DDPM timestep t). The table `sigmas` ((num_idx,) float64, increasing with `flip`) is a plain attribute, not a
    buffer, so that casting the model to bf16 does not round it."""

    def __init__(self, scaling_config: Mapping[str, Any], num_idx: int, discretization_config: Mapping[str, Any],
                 do_append_zero: bool = False, quantize_c_noise: bool = True, flip: bool = True):
        super().__init__(scaling_config)
        discretization = instantiate_from_config(discretization_config)
        self.sigmas = discretization(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.quantize_c_noise = quantize_c_noise

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest tabulated level: (B,) -> (B,) int64."""
        table = self.sigmas.to(sigma.device)
        return (sigma.double()[:, None] - table[None]).abs().argmin(dim=1)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(idx.device)[idx]

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.idx_to_sigma(self.sigma_to_idx(sigma)).to(sigma.dtype)

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise
