"""3x3x3 convolutions (stride 1, zero padding 1) with a thin side of 1 to 8 channels, in Triton: a 3D autoencoder's
first layer (image -> C channels) and last (C channels -> image), a latent UNet's first (4-channel latent -> C) and
last (C -> 4), forward and backward.

cuDNN has no Hopper kernel for a one-channel side and ran the autoencoder's two layers, ~7 GFLOP each at 128^3, in ~6 ms
of forward + backward (benchmarks/bench_thin_conv.py); with 4 thin channels (the UNet's at 4 x 32^3) it takes 0.7-0.8
ms per layer; zero-padding the thin side to 8 or 16 channels did not help. Here both sides are channels-last, so every
spatial position's channels are one contiguous row, and each layer is one pass (T thin channels, t < T; column
j = k * T + t of the tap tile is thin channel t at tap k):

    thin -> wide   out[s, c] = sum_k,t x[s + o_k, t] W[k, t, c]    27 T taps gathered into a (positions, 32..256)
                                                                  tile, one tl.dot
    wide -> thin   out[s, t] = sum_k sum_c u[s + o_k, c] W[k, t, c]  27 shifted (positions, C) loads: fp32 sums
                                                                  (T = 1) or one tl.dot each (T > 1)
    weight grad    G[k, t, c] = sum_s x[s +- o_k, t] u[s, c]      the same gathered tile, transposed, times u
                                                                  (tl.dot); column 27 T of the tile is 1, so
                                                                  G[27 T] = sum_s u[s, :]
o_k is the flat offset of tap k = (kd, kh, kw) (outside the volume the tap reads 0). The input gradient of a thin ->
wide layer is a wide -> thin pass with the taps mirrored (FLIP), and vice versa.

Shapes: thin (N, T, D, H, W), wide (N, C, D, H, W), both channels-last (others are copied into it); weight
(C, T, 3, 3, 3) or (T, C, 3, 3, 3); bias (C,) or (T,). Under autocast the inputs are cast to its dtype, as for a
convolution; products are summed in fp32. C and T are compile-time constants: the rows' offsets s * C + c are then
known to be contiguous and aligned, and their loads and stores vectorised (with C a runtime argument, the wide -> thin
pass ran 16x slower than cuDNN on an H100). `F.conv3d(x, weight, bias, padding=1)` is the spec. Positions are indexed
in int32: fewer than 2^31 voxels per tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.layout import dot_precision, empty_channels_last, multiprocessors

TAPS = 27
MAX_THIN = 8      # thin channels the kernels take
BLOCK_S = 128
WIDE_TO_THIN_BLOCK_S = 64


@triton.jit
def _positions(pid, total, D, H, W, BLOCK_S: tl.constexpr):
    """BLOCK_S flat positions s = ((n * D + d) * H + h) * W + w of this program, their (d, h, w), and validity."""
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    return s, (s // (W * H)) % D, (s // W) % H, s % W, s < total


@triton.jit
def _gather_taps(t_ptr, s, d, h, w, valid, D, H, W, T: tl.constexpr, COLUMNS: tl.constexpr, FLIP: tl.constexpr,
                 ONES_COLUMN: tl.constexpr):
    """(BLOCK_S, COLUMNS) tile: column j = k * T + t < 27 T holds thin channel t at s + o_k (s - o_k with FLIP), 0
    outside the volume; column 27 T holds 1 where s is valid (ONES_COLUMN) or 0; the rest 0."""
    j = tl.arange(0, COLUMNS)
    k = j // T
    sign = -1 if FLIP else 1
    dd = sign * (k // 9 - 1)
    dh = sign * ((k // 3) % 3 - 1)
    dw = sign * (k % 3 - 1)
    td = d[:, None] + dd[None, :]
    th = h[:, None] + dh[None, :]
    tw = w[:, None] + dw[None, :]
    inside = (td >= 0) & (td < D) & (th >= 0) & (th < H) & (tw >= 0) & (tw < W)
    ok = valid[:, None] & (k < 27)[None, :] & inside
    rows = s[:, None] + (dd * H * W + dh * W + dw)[None, :]
    tile = tl.load(t_ptr + rows * T + (j % T)[None, :], mask=ok, other=0.0)
    if ONES_COLUMN:
        tile = tl.where(valid[:, None] & (j == 27 * T)[None, :], 1.0, tile.to(tl.float32))
    return tile


@triton.jit
def _thin_to_wide_kernel(t_ptr, w_ptr, b_ptr, out_ptr, total, D, H, W, C: tl.constexpr, T: tl.constexpr,
                         COLUMNS: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """Program (p, q): out[s, c] = sum_k,t x[s +- o_k, t] W[k * T + t, c] (+ bias[c]) for BLOCK_S positions and
    channels [q * BLOCK_C, ...); W: (27 T, C) in the compute dtype; out channels-last."""
    s, d, h, w, valid = _positions(tl.program_id(0), total, D, H, W, BLOCK_S)
    taps = _gather_taps(t_ptr, s, d, h, w, valid, D, H, W, T, COLUMNS, FLIP, False)
    j = tl.arange(0, COLUMNS)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    weights = tl.load(w_ptr + j[:, None] * C + c[None, :], mask=(j < 27 * T)[:, None] & (c < C)[None, :], other=0.0)
    acc = tl.dot(taps.to(weights.dtype), weights, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    offsets = s.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (c < C)[None, :])


@triton.jit
def _wide_to_thin_kernel(u_ptr, w_ptr, b_ptr, out_ptr, total, D, H, W, C: tl.constexpr, T: tl.constexpr,
                         BLOCK_T: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_C: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """out[s, t] = sum_k sum_c u[s +- o_k, c] W[k * T + t, c] (+ bias[t]); u channels-last, W: (27 T, C); out
    channels-last. One thin channel: fp32 products summed over c; more: a (BLOCK_S, C) x (C, BLOCK_T) dot per tap."""
    s, d, h, w, valid = _positions(tl.program_id(0), total, D, H, W, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_S, BLOCK_C if T == 1 else BLOCK_T), tl.float32)
    for k in tl.static_range(27):
        sign = -1 if FLIP else 1
        dd = sign * (k // 9 - 1)
        dh = sign * ((k // 3) % 3 - 1)
        dw = sign * (k % 3 - 1)
        inside = ((d + dd >= 0) & (d + dd < D) & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W))
        rows = (s + dd * H * W + dh * W + dw).to(tl.int64)
        if T == 1:
            u = tl.load(u_ptr + rows[:, None] * C + c[None, :], mask=(valid & inside)[:, None] & c_ok[None, :],
                        other=0.0)
            weight = tl.load(w_ptr + k * C + c, mask=c_ok, other=0.0).to(tl.float32)
            acc += u.to(tl.float32) * weight[None, :]
        else:  # per CHUNK channels: (BLOCK_S, CHUNK) x (CHUNK, BLOCK_T), W[k * T + t, c]
            for chunk in tl.static_range(BLOCK_C // CHUNK):
                cc = chunk * CHUNK + tl.arange(0, CHUNK)
                u = tl.load(u_ptr + rows[:, None] * C + cc[None, :], mask=(valid & inside)[:, None] & (cc < C)[None, :],
                            other=0.0)
                weight = tl.load(w_ptr + (k * T + t)[None, :] * C + cc[:, None],
                                 mask=(cc < C)[:, None] & (t < T)[None, :], other=0.0)
                acc += tl.dot(u.to(weight.dtype), weight, input_precision=PRECISION)
    if T == 1:
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr).to(tl.float32)
        tl.store(out_ptr + s, out.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + t, mask=t < T, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + s.to(tl.int64)[:, None] * T + t[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (t < T)[None, :])


@triton.jit
def _weight_grad_kernel(t_ptr, u_ptr, part_ptr, total, D, H, W, C: tl.constexpr, T: tl.constexpr,
                        COLUMNS: tl.constexpr, tiles_per_program, FLIP: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """Program (p, q)'s share of G[k * T + t, c] = sum_s x[s +- o_k, t] u[s, c] (k < 27) and G[27 T, c] = sum_s u[s, c]
    for channels c in [q * BLOCK_C, ...), written to part_ptr[p, :, c] of a (programs, COLUMNS, C_pad) fp32 buffer."""
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((COLUMNS, BLOCK_C), tl.float32)
    for i in range(tiles_per_program):
        s, d, h, w, valid = _positions(pid * tiles_per_program + i, total, D, H, W, BLOCK_S)
        u = tl.load(u_ptr + s.to(tl.int64)[:, None] * C + c[None, :], mask=valid[:, None] & (c < C)[None, :],
                    other=0.0)
        taps = _gather_taps(t_ptr, s, d, h, w, valid, D, H, W, T, COLUMNS, FLIP, True)
        acc += tl.dot(tl.trans(taps.to(u.dtype)), u, input_precision=PRECISION)
    j = tl.arange(0, COLUMNS)
    c_pad = tl.num_programs(1) * BLOCK_C
    tl.store(part_ptr + pid * COLUMNS * c_pad + j[:, None] * c_pad + c[None, :], acc)


def _block_c(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def _columns(T: int) -> int:
    """Width of the tap tile: 27 T taps and the column of ones, padded to a power of two."""
    return triton.next_power_of_2(TAPS * T + 1)


def _thin(t: torch.Tensor) -> torch.Tensor:
    """A thin tensor whose memory is its positions' rows of T channels (a one-channel one in either layout)."""
    if t.shape[1] == 1:
        return t if t.is_contiguous() else t.contiguous()
    return _wide(t)


