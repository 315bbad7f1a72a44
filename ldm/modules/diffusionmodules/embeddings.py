"""Sinusoidal timestep embedding, as in DDPM / the CompVis openaimodel UNet."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed diffusion timesteps as `[cos(t * f_0), ..., cos(t * f_{h-1}), sin(t * f_0), ..., sin(t * f_{h-1})]`.

    `f_i = max_period ** (-i / h)` with `h = dim // 2`; an odd `dim` gets one trailing zero column.
    timesteps: (B,) int or float (fractional timesteps are fine) -> (B, dim) float32.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be positive, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = timesteps.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))
