"""Fused GroupNorm (+ per-sample scale-shift, + SiLU, + residual add) in Triton, forward and backward.

    h = x + residual                                      (optional; h is returned too, for the skip path)
    z = GroupNorm(h) * weight + bias                      statistics in fp32 per (sample, group)
    z = z * (1 + scale) + shift                           (optional; scale, shift: (N, C), the UNet's scale-shift norm)
    y = silu(z)                                           (optional)

x: (N, C, *spatial), contiguous or channels-last (`channels_last` / `channels_last_3d`); y has x's layout and dtype.
`group_norm_reference` is the spec; `group_norm_act` runs the kernels (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1).

How the kernels move bytes. A *segment* is one sample's block of whole groups (one group in NCHW; all groups in
channels-last, where a spatial position's channels are contiguous). A segment is cut along space into `splits` parts,
one program each. Every program loads its part once, reduces it to partial statistics, and meets the other programs of
its segment at a barrier in global memory (an arrival counter; the last to arrive combines the partials and raises a
flag); then it normalises the part it still holds in registers and writes it. So the forward reads x once and writes y
once, and the backward reads x and dy once and writes dx once. The barrier is safe because programs take their place in
the grid from a ticket counter (in start order) and a segment never has more parts than the GPU has multiprocessors, so
all programs of a segment can be resident at once. When a part is larger than one register tile, the program loops over
tiles and reads them a second time after the barrier (mostly from L2). Channels-last tensors with few samples, and
Triton's interpreter (which runs programs one after another), use two launches instead: partial statistics, then combine
and apply (measured faster there; `_plan` has the rules, benchmarks/bench_group_norm.py the numbers).

Saved for backward: h (the input), and mean, rstd per (sample, group) in fp32 — not the normalised activations.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

# Elements of one register tile, forward and backward (measured: benchmarks/bench_group_norm.py).
FORWARD_TILE = 8192
BACKWARD_TILE = 8192
# Splitting segments aims at this many programs per multiprocessor in all (measured: benchmarks/bench_group_norm.py).
PROGRAMS_PER_MULTIPROCESSOR = 4
# Every program of the combining launch reads all of its segment's partials: keep their number small (16384 splits of
# one segment ran 300x slower, and wrong, on an H100).
MAX_SPLITS = 1024
# Triton's interpreter runs programs one after another: no program may wait for another there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

PHASE_FUSED, PHASE_PARTIALS, PHASE_APPLY = 0, 1, 2
# The last compiled kernel of each direction (register and spill counts for benchmarks/bench_group_norm.py).
LAST_KERNELS: dict = {}


def group_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                         eps: float = 1e-6, act: bool = False, scale: torch.Tensor | None = None,
                         shift: torch.Tensor | None = None, residual: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec, in PyTorch: returns (y, h) with h = x + residual (x itself without residual).

    x, residual: (N, C, *spatial); weight, bias: (C,); scale, shift: (N, C) or (N, C, 1, ...). Computes in fp32 (or the
    input's dtype when that is float64) and returns y in x's dtype.
    """
    h = x if residual is None else x + residual
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    spatial = (1,) * (x.ndim - 2)
    y = F.group_norm(h.to(compute), num_groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    if scale is not None:
        y = y * (1 + scale.reshape(*scale.shape[:2], *spatial).to(compute))
    if shift is not None:
        y = y + shift.reshape(*shift.shape[:2], *spatial).to(compute)
    if act:
        y = F.silu(y)
    return y.to(x.dtype), h


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _lanes(c0, channels_per_group, groups_here, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr):
    """The channel of each of the tile's BLOCK_G * CPG_PAD channel lanes (lane i: group i // CPG_PAD of the segment,
    its channel i % CPG_PAD), and whether the lane is a real channel (groups padded to a power of two)."""
    lane = tl.arange(0, BLOCK_G * CPG_PAD)
    group = lane // CPG_PAD
    within = lane % CPG_PAD
    return c0 + group * channels_per_group + within, (within < channels_per_group) & (group < groups_here)


@triton.jit
def _group_sum(per_lane, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr):
    """(BLOCK_G * CPG_PAD,) per-lane values -> (BLOCK_G,) per-group sums."""
    return tl.sum(tl.reshape(per_lane, (BLOCK_G, CPG_PAD)), axis=1)


@triton.jit
def _to_lanes(per_group, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr):
    """(BLOCK_G,) per-group values -> (BLOCK_G * CPG_PAD,) per-lane values."""
    return tl.reshape(tl.broadcast_to(per_group[:, None], (BLOCK_G, CPG_PAD)), (BLOCK_G * CPG_PAD,))


@triton.jit
def _tile_offsets(n, channel, lane_valid, s0, C, S, BLOCK_S: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Element offsets (lanes, BLOCK_S) of the tile at position s0 of sample n, and its in-bounds mask."""
    s = s0 + tl.arange(0, BLOCK_S)
    mask = lane_valid[:, None] & (s < S)[None, :]
    if CHANNELS_LAST:
        offsets = n.to(tl.int64) * S * C + s[None, :].to(tl.int64) * C + channel[:, None]
    else:
        offsets = n.to(tl.int64) * C * S + channel[:, None].to(tl.int64) * S + s[None, :]
    return offsets, mask


@triton.jit
def _load_input(x_ptr, r_ptr, h_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """The tile of h = x (+ residual) in fp32; with a residual, h is also written in x's dtype (and used rounded)."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (x.to(tl.float32) + tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + offsets, h, mask=mask)
        x = h
    return x.to(tl.float32)


@triton.jit
def _tile_moments(h, mask, count, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr):
    """Per-group mean and sum of squared deviations of one tile (exact two-pass in registers). h: (lanes, BLOCK_S)."""
    group_mean = _group_sum(tl.sum(h, axis=1), BLOCK_G, CPG_PAD) / tl.maximum(count, 1.0)
    deviation = tl.where(mask, h - _to_lanes(group_mean, BLOCK_G, CPG_PAD)[:, None], 0.0)
    group_m2 = _group_sum(tl.sum(deviation * deviation, axis=1), BLOCK_G, CPG_PAD)
    return group_mean, group_m2


@triton.jit
def _combine_moments(part_mean_ptr, part_m2_ptr, seg, splits, split_elems, group_elems, eps,
                     BLOCK_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr):
    """Chan's parallel combination of the splits' (mean, M2) into the group's (mean, rstd), both (BLOCK_G,)."""
    p = tl.arange(0, BLOCK_SPLITS)
    g = tl.arange(0, BLOCK_G)
    valid = (p < splits)[:, None]
    index = (seg * splits + p)[:, None] * BLOCK_G + g[None, :]
    part_mean = tl.load(part_mean_ptr + index, mask=valid, other=0.0, volatile=True)
    part_m2 = tl.load(part_m2_ptr + index, mask=valid, other=0.0, volatile=True)
    counts = tl.minimum(split_elems, group_elems - p * split_elems).to(tl.float32)
    counts = tl.where(p < splits, tl.maximum(counts, 0.0), 0.0)[:, None]
    total = group_elems.to(tl.float32)
    mean = tl.sum(counts * part_mean, axis=0) / total
    delta = part_mean - mean[None, :]
    m2 = tl.sum(part_m2 + counts * delta * delta, axis=0)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / total, 0.0) + eps)
    return mean, rstd


