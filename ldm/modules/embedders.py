"""Embedders for `GeneralConditioner` (sgm's `sgm.modules.encoders.modules` names): each maps batch entries to one
output whose shape picks its route (vector, crossattn or concat)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.diffusionmodules.embeddings import timestep_embedding
from ldm.modules.encoders import check_class_labels


class ClassEmbedder(nn.Module):
    """Class labels (B,) int in [0, n_classes) -> (B, embed_dim) (vector), or (B, 1, embed_dim) (crossattn) with
    `add_sequence_dim`. The unconditional embedding is the zero vector the conditioner's dropout trains."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, add_sequence_dim: bool = False):
        super().__init__()
        if embed_dim < 1 or n_classes < 1:
            raise ValueError(f"ClassEmbedder: embed_dim and n_classes must be positive, got {embed_dim}, {n_classes}")
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.add_sequence_dim = add_sequence_dim

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        check_class_labels(labels, self.n_classes)
        embedding = self.embedding(labels.long())
        return embedding[:, None] if self.add_sequence_dim else embedding


class ConcatTimestepEmbedderND(nn.Module):
    """SDXL's size and crop conditioning: each of N scalars gets the sinusoidal embedding of width `outdim` (the
    UNet's timestep embedding), concatenated: (B, N) -> (B, N * outdim) (vector)."""

    def __init__(self, outdim: int):
        super().__init__()
        if outdim < 1:
            raise ValueError(f"ConcatTimestepEmbedderND: outdim must be positive, got {outdim}")
        self.outdim = outdim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND: expected (B, N) values, got {tuple(values.shape)}")
        batch, count = values.shape
        return timestep_embedding(values.reshape(-1), self.outdim).reshape(batch, count * self.outdim)


class ScalarEmbedder(nn.Module):
    """A per-item scalar such as age or tumour volume -> (B, outdim) (vector): the sinusoidal embedding of
    (value - offset) / scale, so that the values' useful range spans about [0, 1000] like diffusion timesteps.
    value: (B,) or (B, 1) float; NaN or infinite values are an error (a missing label must not pass silently)."""

    def __init__(self, outdim: int, offset: float = 0.0, scale: float = 1.0):
        super().__init__()
        if outdim < 1 or scale <= 0:
            raise ValueError(f"ScalarEmbedder: outdim and scale must be positive, got {outdim}, {scale}")
        self.outdim, self.offset, self.scale = outdim, offset, scale

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value)
        if value.ndim == 2 and value.shape[1] == 1:
            value = value[:, 0]
        if value.ndim != 1:
            raise ValueError(f"ScalarEmbedder: expected (B,) or (B, 1) values, got {tuple(value.shape)}")
        if not bool(torch.isfinite(value.float()).all()):
            raise ValueError("ScalarEmbedder: values contain NaN or infinity")
        return timestep_embedding((value.double() - self.offset) / self.scale, self.outdim)


class SpatialMaskEmbedder(nn.Module):
    """A mask on the image grid -> the latent grid, for the concat route: (B, C, *S) -> (B, C', *S / factor).

    downsample_factor: the first stage's (per axis, or one int); mode `nearest` (the voxel nearest each latent voxel's
    centre) or `area` (block averages); with `n_classes`, an integer label map (B, 1, *S) or (B, *S) is one-hot coded
    first (C' = n_classes), else C' = C."""

    def __init__(self, downsample_factor: int | Sequence[int], mode: str = "nearest", n_classes: int | None = None):
        super().__init__()
        if mode not in ("nearest", "area"):
            raise ValueError(f"SpatialMaskEmbedder: mode {mode!r} is not one of nearest, area")
        self.factor = downsample_factor
        self.mode = mode
        self.n_classes = n_classes

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if self.n_classes is not None:
            if mask.is_floating_point() and not bool((mask == mask.round()).all()):
                raise ValueError("SpatialMaskEmbedder: n_classes is set but the mask holds non-integer values")
            labels = mask.long()
            labels = labels[:, 0] if labels.ndim >= 4 and labels.shape[1] == 1 else labels
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
                raise ValueError(f"SpatialMaskEmbedder: labels must be in [0, {self.n_classes}), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            mask = F.one_hot(labels, self.n_classes).movedim(-1, 1)
        if mask.ndim not in (4, 5):
            raise ValueError(f"SpatialMaskEmbedder: expected a mask (B, C, H, W) or (B, C, D, H, W), got "
                             f"{tuple(mask.shape)}")
        spatial = mask.shape[2:]
        factors = [self.factor] * len(spatial) if isinstance(self.factor, int) else list(self.factor)
        if len(factors) != len(spatial) or any(s % f for s, f in zip(spatial, factors)):
            raise ValueError(f"SpatialMaskEmbedder: mask size {tuple(spatial)} is not divisible by the downsample "
                             f"factor {self.factor}")
        size = [s // f for s, f in zip(spatial, factors)]
        mode = "nearest-exact" if self.mode == "nearest" else "area"
        return F.interpolate(mask.float(), size=size, mode=mode)
