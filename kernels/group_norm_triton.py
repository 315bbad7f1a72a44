"""The Triton programs behind kernels/group_norm.py (which holds the spec, the launch planning and autograd).

Tiles are (lanes, BLOCK_S): BLOCK_G groups of CPG_PAD channel lanes (channels per group padded to a power of two) by
BLOCK_S spatial positions. PHASE 0 is the single launch (with BARRIER: programs of a segment meet in global memory;
without: one program per segment), PHASE 1 writes partial statistics, PHASE 2 combines them and applies.
HAS_INPUT_BIAS: h = x + input_bias[n, c] is formed in registers wherever a tile is read (forward and backward) and never
written.
"""
import triton
import triton.language as tl


@triton.jit
def _lanes(c0, channels_per_group, groups_here, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr,
           DENSE_LANES: tl.constexpr):
    """The channel of each of the tile's BLOCK_G * CPG_PAD channel lanes (lane i: group i // CPG_PAD of the segment,
    its channel i % CPG_PAD), and whether the lane is a real channel (groups padded to a power of two).

    DENSE_LANES (no padding: channels per group and groups per segment are powers of two): lane i is channel c0 + i
    and every lane is real. Written as a plain arange with an all-true mask, so that Triton's axis analysis sees the
    channels-last tile's channel axis as contiguous and vectorises its loads and stores (the // and % of the general
    form hide that, and a channels-last tile was then read element by element)."""
    lane = tl.arange(0, BLOCK_G * CPG_PAD)
    if DENSE_LANES:
        return c0 + lane, tl.full((BLOCK_G * CPG_PAD,), 1, tl.int1)
    group = lane // CPG_PAD
    within = lane % CPG_PAD
    return c0 + group * channels_per_group + within, (within < channels_per_group) & (group < groups_here)


@triton.jit
def _group_sum(per_lane, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr):
    """(BLOCK_G * CPG_PAD,) per-lane values -> (BLOCK_G,) per-group sums (padding lanes must hold 0)."""
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
def _lane_input_bias(ib_ptr, sb_ptr, ib_sample_stride, sb_sample_stride, n, channel, lane_valid,
                     BLOCK_C: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_SAMPLE_BIAS: tl.constexpr):
    """The (BLOCK_C,) fp32 input bias of sample n's lanes in the tile (zeros without one); input_bias is (N, C) with
    ib_sample_stride its row stride, or (C,) with ib_sample_stride = 0, plus with HAS_SAMPLE_BIAS the (N, C) sample
    bias, rows sb_sample_stride apart (e.g. a slice of every block's embedding projections), added to it in fp32
    before it meets x."""
    input_bias = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_INPUT_BIAS:
        input_bias = tl.load(ib_ptr + n * ib_sample_stride + channel, mask=lane_valid, other=0.0).to(tl.float32)
        if HAS_SAMPLE_BIAS:
            input_bias += tl.load(sb_ptr + n * sb_sample_stride + channel, mask=lane_valid, other=0.0).to(tl.float32)
    return input_bias


