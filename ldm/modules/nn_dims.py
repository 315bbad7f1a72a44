"""Layers picked by spatial dimensionality (`dims` 1, 2 or 3), so 2D and 3D networks share one code path."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kernels.layout import dense, is_channels_last  # PyTorch only: does not load Triton


def triton_selected(kernels: str, x: torch.Tensor) -> bool:
    """Whether a layer's `kernels` choice (`auto`, `triton`, `torch`) runs Triton on x: `auto` does on CUDA."""
    return kernels == "triton" or (kernels == "auto" and x.is_cuda)


class KernelChoice:
    """A layer with Triton kernels as an option: `kernels` (`auto`, `triton`, `torch`), which
    `ldm.modules.normalization.set_kernels` sets on every such layer of a model."""

    kernels = "torch"

    def uses_triton(self, x: torch.Tensor) -> bool:
        return triton_selected(self.kernels, x)


class KernelChoiceConv(KernelChoice):
    """A convolution with Triton kernels where `kernels` picks them. A 3x3x3 convolution (stride 1, zero padding 1)
    with at most 8 channels on one side and more on the other (an autoencoder's image layers, a latent UNet's first
    and last) on channels-last input runs in kernels/thin_conv.py: cuDNN has no fast kernel for a thin side (~6 ms
    forward + backward for the two one-channel layers of a 128^3 autoencoder, ~0.6 ms for a 4-channel UNet's two at
    4 x 32^3). Any other has its bias added after the convolution by `kernels.channel_sum.add_channel_bias_`: the same
    in-place pass PyTorch adds it in, but one that runs at memory speed on channels-last outputs and a backward that
    sums the bias's gradient in Triton (PyTorch's reduction over a channels-last gradient's outer axes runs at a few
    percent of bandwidth)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.uses_triton(input):
            return super()._conv_forward(input, weight, bias)
        if _is_thin_conv3d(self) and input.stride(1) == 1:  # channels-last input (of a model run channels-last)
            from kernels import thin_conv  # imported on first use: CPU-only runs never load Triton
            if thin_conv.positions_fit(input):  # else cuDNN, which indexes any size
                return thin_conv.thin_conv3d(input, weight, bias)
        if bias is None:
            return super()._conv_forward(input, weight, bias)
        from kernels.channel_sum import add_channel_bias_
        return add_channel_bias_(super()._conv_forward(input, weight, None), bias)


class Conv1d(KernelChoiceConv, nn.Conv1d):
    """`nn.Conv1d` with the Triton kernels of `KernelChoiceConv`."""


class Conv2d(KernelChoiceConv, nn.Conv2d):
    """`nn.Conv2d` with the Triton kernels of `KernelChoiceConv`."""


class Conv3d(KernelChoiceConv, nn.Conv3d):
    """`nn.Conv3d` with the Triton kernels of `KernelChoiceConv`."""


_CONV = {1: Conv1d, 2: Conv2d, 3: Conv3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_dims(dims: int, where: str = "dims") -> int:
    """Return `dims` if it is 1, 2 or 3; raise a ValueError naming `where` otherwise."""
    if dims not in _CONV:
        raise ValueError(f"{where}: unsupported dims={dims!r} (expected 1, 2 or 3)")
    return dims


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """`nn.Conv{dims}d(*args, **kwargs)`, with the Triton kernels of `KernelChoiceConv`."""
    return _CONV[check_dims(dims, "conv_nd")](*args, **kwargs)


def conv_without_bias(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` without adding `conv.bias`, for a following op that adds it in its own pass over the output
    (`GroupNormAct(..., input_bias=conv.bias)`): PyTorch adds a cuDNN convolution's bias in a separate pass."""
    return conv._conv_forward(x, conv.weight, None)


def residual_sum(skip: nn.Module, x: torch.Tensor, conv: nn.modules.conv._ConvNd, h: torch.Tensor,
                 fused_add: bool = False) -> torch.Tensor:
    """`skip(x) + conv(h)`, skip an identity or a convolution (a ResNet block's shortcut). A convolution shortcut
    takes conv's bias into its own (one add of two (C,) vectors), so no pass over the output adds it alone. With
    `fused_add` the Triton kernel (kernels/residual_add.py) adds the shortcut, conv's output and the bias(es) in one
    pass: an identity shortcut's sum and conv's bias (two passes otherwise), or both convolutions' outputs, run
    without their biases, and the two biases' sum (three passes otherwise: the shortcut's bias, which a cuDNN
    convolution adds in a pass of its own, and the sum)."""
    if isinstance(skip, nn.modules.conv._ConvNd) and skip.bias is not None and conv.bias is not None:
        if fused_add:
            from kernels.residual_add import residual_bias_add  # imported on first use: CPU-only runs never load Triton
            return residual_bias_add(conv_without_bias(skip, x), conv_without_bias(conv, h), skip.bias + conv.bias)
        return skip._conv_forward(x, skip.weight, skip.bias + conv.bias) + conv_without_bias(conv, h)
    if fused_add and isinstance(skip, nn.Identity) and conv.bias is not None:
        from kernels.residual_add import residual_bias_add
        return residual_bias_add(x, conv_without_bias(conv, h), conv.bias)
    return skip(x) + conv(h)


