"""Flash attention in Triton: exact softmax(scale * q k^T) v, forward and backward, never forming the L_q x L_k matrix.

Shapes: q: (B, H, L_q, d), k and v: (B, H, L_k, d) -> out: (B, H, L_q, d). Non-causal, no mask; L_q and L_k may differ
(cross-attention) and need not be multiples of the block sizes; d from 1 to 512 (tiles are padded to a power of two
>= 16); bf16 / fp16 (fp32 works too, with IEEE fp32 dot products, and is what the interpreter tests use).

Algorithm (FlashAttention-2):
- forward: one program per (block of BLOCK_M queries, chunk of BLOCK_DV output columns, batch x head). It streams
  K/V in blocks of BLOCK_N keys and keeps a running row maximum and row sum (online softmax, base 2: the scale is
  folded into log2(e) so every exponential is an `exp2`), accumulating P V in fp32. It saves the row log-sum-exp
  (base 2) for the backward. A config may split the output columns over programs (BLOCK_DV < d) so that each
  accumulator fits in registers; q k^T is then computed once per chunk.
- backward: delta = rowsum(dO * O) first (one small kernel), then one kernel for dK and dV (a program owns a block
  of keys and loops over the queries) and one for dQ (a program owns a block of queries and loops over the keys).
  Neither needs atomics. Column chunks work as in the forward; for head dim 512 dK and dV are computed by two
  launches (`split`), each holding one full-width accumulator, instead of four column chunks.
Block sizes come from a table per padded head dim (`FORWARD_CONFIGS`, ...: the first entry is used, the next ones only
when the GPU refuses a launch for lack of shared memory); benchmarks/compile_attention.py reports their resources
without a GPU and benchmarks/bench_attention.py --sweep times them.

`attention_reference` is the spec in float math. `flash_attention(q, k, v, scale=None)` is the autograd entry point.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kernels.layout import dot_precision

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 512
MAX_GRID_Z = 65535  # CUDA's limit on the third grid axis, which holds batch x heads


class UnsupportedAttentionInputs(ValueError):
    """The Triton kernel does not take these inputs (device, dtype, shapes); the dispatcher falls back on this."""


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The spec: softmax(scale * q k^T) v in at least fp32 (float64 stays float64), cast back to q's dtype.

    q: (B, H, L_q, d), k: (B, H, L_k, d), v: (B, H, L_k, d_v) -> (B, H, L_q, d_v). Forms the L_q x L_k matrix.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    return (scores.softmax(dim=-1) @ v.to(compute)).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, rows, stride_row, cols, n_rows, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Tile base[rows, cols] (columns contiguous) with zeros outside rows < n_rows, cols < n_cols."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(base, rows, stride_row, cols, n_rows, n_cols, value, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """base[rows, cols] = value, skipping rows >= n_rows and cols >= n_cols."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
        else:
            tl.store(ptrs, value, mask=rows[:, None] < n_rows)
    else:
        if MASK_COLS:
            tl.store(ptrs, value, mask=cols[None, :] < n_cols)
        else:
            tl.store(ptrs, value)