def _wide(u: torch.Tensor) -> torch.Tensor:
    return u.contiguous(memory_format=torch.channels_last_3d)


def _thin_to_wide(t: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, flip: bool) -> torch.Tensor:
    """t: (N, T, D, H, W) thin rows, taps: (27 T, C) -> (N, C, D, H, W) channels-last in t's dtype."""
    N, T, D, H, W = t.shape
    C = taps.shape[1]
    out = empty_channels_last((N, C, D, H, W), t)
    total = N * D * H * W
    block_c = min(_block_c(C), 128)
    _thin_to_wide_kernel[(triton.cdiv(total, BLOCK_S), triton.cdiv(C, block_c))](
        t, taps, bias if bias is not None else taps, out, total, D, H, W, C, T, COLUMNS=_columns(T), FLIP=flip,
        HAS_BIAS=bias is not None, BLOCK_S=BLOCK_S, BLOCK_C=block_c, PRECISION=dot_precision(taps.dtype),
        num_warps=4 if T == 1 else 8)
    return out


def _wide_to_thin(u: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, flip: bool) -> torch.Tensor:
    """u: (N, C, D, H, W) channels-last, taps: (27 T, C) -> (N, T, D, H, W) in u's dtype, channels-last strides."""
    N, C, D, H, W = u.shape
    T = taps.shape[0] // TAPS
    out = empty_channels_last((N, T, D, H, W), u)
    total = N * D * H * W
    block_c = _block_c(C)
    _wide_to_thin_kernel[(triton.cdiv(total, WIDE_TO_THIN_BLOCK_S),)](
        u, taps, bias if bias is not None else taps, out, total, D, H, W, C, T,
        BLOCK_T=max(16, triton.next_power_of_2(T)), FLIP=flip, HAS_BIAS=bias is not None,
        BLOCK_S=WIDE_TO_THIN_BLOCK_S, BLOCK_C=block_c, CHUNK=min(block_c, 64), PRECISION=dot_precision(taps.dtype),
        num_warps=4)
    return out