def concat_skip(h: torch.Tensor, skip: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    """torch.cat([h, skip], dim=1): a UNet decoder block's input, h: (B, C_h, *spatial) from the block below, skip:
    (B, C_s, *spatial) from the encoder. In backward, cat hands each input a channel slice of its gradient, strided
    rather than dense. h's slice goes on to convolutions (a ResBlock's conv and shortcut, an upsampler's conv), and
    cuDNN copies a strided gradient to dense once for the input gradient and once for the weight gradient, in every one
    of them; so h's gradient is made dense here, once, in h's own layout. skip's slice is only added to the gradient
    the encoder's next block returns, which reads it as it is. With `use_triton`, channels-last inputs are copied (and
    h's gradient made dense) by kernels/concat.py, vectorised where PyTorch's copies into and out of channel slices
    are not."""
    if use_triton:
        from kernels import concat  # imported on first use: CPU-only runs never load Triton
        if concat.kernel_takes(h, skip):
            return concat.concat_channels(h, skip)
    return torch.cat([_DenseGradient.apply(h), skip], dim=1)


class SkipConcat(KernelChoice, nn.Module):
    """`concat_skip` as a layer, so that the model's `kernels` choice (`set_kernels`) reaches it; no parameters."""

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return concat_skip(h, skip, use_triton=self.uses_triton(h))


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward returns the gradient dense in the forward input's layout (contiguous or channels-last;
    no copy where it already is)."""

    @staticmethod
    def forward(ctx, x):
        ctx.channels_last = is_channels_last(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return dense(grad, ctx.channels_last)


THIN_CHANNELS = 8  # kernels.thin_conv.MAX_THIN (not imported here: this module does not load Triton)


def _is_thin_conv3d(conv: nn.modules.conv._ConvNd) -> bool:
    return (isinstance(conv, nn.Conv3d) and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
            and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) <= THIN_CHANNELS
            and conv.in_channels != conv.out_channels)  # a thin side against a wider one


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """`nn.AvgPool{dims}d(*args, **kwargs)`."""
    return _AVG_POOL[check_dims(dims, "avg_pool_nd")](*args, **kwargs)


def batch_norm_nd(dims: int, *args, **kwargs) -> nn.Module:
    """`nn.BatchNorm{dims}d(*args, **kwargs)`."""
    return _BATCH_NORM[check_dims(dims, "batch_norm_nd")](*args, **kwargs)


def spatial_dims(x: torch.Tensor, dims: int) -> tuple[int, ...]:
    """Spatial shape of x: (B, C, *spatial) with len(spatial) == dims; a tensor of another rank raises."""
    if x.ndim != dims + 2:
        raise ValueError(f"expected a (B, C, {', '.join('DHW'[3 - dims:])}) tensor for dims={dims}, "
                         f"got shape {tuple(x.shape)}")
    return tuple(x.shape[2:])


def upsample_nearest(x: torch.Tensor, scale_factor: int | Sequence[int] = 2, use_triton: bool = False) -> torch.Tensor:
    """Nearest-neighbour upsampling of x: (B, C, *spatial) -> (B, C, *spatial * scale_factor), any dims, any dtype.

    The output size is given explicitly so that odd sizes map to exactly `size * factor` (no float rounding). With
    `use_triton`, channels-last x goes through the Triton kernels of kernels/upsample.py (forward and backward at
    memory speed; the broadcast copy below runs PyTorch's unvectorised copy kernel).
    """
    spatial = x.shape[2:]
    factors = [scale_factor] * len(spatial) if isinstance(scale_factor, int) else list(scale_factor)
    if len(factors) != len(spatial):
        raise ValueError(f"upsample_nearest: {len(factors)} scale factors for {len(spatial)} spatial dims")
    if use_triton:
        from kernels import upsample  # imported on first use: CPU-only runs never load Triton
        if upsample.kernel_takes(x):
            return upsample.upsample_nearest(x, tuple(factors))
    size = [s * f for s, f in zip(spatial, factors)]
    channels_last = is_channels_last(x)
    if channels_last or math.prod(size) * x.shape[0] * x.shape[1] >= 2 ** 31:
        # channels-last, or too large for PyTorch's nearest kernels (a 128 x 256^2 x 512 output fails on CUDA)
        return _upsample_nearest_broadcast(x, factors, channels_last)
    if not (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)):
        return F.interpolate(x, size=size, mode="nearest")
    # Outside autocast: CUDA autocast runs upsample_nearest in fp32, which casts a bf16 input up, moves twice the bytes
    # through the interpolation and its backward and leaves the next conv to cast the 2^dims times larger result back
    # down. Nearest neighbour only copies values, so it is exact in the input's own dtype.
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x, size=size, mode="nearest")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` in place and return it (residual branches that start as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def _upsample_nearest_broadcast(x: torch.Tensor, factors: Sequence[int], channels_last: bool) -> torch.Tensor:
    """Nearest upsampling as a broadcast along a new axis after each spatial axis, written once by a copy kernel
    (which indexes any size). Channels-last x is handled as (B, *spatial, C) and stays channels-last (PyTorch's 3D
    nearest kernel reads it through layout copies). Exact in any dtype; backward sums over the broadcast axes."""
    b, c, *spatial = x.shape
    unit = [n for s in spatial for n in (s, 1)]
    repeated = [n for s, f in zip(spatial, factors) for n in (s, f)]
    size = [s * f for s, f in zip(spatial, factors)]
    if not channels_last:
        return x.reshape(b, c, *unit).expand(b, c, *repeated).reshape(b, c, *size)
    y = x.movedim(1, -1).reshape(b, *unit, c).expand(b, *repeated, c)
    return y.reshape(b, *size, c).movedim(-1, 1)