@triton.jit
def _load_rows(base, rows, n_rows, other, MASK_ROWS: tl.constexpr):
    """Vector base[rows], `other` where rows >= n_rows."""
    if MASK_ROWS:
        values = tl.load(base + rows, mask=rows < n_rows, other=other)
    else:
        values = tl.load(base + rows)
    return values


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_heads, len_q, len_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """O[b, h, rows, chunk] and LSE[b, h, rows] (base 2) for one block of queries and one chunk of output columns."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)

    q = _load_tile(q_base, rows, stride_qm, offs_d, len_q, HEAD_DIM, not EVEN_M, MASK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of scale * log2(e) * q.k
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(. - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, offs_d, len_k, HEAD_DIM, not EVEN_N, MASK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if not EVEN_N:
            s = tl.where(cols[None, :] < len_k, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, cols, stride_vn, offs_dv, len_k, HEAD_DIM, not EVEN_N, MASK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_tile(o_base, rows, stride_om, offs_dv, len_q, HEAD_DIM, acc.to(O.dtype.element_ty), not EVEN_M, MASK_D)
    if pid_c == 0:
        lse_rows = LSE + pid_bh.to(tl.int64) * len_q + rows
        if EVEN_M:
            tl.store(lse_rows, m_i + tl.log2(l_i))
        else:
            tl.store(lse_rows, m_i + tl.log2(l_i), mask=rows < len_q)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    n_heads, len_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK_D: tl.constexpr,
):
    """DELTA[b, h, rows] = sum_j O[b, h, rows, j] * dO[b, h, rows, j] in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + h * stride_oh, rows, stride_om, offs_d, len_q, HEAD_DIM, True, MASK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, rows, stride_dom, offs_d, len_q, HEAD_DIM, True, MASK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * len_q + rows, delta, mask=rows < len_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n_heads, len_q, len_k, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
):
    """dK and / or dV (WITH_DK, WITH_DV) for one block of keys (rows) and one chunk of columns; loops over all queries.

    Works transposed (keys x queries) so no tile is transposed twice: P^T = exp2(qk_scale * K Q^T - lse),
    dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q (times scale at the end).
    Computing dK and dV in separate launches halves the accumulators, which lets large head dims keep all columns in
    one program instead of recomputing P^T and dP^T per column chunk.
    """
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * len_q
    delta_base = DELTA + pid_bh.to(tl.int64) * len_q

    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = pid_c * BLOCK_DC + tl.arange(0, BLOCK_DC)

    k = _load_tile(K + b * stride_kb + h * stride_kh, keys, stride_kn, offs_d, len_k, HEAD_DIM, not EVEN_N, MASK_D)
    if WITH_DK:
        v = _load_tile(V + b * stride_vb + h * stride_vh, keys, stride_vn, offs_d, len_k, HEAD_DIM, not EVEN_N,
                       MASK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_DC], tl.float32)
    if WITH_DV:
        dv = tl.zeros([BLOCK_N, BLOCK_DC], tl.float32)
    for start_m in range(0, len_q, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base, rows, stride_qm, offs_d, len_q, HEAD_DIM, not EVEN_M, MASK_D)
        # Rows past len_q get lse = +inf, so their probabilities are exactly 0.
        lse = _load_rows(lse_base, rows, len_q, float("inf"), not EVEN_M)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if not EVEN_N:
            # Keys past len_k are zero rows: keep their (unstored) results finite.
            p_t = tl.where(keys[:, None] < len_k, p_t, 0.0)
        if WITH_DK or BLOCK_DC == BLOCK_D:
            do = _load_tile(do_base, rows, stride_dom, offs_d, len_q, HEAD_DIM, not EVEN_M, MASK_D)
        if WITH_DV:
            if BLOCK_DC != BLOCK_D:  # this program's columns are a slice of the head dim
                do_c = _load_tile(do_base, rows, stride_dom, offs_c, len_q, HEAD_DIM, not EVEN_M, MASK_D)
            else:
                do_c = do
            dv = tl.dot(p_t.to(do_c.dtype), do_c, dv, input_precision=DOT_PRECISION)
        if WITH_DK:
            if BLOCK_DC != BLOCK_D:
                q_c = _load_tile(q_base, rows, stride_qm, offs_c, len_q, HEAD_DIM, not EVEN_M, MASK_D)
            else:
                q_c = q
            delta = _load_rows(delta_base, rows, len_q, 0.0, not EVEN_M)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q_c, dk, input_precision=DOT_PRECISION)
    if WITH_DK:
        dk = dk * scale
        _store_tile(DK + b * stride_dkb + h * stride_dkh, keys, stride_dkn, offs_c, len_k, HEAD_DIM,
                    dk.to(DK.dtype.element_ty), not EVEN_N, MASK_D)
    if WITH_DV:
        _store_tile(DV + b * stride_dvb + h * stride_dvh, keys, stride_dvn, offs_c, len_k, HEAD_DIM,
                    dv.to(DV.dtype.element_ty), not EVEN_N, MASK_D)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    n_heads, len_q, len_k, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, MASK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ for one block of queries (rows) and one chunk of columns; loops over all keys.

    P = exp2(qk_scale * Q K^T - lse), dP = dO V^T, dS = P * (dP - delta), dQ += dS K (times scale at the end).
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = pid_c * BLOCK_DC + tl.arange(0, BLOCK_DC)

    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qm, offs_d, len_q, HEAD_DIM, not EVEN_M, MASK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, rows, stride_dom, offs_d, len_q, HEAD_DIM, not EVEN_M,
                    MASK_D)
    # Rows past len_q are never stored; lse = delta = 0 keeps them finite.
    lse = _load_rows(LSE + pid_bh.to(tl.int64) * len_q, rows, len_q, 0.0, not EVEN_M)
    delta = _load_rows(DELTA + pid_bh.to(tl.int64) * len_q, rows, len_q, 0.0, not EVEN_M)
    dq = tl.zeros([BLOCK_M, BLOCK_DC], tl.float32)
    for start_n in range(0, len_k, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, offs_d, len_k, HEAD_DIM, not EVEN_N, MASK_D)
        v = _load_tile(v_base, cols, stride_vn, offs_d, len_k, HEAD_DIM, not EVEN_N, MASK_D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if not EVEN_N:
            p = tl.where(cols[None, :] < len_k, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if BLOCK_DC != BLOCK_D:  # this program's columns are a slice of the head dim
            k_c = _load_tile(k_base, cols, stride_kn, offs_c, len_k, HEAD_DIM, not EVEN_N, MASK_D)
        else:
            k_c = k
        dq = tl.dot(ds.to(k.dtype), k_c, dq, input_precision=DOT_PRECISION)
    dq = dq * scale
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, rows, stride_dqm, offs_c, len_q, HEAD_DIM,
                dq.to(DQ.dtype.element_ty), not EVEN_M, MASK_D)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one kernel launch.

    block_m: queries per tile, block_n: keys per tile, block_c: output columns per program (the head dim is split
    over d / block_c programs when smaller), num_warps / num_stages: Triton's warps per program and pipeline depth,
    split: see the field.
    In the forward and dQ kernels a program owns block_m queries; in the dK/dV kernel it owns block_n keys.
    """
    block_m: int
    block_n: int
    block_c: int
    num_warps: int
    num_stages: int
    split: bool = False  # dK/dV kernel only: dK and dV in two launches (half the accumulators each)

    def __str__(self) -> str:
        split = "-split" if self.split else ""
        return f"M{self.block_m}-N{self.block_n}-C{self.block_c}-w{self.num_warps}-s{self.num_stages}{split}"


def _cfgs(*rows: tuple) -> tuple[KernelConfig, ...]:
    return tuple(KernelConfig(*row) for row in rows)


# Candidates per padded head dim, best first; later entries are fallbacks when a launch runs out of shared memory
# (H100: 227 KB per program). Rows are (block_m, block_n, block_c, num_warps, num_stages[, split]). Chosen by
# compiling for sm_90 without a GPU (benchmarks/compile_attention.py: shared memory, registers and spills from ptxas,
# HGMMA in the SASS): every entry is spill-free and every first entry uses wgmma; num_stages >= 2 everywhere because
# with one stage the tiles are loaded through registers. Not yet timed on a GPU: benchmarks/bench_attention.py
# --sweep times every candidate; reorder from its output.
FORWARD_CONFIGS: dict[int, tuple[KernelConfig, ...]] = {
    16: _cfgs((128, 64, 16, 4, 3), (64, 64, 16, 4, 2)),
    32: _cfgs((128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 2)),
    64: _cfgs((128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3)),
    128: _cfgs((128, 64, 128, 8, 3), (128, 128, 128, 8, 2), (64, 64, 128, 4, 2)),
    256: _cfgs((64, 64, 256, 8, 2), (128, 64, 128, 8, 2), (64, 32, 256, 4, 2), (32, 32, 128, 4, 2)),
    # 512: the whole head dim in one program (196 KB) before splitting it (q k^T then computed twice).
    512: _cfgs((64, 32, 512, 8, 2), (64, 16, 512, 8, 2), (64, 32, 256, 8, 2), (32, 32, 128, 4, 2)),
}
# dK/dV: a program owns block_n keys (K, V resident) and streams block_m queries.
BACKWARD_DKDV_CONFIGS: dict[int, tuple[KernelConfig, ...]] = {
    16: _cfgs((64, 128, 16, 8, 3), (64, 64, 16, 4, 2)),
    32: _cfgs((64, 128, 32, 8, 3), (32, 128, 32, 4, 3), (64, 64, 32, 4, 2)),
    64: _cfgs((64, 128, 64, 8, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 2)),
    128: _cfgs((64, 64, 128, 8, 2), (32, 128, 128, 8, 2), (64, 128, 128, 8, 2, True), (32, 64, 128, 4, 2)),
    256: _cfgs((32, 64, 256, 8, 2), (32, 64, 256, 8, 2, True), (32, 64, 128, 8, 2), (32, 32, 128, 4, 2)),
    # 512: dK and dV in separate launches, each with all 512 columns (two column chunks would compute P^T and dP^T
    # twice; four, as small accumulators need, four times).
    512: _cfgs((16, 64, 512, 8, 2, True), (16, 64, 256, 8, 2), (16, 32, 128, 4, 2)),
}
# dQ: a program owns block_m queries (Q, dO resident) and streams block_n keys.
BACKWARD_DQ_CONFIGS: dict[int, tuple[KernelConfig, ...]] = {
    16: _cfgs((128, 64, 16, 8, 3), (64, 64, 16, 4, 2)),
    32: _cfgs((128, 64, 32, 8, 3), (128, 32, 32, 4, 3), (64, 64, 32, 4, 2)),
    64: _cfgs((128, 64, 64, 8, 3), (128, 32, 64, 4, 3), (64, 64, 64, 4, 2)),
    128: _cfgs((128, 64, 128, 8, 2), (64, 64, 128, 4, 2), (128, 32, 128, 8, 3)),
    256: _cfgs((64, 32, 256, 8, 2), (64, 64, 256, 8, 2), (64, 32, 128, 8, 2)),
    512: _cfgs((64, 16, 512, 8, 2), (64, 16, 256, 8, 2), (32, 16, 256, 4, 2)),
}
# Last resort for every kernel: small tiles that fit any head dim up to 512, fp32 included.
_SMALLEST = KernelConfig(32, 16, 64, 4, 2)

# Index of the first candidate that launched, per (kernel, padded head dim, dtype, device): later calls start there.
_FIRST_WORKING: dict[tuple, int] = {}
# Last launch per kernel name: (config, Triton's compiled kernel or None in the interpreter); benchmarks read the
# register and spill counts from it.
LAST_LAUNCHES: dict[str, tuple[KernelConfig, object]] = {}


def padded_head_dim(head_dim: int) -> int:
    """The tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def candidate_configs(table: dict[int, tuple[KernelConfig, ...]], head_dim: int,
                      dtype: torch.dtype) -> tuple[KernelConfig, ...]:
    """The table's candidates for this head dim (fp32 takes the row of twice the width: same bytes per tile)."""
    block_d = padded_head_dim(head_dim)
    key = min(block_d * max(1, dtype.itemsize // 2), MAX_HEAD_DIM)
    rows = table[key] + (_SMALLEST,)
    # The output chunk must divide the tile width.
    return tuple(dataclasses.replace(c, block_c=min(c.block_c, block_d)) for c in rows)


def _launch_first_that_fits(name: str, configs: tuple[KernelConfig, ...], cache_key: tuple | None,
                            launch) -> KernelConfig:
    """Launch with the first config the GPU accepts (a config can exceed the shared memory of a smaller GPU); with a
    cache_key, later calls start at the config that worked."""
    start = _FIRST_WORKING.get((name, *cache_key), 0) if cache_key is not None else 0
    refusal = None
    for index in range(start, len(configs)):
        try:
            compiled = launch(configs[index])
        except OutOfResources as err:
            logger.info("flash attention %s: config %s does not fit (%s); trying the next", name, configs[index], err)
            refusal = err
            continue
        if cache_key is not None:
            _FIRST_WORKING[(name, *cache_key)] = index
        LAST_LAUNCHES[name] = (configs[index], compiled)
        return configs[index]
    raise refusal  # every candidate was too large for this GPU


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------

def is_interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return not isinstance(_attn_fwd_kernel, triton.runtime.JITFunction)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise UnsupportedAttentionInputs naming the culprit unless the kernel takes q, k, v."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise UnsupportedAttentionInputs(f"flash_attention: q, k, v must be (B, H, L, d), got {shapes}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise UnsupportedAttentionInputs(f"flash_attention: needs equal B, H and d for q, k, v and k.shape == v.shape, "
                                         f"got {shapes}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise UnsupportedAttentionInputs(f"flash_attention: head dim {q.shape[-1]} is outside [1, {MAX_HEAD_DIM}]")
    if k.shape[2] == 0:
        raise UnsupportedAttentionInputs("flash_attention: no keys (L_k = 0): softmax over an empty set")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedAttentionInputs(f"flash_attention: dtypes must be equal and one of {SUPPORTED_DTYPES}, got "
                                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise UnsupportedAttentionInputs(f"flash_attention: q, k, v on different devices "
                                         f"({q.device}, {k.device}, {v.device})")
    if q.device.type != "cuda" and not is_interpreted():
        raise UnsupportedAttentionInputs(f"flash_attention: needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if q.shape[0] * q.shape[1] > MAX_GRID_Z:
        raise UnsupportedAttentionInputs(f"flash_attention: B * H = {q.shape[0] * q.shape[1]} exceeds {MAX_GRID_Z}")


def _new_output(like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Uninitialised output buffer: like `like` (its layout too), or fp32 of `shape` on its device. The kernels
    write every element; tests replace this function to fill buffers with NaN and check that."""
    if shape is None:
        return torch.empty_like(like)
    return torch.empty(shape, device=like.device, dtype=torch.float32)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass: (out (B, H, L_q, d) in q's dtype and layout, lse (B, H, L_q) fp32, base-2 log-sum-exp of
    scale * log2(e) * q k^T per row). `config` forces one launch configuration (benchmarks); otherwise the table's."""
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = _new_output(q)  # keeps q's memory layout, e.g. (B, L, H, d) storage from a head split
    lse = _new_output(q, (batch, heads, len_q))
    if len_q == 0:
        return out, lse
    block_d = padded_head_dim(head_dim)

    def launch(cfg: KernelConfig):
        grid = (triton.cdiv(len_q, cfg.block_m), block_d // cfg.block_c, batch * heads)
        return _attn_fwd_kernel[grid](
            q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, len_q, len_k, scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DV=cfg.block_c, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            EVEN_M=len_q % cfg.block_m == 0, EVEN_N=len_k % cfg.block_n == 0, MASK_D=head_dim != block_d,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if config is not None:
        _launch_first_that_fits("forward", (config,), None, launch)
    else:
        _launch_first_that_fits("forward", candidate_configs(FORWARD_CONFIGS, head_dim, q.dtype),
                                (block_d, q.dtype, q.device), launch)
    return out, lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       grad_out: torch.Tensor, scale: float, dkdv_config: KernelConfig | None = None,
                       dq_config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass from the forward's out and lse: (dq, dk, dv) shaped and laid out like q, k, v."""
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    dq, dk, dv = _new_output(q), _new_output(k), _new_output(v)
    if len_q == 0:
        return dq, dk.zero_(), dv.zero_()
    block_d = padded_head_dim(head_dim)
    mask_d = head_dim != block_d
    precision = dot_precision(q.dtype)
    key = (block_d, q.dtype, q.device)

    delta = _new_output(q, (batch, heads, len_q))
    delta_rows = max(16, min(128, 8192 // block_d))
    _attn_bwd_delta_kernel[(triton.cdiv(len_q, delta_rows), batch * heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, len_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=delta_rows, MASK_D=mask_d)

    def launch_dkdv(cfg: KernelConfig):
        grid = (triton.cdiv(len_k, cfg.block_n), block_d // cfg.block_c, batch * heads)
        for with_dk, with_dv in ((True, False), (False, True)) if cfg.split else ((True, True),):
            compiled = _attn_bwd_dkdv_kernel[grid](
                q, k, v, grad_out, lse, delta, dk, dv,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
                heads, len_q, len_k, scale * LOG2E, scale,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DC=cfg.block_c, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                EVEN_M=len_q % cfg.block_m == 0, EVEN_N=len_k % cfg.block_n == 0, MASK_D=mask_d,
                DOT_PRECISION=precision, WITH_DK=with_dk, WITH_DV=with_dv,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return compiled

    def launch_dq(cfg: KernelConfig):
        grid = (triton.cdiv(len_q, cfg.block_m), block_d // cfg.block_c, batch * heads)
        return _attn_bwd_dq_kernel[grid](
            q, k, v, grad_out, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
            heads, len_q, len_k, scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DC=cfg.block_c, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            EVEN_M=len_q % cfg.block_m == 0, EVEN_N=len_k % cfg.block_n == 0, MASK_D=mask_d,
            DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    for name, table, config, launch in (("backward dK/dV", BACKWARD_DKDV_CONFIGS, dkdv_config, launch_dkdv),
                                        ("backward dQ", BACKWARD_DQ_CONFIGS, dq_config, launch_dq)):
        if config is not None:
            _launch_first_that_fits(name, (config,), None, launch)
        else:
            _launch_first_that_fits(name, candidate_configs(table, head_dim, q.dtype), key, launch)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the row log-sum-exp; the backward recomputes P block by block."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, grad_out, ctx.scale)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v with the Triton kernels, differentiable in q, k, v.

    q: (B, H, L_q, d), k, v: (B, H, L_k, d) on CUDA (or CPU under TRITON_INTERPRET=1), equal dtypes in fp16 / bf16 /
    fp32, d <= 512 -> (B, H, L_q, d) in q's dtype. scale defaults to 1 / sqrt(d) and must be positive.
    Raises UnsupportedAttentionInputs for anything else.
    """
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0:
        raise UnsupportedAttentionInputs(f"flash_attention: scale must be positive, got {scale}")
    return FlashAttentionFunction.apply(q, k, v, scale)
