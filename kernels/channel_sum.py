"""Per-channel sums of a channels-last tensor in fp32: a bias's gradient, grad.sum over samples and space.

x: (N, C, *spatial) with channels innermost, any float dtype -> (C,) fp32 (float64 for float64 x). PyTorch reduces
such a tensor over its outer axes at a few percent of memory bandwidth (0.12 ms for a 4 x 128 x 32^3 bf16 gradient on
an H200, where reading it takes 8 us); here the tensor is read as its (N * spatial, C) rows: programs sum blocks of
rows into fp32 partials, one per program and channel, which a second, small sum combines (deterministic: no atomics).
The rows may be further apart than C (a channel slice of a wider channels-last tensor: the gradient that
`torch.cat` along channels hands each of its inputs, as in a UNet's skip connections).
`channel_sum_reference` is the spec; other layouts and devices the kernel does not run on go through it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.layout import multiprocessors, row_blocks

TILE = 8192                    # elements of one (rows, channels) register tile
MAX_BLOCK_C = 256
PROGRAMS_PER_MULTIPROCESSOR = 4
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def channel_sum_reference(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, *spatial) -> (C,) sums in fp32 (float64 for float64 x)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.sum(dim=[d for d in range(x.ndim) if d != 1], dtype=compute)


@triton.jit
def _channel_sum_kernel(x_ptr, part_ptr, M, C, row_stride, rows_per_program, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Program (m, c) sums rows [m * rows_per_program, ...) of channels [c * BLOCK_C, ...) of x: (M, C), rows
    `row_stride` elements apart and channels adjacent, into part[m, channels]."""
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
        acc += tl.load(x_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid_m * C + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def _add_channel_bias_kernel(y_ptr, bias_ptr, M, C, row_stride, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                             INT64: tl.constexpr):
    """Program (m, c) adds bias[channels] to rows [m * BLOCK_M, ...) of y: (M, C), rows `row_stride` apart, in place;
    the sum is rounded to y's dtype, as PyTorch's add of a bias already cast to that dtype is."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    offsets = rows[:, None] * row_stride + cols[None, :]
    y = tl.load(y_ptr + offsets, mask=mask)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(y.dtype)
    tl.store(y_ptr + offsets, (y.to(tl.float32) + bias.to(tl.float32)[None, :]).to(y.dtype), mask=mask)


def _channel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x: (N, C, *spatial) as (N * spatial, C) rows with adjacent channels (a view), or None where its strides do not
    allow that (e.g. plain contiguous x)."""
    if x.stride(1) != 1 or x.shape[1] == 1:
        return None
    try:
        return x.movedim(1, -1).view(-1, x.shape[1])
    except RuntimeError:  # the outer axes do not collapse into one stride
        return None


def _needs_int64(rows: torch.Tensor) -> bool:
    """Whether offsets into (M, C) rows (a tile past the end included) reach int32's limit."""
    return rows.shape[0] * rows.stride(0) + TILE >= 2 ** 31


def _kernel_takes(x: torch.Tensor) -> bool:
    return x.ndim >= 3 and x.numel() > 0 and x.dtype != torch.float64 and (x.is_cuda or _INTERPRET)


def channel_sum(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, *spatial) -> (C,) fp32 sums over samples and space; the Triton kernel where channels are innermost
    (channels-last x, or a channel slice of one)."""
    if x.ndim < 2:
        raise ValueError(f"channel_sum: x (N, C, *spatial) expected, got {tuple(x.shape)}")
    rows = _channel_rows(x) if _kernel_takes(x) else None
    if rows is None:
        return channel_sum_reference(x)
    M, C = rows.shape
    block_m, block_c = row_blocks(M, C, TILE, MAX_BLOCK_C)
    column_blocks = triton.cdiv(C, block_c)
    wanted = max(1, PROGRAMS_PER_MULTIPROCESSOR * multiprocessors(x.device) // column_blocks)
    rows_per_program = block_m * triton.cdiv(triton.cdiv(M, wanted), block_m)
    programs = triton.cdiv(M, rows_per_program)
    partials = torch.empty(programs, C, device=x.device, dtype=torch.float32)
    _channel_sum_kernel[(programs, column_blocks)](rows, partials, M, C, rows.stride(0), rows_per_program,
                                                   BLOCK_M=block_m, BLOCK_C=block_c, INT64=_needs_int64(rows),
                                                   num_warps=8)
    return partials.sum(dim=0)


def _add_bias_to_rows(rows: torch.Tensor, bias: torch.Tensor) -> None:
    """rows: (M, C) with adjacent channels += bias: (C,) cast to rows' dtype, in place."""
    M, C = rows.shape
    block_m, block_c = row_blocks(M, C, TILE, MAX_BLOCK_C)
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c))
    _add_channel_bias_kernel[grid](rows, bias, M, C, rows.stride(0), BLOCK_M=block_m, BLOCK_C=block_c,
                                   INT64=_needs_int64(rows), num_warps=8)


class _AddChannelBias(torch.autograd.Function):
    """y += bias[c] in place (PyTorch adds a cuDNN convolution's bias the same way, in a pass of its own; here in
    Triton where y's channels are innermost); the bias's gradient is `channel_sum` of the incoming one."""

    @staticmethod
    def forward(ctx, y, bias):
        rows = _channel_rows(y) if _kernel_takes(y) else None
        if rows is None:
            y.add_(bias.to(y.dtype).reshape(1, -1, *(1,) * (y.ndim - 2)))
        else:  # PyTorch's add of a broadcast bias to channels-last y takes its unvectorised kernel: ~half bandwidth
            _add_bias_to_rows(rows, bias)
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
