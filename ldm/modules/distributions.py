"""The KL autoencoder's posterior: a Gaussian with diagonal covariance over the latent tensor."""
from __future__ import annotations

import math

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) for each batch item, built from the encoder's moments.

    parameters: (B, 2*C, *spatial) = [mean, logvar] along channels -> mean, logvar, std, var: (B, C, *spatial) fp32.
    The log-variance is clamped to [-30, 20] so that exp() stays finite. Statistics are kept in fp32 even under
    autocast, because `kl` and `nll` sum over every latent element.
    """

    def __init__(self, parameters: torch.Tensor):
        if parameters.ndim < 3 or parameters.shape[1] % 2:
            raise ValueError(f"DiagonalGaussianDistribution: parameters must be (B, 2*C, *spatial), "
                             f"got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        mean, logvar = parameters.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def _sum_per_item(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(dim=1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw mean + std * eps (differentiable in mean and logvar): (B, C, *spatial) fp32."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean: (B, C, *spatial) fp32."""
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other), summed over all latent elements: (B,). `other=None` means the standard normal."""
        if other is None:
            return 0.5 * self._sum_per_item(self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return 0.5 * self._sum_per_item((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                                        - self.logvar + other.logvar)

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample`: (B, C, *spatial) under this distribution, summed per item: (B,)."""
        return 0.5 * self._sum_per_item(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var)