@triton.jit
def _arrive(sync_ptr, seg, splits):
    """Arrive at the segment's barrier (after this program's partials are stored); True for the last to arrive, which
    must combine the partials, store the result and call `_publish`."""
    tl.debug_barrier()
    arrived = tl.atomic_add(sync_ptr + 1 + seg, 1, sem="acq_rel")
    return arrived == splits - 1


@triton.jit
def _publish(sync_ptr, seg, num_segments):
    tl.debug_barrier()
    tl.atomic_xchg(sync_ptr + 1 + num_segments + seg, 1, sem="release")


@triton.jit
def _wait_published(sync_ptr, seg, num_segments):
    """Spin on the segment's flag with plain uncached loads (cheap for the memory system), then acquire it once."""
    tl.debug_barrier()
    flag_ptr = sync_ptr + 1 + num_segments + seg
    ready = tl.load(flag_ptr, volatile=True)
    while ready == 0:
        ready = tl.load(flag_ptr, volatile=True)
    tl.atomic_add(flag_ptr, 0, sem="acquire")


@triton.jit
def _segment_of_program(sync_ptr, splits, BARRIER: tl.constexpr):
    """(segment, split) of this program. With the barrier, programs take a ticket, so they are numbered in start
    order and a waiting program only ever waits for programs that have started or can start."""
    if BARRIER:
        pid = tl.atomic_add(sync_ptr, 1)
    else:
        pid = tl.program_id(0)
    return pid // splits, pid % splits


