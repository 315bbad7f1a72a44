"""Concatenation of two channels-last tensors along channels, forward and backward (a UNet decoder block's input).

h: (N, C1, *spatial), skip: (N, C2, *spatial), both channels-last -> (N, C1 + C2, *spatial), channels-last. PyTorch's
torch.cat writes each input into a channel slice of a channels-last output, rows C1 + C2 apart, and copying into (or
out of) such a slice takes its unvectorised copy kernel: in the 166M UNet's step on an H200 the ten skip
concatenations and their gradients made 28 such copies, 0.61 ms. Here every copy is of (positions, channels) rows
between row strides, vectorised along channels: the forward copies h's rows and skip's rows into their column ranges
of the output's; the backward copies the gradient's first C1 columns into h's gradient, dense (it goes on to
convolutions, which would copy a strided gradient to dense twice each), and hands skip its slice of the gradient as
it is (only added to another gradient, which reads it strided). `torch.cat` is the spec.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.layout import dense, empty_channels_last, is_channels_last, row_blocks

TILE = 8192          # elements of one (rows, channels) tile
MAX_BLOCK_C = 256
INT32_LIMIT = 2 ** 31   # offsets at or above it are computed in int64
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, M, C, src_stride, dst_stride, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      INT64: tl.constexpr):
    """Program (m, c): dst[r * dst_stride + j] = src[r * src_stride + j] for rows r in [m * BLOCK_M, ...) of M and
    columns j in [c * BLOCK_C, ...) of C."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    values = tl.load(src_ptr + rows[:, None] * src_stride + cols[None, :], mask=mask)
    tl.store(dst_ptr + rows[:, None] * dst_stride + cols[None, :], values, mask=mask)


def _rows(t: torch.Tensor) -> tuple[int, int, int]:
    """(rows, columns, row stride) of t: (N, C, *spatial) channels-last, or a channel slice of a wider such tensor,
    read as (N * positions, C) rows with contiguous columns (at least two positions: the innermost spatial axis
    longer than one gives the stride)."""
    stride = next(t.stride(d) for d in reversed(range(2, t.ndim)) if t.shape[d] > 1)
    return t.numel() // t.shape[1], t.shape[1], stride


def _copy_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[...] = src for two channels-last tensors (or channel slices of such) of one shape."""
    rows, columns, src_stride = _rows(src)
    _, _, dst_stride = _rows(dst)
    block_m, block_c = row_blocks(rows, columns, TILE, MAX_BLOCK_C)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(columns, block_c))
    largest = rows * max(src_stride, dst_stride)
    _copy_rows_kernel[grid](src, dst, rows, columns, src_stride, dst_stride, BLOCK_M=block_m, BLOCK_C=block_c,
                            INT64=largest + TILE >= INT32_LIMIT, num_warps=4)


class _ConcatChannels(torch.autograd.Function):
    """(h, skip) channels-last -> cat([h, skip], dim=1) channels-last; backward: h's gradient dense, skip's a slice."""

    @staticmethod
    def forward(ctx, h, skip):
        c1 = h.shape[1]
        out = empty_channels_last((h.shape[0], c1 + skip.shape[1], *h.shape[2:]), h)
        _copy_rows(h, out[:, :c1])
        _copy_rows(skip, out[:, c1:])
        ctx.c1 = c1
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = dense(grad, channels_last=True)
        return leading_channels_dense(grad, ctx.c1), grad[:, ctx.c1:]


def leading_channels_dense(grad: torch.Tensor, channels: int) -> torch.Tensor:
    """grad[:, :channels] copied dense, channels-last (h's gradient): grad (N, C, *spatial) channels-last."""
    dh = empty_channels_last(grad[:, :channels].shape, grad)
    _copy_rows(grad[:, :channels], dh)
    return dh


def kernel_takes(h: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether `concat_channels` runs the kernels: h and skip channels-last (N, C, *spatial) with 1 to 3 spatial axes
    and more than one position, of one dtype (not float64), batch and spatial shape, on CUDA or in the interpreter."""
    return (3 <= h.ndim <= 5 and h.ndim == skip.ndim and h.shape[0] == skip.shape[0] and h.shape[2:] == skip.shape[2:]
            and h.dtype == skip.dtype and h.is_floating_point() and h.dtype != torch.float64 and h.numel() > 0
            and skip.numel() > 0 and h.shape[2:].numel() > 1 and is_channels_last(h) and is_channels_last(skip)
            and h.device == skip.device and (h.is_cuda or _INTERPRET))


def concat_channels(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """torch.cat([h, skip], dim=1): h (N, C1, *spatial), skip (N, C2, *spatial) -> (N, C1 + C2, *spatial), channels-
    last, with h's gradient dense (see the module docstring). The kernels where `kernel_takes`, torch.cat otherwise."""
    if not kernel_takes(h, skip):
        return torch.cat([h, skip], dim=1)
    return _ConcatChannels.apply(h, skip)
