"""3x3x3 convolutions (stride 1, zero padding 1) with one input or one output channel, in Triton: a 3D autoencoder's
first layer (image -> C channels) and last (C channels -> image), forward and backward.

cuDNN has no Hopper kernel for a one-channel side and ran these two layers, ~7 GFLOP each at 128^3, in ~6 ms of
forward + backward (benchmarks/bench_thin_conv.py); zero-padding the thin side to 4-16 channels did not help. Here the
wide side is channels-last, so every spatial position's C channels are one contiguous row, and each layer is one pass:

    thin -> wide   out[s, c] = sum_k t[s + o_k] W[k, c]     27 taps gathered into a (positions, 32) tile, one tl.dot
    wide -> thin   out[s]    = sum_k sum_c u[s + o_k, c] W[k, c]   27 shifted (positions, C) loads, fp32 sums
    weight grad    G[k, c]   = sum_s t[s +- o_k] u[s, c]    the same gathered tile, transposed, times u (tl.dot);
                                                            column 27 of the tile is 1, so G[27] = sum_s u[s, :]
o_k is the flat offset of tap k = (kd, kh, kw) (outside the volume the tap reads 0). The input gradient of a thin ->
wide layer is a wide -> thin pass with the taps mirrored (FLIP), and vice versa.

Shapes: thin (N, 1, D, H, W), wide (N, C, D, H, W) channels-last (others are copied into it); weight (C, 1, 3, 3, 3) or
(1, C, 3, 3, 3); bias (C,) or (1,). Under autocast the inputs are cast to its dtype, as for a convolution; products are
summed in fp32. C is a compile-time constant: the wide rows' offsets s * C + c are then known to be contiguous and
aligned, and their loads and stores vectorised (with C a runtime argument, the wide -> thin pass ran 16x slower than
cuDNN on an H100). `F.conv3d(x, weight, bias, padding=1)` is the spec. Positions are indexed in int32: fewer than
2^31 voxels per tensor.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.layout import dot_precision

TAPS = 27
TAP_COLUMNS = 32  # the taps, then a column of ones (bias gradient), padded to a power of two
BLOCK_S = 128
WIDE_TO_THIN_BLOCK_S = 64
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _positions(pid, total, D, H, W, BLOCK_S: tl.constexpr):
    """BLOCK_S flat positions s = ((n * D + d) * H + h) * W + w of this program, their (d, h, w), and validity."""
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    return s, (s // (W * H)) % D, (s // W) % H, s % W, s < total


@triton.jit
def _gather_taps(t_ptr, s, d, h, w, valid, D, H, W, FLIP: tl.constexpr, ONES_COLUMN: tl.constexpr):
    """(BLOCK_S, 32) tile: column k < 27 holds t at s + o_k (s - o_k with FLIP), 0 outside the volume; column 27 holds
    1 where s is valid (ONES_COLUMN) or 0; the rest 0."""
    k = tl.arange(0, 32)
    sign = -1 if FLIP else 1
    dd = sign * (k // 9 - 1)
    dh = sign * ((k // 3) % 3 - 1)
    dw = sign * (k % 3 - 1)
    td = d[:, None] + dd[None, :]
    th = h[:, None] + dh[None, :]
    tw = w[:, None] + dw[None, :]
    inside = (td >= 0) & (td < D) & (th >= 0) & (th < H) & (tw >= 0) & (tw < W)
    ok = valid[:, None] & (k < 27)[None, :] & inside
    tile = tl.load(t_ptr + s[:, None] + (dd * H * W + dh * W + dw)[None, :], mask=ok, other=0.0)
    if ONES_COLUMN:
        tile = tl.where(valid[:, None] & (k == 27)[None, :], 1.0, tile.to(tl.float32))
    return tile


@triton.jit
def _thin_to_wide_kernel(t_ptr, w_ptr, b_ptr, out_ptr, total, D, H, W, C: tl.constexpr,
                         FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                         PRECISION: tl.constexpr):
    """out[s, c] = sum_k t[s +- o_k] W[k, c] (+ bias[c]); W: (27, C) in the compute dtype; out channels-last."""
    s, d, h, w, valid = _positions(tl.program_id(0), total, D, H, W, BLOCK_S)
    taps = _gather_taps(t_ptr, s, d, h, w, valid, D, H, W, FLIP, False)
    k = tl.arange(0, 32)
    c = tl.arange(0, BLOCK_C)
    weights = tl.load(w_ptr + k[:, None] * C + c[None, :], mask=(k < 27)[:, None] & (c < C)[None, :], other=0.0)
    acc = tl.dot(taps.to(weights.dtype), weights, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    offsets = s.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (c < C)[None, :])


@triton.jit
def _wide_to_thin_kernel(u_ptr, w_ptr, b_ptr, out_ptr, total, D, H, W, C: tl.constexpr,
                         FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[s] = sum_k sum_c u[s +- o_k, c] W[k, c] (+ bias); u channels-last, W: (27, C)."""
    s, d, h, w, valid = _positions(tl.program_id(0), total, D, H, W, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    for k in tl.static_range(27):
        sign = -1 if FLIP else 1
        dd = sign * (k // 9 - 1)
        dh = sign * ((k // 3) % 3 - 1)
        dw = sign * (k % 3 - 1)
        inside = ((d + dd >= 0) & (d + dd < D) & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W))
        rows = (s + dd * H * W + dh * W + dw).to(tl.int64)
        u = tl.load(u_ptr + rows[:, None] * C + c[None, :], mask=(valid & inside)[:, None] & c_ok[None, :], other=0.0)
        weight = tl.load(w_ptr + k * C + c, mask=c_ok, other=0.0).to(tl.float32)
        acc += u.to(tl.float32) * weight[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr).to(tl.float32)
    tl.store(out_ptr + s, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _weight_grad_kernel(t_ptr, u_ptr, part_ptr, total, D, H, W, C: tl.constexpr, tiles_per_program,
                        FLIP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """This program's share of G[k, c] = sum_s t[s +- o_k] u[s, c] (k < 27) and G[27, c] = sum_s u[s, c], written to
    part_ptr[program] as a (32, BLOCK_C) fp32 block."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    acc = tl.zeros((32, BLOCK_C), tl.float32)
    for i in range(tiles_per_program):
        s, d, h, w, valid = _positions(pid * tiles_per_program + i, total, D, H, W, BLOCK_S)
        u = tl.load(u_ptr + s.to(tl.int64)[:, None] * C + c[None, :], mask=valid[:, None] & (c < C)[None, :],
                    other=0.0)
        taps = _gather_taps(t_ptr, s, d, h, w, valid, D, H, W, FLIP, True)
        acc += tl.dot(tl.trans(taps.to(u.dtype)), u, input_precision=PRECISION)
    k = tl.arange(0, 32)
    tl.store(part_ptr + pid * 32 * BLOCK_C + k[:, None] * BLOCK_C + c[None, :], acc)


def _block_c(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def _thin(t: torch.Tensor) -> torch.Tensor:
    """A one-channel tensor whose memory is its flat positions (either layout)."""
    return t if t.is_contiguous() else t.contiguous()


def _wide(u: torch.Tensor) -> torch.Tensor:
    return u.contiguous(memory_format=torch.channels_last_3d)


def _thin_to_wide(t: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, flip: bool) -> torch.Tensor:
    """t: (N, 1, D, H, W), taps: (27, C) -> (N, C, D, H, W) channels-last in t's dtype."""
    N, _, D, H, W = t.shape
    C = taps.shape[1]
    out = torch.empty((N, D, H, W, C), device=t.device, dtype=t.dtype).movedim(-1, 1)
    total = N * D * H * W
    _thin_to_wide_kernel[(triton.cdiv(total, BLOCK_S),)](
        t, taps, bias if bias is not None else taps, out, total, D, H, W, C, FLIP=flip, HAS_BIAS=bias is not None,
        BLOCK_S=BLOCK_S, BLOCK_C=_block_c(C), PRECISION=dot_precision(taps.dtype), num_warps=4)
    return out


def _wide_to_thin(u: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, flip: bool) -> torch.Tensor:
    """u: (N, C, D, H, W) channels-last, taps: (27, C) -> (N, 1, D, H, W) in u's dtype, channels-last strides."""
    N, C, D, H, W = u.shape
    out = torch.empty((N, D, H, W, 1), device=u.device, dtype=u.dtype).movedim(-1, 1)
    total = N * D * H * W
    _wide_to_thin_kernel[(triton.cdiv(total, WIDE_TO_THIN_BLOCK_S),)](
        u, taps, bias if bias is not None else taps, out, total, D, H, W, C, FLIP=flip, HAS_BIAS=bias is not None,
        BLOCK_S=WIDE_TO_THIN_BLOCK_S, BLOCK_C=_block_c(C), num_warps=4)
    return out


def _weight_grad(t: torch.Tensor, u: torch.Tensor, flip: bool) -> torch.Tensor:
    """(28, C) fp32: rows k < 27 = sum_s t[s +- o_k] u[s, :], row 27 = sum_s u[s, :]; t thin, u wide channels-last,
    one dtype."""
    N, C, D, H, W = u.shape
    total = N * D * H * W
    tiles = triton.cdiv(total, BLOCK_S)
    programs = 1 if _INTERPRET else min(tiles, 4 * torch.cuda.get_device_properties(u.device).multi_processor_count)
    tiles_per_program = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, tiles_per_program)
    block_c = _block_c(C)
    parts = torch.empty((programs, TAP_COLUMNS, block_c), device=u.device, dtype=torch.float32)
    _weight_grad_kernel[(programs,)](t, u, parts, total, D, H, W, C, tiles_per_program, FLIP=flip, BLOCK_S=BLOCK_S,
                                     BLOCK_C=block_c, PRECISION=dot_precision(u.dtype), num_warps=4)
    return parts.sum(0)[:TAPS + 1, :C]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _ThinConv3d(torch.autograd.Function):
    """Thin to wide: x (N, 1, D, H, W), weight (C, 1, 3, 3, 3) -> (N, C, D, H, W) channels-last. Wide to thin:
    x (N, C, D, H, W), weight (1, C, 3, 3, 3) -> (N, 1, D, H, W). bias: (C_out,) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        thin_input = weight.shape[1] == 1
        x_c = (_thin if thin_input else _wide)(x.to(dtype))
        taps = weight.reshape(weight.shape[0 if thin_input else 1], TAPS).t().contiguous().to(dtype)
        conv = _thin_to_wide if thin_input else _wide_to_thin
        out = conv(x_c, taps, None if bias is None else bias.to(dtype), flip=False)
        ctx.save_for_backward(x_c, taps)
        ctx.meta = (thin_input, x.dtype, weight.dtype, None if bias is None else bias.dtype, weight.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_c, taps = ctx.saved_tensors
        thin_input, x_dtype, w_dtype, b_dtype, w_shape = ctx.meta
        grad = (_wide if thin_input else _thin)(grad.to(taps.dtype))
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # a pass of the other kind, taps mirrored
            dx = (_wide_to_thin if thin_input else _thin_to_wide)(grad, taps, None, flip=True).to(x_dtype)
        if ctx.needs_input_grad[1] or (thin_input and ctx.needs_input_grad[2]):
            # rows k < 27: sum_s thin[s +- o_k] wide[s, :]; row 27: sum_s wide[s, :] (the thin-to-wide bias gradient)
            g = _weight_grad(x_c, grad, flip=False) if thin_input else _weight_grad(grad, x_c, flip=True)
            dw = g[:TAPS].t().reshape(w_shape).to(w_dtype)
        if ctx.needs_input_grad[2] and b_dtype is not None:
            db = (g[TAPS] if thin_input else grad.float().sum().reshape(1)).to(b_dtype)
        return dx, dw, db, None


def thin_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=1) for a 3x3x3 weight with one input or one output channel, in the kernels.

    x: (N, C_in, D, H, W); weight: (C_out, C_in, 3, 3, 3) with C_in == 1 or C_out == 1; bias: (C_out,) or None.
    Returns (N, C_out, D, H, W), channels-last where C_out > 1, in the compute dtype (autocast's, else x's)."""
    if x.ndim != 5 or weight.ndim != 5 or tuple(weight.shape[2:]) != (3, 3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"thin_conv3d: x (N, C_in, D, H, W) and a (C_out, C_in, 3, 3, 3) weight expected, got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[1] != 1 and weight.shape[0] != 1:
        raise ValueError(f"thin_conv3d: one input or one output channel expected, weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"thin_conv3d: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if x.shape[0] * x[0, 0].numel() + 2 * BLOCK_S >= 2 ** 31:
        raise ValueError(f"thin_conv3d: {tuple(x.shape)} has 2^31 or more voxels, beyond the kernels' int32 positions")
    return _ThinConv3d.apply(x, weight, bias, _compute_dtype(x))
