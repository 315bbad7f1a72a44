"""Nearest-neighbour upsampling of channels-last tensors by integer factors per spatial axis, forward and backward.

x: (N, C, *spatial) with 1 to 3 spatial axes, stored channels-last -> (N, C, *spatial * factors), channels-last, x's
dtype. PyTorch's nearest kernels read channels-last x through layout copies, and a broadcast-and-reshape copy (what
`ldm.modules.nn_dims.upsample_nearest` does otherwise) takes PyTorch's unvectorised kernel: 0.125 ms for a
4 x 256 x 32^3 bf16 output on an H200, where writing it takes ~16 us. Here both are read and written as
(samples * positions, C) rows: the forward copies each input row to its prod(factors) output rows, the backward sums
those rows' gradients in fp32 into the input's. `upsample_nearest_reference` is the spec.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.layout import dense, empty_channels_last, is_channels_last, row_blocks

TILE = 4096          # elements of one (rows, channels) tile
MAX_BLOCK_C = 256
INT32_LIMIT = 2 ** 31   # offsets at or above it are computed in int64
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def upsample_nearest_reference(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """x: (N, C, *spatial) -> each value repeated factors[i] times along spatial axis i (exact in any dtype)."""
    for axis, factor in enumerate(factors):
        x = x.repeat_interleave(factor, dim=2 + axis)
    return x


@triton.jit
def _positions(rows, D, H, W):
    """Row index of a (N, D, H, W) grid -> (n, d, h, w)."""
    w = rows % W
    rest = rows // W
    h = rest % H
    rest = rest // H
    return rest // D, rest % D, h, w


@triton.jit
def _upsample_forward_kernel(x_ptr, y_ptr, M_out, C, D, H, W, FD: tl.constexpr, FH: tl.constexpr,
                             FW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Program (m, c): output rows [m * BLOCK_M, ...) of y: (N * D*FD * H*FH * W*FW, C), channels [c * BLOCK_C, ...),
    each copied from its input row of x: (N * D * H * W, C)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M_out)[:, None] & (cols < C)[None, :]
    n, d, h, w = _positions(rows, D * FD, H * FH, W * FW)
    source = ((n * D + d // FD) * H + h // FH) * W + w // FW
    values = tl.load(x_ptr + source[:, None] * C + cols[None, :], mask=mask)
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], values, mask=mask)


@triton.jit
def _upsample_backward_kernel(dy_ptr, dx_ptr, M_in, C, D, H, W, FD: tl.constexpr, FH: tl.constexpr,
                              FW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Program (m, c): input rows [m * BLOCK_M, ...) of dx, channels [c * BLOCK_C, ...), each the fp32 sum of its
    FD * FH * FW output rows of dy."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M_in)[:, None] & (cols < C)[None, :]
    n, d, h, w = _positions(rows, D, H, W)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(FD):
        for j in tl.static_range(FH):
            for k in tl.static_range(FW):
                out_rows = ((n * (D * FD) + d * FD + i) * (H * FH) + h * FH + j) * (W * FW) + w * FW + k
                acc += tl.load(dy_ptr + out_rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + rows[:, None] * C + cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, src: torch.Tensor, dst: torch.Tensor, grid_rows: int, spatial: tuple[int, ...],
            factors: tuple[int, ...]) -> None:
    """Runs `kernel` over `grid_rows` rows of C channels; spatial / factors: the input's, padded to 3 axes."""
    C = src.shape[1]
    block_m, block_c = row_blocks(grid_rows, C, TILE, MAX_BLOCK_C)
    grid = (triton.cdiv(grid_rows, block_m), triton.cdiv(C, block_c))
    kernel[grid](src, dst, grid_rows, C, *spatial, *factors, BLOCK_M=block_m, BLOCK_C=block_c,
                 INT64=max(src.numel(), dst.numel()) + TILE >= INT32_LIMIT, num_warps=4)


def _padded(values: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * (3 - len(values)) + tuple(values)


class _UpsampleNearest(torch.autograd.Function):
    """x: (N, C, *spatial) channels-last -> (N, C, *spatial * factors) channels-last; backward:
    `upsample_nearest_backward`."""

    @staticmethod
    def forward(ctx, x, factors):
        N, C, *spatial = x.shape
        out_spatial = [s * f for s, f in zip(spatial, factors)]
        y = empty_channels_last((N, C, *out_spatial), x)
        _launch(_upsample_forward_kernel, x, y, N * math.prod(out_spatial), _padded(spatial), _padded(factors))
        ctx.shape, ctx.factors = x.shape, factors
        return y

    @staticmethod
    def backward(ctx, dy):
        return upsample_nearest_backward(dy, ctx.shape, ctx.factors), None


def upsample_nearest_backward(dy: torch.Tensor, input_shape: torch.Size, factors: tuple[int, ...]) -> torch.Tensor:
    """The gradient of `upsample_nearest` for an x of `input_shape`: each input position's sum of its prod(factors)
    output positions of dy (any layout; made channels-last), summed in fp32, channels-last in dy's dtype."""
    N, C, *spatial = input_shape
    dy = dense(dy, channels_last=True)
    dx = empty_channels_last((N, C, *spatial), dy)
    _launch(_upsample_backward_kernel, dy, dx, N * math.prod(spatial), _padded(spatial), _padded(factors))
    return dx


def kernel_takes(x: torch.Tensor) -> bool:
    """Whether `upsample_nearest` runs the kernels on x (else it is the reference): channels-last (N, C, *spatial)
    with 1 to 3 spatial axes, C > 1, a float dtype, on CUDA or in Triton's interpreter."""
    return (3 <= x.ndim <= 5 and x.shape[1] > 1 and is_channels_last(x) and x.is_floating_point()
            and x.dtype != torch.float64 and x.numel() > 0 and (x.is_cuda or _INTERPRET))


def upsample_nearest(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """x: (N, C, *spatial) -> (N, C, *spatial * factors) by nearest neighbour, in x's dtype and layout; one positive
    integer factor per spatial axis. The Triton kernels where `kernel_takes(x)`, the reference otherwise."""
    factors = tuple(int(f) for f in factors)
    if len(factors) != x.ndim - 2 or min(factors, default=0) < 1:
        raise ValueError(f"upsample_nearest: one positive integer factor per spatial axis of x {tuple(x.shape)} "
                         f"expected, got {factors}")
    if not kernel_takes(x):
        return upsample_nearest_reference(x, factors)
    return _UpsampleNearest.apply(x, factors)