def _weight_grad(t: torch.Tensor, u: torch.Tensor, flip: bool) -> torch.Tensor:
    """(27 T + 1, C) fp32: row k * T + t = sum_s x[s +- o_k, t] u[s, :], row 27 T = sum_s u[s, :]; t thin rows, u wide
    channels-last, one dtype."""
    N, C, D, H, W = u.shape
    T = t.shape[1]
    total = N * D * H * W
    columns = _columns(T)
    block_c = min(_block_c(C), max(16, 16384 // columns))  # a (columns, block_c) fp32 accumulator per program
    channel_blocks = triton.cdiv(C, block_c)
    tiles = triton.cdiv(total, BLOCK_S)
    wanted = max(1, 4 * multiprocessors(u.device) // channel_blocks)
    tiles_per_program = triton.cdiv(tiles, min(tiles, wanted))
    programs = triton.cdiv(tiles, tiles_per_program)
    parts = torch.empty((programs, columns, channel_blocks * block_c), device=u.device, dtype=torch.float32)
    _weight_grad_kernel[(programs, channel_blocks)](
        t, u, parts, total, D, H, W, C, T, COLUMNS=columns, tiles_per_program=tiles_per_program, FLIP=flip,
        BLOCK_S=BLOCK_S, BLOCK_C=block_c, PRECISION=dot_precision(u.dtype), num_warps=4 if columns <= 32 else 8)
    return parts.sum(0)[:TAPS * T + 1, :C]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _is_thin_input(weight: torch.Tensor) -> bool:
    """Whether a (C_out, C_in, 3, 3, 3) weight's thin side is its input (else its output)."""
    return weight.shape[1] <= min(weight.shape[0], MAX_THIN)


def _taps(weight: torch.Tensor, thin_input: bool) -> torch.Tensor:
    """(27 T, C): row k * T + t, column c = the weight between thin channel t and wide channel c at tap k."""
    c_out, c_in = weight.shape[:2]
    per_tap = weight.reshape(c_out, c_in, TAPS).permute(2, 1, 0) if thin_input else \
        weight.reshape(c_out, c_in, TAPS).permute(2, 0, 1)  # (27, T, C)
    return per_tap.reshape(-1, per_tap.shape[2]).contiguous()


def _weight_of_taps(g: torch.Tensor, weight_shape: torch.Size, thin_input: bool) -> torch.Tensor:
    """The inverse of `_taps`: (27 T, C) -> (C_out, C_in, 3, 3, 3)."""
    c_out, c_in = weight_shape[:2]
    per_tap = g.reshape(TAPS, -1, g.shape[1])  # (27, T, C)
    return (per_tap.permute(2, 1, 0) if thin_input else per_tap.permute(1, 2, 0)).reshape(weight_shape)


class _ThinConv3d(torch.autograd.Function):
    """Thin to wide: x (N, T, D, H, W), weight (C, T, 3, 3, 3) -> (N, C, D, H, W) channels-last. Wide to thin:
    x (N, C, D, H, W), weight (T, C, 3, 3, 3) -> (N, T, D, H, W) channels-last. bias: (C_out,) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        thin_input = _is_thin_input(weight)
        x_c = (_thin if thin_input else _wide)(x.to(dtype))
        taps = _taps(weight, thin_input).to(dtype)
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
            # rows j < 27 T: sum_s thin[s +- o_k, t] wide[s, :]; row 27 T: sum_s wide[s, :] (the thin-to-wide bias
            # gradient)
            g = _weight_grad(x_c, grad, flip=False) if thin_input else _weight_grad(grad, x_c, flip=True)
            dw = _weight_of_taps(g[:-1], w_shape, thin_input).to(w_dtype)
        if ctx.needs_input_grad[2] and b_dtype is not None:
            db = (g[-1] if thin_input else grad.float().sum(dim=(0, 2, 3, 4))).to(b_dtype)
        return dx, dw, db, None


def positions_fit(x: torch.Tensor) -> bool:
    """Whether x's positions (N * D * H * W) fit the kernels' int32 indexing."""
    return x.shape[0] * x[0, 0].numel() + 2 * BLOCK_S < 2 ** 31


def thin_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=1) for a 3x3x3 weight with at most MAX_THIN (8) input or output channels, in
    the kernels.

    x: (N, C_in, D, H, W); weight: (C_out, C_in, 3, 3, 3) with C_in or C_out <= 8; bias: (C_out,) or None. Returns
    (N, C_out, D, H, W), channels-last, in the compute dtype (autocast's, else x's)."""
    if x.ndim != 5 or weight.ndim != 5 or tuple(weight.shape[2:]) != (3, 3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"thin_conv3d: x (N, C_in, D, H, W) and a (C_out, C_in, 3, 3, 3) weight expected, got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if min(weight.shape[:2]) > MAX_THIN:
        raise ValueError(f"thin_conv3d: at most {MAX_THIN} input or output channels expected, weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"thin_conv3d: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if not positions_fit(x):
        raise ValueError(f"thin_conv3d: {tuple(x.shape)} has 2^31 or more voxels, beyond the kernels' int32 positions")
    return _ThinConv3d.apply(x, weight, bias, _compute_dtype(x))