@triton.jit
def _load_input(x_ptr, r_ptr, h_ptr, input_bias, offsets, mask, HAS_RESIDUAL: tl.constexpr,
                HAS_INPUT_BIAS: tl.constexpr):
    """The tile of h = x (+ residual) (+ input_bias per lane) in fp32, 0 outside `mask` (the moments sum it); with a
    residual, h is also written in x's dtype (and used rounded); with an input bias, h is not written (nor rounded)."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (x.to(tl.float32) + tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + offsets, h, mask=mask)
        x = h
    h = x.to(tl.float32)
    if HAS_INPUT_BIAS:
        h = tl.where(mask, h + input_bias[:, None], 0.0)
    return h


@triton.jit
def _add_pairs(a1, a2, b1, b2):
    return a1 + b1, a2 + b2


@triton.jit
def _load_shift(x_ptr, r_ptr, input_bias, n, channel, lane_valid, s, C, S, CHANNELS_LAST: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr):
    """(lanes,) fp32: h = x (+ residual, rounded to x's dtype as `_load_input` does) (+ input_bias) at position s."""
    if CHANNELS_LAST:
        offsets = n.to(tl.int64) * S * C + s.to(tl.int64) * C + channel
    else:
        offsets = n.to(tl.int64) * C * S + channel.to(tl.int64) * S + s
    x = tl.load(x_ptr + offsets, mask=lane_valid, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + offsets, mask=lane_valid, other=0.0).to(tl.float32)).to(x.dtype)
    h = x.to(tl.float32)
    if HAS_INPUT_BIAS:
        h += input_bias
    return h


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
    """Arrive at the segment's barrier after this program's partials are stored (every thread's: the CTA barrier,
    then a release at GPU scope); True for the last to arrive, which then sees all of their stores (acquire) and must
    combine the partials, store the result and call `_publish`."""
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
def _segment_lanes(seg, G, channels_per_group, groups_per_segment, segments_per_sample, BLOCK_G: tl.constexpr,
                   CPG_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, DENSE_LANES: tl.constexpr):
    """Sample n, first group g0, groups in the segment, and the lanes' channels and validity of segment `seg`."""
    if CHANNELS_LAST:  # a segment is a whole sample: g0 = 0, known at compile time (aligned channel offsets)
        n = seg
        g0 = 0
    else:
        n = seg // segments_per_sample
        g0 = (seg % segments_per_sample) * groups_per_segment
    groups_here = tl.minimum(groups_per_segment, G - g0)
    channel, lane_valid = _lanes(g0 * channels_per_group, channels_per_group, groups_here, BLOCK_G, CPG_PAD,
                                 DENSE_LANES)
    return n, g0, groups_here, channel, lane_valid


@triton.jit
def _program_part(sync_ptr, G, channels_per_group, groups_per_segment, segments_per_sample, splits, tiles_per_split,
                  BARRIER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                  CPG_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, DENSE_LANES: tl.constexpr):
    """Where this program works: segment, split, sample n, first group g0, groups in the segment, the lanes'
    channels and validity, and the first spatial position of its part."""
    seg, split = _segment_of_program(sync_ptr, splits, BARRIER)
    n, g0, groups_here, channel, lane_valid = _segment_lanes(seg, G, channels_per_group, groups_per_segment,
                                                             segments_per_sample, BLOCK_G, CPG_PAD, CHANNELS_LAST,
                                                             DENSE_LANES)
    return seg, split, n, g0, groups_here, channel, lane_valid, split * tiles_per_split * BLOCK_S