@triton.jit
def _gn_forward_kernel(
        x_ptr, r_ptr, h_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
        part_mean_ptr, part_m2_ptr, sync_ptr,
        C, S, G, channels_per_group, groups_per_segment, segments_per_sample, num_segments, splits, tiles_per_split,
        eps,
        CHANNELS_LAST: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr,
        PHASE: tl.constexpr, BARRIER: tl.constexpr, ONE_TILE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr):
    """Forward; PHASE 0: one launch with the barrier, 1: partials only, 2: combine and apply. ONE_TILE: the program's
    part is one tile (kept in registers across the barrier in phase 0)."""
    seg, split = _segment_of_program(sync_ptr, splits, PHASE == 0 and BARRIER)
    n = seg // segments_per_sample
    g0 = (seg % segments_per_sample) * groups_per_segment
    c0 = g0 * channels_per_group
    groups_here = tl.minimum(groups_per_segment, G - g0)
    channel, lane_valid = _lanes(c0, channels_per_group, groups_here, BLOCK_G, CPG_PAD)
    s_begin = split * tiles_per_split * BLOCK_S
    g = tl.arange(0, BLOCK_G)
    g_mask = g < groups_here
    split_elems = tiles_per_split * BLOCK_S * channels_per_group
    group_elems = S * channels_per_group

    # 1. partial statistics of this program's part (kept in registers when it is one tile)
    if PHASE != 2:
        offsets, mask = _tile_offsets(n, channel, lane_valid, s_begin, C, S, BLOCK_S, CHANNELS_LAST)
        h = _load_input(x_ptr, r_ptr, h_ptr, offsets, mask, HAS_RESIDUAL)
        count = (tl.minimum(S - s_begin, BLOCK_S) * channels_per_group).to(tl.float32)
        mean, m2 = _tile_moments(h, mask, count, BLOCK_G, CPG_PAD)
        if not ONE_TILE:
            # The other tiles: per-lane sums of d = h - (tile 0's group mean) and d^2, reduced once after the loop (the
            # loop body stays elementwise), then merged with tile 0's moments (Chan et al.).
            shift = _to_lanes(mean, BLOCK_G, CPG_PAD)[:, None]
            sum_d = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
            sum_d2 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
            for t in range(1, tiles_per_split):
                t_offsets, t_mask = _tile_offsets(n, channel, lane_valid, s_begin + t * BLOCK_S, C, S, BLOCK_S, CHANNELS_LAST)
                d = tl.where(t_mask, _load_input(x_ptr, r_ptr, h_ptr, t_offsets, t_mask, HAS_RESIDUAL) - shift, 0.0)
                sum_d += d
                sum_d2 += d * d
            rest_end = tl.minimum(S, s_begin + tiles_per_split * BLOCK_S)
            rest_count = (tl.maximum(rest_end - s_begin - BLOCK_S, 0) * channels_per_group).to(tl.float32)
            s1 = _group_sum(tl.sum(sum_d, axis=1), BLOCK_G, CPG_PAD)
            s2 = _group_sum(tl.sum(sum_d2, axis=1), BLOCK_G, CPG_PAD)
            delta = s1 / tl.maximum(rest_count, 1.0)  # the other tiles' mean minus tile 0's
            total = count + rest_count
            weight = rest_count / total
            m2 = m2 + (s2 - s1 * delta) + delta * delta * count * weight
            mean = mean + delta * weight
            count = total
        if PHASE == 1 or BARRIER:
            part = (seg * splits + split) * BLOCK_G + g
            tl.store(part_mean_ptr + part, mean)
            tl.store(part_m2_ptr + part, m2)
    if PHASE == 1:  # two launches: this one only writes the partials
        return

    # 2. the group statistics of the whole segment
    stats = n * G + g0 + g
    if PHASE == 0 and BARRIER:
        if _arrive(sync_ptr, seg, splits):
            mean, rstd = _combine_moments(part_mean_ptr, part_m2_ptr, seg, splits, split_elems, group_elems, eps,
                                          BLOCK_SPLITS, BLOCK_G)
            tl.store(mean_ptr + stats, mean, mask=g_mask)
            tl.store(rstd_ptr + stats, rstd, mask=g_mask)
            _publish(sync_ptr, seg, num_segments)
        _wait_published(sync_ptr, seg, num_segments)
        mean = tl.load(mean_ptr + stats, mask=g_mask, other=0.0, volatile=True)
        rstd = tl.load(rstd_ptr + stats, mask=g_mask, other=0.0, volatile=True)
    elif PHASE == 0:  # one split: this program holds the whole segment's moments
        rstd = 1.0 / tl.sqrt(tl.maximum(m2 / tl.maximum(count, 1.0), 0.0) + eps)
        tl.store(mean_ptr + stats, mean, mask=g_mask)
        tl.store(rstd_ptr + stats, rstd, mask=g_mask)
    else:
        mean, rstd = _combine_moments(part_mean_ptr, part_m2_ptr, seg, splits, split_elems, group_elems, eps,
                                      BLOCK_SPLITS, BLOCK_G)
        if split == 0:
            tl.store(mean_ptr + stats, mean, mask=g_mask)
            tl.store(rstd_ptr + stats, rstd, mask=g_mask)

    # 3. per-channel affine map y = h * a + b (group statistics, weight, bias, scale, shift folded in)
    channel_mean = _to_lanes(mean, BLOCK_G, CPG_PAD)
    channel_rstd = _to_lanes(rstd, BLOCK_G, CPG_PAD)
    a = channel_rstd * tl.load(w_ptr + channel, mask=lane_valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + channel, mask=lane_valid, other=0.0).to(tl.float32) - channel_mean * a
    if HAS_SCALE:
        scale = 1.0 + tl.load(scale_ptr + n * C + channel, mask=lane_valid, other=0.0).to(tl.float32)
        a = a * scale
        b = b * scale + tl.load(shift_ptr + n * C + channel, mask=lane_valid, other=0.0).to(tl.float32)

    # 4. normalise and write
    if ONE_TILE and PHASE == 0:
        z = h * a[:, None] + b[:, None]
        if ACT:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + offsets, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for t in range(0, tiles_per_split):
            s0 = s_begin + t * BLOCK_S
            t_offsets, t_mask = _tile_offsets(n, channel, lane_valid, s0, C, S, BLOCK_S, CHANNELS_LAST)
            if HAS_RESIDUAL:
                t_h = tl.load(h_ptr + t_offsets, mask=t_mask, other=0.0).to(tl.float32)
            else:
                t_h = tl.load(x_ptr + t_offsets, mask=t_mask, other=0.0).to(tl.float32)
            z = t_h * a[:, None] + b[:, None]
            if ACT:
                z = z * tl.sigmoid(z)
            tl.store(y_ptr + t_offsets, z.to(y_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def _backward_tile(h_ptr, dy_ptr, offsets, mask, channel_mean, channel_rstd, w, b, scale, shift,
                   HAS_SCALE: tl.constexpr, ACT: tl.constexpr):
    """xhat and dz (the gradient at the normalised-and-affine output, before scale) of one tile, both fp32."""
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = (h - channel_mean[:, None]) * channel_rstd[:, None]
    if ACT:
        z = xhat * w[:, None] + b[:, None]
        if HAS_SCALE:
            z = z * scale[:, None] + shift[:, None]
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return xhat, dy


@triton.jit
def _gn_backward_kernel(
        h_ptr, dy_ptr, dh_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
        part_a_ptr, part_b_ptr, sum_a_ptr, sum_b_ptr, sync_ptr,
        C, S, G, channels_per_group, groups_per_segment, segments_per_sample, num_segments, splits, tiles_per_split,
        CHANNELS_LAST: tl.constexpr, HAS_DH: tl.constexpr, HAS_SCALE: tl.constexpr, ACT: tl.constexpr,
        PHASE: tl.constexpr, BARRIER: tl.constexpr, ONE_TILE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr):
    """dx = rstd * (k * dz - mean_g(k * dz) - xhat * mean_g(k * dz * xhat)), k = weight * (1 + scale); also the
    per-(sample, channel) sums A = sum(dz), B = sum(dz * xhat) from which the parameter gradients follow."""
    seg, split = _segment_of_program(sync_ptr, splits, PHASE == 0 and BARRIER)
    n = seg // segments_per_sample
    g0 = (seg % segments_per_sample) * groups_per_segment
    c0 = g0 * channels_per_group
    groups_here = tl.minimum(groups_per_segment, G - g0)
    channel, lane_valid = _lanes(c0, channels_per_group, groups_here, BLOCK_G, CPG_PAD)
    s_begin = split * tiles_per_split * BLOCK_S
    g = tl.arange(0, BLOCK_G)
    g_mask = g < groups_here

    mean = tl.load(mean_ptr + n * G + g0 + g, mask=g_mask, other=0.0)
    rstd = tl.load(rstd_ptr + n * G + g0 + g, mask=g_mask, other=0.0)
    channel_mean = _to_lanes(mean, BLOCK_G, CPG_PAD)
    channel_rstd = _to_lanes(rstd, BLOCK_G, CPG_PAD)
    w = tl.load(w_ptr + channel, mask=lane_valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + channel, mask=lane_valid, other=0.0).to(tl.float32)
    scale = tl.full((BLOCK_C,), 1.0, tl.float32)
    shift = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_SCALE:
        scale += tl.load(scale_ptr + n * C + channel, mask=lane_valid, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + n * C + channel, mask=lane_valid, other=0.0).to(tl.float32)

    # 1. per-channel partial sums of dz and dz * xhat over this program's part
    if PHASE != 2:
        offsets, mask = _tile_offsets(n, channel, lane_valid, s_begin, C, S, BLOCK_S, CHANNELS_LAST)
        xhat, dz = _backward_tile(h_ptr, dy_ptr, offsets, mask, channel_mean, channel_rstd, w, b, scale, shift,
                                  HAS_SCALE, ACT)
        if ONE_TILE:
            sum_a = tl.sum(dz, axis=1)
            sum_b = tl.sum(dz * xhat, axis=1)
        else:  # per-lane sums over the tiles, reduced once after the loop
            lane_a = dz
            lane_b = dz * xhat
            for t in range(1, tiles_per_split):
                t_offsets, t_mask = _tile_offsets(n, channel, lane_valid, s_begin + t * BLOCK_S, C, S, BLOCK_S, CHANNELS_LAST)
                t_xhat, t_dz = _backward_tile(h_ptr, dy_ptr, t_offsets, t_mask, channel_mean, channel_rstd, w, b,
                                              scale, shift, HAS_SCALE, ACT)
                lane_a += t_dz
                lane_b += t_dz * t_xhat
            sum_a = tl.sum(lane_a, axis=1)
            sum_b = tl.sum(lane_b, axis=1)
        if PHASE == 1 or BARRIER:
            part = (seg * splits + split) * BLOCK_C + tl.arange(0, BLOCK_C)
            tl.store(part_a_ptr + part, sum_a)
            tl.store(part_b_ptr + part, sum_b)

    if PHASE == 1:  # two launches: this one only writes the partials
        return

    # 2. the segment's totals: A and B per channel (written for the parameter gradients)
    sums = n * C + channel
    if PHASE == 0 and BARRIER:
        if _arrive(sync_ptr, seg, splits):
            total_a, total_b = _sum_partials(part_a_ptr, part_b_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
            tl.store(sum_a_ptr + sums, total_a, mask=lane_valid)
            tl.store(sum_b_ptr + sums, total_b, mask=lane_valid)
            _publish(sync_ptr, seg, num_segments)
        _wait_published(sync_ptr, seg, num_segments)
        total_a = tl.load(sum_a_ptr + sums, mask=lane_valid, other=0.0, volatile=True)
        total_b = tl.load(sum_b_ptr + sums, mask=lane_valid, other=0.0, volatile=True)
    elif PHASE == 0:  # one split: this program's sums are the totals
        total_a, total_b = sum_a, sum_b
        tl.store(sum_a_ptr + sums, total_a, mask=lane_valid)
        tl.store(sum_b_ptr + sums, total_b, mask=lane_valid)
    else:
        total_a, total_b = _sum_partials(part_a_ptr, part_b_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
        if split == 0:
            tl.store(sum_a_ptr + sums, total_a, mask=lane_valid)
            tl.store(sum_b_ptr + sums, total_b, mask=lane_valid)

    k = w * scale
    inv_elems = 1.0 / (S * channels_per_group).to(tl.float32)
    c1 = _to_lanes(_group_sum(k * total_a, BLOCK_G, CPG_PAD), BLOCK_G, CPG_PAD) * inv_elems
    c2 = _to_lanes(_group_sum(k * total_b, BLOCK_G, CPG_PAD), BLOCK_G, CPG_PAD) * inv_elems

    # 3. dx for this program's part
    if ONE_TILE and PHASE == 0:
        dx = channel_rstd[:, None] * (k[:, None] * dz - c1[:, None] - xhat * c2[:, None])
        if HAS_DH:
            dx += tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for t in range(0, tiles_per_split):
            t_offsets, t_mask = _tile_offsets(n, channel, lane_valid, s_begin + t * BLOCK_S, C, S, BLOCK_S, CHANNELS_LAST)
            t_xhat, t_dz = _backward_tile(h_ptr, dy_ptr, t_offsets, t_mask, channel_mean, channel_rstd, w, b, scale,
                                          shift, HAS_SCALE, ACT)
            dx = channel_rstd[:, None] * (k[:, None] * t_dz - c1[:, None] - t_xhat * c2[:, None])
            if HAS_DH:
                dx += tl.load(dh_ptr + t_offsets, mask=t_mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + t_offsets, dx.to(dx_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def _sum_partials(part_a_ptr, part_b_ptr, seg, splits, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of the splits' per-channel partials, in split order (deterministic). Returns two (BLOCK_C,) vectors."""
    p = tl.arange(0, BLOCK_SPLITS)
    c = tl.arange(0, BLOCK_C)
    index = (seg * splits + p)[:, None] * BLOCK_C + c[None, :]
    valid = (p < splits)[:, None]
    total_a = tl.sum(tl.load(part_a_ptr + index, mask=valid, other=0.0, volatile=True), axis=0)
    total_b = tl.sum(tl.load(part_b_ptr + index, mask=valid, other=0.0, volatile=True), axis=0)
    return total_a, total_b


# ----------------------------------------------------------------------------------------------------------------------
# Launch planning
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """How a (N, C, S) tensor is cut into segments, splits and tiles; see the module docstring."""
    block_c: int
    block_s: int
    block_g: int
    cpg_pad: int
    groups_per_segment: int
    segments_per_sample: int
    num_segments: int
    splits: int
    tiles_per_split: int
    fused: bool
    barrier: bool

    @property
    def block_splits(self) -> int:
        return triton.next_power_of_2(self.splits)


@functools.lru_cache(maxsize=1024)
def _plan(N: int, C: int, S: int, G: int, channels_last: bool, tile: int, device: torch.device,
          splits: int | None = None, fused: bool | None = None, barrier: bool | None = None) -> _Plan:
    """Cut (N, C, S) into segments, splits and tiles of about `tile` elements.

    At least one segment per multiprocessor: one program per segment, no barrier (it reads its segment twice; the
    second read hits the cache). Fewer: contiguous segments are split so that there are about
    PROGRAMS_PER_MULTIPROCESSOR programs per multiprocessor in all, at most one per multiprocessor per segment, which
    meet at the barrier; channels-last ones run in two launches, one tile per program. `splits`, `fused` and
    `barrier` override the choice (tests use them: the interpreter runs programs one after another, so there the
    fused launch can only run with one split)."""
    cpg = C // G
    cpg_pad = triton.next_power_of_2(cpg)
    # channels-last: a spatial row holds all channels contiguously, so a segment is a whole sample (all groups);
    # contiguous: a segment is one group (its channels are contiguous runs along space).
    groups_per_segment = G if channels_last else 1
    block_c = triton.next_power_of_2(groups_per_segment) * cpg_pad
    block_s = max(1, min(tile // block_c, triton.next_power_of_2(S)))
    tiles = triton.cdiv(S, block_s)
    segments_per_sample = triton.cdiv(G, groups_per_segment)
    max_splits = _multiprocessors(device)
    num_segments = N * segments_per_sample
    if fused is None:  # measured: channels-last (one segment per sample) runs faster in two launches than gang-synced
        fused = not _INTERPRET and not (channels_last and num_segments < max_splits)
    if splits is None:
        wanted = triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * max_splits, num_segments)
        if not fused:
            splits = wanted
        elif num_segments >= max_splits:
            splits = 1
        else:  # a power of two: measured faster than its neighbours (e.g. 16 vs 17 splits of 512 tiles)
            splits = triton.next_power_of_2(wanted) // (2 if wanted & (wanted - 1) else 1)
    if fused:
        splits = min(splits, max_splits)
    splits = max(1, min(splits, tiles, MAX_SPLITS))
    tiles_per_split = triton.cdiv(tiles, splits)
    return _Plan(block_c=block_c, block_s=block_s, block_g=triton.next_power_of_2(groups_per_segment), cpg_pad=cpg_pad,
                 groups_per_segment=groups_per_segment, segments_per_sample=segments_per_sample,
                 num_segments=N * segments_per_sample, splits=triton.cdiv(tiles, tiles_per_split),
                 tiles_per_split=tiles_per_split, fused=fused,
                 barrier=fused and (splits > 1 if barrier is None else barrier))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """Programs of one segment that are surely resident together: one per multiprocessor (1 in the interpreter)."""
    if _INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_warps(block_elems: int) -> int:
    return max(1, min(16, block_elems // 1024))


def _is_channels_last(x: torch.Tensor) -> bool:
    """True when x is (N, C, *spatial) stored with channels innermost and is not also plain contiguous."""
    if x.is_contiguous():
        return False
    return x.movedim(1, -1).is_contiguous()


def _as_kernel_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x in a layout the kernels read: kept if contiguous or channels-last, else made contiguous."""
    if _is_channels_last(x):
        return x, True
    return x.contiguous(), False


def _per_sample_channels(t: torch.Tensor | None, N: int, C: int, name: str) -> torch.Tensor | None:
    """scale / shift given as (N, C) or (N, C, 1, ...) -> contiguous (N, C)."""
    if t is None:
        return None
    if t.shape[:2] != (N, C) or t[0, 0].numel() != 1:
        raise ValueError(f"group_norm_act: {name} must be (N, C) = ({N}, {C}) or (N, C, 1, ...), got {tuple(t.shape)}")
    return t.reshape(N, C).contiguous()


@dataclass(frozen=True)
class GroupNormTuning:
    """Launch choices. None = chosen by size and device (see `_plan`)."""
    forward_tile: int = FORWARD_TILE
    backward_tile: int = BACKWARD_TILE
    splits: int | None = None
    fused: bool | None = None
    barrier: bool | None = None


def _sync_counters(plan: _Plan, device: torch.device) -> torch.Tensor:
    """Zeroed ticket, arrival counters and flags for the barrier (a dummy when there is none)."""
    if not plan.barrier:
        return torch.empty(1, device=device, dtype=torch.int32)
    return torch.zeros(1 + 2 * plan.num_segments, device=device, dtype=torch.int32)


def _launch_forward(h_in: torch.Tensor, residual, weight, bias, scale, shift, G: int, eps: float, act: bool,
                    channels_last: bool, tuning: GroupNormTuning):
    """Runs the forward kernel(s). Returns y, h (= x + residual, or x), mean, rstd ((N, G) fp32)."""
    N, C = h_in.shape[:2]
    S = h_in[0, 0].numel()
    plan = _plan(N, C, S, G, channels_last, tuning.forward_tile, h_in.device, tuning.splits, tuning.fused,
                 tuning.barrier)
    y = torch.empty_like(h_in)
    h = torch.empty_like(h_in) if residual is not None else h_in
    parts = plan.num_segments * plan.splits * plan.block_g if (plan.barrier or not plan.fused) else 1
    scratch = torch.empty(2 * N * G + 2 * parts, device=h_in.device, dtype=torch.float32)
    mean, rstd = scratch[:N * G].view(N, G), scratch[N * G:2 * N * G].view(N, G)
    part_mean, part_m2 = scratch[2 * N * G:2 * N * G + parts], scratch[2 * N * G + parts:]
    sync = _sync_counters(plan, h_in.device)
    dummy = mean  # stands for absent optional tensors (never read: the constexpr flags prune those loads)
    args = (h_in, residual if residual is not None else h_in, h, y, weight, bias,
            scale if scale is not None else dummy, shift if shift is not None else dummy, mean, rstd,
            part_mean, part_m2, sync,
            C, S, G, C // G, plan.groups_per_segment, plan.segments_per_sample, plan.num_segments, plan.splits,
            plan.tiles_per_split, eps)
    meta = dict(CHANNELS_LAST=channels_last, HAS_RESIDUAL=residual is not None, HAS_SCALE=scale is not None,
                ACT=act, ONE_TILE=plan.tiles_per_split == 1, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
                BLOCK_G=plan.block_g, CPG_PAD=plan.cpg_pad, BLOCK_SPLITS=plan.block_splits,
                num_warps=_num_warps(plan.block_c * plan.block_s))
    grid = (plan.num_segments * plan.splits,)
    if plan.fused:
        LAST_KERNELS["forward"] = _gn_forward_kernel[grid](*args, PHASE=PHASE_FUSED, BARRIER=plan.barrier, **meta)
    else:
        _gn_forward_kernel[grid](*args, PHASE=PHASE_PARTIALS, BARRIER=False, **meta)
        if residual is not None:  # the apply launch reads h, which the first launch wrote
            args = (h,) + args[1:]
            meta["HAS_RESIDUAL"] = False
        _gn_forward_kernel[grid](*args, PHASE=PHASE_APPLY, BARRIER=False, **meta)
    return y, h, mean, rstd


def _launch_backward(h: torch.Tensor, dy: torch.Tensor, dh, weight, bias, scale, shift, mean, rstd, G: int, act: bool,
                     channels_last: bool, tuning: GroupNormTuning):
    """Runs the backward kernel(s). Returns dx and the (N, C) fp32 sums A = sum(dz), B = sum(dz * xhat)."""
    N, C = h.shape[:2]
    S = h[0, 0].numel()
    plan = _plan(N, C, S, G, channels_last, tuning.backward_tile, h.device, tuning.splits, tuning.fused,
                 tuning.barrier)
    dx = torch.empty_like(h)
    parts = plan.num_segments * plan.splits * plan.block_c if (plan.barrier or not plan.fused) else 1
    scratch = torch.empty(2 * N * C + 2 * parts, device=h.device, dtype=torch.float32)
    sum_a, sum_b = scratch[:N * C].view(N, C), scratch[N * C:2 * N * C].view(N, C)
    part_a, part_b = scratch[2 * N * C:2 * N * C + parts], scratch[2 * N * C + parts:]
    sync = _sync_counters(plan, h.device)
    dummy = mean
    args = (h, dy, dh if dh is not None else dy, dx, weight, bias,
            scale if scale is not None else dummy, shift if shift is not None else dummy, mean, rstd,
            part_a, part_b, sum_a, sum_b, sync,
            C, S, G, C // G, plan.groups_per_segment, plan.segments_per_sample, plan.num_segments, plan.splits,
            plan.tiles_per_split)
    meta = dict(CHANNELS_LAST=channels_last, HAS_DH=dh is not None, HAS_SCALE=scale is not None, ACT=act,
                ONE_TILE=plan.tiles_per_split == 1, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
                BLOCK_G=plan.block_g, CPG_PAD=plan.cpg_pad, BLOCK_SPLITS=plan.block_splits,
                num_warps=_num_warps(plan.block_c * plan.block_s))
    grid = (plan.num_segments * plan.splits,)
    if plan.fused:
        LAST_KERNELS["backward"] = _gn_backward_kernel[grid](*args, PHASE=PHASE_FUSED, BARRIER=plan.barrier, **meta)
    else:
        _gn_backward_kernel[grid](*args, PHASE=PHASE_PARTIALS, BARRIER=False, **meta)
        _gn_backward_kernel[grid](*args, PHASE=PHASE_APPLY, BARRIER=False, **meta)
    return dx, sum_a, sum_b


class _GroupNormActFunction(torch.autograd.Function):
    """Autograd for the fused kernels. Saves h, weight, bias, scale, shift and (N, G) mean / rstd only."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, scale, shift, num_groups, eps, act, tuning):
        x_in, channels_last = _as_kernel_layout(x)
        if residual is not None:
            residual = residual.contiguous(memory_format=_memory_format(x_in, channels_last))
        y, h, mean, rstd = _launch_forward(x_in, residual, weight, bias, scale, shift, num_groups, eps, act,
                                           channels_last, tuning)
        ctx.save_for_backward(h, weight, bias, scale, shift, mean, rstd)
        ctx.config = (num_groups, act, channels_last, tuning, residual is not None)
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, *maybe_dh):
        h, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        num_groups, act, channels_last, tuning, has_residual = ctx.config
        fmt = _memory_format(h, channels_last)
        dy = dy.contiguous(memory_format=fmt)
        dh = maybe_dh[0].contiguous(memory_format=fmt) if (maybe_dh and maybe_dh[0] is not None) else None
        dx, sum_a, sum_b = _launch_backward(h, dy, dh, weight, bias, scale, shift, mean, rstd, num_groups, act,
                                            channels_last, tuning)
        if scale is not None:
            factor = 1.0 + scale.float()
            d_weight, d_bias = (factor * sum_b).sum(0), (factor * sum_a).sum(0)
            d_scale = weight.float() * sum_b + bias.float() * sum_a
            d_shift = sum_a
            d_scale, d_shift = d_scale.to(scale.dtype), d_shift.to(shift.dtype)
        else:
            d_weight, d_bias, d_scale, d_shift = sum_b.sum(0), sum_a.sum(0), None, None
        d_residual = dx if has_residual else None
        return (dx, d_residual, d_weight.to(weight.dtype), d_bias.to(bias.dtype), d_scale, d_shift,
                None, None, None, None)


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if x.ndim == 5 else torch.channels_last


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-6,
                   act: bool = False, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, tuning: GroupNormTuning | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels. Returns (y, h) like `group_norm_reference`.

    x, residual: (N, C, *spatial) with 1 to 3 spatial dims; weight, bias: (C,); scale, shift: (N, C) or (N, C, 1, ...),
    given together or not at all. x in fp32, bf16 or fp16; y and h in x's dtype and layout.
    """
    if x.ndim < 3:
        raise ValueError(f"group_norm_act: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"group_norm_act: C={C} is not divisible by num_groups={num_groups}")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_act: give scale and shift together (shift may be zeros)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"group_norm_act: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if weight is None:
        weight = torch.ones(C, device=x.device, dtype=torch.float32)
    if bias is None:
        bias = torch.zeros(C, device=x.device, dtype=torch.float32)
    scale = _per_sample_channels(scale, N, C, "scale")
    shift = _per_sample_channels(shift, N, C, "shift")
    if x.numel() == 0:
        return group_norm_reference(x, weight, bias, num_groups, eps, act, scale, shift, residual)
    out = _GroupNormActFunction.apply(x, residual, weight.contiguous(), bias.contiguous(), scale, shift, num_groups,
                                      eps, act, tuning or GroupNormTuning())
    return out if residual is not None else (out, x)
