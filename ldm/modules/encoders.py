"""Conditioning-stage encoders (`cond_stage_config` targets): class labels to tokens, masks to the latent grid
(a trained encoder, or CompVis' interpolating `SpatialRescaler`).

A conditioning encoder may define `null_condition(c) -> c_null`, the learned "no condition" that classifier-free
guidance trains and samples with; without it the null condition is zeros.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.nn_dims import check_dims, conv_nd, spatial_dims


def check_class_labels(labels: torch.Tensor, n_classes: int) -> None:
    """labels must be (B,) integers in [0, n_classes); a ValueError says what they are otherwise."""
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"ClassEmbedder: labels must be (B,) integers, got {tuple(labels.shape)} {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"ClassEmbedder: labels must be in [0, {n_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


class ClassEmbedder(nn.Module):
    """Class labels (B,) int64 in [0, n_classes) -> one token each: (B, 1, embed_dim), for cross-attention.

    One extra embedding row is the learned null class used for classifier-free guidance.
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000):
        super().__init__()
        if n_classes < 1 or embed_dim < 1:
            raise ValueError(f"ClassEmbedder: embed_dim and n_classes must be positive, got {embed_dim}, {n_classes}")
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes + 1, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (B,) int -> (B, 1, embed_dim)."""
        check_class_labels(labels, self.n_classes)
        return self.embedding(labels.long())[:, None]

    def null_condition(self, c: torch.Tensor) -> torch.Tensor:
        """The learned null-class token, shaped like an output c: (B, 1, embed_dim)."""
        null = self.embedding.weight[self.n_classes]
        return null.to(c.dtype).expand_as(c)


class MaskEncoder(nn.Module):
    """A small trainable encoder taking a mask to the latent grid: (B, in_channels, *S) -> (B, out_channels, *S / 2**n).

    A 3x3 convolution, then `n_stages` stride-2 3x3 convolutions (each halving every spatial axis, so n_stages must
    be log2 of the first stage's downsampling factor), then a 1x1 projection; SiLU between them.
    """

    def __init__(self, in_channels: int, out_channels: int, n_stages: int, dims: int = 3, hidden_channels: int = 32):
        super().__init__()
        check_dims(dims, "MaskEncoder.dims")
        if n_stages < 0:
            raise ValueError(f"MaskEncoder: n_stages must be >= 0, got {n_stages}")
        self.dims = dims
        layers: list[nn.Module] = [conv_nd(dims, in_channels, hidden_channels, 3, padding=1)]
        for _ in range(n_stages):
            layers += [nn.SiLU(), conv_nd(dims, hidden_channels, hidden_channels, 3, stride=2, padding=1)]
        layers += [nn.SiLU(), conv_nd(dims, hidden_channels, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask: (B, in_channels, *S) float -> (B, out_channels, *ceil(S / 2**n_stages))."""
        spatial_dims(mask, self.dims)
        return self.net(mask.to(self.net[0].weight.dtype))


class SpatialRescaler(nn.Module):
    """CompVis' conditioning rescaler: `n_stages` interpolations by `multiplier`, then (with `out_channels`) a 1x1
    projection: (B, in_channels, *S) -> (B, out_channels or in_channels, *S * multiplier**n_stages).

    `method`: F.interpolate's mode (`bilinear` in 2D means `trilinear` in 3D: the linear mode of the dims).
    """

    METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: int | None = None, bias: bool = False, dims: int = 2):
        super().__init__()
        check_dims(dims, "SpatialRescaler.dims")
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}")
        if method not in self.METHODS:
            raise ValueError(f"SpatialRescaler: method {method!r} is not one of {', '.join(self.METHODS)}")
        self.n_stages, self.multiplier, self.dims = n_stages, multiplier, dims
        linear = ("linear", "bilinear", "trilinear")
        self.mode = linear[dims - 1] if method in linear else method
        self.channel_mapper = None if out_channels is None else conv_nd(dims, in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, *S) -> (B, out_channels, *S * multiplier**n_stages), float."""
        spatial_dims(x, self.dims)
        x = x if x.is_floating_point() else x.float()
        for _ in range(self.n_stages):
            x = nn.functional.interpolate(x, scale_factor=self.multiplier, mode=self.mode)
        return x if self.channel_mapper is None else self.channel_mapper(x)