@triton.jit
def gn_forward_kernel(
        x_ptr, r_ptr, ib_ptr, sb_ptr, h_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
        part_mean_ptr, part_m2_ptr, sync_ptr, ib_sample_stride, sb_sample_stride,
        C, S, G, channels_per_group, groups_per_segment, segments_per_sample, num_segments, splits, tiles_per_split,
        eps,
        CHANNELS_LAST: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr, ACT: tl.constexpr,
        PHASE: tl.constexpr, BARRIER: tl.constexpr, ONE_TILE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr, DENSE_LANES: tl.constexpr, HAS_SAMPLE_BIAS: tl.constexpr = False):
    """Forward; PHASE 0: one launch with the barrier, 1: partials only, 2: combine and apply. ONE_TILE: the program's
    part is one tile (kept in registers across the barrier in phase 0)."""
    seg, split, n, g0, groups_here, channel, lane_valid, s_begin = _program_part(
        sync_ptr, G, channels_per_group, groups_per_segment, segments_per_sample, splits, tiles_per_split,
        PHASE == 0 and BARRIER, BLOCK_S, BLOCK_G, CPG_PAD, CHANNELS_LAST, DENSE_LANES)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < groups_here
    input_bias = _lane_input_bias(ib_ptr, sb_ptr, ib_sample_stride, sb_sample_stride, n, channel, lane_valid,
                                  BLOCK_C, HAS_INPUT_BIAS, HAS_SAMPLE_BIAS)
    split_elems = tiles_per_split * BLOCK_S * channels_per_group
    group_elems = S * channels_per_group

    # 1. partial statistics of this program's part (kept in registers when it is one tile): per lane, sums of
    # d = h - K and d^2 with K the lane's value at the part's first position (shifted data: no cancellation while K is
    # one of the lane's values), elementwise over the tiles and reduced across the tile once; then per lane mean and
    # M2, combined into the groups' (Chan et al.).
    if PHASE != 2 and ONE_TILE:  # exact two passes over the tile in registers
        offsets, mask = _tile_offsets(n, channel, lane_valid, s_begin, C, S, BLOCK_S, CHANNELS_LAST)
        h = _load_input(x_ptr, r_ptr, h_ptr, input_bias, offsets, mask, HAS_RESIDUAL, HAS_INPUT_BIAS)
        count = (tl.minimum(S - s_begin, BLOCK_S) * channels_per_group).to(tl.float32)
        mean, m2 = _tile_moments(h, mask, count, BLOCK_G, CPG_PAD)
    elif PHASE != 2:
        offsets, mask = _tile_offsets(n, channel, lane_valid, s_begin, C, S, BLOCK_S, CHANNELS_LAST)
        h = _load_input(x_ptr, r_ptr, h_ptr, input_bias, offsets, mask, HAS_RESIDUAL, HAS_INPUT_BIAS)
        shift = _load_shift(x_ptr, r_ptr, input_bias, n, channel, lane_valid, s_begin, C, S, CHANNELS_LAST,
                            HAS_RESIDUAL, HAS_INPUT_BIAS)[:, None]
        sum_d = tl.where(mask, h - shift, 0.0)
        sum_d2 = sum_d * sum_d
        for t in range(1, tiles_per_split):
            t_offsets, t_mask = _tile_offsets(n, channel, lane_valid, s_begin + t * BLOCK_S, C, S, BLOCK_S, CHANNELS_LAST)
            t_h = _load_input(x_ptr, r_ptr, h_ptr, input_bias, t_offsets, t_mask, HAS_RESIDUAL, HAS_INPUT_BIAS)
            d = tl.where(t_mask, t_h - shift, 0.0)
            sum_d += d
            sum_d2 += d * d
        positions = (tl.minimum(S, s_begin + tiles_per_split * BLOCK_S) - s_begin).to(tl.float32)
        s1, s2 = tl.reduce((sum_d, sum_d2), 1, _add_pairs)
        lane_mean = tl.where(lane_valid, shift.reshape(BLOCK_C) + s1 / positions, 0.0)
        lane_m2 = tl.where(lane_valid, s2 - s1 * s1 / positions, 0.0)
        mean = _group_sum(lane_mean, BLOCK_G, CPG_PAD) / channels_per_group
        spread = tl.where(lane_valid, lane_mean - _to_lanes(mean, BLOCK_G, CPG_PAD), 0.0)
        m2 = _group_sum(lane_m2 + positions * spread * spread, BLOCK_G, CPG_PAD)
        count = positions * channels_per_group
    if PHASE != 2:
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
            if HAS_INPUT_BIAS:
                t_h += input_bias[:, None]
            z = t_h * a[:, None] + b[:, None]
            if ACT:
                z = z * tl.sigmoid(z)
            tl.store(y_ptr + t_offsets, z.to(y_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def _backward_tile(h_ptr, dy_ptr, offsets, mask, channel_mean, channel_rstd, w, b, scale, shift, input_bias,
                   HAS_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr):
    """xhat and dz (the gradient at the normalised-and-affine output, before scale) of one tile, both fp32; dz is 0
    outside `mask`, xhat is not. With HAS_INPUT_BIAS, h_ptr holds x and h = x + input_bias is formed here."""
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_INPUT_BIAS:
        h += input_bias[:, None]
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
def gn_backward_kernel(
        h_ptr, ib_ptr, sb_ptr, dy_ptr, dh_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
        part_a_ptr, part_b_ptr, part_x_ptr, sum_a_ptr, sum_b_ptr, d_ib_ptr, sync_ptr, ib_sample_stride,
        sb_sample_stride,
        C, S, G, channels_per_group, groups_per_segment, segments_per_sample, num_segments, splits, tiles_per_split,
        CHANNELS_LAST: tl.constexpr, HAS_DH: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        ACT: tl.constexpr,
        PHASE: tl.constexpr, BARRIER: tl.constexpr, ONE_TILE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr, DENSE_LANES: tl.constexpr, HAS_SAMPLE_BIAS: tl.constexpr = False):
    """dx = rstd * (k * dz - mean_g(k * dz) - xhat * mean_g(k * dz * xhat)), k = weight * (1 + scale); also the
    per-(sample, channel) sums A = sum(dz), B = sum(dz * xhat) from which the parameter gradients follow, and with
    HAS_INPUT_BIAS (h_ptr then holds x) the input bias's per-(sample, channel) gradient, dx summed over space
    (`_input_bias_grad`, from A, B and X = sum(xhat)), stored in d_ib_ptr's dtype; with HAS_SAMPLE_BIAS that is the
    (N, C) sample bias's gradient, and the (C,) input bias's is its sum over the samples."""
    seg, split, n, g0, groups_here, channel, lane_valid, s_begin = _program_part(
        sync_ptr, G, channels_per_group, groups_per_segment, segments_per_sample, splits, tiles_per_split,
        PHASE == 0 and BARRIER, BLOCK_S, BLOCK_G, CPG_PAD, CHANNELS_LAST, DENSE_LANES)
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
    input_bias = _lane_input_bias(ib_ptr, sb_ptr, ib_sample_stride, sb_sample_stride, n, channel, lane_valid,
                                  BLOCK_C, HAS_INPUT_BIAS, HAS_SAMPLE_BIAS)
    k = w * scale
    inv_elems = 1.0 / (S * channels_per_group).to(tl.float32)

    # 1. per-channel partial sums of dz, dz * xhat (and xhat) over this program's part
    if PHASE != 2:
        offsets, mask = _tile_offsets(n, channel, lane_valid, s_begin, C, S, BLOCK_S, CHANNELS_LAST)
        xhat, dz = _backward_tile(h_ptr, dy_ptr, offsets, mask, channel_mean, channel_rstd, w, b, scale, shift,
                                  input_bias, HAS_SCALE, ACT, HAS_INPUT_BIAS)
        if ONE_TILE:
            sum_a = tl.sum(dz, axis=1)
            sum_b = tl.sum(dz * xhat, axis=1)
            if HAS_INPUT_BIAS:
                sum_x = tl.sum(tl.where(mask, xhat, 0.0), axis=1)
        else:  # per-lane sums over the tiles, reduced once after the loop
            lane_a = dz
            lane_b = dz * xhat
            if HAS_INPUT_BIAS:
                lane_x = tl.where(mask, xhat, 0.0)
            for t in range(1, tiles_per_split):
                t_offsets, t_mask = _tile_offsets(n, channel, lane_valid, s_begin + t * BLOCK_S, C, S, BLOCK_S, CHANNELS_LAST)
                t_xhat, t_dz = _backward_tile(h_ptr, dy_ptr, t_offsets, t_mask, channel_mean, channel_rstd, w, b,
                                              scale, shift, input_bias, HAS_SCALE, ACT, HAS_INPUT_BIAS)
                lane_a += t_dz
                lane_b += t_dz * t_xhat
                if HAS_INPUT_BIAS:
                    lane_x += tl.where(t_mask, t_xhat, 0.0)
            sum_a = tl.sum(lane_a, axis=1)
            sum_b = tl.sum(lane_b, axis=1)
            if HAS_INPUT_BIAS:
                sum_x = tl.sum(lane_x, axis=1)
        if PHASE == 1 or BARRIER:
            part = (seg * splits + split) * BLOCK_C + tl.arange(0, BLOCK_C)
            tl.store(part_a_ptr + part, sum_a)
            tl.store(part_b_ptr + part, sum_b)
            if HAS_INPUT_BIAS:
                tl.store(part_x_ptr + part, sum_x)

    if PHASE == 1:  # two launches: this one only writes the partials
        return

    # 2. the segment's totals: A and B per channel (written for the parameter gradients; with an input bias, its
    # gradient written instead of X)
    sums = n * C + channel
    if PHASE == 0 and BARRIER:
        if _arrive(sync_ptr, seg, splits):
            total_a = _sum_partials(part_a_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
            total_b = _sum_partials(part_b_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
            tl.store(sum_a_ptr + sums, total_a, mask=lane_valid)
            tl.store(sum_b_ptr + sums, total_b, mask=lane_valid)
            if HAS_INPUT_BIAS:
                total_x = _sum_partials(part_x_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
                d_ib = _input_bias_grad(total_a, total_b, total_x, k, channel_rstd, S, inv_elems, BLOCK_G, CPG_PAD)
                tl.store(d_ib_ptr + sums, d_ib.to(d_ib_ptr.dtype.element_ty), mask=lane_valid)
            _publish(sync_ptr, seg, num_segments)
        _wait_published(sync_ptr, seg, num_segments)
        total_a = tl.load(sum_a_ptr + sums, mask=lane_valid, other=0.0, volatile=True)
        total_b = tl.load(sum_b_ptr + sums, mask=lane_valid, other=0.0, volatile=True)
    elif PHASE == 0:  # one split: this program's sums are the totals
        total_a, total_b = sum_a, sum_b
        tl.store(sum_a_ptr + sums, total_a, mask=lane_valid)
        tl.store(sum_b_ptr + sums, total_b, mask=lane_valid)
        if HAS_INPUT_BIAS:
            d_ib = _input_bias_grad(total_a, total_b, sum_x, k, channel_rstd, S, inv_elems, BLOCK_G, CPG_PAD)
            tl.store(d_ib_ptr + sums, d_ib.to(d_ib_ptr.dtype.element_ty), mask=lane_valid)
    else:
        total_a = _sum_partials(part_a_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
        total_b = _sum_partials(part_b_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
        if split == 0:
            tl.store(sum_a_ptr + sums, total_a, mask=lane_valid)
            tl.store(sum_b_ptr + sums, total_b, mask=lane_valid)
            if HAS_INPUT_BIAS:
                total_x = _sum_partials(part_x_ptr, seg, splits, BLOCK_SPLITS, BLOCK_C)
                d_ib = _input_bias_grad(total_a, total_b, total_x, k, channel_rstd, S, inv_elems, BLOCK_G, CPG_PAD)
                tl.store(d_ib_ptr + sums, d_ib.to(d_ib_ptr.dtype.element_ty), mask=lane_valid)

    c1, c2 = _group_means(k * total_a, k * total_b, inv_elems, BLOCK_G, CPG_PAD)

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
                                          shift, input_bias, HAS_SCALE, ACT, HAS_INPUT_BIAS)
            dx = channel_rstd[:, None] * (k[:, None] * t_dz - c1[:, None] - t_xhat * c2[:, None])
            if HAS_DH:
                dx += tl.load(dh_ptr + t_offsets, mask=t_mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + t_offsets, dx.to(dx_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def _input_bias_grad(total_a, total_b, total_x, k, channel_rstd, S, inv_elems, BLOCK_G: tl.constexpr,
                     CPG_PAD: tl.constexpr):
    """Per lane: dx summed over the sample's space, rstd * (k A - S mean_g(k dz) - X mean_g(k dz xhat)), from the
    totals A = sum(dz), B = sum(dz * xhat), X = sum(xhat); mean_g over the group's elements (inv_elems = 1 / their
    number). The gradient of an input bias added to this sample's channels."""
    c1, c2 = _group_means(k * total_a, k * total_b, inv_elems, BLOCK_G, CPG_PAD)
    return channel_rstd * (k * total_a - S * c1 - total_x * c2)


@triton.jit
def _group_means(k_a, k_b, inv_elems, BLOCK_G: tl.constexpr, CPG_PAD: tl.constexpr):
    """Per lane, its group's mean_g(k dz) and mean_g(k dz xhat) from per-lane sums k A and k B (inv_elems = 1 / the
    group's number of elements)."""
    c1 = _to_lanes(_group_sum(k_a, BLOCK_G, CPG_PAD), BLOCK_G, CPG_PAD) * inv_elems
    c2 = _to_lanes(_group_sum(k_b, BLOCK_G, CPG_PAD), BLOCK_G, CPG_PAD) * inv_elems
    return c1, c2


@triton.jit
def _sum_partials(part_ptr, seg, splits, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of the splits' per-channel partials, in split order (deterministic): a (BLOCK_C,) vector."""
    p = tl.arange(0, BLOCK_SPLITS)
    c = tl.arange(0, BLOCK_C)
    index = (seg * splits + p)[:, None] * BLOCK_C + c[None, :]
    valid = (p < splits)[:, None]
    return tl.sum(tl.load(part_ptr + index, mask=valid, other=0.0, volatile=True), axis=0)
