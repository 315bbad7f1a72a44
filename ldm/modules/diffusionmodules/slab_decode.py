"""Exact decoding of latents too large to decode at once (inference): the Decoder's layers run one slab at a time.

Decoding a whole tile per call is not exact and shows seams: each tile's GroupNorms normalise with the tile's own
statistics, and convolutions at a tile's edge miss their neighbours. Here each layer runs over the whole tensor in
slabs along the first spatial axis (depth for volumes, height for images): a 3x3(x3) convolution's slab reads one
more row of its input on each side (zeros outside the tensor, as its own padding would give), and each GroupNorm is
applied with the mean and variance of the whole tensor, gathered slab by slab first (Chan's parallel merge in
float64). Attention blocks run whole: they sit at the lowest resolutions. The result equals the plain decode up to
floating-point rounding, for any slab size. The compute device holds one slab of one layer at a time (plus the
attention blocks' inputs); the whole intermediate tensors live on `storage` (the compute device by default, "cpu"
for volumes whose activations do not fit on it).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.nn_dims import upsample_nearest
from ldm.modules.normalization import GroupNormAct

AXIS = 2  # the first spatial axis of (B, C, *spatial)
Rows = Callable[[int, int], torch.Tensor]  # rows [lo, hi) along AXIS of a layer's input, on the compute device


class SlabDecoder:
    """Runs a `Decoder` (ldm.modules.diffusionmodules.model) over slabs of `slab` output rows; see the module doc."""

    def __init__(self, decoder: nn.Module, slab: int, storage: torch.device | str | None = None):
        if isinstance(slab, bool) or not isinstance(slab, int) or slab < 1:
            raise ValueError(f"decode slab must be a positive number of rows, got {slab!r}")
        self.decoder, self.slab = decoder, slab
        self.storage = None if storage is None else torch.device(storage)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z_channels, *latent) -> (B, out_ch, *latent * factor), on `storage` (default: z's device)."""
        from ldm.modules.diffusionmodules.model import AttentionBlock, ResnetBlock
        from ldm.modules.resampling import Upsample

        decoder = self.decoder
        self.compute = z.device
        self.out_length = z.shape[AXIS] * decoder.factor
        storage = self.storage or z.device
        h = self.conv(decoder.conv_in, lambda lo, hi: z.narrow(AXIS, lo, hi - lo), z.shape[AXIS])
        for block in [*decoder.mid, *(layer for level in decoder.up for layer in level)]:
            if isinstance(block, ResnetBlock):
                h = self.resnet_block(block, h)
            elif isinstance(block, AttentionBlock):
                h = block(h.to(self.compute)).to(storage)
            elif isinstance(block, Upsample):
                h = self.upsample(block, h)
            else:
                raise TypeError(f"decode in slabs: no slab rule for {type(block).__name__} in the decoder")
        return self.norm_then_conv(decoder.norm_out, decoder.conv_out, h)

    # ----------------------------------------------------------------------------------------------- layers
    def resnet_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """norm1+SiLU -> conv1 -> norm2+SiLU -> conv2, plus skip(x); dropout is inert in inference."""
        h = self.norm_then_conv(block.norm1, block.conv1, x)
        return self.norm_then_conv(block.norm2, block.conv2, h,
                                   residual=lambda lo, hi: block.skip(self.load(x, lo, hi)))

    def upsample(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Nearest 2x (every spatial axis), then the block's conv; rows of the doubled tensor come from x's rows."""
        def doubled_rows(lo: int, hi: int) -> torch.Tensor:
            first, last = lo // 2, (hi + 1) // 2
            return upsample_nearest(self.load(x, first, last), 2).narrow(AXIS, lo - 2 * first, hi - lo)

        length = 2 * x.shape[AXIS]
        if isinstance(block.conv, nn.Identity):
            return self.assemble(doubled_rows, length)
        return self.conv(block.conv, doubled_rows, length)

    def norm_then_conv(self, norm: GroupNormAct, conv: nn.Module, x: torch.Tensor,
                       residual: Rows | None = None) -> torch.Tensor:
        """conv(norm(x)) (+ residual rows), the norm with statistics over the whole of x."""
        mean, rstd = self.group_statistics(x, norm.num_groups, norm.eps)
        return self.conv(conv, lambda lo, hi: normalize(self.load(x, lo, hi), norm, mean, rstd), x.shape[AXIS],
                         residual)

    def conv(self, conv: nn.Module, rows_of: Rows, length: int, residual: Rows | None = None) -> torch.Tensor:
        """A stride-1 'same' convolution of a tensor given by its rows (length rows along AXIS), slab by slab."""
        halo = conv.padding[0]
        if (any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros"
                or conv.kernel_size[0] != 2 * halo + 1):
            raise ValueError(f"decode in slabs: {conv} is not a stride-1, zero-padded 'same' convolution")
        functional = (F.conv1d, F.conv2d, F.conv3d)[conv.weight.ndim - 3]
        padding = (0, *conv.padding[1:])

        def rows(lo: int, hi: int) -> torch.Tensor:
            first, last = max(lo - halo, 0), min(hi + halo, length)
            x = rows_of(first, last)
            before, after = halo - (lo - first), halo - (last - hi)
            if before or after:  # rows outside the tensor: the zeros of the convolution's own padding
                x = F.pad(x, [0, 0] * (x.ndim - AXIS - 1) + [before, after])
            y = functional(x, conv.weight, conv.bias, 1, padding, 1, conv.groups)
            return y if residual is None else y + residual(lo, hi)

        return self.assemble(rows, length)

    # ---------------------------------------------------------------------------------------------- helpers
    def rows_per_slab(self, length: int) -> int:
        """Rows per slab for a tensor of `length` rows: `slab` output rows, scaled to this resolution."""
        return max(1, self.slab * length // self.out_length)

    def load(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return x.narrow(AXIS, lo, hi - lo).to(self.compute, non_blocking=True)

    def assemble(self, rows_of: Rows, length: int) -> torch.Tensor:
        """The tensor whose rows [lo, hi) `rows_of` computes, built slab by slab on `storage`."""
        step = self.rows_per_slab(length)
        out = None
        for lo in range(0, length, step):
            hi = min(lo + step, length)
            y = rows_of(lo, hi)
            if out is None:
                shape = (*y.shape[:AXIS], length, *y.shape[AXIS + 1:])
                out = torch.empty(shape, dtype=y.dtype, device=self.storage or y.device)
            out.narrow(AXIS, lo, hi - lo).copy_(y)
        return out

    def group_statistics(self, x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (sample, group) mean and 1 / sqrt(var + eps) of x: (B, C, *spatial), (B, groups) float64 each;
        slab moments in fp32 (float64 for a float64 x), merged in float64 (Chan et al.)."""
        count = torch.zeros((), dtype=torch.float64, device=self.compute)
        mean = m2 = None
        step = self.rows_per_slab(x.shape[AXIS])
        for lo in range(0, x.shape[AXIS], step):
            slab = self.load(x, lo, min(lo + step, x.shape[AXIS]))
            slab = slab.to(torch.promote_types(slab.dtype, torch.float32))
            slab = slab.unflatten(1, (groups, slab.shape[1] // groups)).flatten(2)
            var, slab_mean = torch.var_mean(slab, dim=2, correction=0)
            n = slab.shape[2]
            if mean is None:
                count, mean, m2 = count + n, slab_mean.double(), var.double() * n
                continue
            delta = slab_mean.double() - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + var.double() * n + delta.square() * (count * n / total)
            count = total
        return mean, torch.rsqrt(m2 / count + eps)


def normalize(x: torch.Tensor, norm: GroupNormAct, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """GroupNormAct's forward with given per-group statistics (B, groups): x: (B, C, *spatial), in x's dtype
    (computed in fp32, or float64 for float64 x).

    (x - mean) * (rstd * weight) + bias: the statistics and the affine fold into per-(sample, channel) factors, so the
    slab takes four elementwise passes (centre, scale and shift, SiLU in place, cast back) instead of seven; centring
    first keeps the precision of GroupNorm's own order when the mean is large against the deviation."""
    b, c = x.shape[:2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    per_channel = (b, c) + (1,) * (x.ndim - 2)
    channels_per_group = c // norm.num_groups
    mean_c = mean.repeat_interleave(channels_per_group, dim=1)
    scale_c = rstd.repeat_interleave(channels_per_group, dim=1) * norm.weight.to(rstd.dtype)
    y = torch.addcmul(norm.bias.to(dtype).view(per_channel[1:]).unsqueeze(0),
                      x - mean_c.to(dtype).view(per_channel), scale_c.to(dtype).view(per_channel))
    return (F.silu(y, inplace=True) if norm.act else y).to(x.dtype)


def decode_in_slabs(decoder: nn.Module, z: torch.Tensor, slab: int,
                    storage: torch.device | str | None = None) -> torch.Tensor:
    """decoder(z), computed `slab` output rows at a time along the first spatial axis (see the module doc)."""
    return SlabDecoder(decoder, slab, storage)(z)
