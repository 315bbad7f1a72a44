"""Tiny stand-ins for the networks around the diffusion process, so its tests see exactly what reaches them."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.nn_dims import avg_pool_nd, conv_nd


class PoolFirstStage(nn.Module):
    """An autoencoder whose latents are `gain * 1x1conv(avg_pool(x))`: (B, C, *S) -> (B, embed_dim, *S / factor).

    The posterior has a tiny fixed variance, so `sample()` is `mode()` up to 1e-4. The 1x1 convolution is a trainable
    parameter, which lets tests check that the latent diffusion model never trains or un-freezes it.
    """

    def __init__(self, in_channels: int = 1, embed_dim: int = 2, factor: int = 2, dims: int = 3, gain: float = 3.0):
        super().__init__()
        self.dims = dims
        self.embed_dim = embed_dim
        self.factor = factor
        self.pool = avg_pool_nd(dims, factor)
        self.proj = conv_nd(dims, in_channels, embed_dim, 1)
        self.unproj = conv_nd(dims, embed_dim, in_channels, 1)
        self.gain = gain

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        z = self.gain * self.proj(self.pool(x))
        return DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -18.0)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.unproj(z / self.gain), scale_factor=self.factor, mode="nearest")


class RecordingUNet(nn.Module):
    """A one-convolution network `(x, t, context, y) -> (B, out_channels, *S)` that records the shapes it was given.

    The context (mean over tokens) and the class embedding are added as per-channel offsets, so every input matters.
    """

    def __init__(self, in_channels: int, out_channels: int, dims: int = 3, context_dim: int | None = None,
                 num_classes: int | None = None):
        super().__init__()
        self.dims = dims
        self.conv = conv_nd(dims, in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(1, out_channels)
        self.context = nn.Linear(context_dim, out_channels) if context_dim else None
        self.label = nn.Embedding(num_classes, out_channels) if num_classes else None
        self.calls: list[dict] = []

    def forward(self, x, timesteps, context=None, y=None):
        self.calls.append({"x": tuple(x.shape), "t": tuple(timesteps.shape),
                           "context": None if context is None else tuple(context.shape),
                           "y": None if y is None else (tuple(y.shape), y.dtype)})
        offset = self.time(timesteps.float()[:, None] / 1000)
        if self.context is not None:
            offset = offset + self.context(context.mean(dim=1))
        if self.label is not None:
            offset = offset + self.label(y)
        return self.conv(x) + offset.view(*offset.shape, *([1] * self.dims))
