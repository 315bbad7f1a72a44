"""out = x + y + bias[c] in one pass: a ResNet block's identity shortcut x plus its last convolution's output y,
the convolution run without its bias (PyTorch adds a cuDNN convolution's bias in a pass of its own over y).

x, y: (N, C, *spatial) of one dtype, both contiguous or both channels-last; bias: (C,) in any float dtype, added in
fp32; out has x's dtype and layout. Backward: the gradient passes to x and y unchanged, and the bias's is its sum over
samples and space (in fp32, by `kernels.channel_sum`). `residual_bias_add_reference` is the spec; inputs the kernel
does not take (other layouts, mixed dtypes, CPU tensors outside Triton's interpreter) go through it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.channel_sum import channel_sum
from kernels.layout import is_channels_last

BLOCK = 4096
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def residual_bias_add_reference(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + y + bias per channel, summed in fp32 (float64 for float64 x) and returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    bias = bias.to(compute).reshape(1, -1, *(1,) * (x.ndim - 2))
    return (x.to(compute) + y.to(compute) + bias).to(x.dtype)


@triton.jit
def _residual_bias_add_kernel(x_ptr, y_ptr, bias_ptr, out_ptr, numel, S, C: tl.constexpr,
                              CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK of the flat tensors; a flat index's channel is index % C (channels-last) or index // S % C."""
    start = tl.program_id(0).to(tl.int64) * BLOCK if INT64 else tl.program_id(0) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    channel = offsets % C if CHANNELS_LAST else (offsets // S) % C
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (x + y + bias).to(out_ptr.dtype.element_ty), mask=mask)


def _kernel_takes(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> bool:
    """Same shape, dtype and device, and both contiguous or both channels-last."""
    same_layout = ((x.is_contiguous() and y.is_contiguous())
                   or (is_channels_last(x) and is_channels_last(y)))
    return (x.shape == y.shape and x.dtype == y.dtype and x.device == y.device == bias.device
            and (x.is_cuda or _INTERPRET) and x.numel() > 0 and same_layout)


class _ResidualBiasAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, bias):
        out = torch.empty_like(x)
        C = x.shape[1]
        numel = x.numel()
        grid = (triton.cdiv(numel, BLOCK),)
        _residual_bias_add_kernel[grid](x, y, bias.contiguous(), out, numel, x[0, 0].numel(), C=C,
                                        CHANNELS_LAST=is_channels_last(x), INT64=numel + BLOCK >= 2 ** 31,
                                        BLOCK=BLOCK, num_warps=8)
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        d_bias = None
        if ctx.needs_input_grad[2]:
            d_bias = channel_sum(grad).to(ctx.bias_dtype)
        return grad, grad, d_bias


def residual_bias_add(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + y + bias per channel (x, y: (N, C, *spatial); bias: (C,)), in one pass where the kernel takes them."""
    if x.ndim < 3 or bias.shape != (x.shape[1],):
        raise ValueError(f"residual_bias_add: x (N, C, *spatial) and a (C,) bias expected, got x {tuple(x.shape)}, "
                         f"bias {tuple(bias.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"residual_bias_add: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    if not _kernel_takes(x, y, bias):
        return residual_bias_add_reference(x, y, bias)
    return _ResidualBiasAdd.apply(x, y, bias)
