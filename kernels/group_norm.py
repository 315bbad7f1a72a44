"""Fused GroupNorm (+ input bias, + per-sample scale-shift, + SiLU, + residual add) in Triton, forward and backward.

    h = x + residual                                      (optional; h is returned too, for the skip path)
    h = x + input_bias[n, c] (+ sample_bias[n, c])        (optional, instead; input_bias: (C,) or (N, C), e.g. the
                                                           bias of the convolution that made x, plus a per-sample
                                                           embedding; h is not materialised)
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

Saved for backward: h (the input), or x and input_bias, and mean, rstd per (sample, group) in fp32 — not the
normalised activations. The input bias's gradient (dx summed over space, per sample and channel) follows in closed
form from per-(sample, channel) sums the backward kernel forms anyway, plus one: the sum of xhat; the program that
combines a segment's sums writes it (`_input_bias_grad` in kernels/group_norm_triton.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
from torch.nn import functional as F

from kernels.group_norm_triton import gn_backward_kernel, gn_forward_kernel
from kernels.layout import dense, is_channels_last, multiprocessors

# Elements of one register tile, forward and backward (measured: benchmarks/bench_group_norm.py).
FORWARD_TILE = 8192
BACKWARD_TILE = 8192
# Splitting segments aims at this many programs per multiprocessor in all (measured: benchmarks/bench_group_norm.py).
PROGRAMS_PER_MULTIPROCESSOR = 4
# Channels-last parts in two launches: every combining program reads all partials of its sample, so fewer programs
# (2 per multiprocessor) and no more than this many tiles each (measured on an H200, 2026-12-03: 4x128x32^3
# 0.156 -> 0.128 ms forward+backward, 8x256x16^3 0.125 -> 0.086, 4x256x16^3 0.087 -> 0.063, 1x64x128^3 unchanged).
CHANNELS_LAST_PROGRAMS_PER_MULTIPROCESSOR = 2
CHANNELS_LAST_MAX_TILES_PER_SPLIT = 32
# Every program of the combining launch reads all of its segment's partials: keep their number small (16384 splits of
# one segment ran 300x slower, and wrong, on an H100).
MAX_SPLITS = 1024
# Triton's interpreter runs programs one after another: no program may wait for another there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The barrier needs all programs of a segment resident at once, which holds when the GPU's multiprocessors are ours to
# share with ordinary kernels. Where they are not (e.g. an MPS client limited to a share of the SMs, which still
# reports them all), LDM_GROUP_NORM_BARRIER=0 makes every launch plan use two launches instead.
_BARRIER_ALLOWED = os.environ.get("LDM_GROUP_NORM_BARRIER", "1") != "0"

PHASE_FUSED, PHASE_PARTIALS, PHASE_APPLY = 0, 1, 2
# The last compiled kernel of each direction (register and spill counts for benchmarks/bench_group_norm.py).
LAST_KERNELS: dict = {}


def group_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                         eps: float = 1e-6, act: bool = False, scale: torch.Tensor | None = None,
                         shift: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                         input_bias: torch.Tensor | None = None,
                         sample_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec, in PyTorch: returns (y, h) with h = x (+ residual) (+ input_bias per channel) (+ sample_bias).

    x, residual: (N, C, *spatial); weight, bias: (C,); input_bias: (C,) or (N, C); sample_bias: (N, C), added to
    input_bias first; scale, shift: (N, C) or (N, C, 1, ...). Computes in
    fp32 (or the input's dtype when that is float64; input_bias is added there) and returns y and h in x's dtype.
    """
    h = x if residual is None else x + residual
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    spatial = (1,) * (x.ndim - 2)
    h_compute = h.to(compute)
    if sample_bias is not None:
        input_bias = sample_bias if input_bias is None else input_bias.to(compute) + sample_bias.to(compute)
    if input_bias is not None:
        h_compute = h_compute + input_bias.to(compute).reshape(-1, x.shape[1], *spatial)
        h = h_compute.to(x.dtype)
    y = F.group_norm(h_compute, num_groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    if scale is not None:
        y = y * (1 + scale.reshape(*scale.shape[:2], *spatial).to(compute))
    if shift is not None:
        y = y + shift.reshape(*shift.shape[:2], *spatial).to(compute)
    if act:
        y = F.silu(y)
    return y.to(x.dtype), h


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
    dense_lanes: bool  # lanes are the segment's channels one to one, all real (no power-of-two padding)

    @property
    def block_splits(self) -> int:
        return triton.next_power_of_2(self.splits)


def _power_of_two_at_most(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return triton.next_power_of_2(n) // (2 if n & (n - 1) else 1)


@functools.lru_cache(maxsize=1024)
def _plan(N: int, C: int, S: int, G: int, channels_last: bool, tile: int, device: torch.device,
          splits: int | None = None, fused: bool | None = None, barrier: bool | None = None) -> _Plan:
    """Cut (N, C, S) into segments, splits and tiles of about `tile` elements.

    At least one segment per multiprocessor: one program per segment, no barrier (it reads its segment twice; the
    second read hits the cache). Fewer: contiguous segments are split so that there are about
    PROGRAMS_PER_MULTIPROCESSOR programs per multiprocessor in all, at most one per multiprocessor per segment, which
    meet at the barrier; channels-last ones run in two launches with about CHANNELS_LAST_PROGRAMS_PER_MULTIPROCESSOR
    programs per multiprocessor and at most CHANNELS_LAST_MAX_TILES_PER_SPLIT tiles each. `splits`, `fused` and
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
    max_splits = multiprocessors(device)  # programs of one segment surely resident together: one per multiprocessor
    num_segments = N * segments_per_sample
    if fused is None:  # measured: channels-last (one segment per sample) runs faster in two launches than gang-synced
        fused = not _INTERPRET and not (channels_last and num_segments < max_splits)
    if splits is None:
        if not fused and channels_last:
            wanted = triton.cdiv(CHANNELS_LAST_PROGRAMS_PER_MULTIPROCESSOR * max_splits, num_segments)
            splits = max(_power_of_two_at_most(wanted), triton.cdiv(tiles, CHANNELS_LAST_MAX_TILES_PER_SPLIT))
        else:
            wanted = triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * max_splits, num_segments)
            if not fused:
                splits = wanted
            elif num_segments >= max_splits:
                splits = 1
            else:  # a power of two: measured faster than its neighbours (e.g. 16 vs 17 splits of 512 tiles)
                splits = _power_of_two_at_most(wanted)
    if fused:
        splits = min(splits, max_splits)
    splits = max(1, min(splits, tiles, MAX_SPLITS))
    if fused and splits > 1 and not _BARRIER_ALLOWED:
        fused = False
    tiles_per_split = triton.cdiv(tiles, splits)
    dense_lanes = (cpg == cpg_pad and G % groups_per_segment == 0
                   and triton.next_power_of_2(groups_per_segment) == groups_per_segment)
    return _Plan(block_c=block_c, block_s=block_s, block_g=triton.next_power_of_2(groups_per_segment), cpg_pad=cpg_pad,
                 groups_per_segment=groups_per_segment, segments_per_sample=segments_per_sample,
                 num_segments=N * segments_per_sample, splits=triton.cdiv(tiles, tiles_per_split),
                 tiles_per_split=tiles_per_split, fused=fused,
                 barrier=fused and (splits > 1 if barrier is None else barrier),
                 dense_lanes=dense_lanes)


def _plan_meta(plan: _Plan, channels_last: bool) -> dict:
    """The compile-time arguments both kernels take from a plan (layout, block shapes, warps)."""
    return dict(CHANNELS_LAST=channels_last, ONE_TILE=plan.tiles_per_split == 1, BLOCK_C=plan.block_c,
                BLOCK_S=plan.block_s, BLOCK_G=plan.block_g, CPG_PAD=plan.cpg_pad, BLOCK_SPLITS=plan.block_splits,
                DENSE_LANES=plan.dense_lanes,
                num_warps=max(1, min(16, plan.block_c * plan.block_s // 1024)))


def _as_kernel_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x in a layout the kernels read: kept if contiguous or channels-last, else made contiguous."""
    if is_channels_last(x):
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

    @classmethod
    def parse(cls, spec: str) -> "GroupNormTuning":
        """'forward_tile=4096,splits=8' (benchmarks' command lines) -> GroupNormTuning; an unknown field or
        a value that is not an integer, True or False raises ValueError naming it."""
        fields: dict = {}
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"GroupNormTuning: unknown field {key!r} in {spec!r} (fields: "
                                 f"{', '.join(cls.__dataclass_fields__)})")
            constants = {"True": True, "False": False, "None": None}
            if value in constants:
                fields[key] = constants[value]
                continue
            try:
                fields[key] = int(value)
            except ValueError:
                raise ValueError(f"GroupNormTuning: {key}={value!r} is not an integer, True, False or None") from None
        return cls(**fields)


def _scratch(shape: tuple[int, int], plan: _Plan, per_part: int, device: torch.device,
             count: int = 2) -> tuple[torch.Tensor, ...]:
    """One fp32 allocation for `count` `shape` results (e.g. mean and rstd), as one (count, *shape) tensor, then
    `count` partials buffers of `per_part` values per program (only where a plan combines partials)."""
    size = shape[0] * shape[1]
    parts = plan.num_segments * plan.splits * per_part if (plan.barrier or not plan.fused) else 1
    scratch = torch.empty(count * (size + parts), device=device, dtype=torch.float32)
    results = scratch[:count * size].view(count, *shape)
    partials = tuple(scratch[count * size + i * parts:count * size + (i + 1) * parts] for i in range(count))
    return (results,) + partials


def _sync_counters(plan: _Plan, device: torch.device) -> torch.Tensor:
    """Zeroed ticket, arrival counters and flags for the barrier; else a dummy."""
    if plan.barrier:
        return torch.zeros(1 + 2 * plan.num_segments, device=device, dtype=torch.int32)
    return torch.empty(1, device=device, dtype=torch.int32)


def _launch_forward(h_in: torch.Tensor, residual, input_bias, sample_bias, weight, bias, scale, shift, G: int,
                    eps: float, act: bool, channels_last: bool, tuning: GroupNormTuning):
    """Runs the forward kernel(s). Returns y, h (= x + residual, or x: also with input_bias, which is added in
    registers only), mean, rstd ((N, G) fp32)."""
    N, C = h_in.shape[:2]
    S = h_in[0, 0].numel()
    plan = _plan(N, C, S, G, channels_last, tuning.forward_tile, h_in.device, tuning.splits, tuning.fused,
                 tuning.barrier)
    y = torch.empty_like(h_in)
    h = torch.empty_like(h_in) if residual is not None else h_in
    (mean, rstd), part_mean, part_m2 = _scratch((N, G), plan, plan.block_g, h_in.device)
    sync = _sync_counters(plan, h_in.device)
    dummy = mean  # stands for absent optional tensors (never read: the constexpr flags prune those loads)
    args = (h_in, residual if residual is not None else h_in, input_bias if input_bias is not None else dummy,
            sample_bias if sample_bias is not None else dummy,
            h, y, weight, bias, scale if scale is not None else dummy, shift if shift is not None else dummy,
            mean, rstd, part_mean, part_m2, sync, _sample_stride(input_bias), _sample_stride(sample_bias),
            C, S, G, C // G, plan.groups_per_segment, plan.segments_per_sample, plan.num_segments, plan.splits,
            plan.tiles_per_split, eps)
    meta = dict(_plan_meta(plan, channels_last), HAS_RESIDUAL=residual is not None,
                HAS_INPUT_BIAS=input_bias is not None, HAS_SCALE=scale is not None, ACT=act,
                HAS_SAMPLE_BIAS=sample_bias is not None)
    grid = (plan.num_segments * plan.splits,)
    if plan.fused:
        LAST_KERNELS["forward"] = gn_forward_kernel[grid](*args, PHASE=PHASE_FUSED, BARRIER=plan.barrier, **meta)
    else:
        gn_forward_kernel[grid](*args, PHASE=PHASE_PARTIALS, BARRIER=False, **meta)
        if residual is not None:  # the apply launch reads h, which the first launch wrote
            args = (h,) + args[1:]
            meta["HAS_RESIDUAL"] = False
        gn_forward_kernel[grid](*args, PHASE=PHASE_APPLY, BARRIER=False, **meta)
    return y, h, mean, rstd


def _launch_backward(h: torch.Tensor, dy: torch.Tensor, dh, input_bias, sample_bias, weight, bias, scale, shift, mean,
                     rstd, G: int, act: bool, channels_last: bool,
                     tuning: GroupNormTuning) -> tuple[torch.Tensor, _ParameterGrads]:
    """Runs the backward kernel(s); h is x where input_bias is given. Returns dx and the gradients of input_bias,
    sample_bias, weight, bias, scale and shift (None where the argument is None), in fp32, from the kernel's
    per-(sample, channel) sums (`_parameter_grads_from_sums`)."""
    N, C = h.shape[:2]
    S = h[0, 0].numel()
    plan = _plan(N, C, S, G, channels_last, tuning.backward_tile, h.device, tuning.splits, tuning.fused,
                 tuning.barrier)
    dx = torch.empty_like(h)
    dummy = mean
    if input_bias is None:
        sums, part_a, part_b = _scratch((N, C), plan, plan.block_c, h.device)
        part_x = dummy
    else:
        sums, part_a, part_b, part_x = _scratch((N, C), plan, plan.block_c, h.device, count=3)
    d_input_bias = sums[2] if input_bias is not None else None  # per (sample, channel)
    sync = _sync_counters(plan, h.device)
    args = (h, input_bias if input_bias is not None else dummy, sample_bias if sample_bias is not None else dummy,
            dy, dh if dh is not None else dy, dx, weight, bias,
            scale if scale is not None else dummy, shift if shift is not None else dummy, mean, rstd,
            part_a, part_b, part_x, sums[0], sums[1], d_input_bias if d_input_bias is not None else dummy, sync,
            _sample_stride(input_bias), _sample_stride(sample_bias),
            C, S, G, C // G, plan.groups_per_segment, plan.segments_per_sample, plan.num_segments, plan.splits,
            plan.tiles_per_split)
    meta = dict(_plan_meta(plan, channels_last), HAS_DH=dh is not None, HAS_INPUT_BIAS=input_bias is not None,
                HAS_SCALE=scale is not None, ACT=act, HAS_SAMPLE_BIAS=sample_bias is not None)
    grid = (plan.num_segments * plan.splits,)
    if plan.fused:
        LAST_KERNELS["backward"] = gn_backward_kernel[grid](*args, PHASE=PHASE_FUSED, BARRIER=plan.barrier, **meta)
    else:
        gn_backward_kernel[grid](*args, PHASE=PHASE_PARTIALS, BARRIER=False, **meta)
        gn_backward_kernel[grid](*args, PHASE=PHASE_APPLY, BARRIER=False, **meta)
    return dx, _parameter_grads_from_sums(sums[:2], d_input_bias, input_bias, sample_bias, weight, bias, scale)


@dataclass
class _ParameterGrads:
    """The backward's gradients of group_norm_act's parameters (None where there is no such argument)."""
    input_bias: torch.Tensor | None
    sample_bias: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor | None
    shift: torch.Tensor | None


def _parameter_grads_from_sums(sums: torch.Tensor, d_input_bias, input_bias, sample_bias, weight, bias,
                               scale) -> _ParameterGrads:
    """The parameter gradients from the kernel's (2, N, C) fp32 sums [A = sum(dz), B = sum(dz * xhat)] and, with an
    input bias, its (N, C) per-sample gradient (the sample bias's): d_bias = sum_n (1 + scale_n) A_n,
    d_weight = sum_n (1 + scale_n) B_n, d_scale = weight B + bias A, d_shift = A."""
    sum_a, sum_b = sums
    d_scale = d_shift = None
    if scale is not None:
        d_bias, d_weight = ((1.0 + scale.float()) * sums).sum(1)
        d_scale = weight.float() * sum_b + bias.float() * sum_a
        d_shift = sum_a
    else:
        d_bias, d_weight = sums.sum(1)  # one reduction for both
    d_sample_bias = d_input_bias if sample_bias is not None else None
    if input_bias is not None and input_bias.ndim == 1:
        d_input_bias = d_input_bias.sum(0)
    return _ParameterGrads(input_bias=d_input_bias, sample_bias=d_sample_bias, weight=d_weight, bias=d_bias,
                           scale=d_scale, shift=d_shift)


def _sample_stride(input_bias: torch.Tensor | None) -> int:
    """Elements between samples' rows of an input or sample bias: its row stride for (N, C), 0 for (C,) (one row for
    all)."""
    return input_bias.stride(0) if input_bias is not None and input_bias.ndim == 2 else 0


def _dense_rows(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A (C,) or (N, C) bias whose channels are adjacent (its rows may be apart: a slice of a wider tensor is read
    where it lies, not copied)."""
    return bias if bias is None or bias.stride(-1) == 1 else bias.contiguous()


class _GroupNormActFunction(torch.autograd.Function):
    """Autograd for the fused kernels. Saves h (or x and input_bias), weight, bias, scale, shift and (N, G) mean /
    rstd only. With `pass_input`, x is a second output too, whose gradient comes back to this backward, which adds it
    to dx in the kernel, as it adds h's with a residual."""

    @staticmethod
    def forward(ctx, x, residual, input_bias, sample_bias, weight, bias, scale, shift, num_groups, eps, act, tuning,
                pass_input):
        x_in, channels_last = _as_kernel_layout(x)
        if residual is not None:
            residual = dense(residual, channels_last)
        y, h, mean, rstd = _launch_forward(x_in, residual, input_bias, sample_bias, weight, bias, scale, shift,
                                           num_groups, eps, act, channels_last, tuning)
        ctx.save_for_backward(h, input_bias, sample_bias, weight, bias, scale, shift, mean, rstd)
        ctx.config = (num_groups, act, channels_last, tuning, residual is not None)
        if residual is not None:
            return y, h
        # x's alias (a new tensor on x's memory, its strides kept): x itself would come back as autograd's view of it,
        # with a size-1 batch axis's stride rewritten
        return (y, x.detach()) if pass_input else y

    @staticmethod
    def backward(ctx, dy, *maybe_dh):
        h, input_bias, sample_bias, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        num_groups, act, channels_last, tuning, has_residual = ctx.config
        dy = dense(dy, channels_last)
        dh = dense(maybe_dh[0], channels_last) if (maybe_dh and maybe_dh[0] is not None) else None
        dx, grads = _launch_backward(h, dy, dh, input_bias, sample_bias, weight, bias, scale, shift, mean, rstd,
                                     num_groups, act, channels_last, tuning)
        return (dx, dx if has_residual else None, _cast(grads.input_bias, input_bias),
                _cast(grads.sample_bias, sample_bias), _cast(grads.weight, weight), _cast(grads.bias, bias),
                _cast(grads.scale, scale), _cast(grads.shift, shift), None, None, None, None, None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient in its argument's dtype (a no-op where they agree)."""
    return None if grad is None else grad.to(like.dtype)


def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-6,
                   act: bool = False, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, tuning: GroupNormTuning | None = None,
                   input_bias: torch.Tensor | None = None, sample_bias: torch.Tensor | None = None,
                   pass_input: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused kernels. Returns (y, h) like `group_norm_reference`; (y, None) with input_bias, whose
    h = x + input_bias is never materialised. `pass_input` (not with residual): (y, x), x as an output of the norm, for
    a block that uses x again (a residual shortcut): the gradient of those other uses comes into the norm's backward,
    which adds it to x's in the kernel, instead of autograd adding the two in a pass over x of its own.

    x, residual: (N, C, *spatial) with 1 to 3 spatial dims; weight, bias: (C,); scale, shift: (N, C) or (N, C, 1, ...),
    given together or not at all; input_bias: (C,) or (N, C) in any float dtype (under autocast, the fp32 bias of the
    convolution that made a bf16 x; added in fp32; its gradient comes back in its dtype), not together with residual;
    sample_bias: (N, C) (the UNet's timestep embedding, bf16 under autocast) added to a (C,) input_bias in fp32, so
    that their sum is never formed in memory, nor its gradient reduced to the (C,) one in a kernel of its own.
    x in fp32, bf16 or fp16; y and h in x's dtype and layout.
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
    if input_bias is not None and residual is not None:
        raise ValueError("group_norm_act: input_bias and residual are not supported together")
    if pass_input and residual is not None:
        raise ValueError("group_norm_act: pass_input with a residual: h, returned with it, already passes its gradient")
    if input_bias is not None and input_bias.shape not in ((C,), (N, C)):
        raise ValueError(f"group_norm_act: input_bias must be (C,) = ({C},) or (N, C) = ({N}, {C}), got "
                         f"{tuple(input_bias.shape)}")
    if sample_bias is not None:
        if sample_bias.shape != (N, C):
            raise ValueError(f"group_norm_act: sample_bias must be (N, C) = ({N}, {C}), got {tuple(sample_bias.shape)}")
        if input_bias is None:  # on its own it is a per-sample input bias
            input_bias, sample_bias = sample_bias, None
        elif input_bias.ndim != 1:
            raise ValueError(f"group_norm_act: sample_bias is added to a (C,) input_bias, got input_bias "
                             f"{tuple(input_bias.shape)}")
    if weight is None:
        weight = torch.ones(C, device=x.device, dtype=torch.float32)
    if bias is None:
        bias = torch.zeros(C, device=x.device, dtype=torch.float32)
    scale = _per_sample_channels(scale, N, C, "scale")
    shift = _per_sample_channels(shift, N, C, "shift")
    if x.numel() == 0:
        y, h = group_norm_reference(x, weight, bias, num_groups, eps, act, scale, shift, residual, input_bias,
                                    sample_bias)
        return y, (x if pass_input else h if input_bias is None else None)
    input_bias, sample_bias = _dense_rows(input_bias), _dense_rows(sample_bias)
    out = _GroupNormActFunction.apply(x, residual, input_bias, sample_bias, weight.contiguous(), bias.contiguous(),
                                      scale, shift, num_groups, eps, act, tuning or GroupNormTuning(), pass_input)
    if residual is not None or pass_input:
        return out
    return out, (x if input_bias is None else None)
