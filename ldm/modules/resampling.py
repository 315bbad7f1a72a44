"""Halving and doubling of every spatial axis, shared by the autoencoder and the UNet (2D and 3D through `dims`)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.nn_dims import KernelChoice, avg_pool_nd, conv_nd, upsample_nearest
from ldm.modules.recomputed_conv import prepared_conv


class Downsample(nn.Module):
    """Halve every spatial size: stride-2 3x3 conv, or 2x average pooling. x: (B, C, *S) -> (B, C, *S/2).

    The conv pads one row on each side of every axis, or with `pad_end` one at the end and none at the start (the
    autoencoders of CompVis and diffusers do: their weights are trained for that grid alignment)."""

    def __init__(self, channels: int, dims: int, with_conv: bool, pad_end: bool = False):
        super().__init__()
        self.pad = (0, 1) * dims if with_conv and pad_end else None
        self.op = (conv_nd(dims, channels, channels, 3, stride=2, padding=0 if self.pad else 1) if with_conv
                   else avg_pool_nd(dims, kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x if self.pad is None else F.pad(x, self.pad))


class Upsample(KernelChoice, nn.Module):
    """Double every spatial size: nearest neighbour, then a 3x3 conv if `with_conv`. x: (B, C, *S) -> (B, C, *2S).
    `kernels` (set by `set_kernels`) picks the Triton upsampling kernels for channels-last x."""

    def __init__(self, channels: int, dims: int, with_conv: bool):
        super().__init__()
        self.conv = conv_nd(dims, channels, channels, 3, padding=1) if with_conv else nn.Identity()

    recompute_cheap = False  # keep x, not the 2^dims times larger upsampled tensor, for backward (recomputed_conv.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_cheap and not isinstance(self.conv, nn.Identity):
            return prepared_conv(self.double, self.conv, x)
        return self.conv(self.double(x))

    def double(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_nearest(x, 2, use_triton=self.uses_triton(x))
