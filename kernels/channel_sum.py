"""Per-channel sums of a channels-last tensor in fp32: a bias's gradient, grad.sum over samples and space.

x: (N, C, *spatial) channels-last, any float dtype -> (C,) fp32 (float64 for float64 x). PyTorch reduces such a
tensor over its outer axes at a few percent of memory bandwidth (0.13 ms for a 4 x 128 x 32^3 bf16 gradient on an H200,
where reading it takes 8 us); here the tensor is read as its (N * spatial, C) rows: programs sum blocks of rows into
fp32 partials, one per program and channel, which a second, small sum combines (deterministic: no atomics).
`channel_sum_reference` is the spec; other layouts and devices the kernel does not run on go through it.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.layout import is_channels_last

TILE = 8192                    # elements of one (rows, channels) register tile
MAX_BLOCK_C = 256
PROGRAMS_PER_MULTIPROCESSOR = 4
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def channel_sum_reference(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, *spatial) -> (C,) sums in fp32 (float64 for float64 x)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.sum(dim=[d for d in range(x.ndim) if d != 1], dtype=compute)


@triton.jit
def _channel_sum_kernel(x_ptr, part_ptr, M, C, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        INT64: tl.constexpr):
    """Program (m, c) sums rows [m * rows_per_program, ...) of channels [c * BLOCK_C, ...) of x: (M, C) row-major
    into part[m, channels]."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    first = pid_m * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        if INT64:
            rows = rows.to(tl.int64)
        mask = (rows < last)[:, None] & col_mask[None, :]
        acc += tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid_m * C + cols, tl.sum(acc, axis=0), mask=col_mask)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if _INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_takes(x: torch.Tensor) -> bool:
    return (x.ndim >= 3 and is_channels_last(x) and x.numel() > 0 and x.dtype != torch.float64
            and (x.is_cuda or _INTERPRET))


def channel_sum(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, *spatial) -> (C,) fp32 sums over samples and space; the Triton kernel for channels-last x."""
    if x.ndim < 2:
        raise ValueError(f"channel_sum: x (N, C, *spatial) expected, got {tuple(x.shape)}")
    if not _kernel_takes(x):
        return channel_sum_reference(x)
    C = x.shape[1]
    M = x.numel() // C
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    block_m = max(1, min(TILE // block_c, triton.next_power_of_2(M)))
    column_blocks = triton.cdiv(C, block_c)
    wanted = max(1, PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(x.device) // column_blocks)
    rows_per_program = block_m * triton.cdiv(triton.cdiv(M, wanted), block_m)
    programs = triton.cdiv(M, rows_per_program)
    partials = torch.empty(programs, C, device=x.device, dtype=torch.float32)
    _channel_sum_kernel[(programs, column_blocks)](x, partials, M, C, rows_per_program, BLOCK_M=block_m,
                                                   BLOCK_C=block_c, INT64=x.numel() + TILE >= 2 ** 31,
                                                   num_warps=8)
    return partials.sum(dim=0)


class _AddChannelBias(torch.autograd.Function):
    """y += bias[c] in place (PyTorch adds a cuDNN convolution's bias the same way, in a pass of its own); the bias's
    gradient is `channel_sum` of the incoming one."""

    @staticmethod
    def forward(ctx, y, bias):
        y.add_(bias.to(y.dtype).reshape(1, -1, *(1,) * (y.ndim - 2)))
        ctx.mark_dirty(y)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, channel_sum(grad).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None


def add_channel_bias_(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y: (N, C, *spatial) += bias: (C,) (cast to y's dtype), in place, e.g. on a convolution's output computed without
    its bias; returns y. Backward: the gradient passes to y, and bias's is its fp32 per-channel sum (`channel_sum`)."""
    if y.ndim < 2 or bias.shape != (y.shape[1],):
        raise ValueError(f"add_channel_bias_: y (N, C, *spatial) and a (C,) bias expected, got y {tuple(y.shape)}, "
                         f"bias {tuple(bias.shape)}")
    return _AddChannelBias.apply(y, bias)
