"""AdamW on fp32 master weights that also writes their half-precision copies, every tensor in one launch.

Under autocast a network's convolution and linear weights are used in bf16 only: a step casts each fp32 weight down
(6 bytes per parameter), casts its bf16 gradient back up (6 more) and fused AdamW then moves 28 (fp32 weight, gradient,
two moments read; weight and moments written). When the forward reads bf16 copies of the fp32 weights instead
(ldm/engine/weight_copies.py), autocast casts nothing and autograd leaves the gradients in bf16 on the copies; this step
reads the bf16 gradient, the fp32 master (the weight itself) and moments, and writes master, moments and the rounded
copy: 28 bytes per parameter and no casts. The copy is what autocast's cast of the master would give (round to
nearest), so training follows the same path.

`master_adamw_step` takes lists of tensors: weights (bf16 or fp16, written), their gradients (same dtype and strides),
and fp32 masters and moments (same strides); every tensor dense (its elements a contiguous run of memory, in any
order of axes, e.g. channels-last), so one elementwise pass over each run in memory order covers it. One launch reads
a table of the tensors' addresses and a table of blocks (tensor, first element). `master_adamw_reference` is the spec
(torch.optim.AdamW's update, decoupled weight decay, bias-corrected moments); CPU tensors outside Triton's
interpreter go through it. `MasterAdamWLaunch` sets how the work is cut: elements per pass (`block`), passes per program
over one tensor (`blocks_per_program`: one table lookup for all of them) and warps per program;
benchmarks/bench_master_adamw.py times the choices against torch's fused AdamW.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl



@dataclass(frozen=True)
class MasterAdamWLaunch:
    """How one step's elements are split among programs (see the module docstring)."""

    # defaults: the fastest of bench_master_adamw's launches on an H200 (the UNet's 166.4M parameters: 1.50 ms, against
    # 1.65 for 1024 elements on 4 warps and 2.06 for torch's fused AdamW)
    block: int = 2048            # elements per pass, a power of two
    blocks_per_program: int = 1  # consecutive passes over one tensor per program
    num_warps: int = 8

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1) or self.blocks_per_program < 1 or self.num_warps < 1:
            raise ValueError(f"MasterAdamWLaunch: block must be a power of two >= 16 and blocks_per_program, "
                             f"num_warps >= 1, got {self}")

    @property
    def span(self) -> int:
        """Elements per program."""
        return self.block * self.blocks_per_program


DEFAULT_LAUNCH = MasterAdamWLaunch()
BLOCK = DEFAULT_LAUNCH.block
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_WEIGHT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def master_adamw_reference(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                           masters: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                           exp_avg_sqs: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float, step: int) -> None:
    """One AdamW step (`step` counts from 1) on the masters, in place; each weight becomes its master rounded."""
    bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    for weight, grad, master, exp_avg, exp_avg_sq in zip(weights, grads, masters, exp_avgs, exp_avg_sqs):
        g = grad.float()
        master.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        weight.copy_(master)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE rounded to nearest, ties to even, as torch's cast (spelled out in bits for bf16: Triton's
    interpreter truncates that conversion)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _load(pointers, mask, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return tl.load(pointers, mask=mask, other=0.0)
    return tl.load(pointers)


@triton.jit
def _update(weight_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, decay_factor, beta1, beta2,
            eps, step_size, bias_correction2_sqrt, WEIGHT_DTYPE: tl.constexpr, HAS_MASK: tl.constexpr):
    g = _load(grad_ptr + offsets, mask, HAS_MASK).to(tl.float32)
    master = _load(master_ptr + offsets, mask, HAS_MASK) * decay_factor
    exp_avg = beta1 * _load(exp_avg_ptr + offsets, mask, HAS_MASK) + (1 - beta1) * g
    exp_avg_sq = beta2 * _load(exp_avg_sq_ptr + offsets, mask, HAS_MASK) + (1 - beta2) * g * g
    master = master - step_size * exp_avg / (tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
    tl.store(master_ptr + offsets, master, mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    tl.store(weight_ptr + offsets, _round_to(master, WEIGHT_DTYPE), mask=mask)


@triton.jit
def _master_adamw_kernel(table_ptr, program_tensor_ptr, program_start_ptr, decay_factor, beta1, beta2, eps, step_size,
                         bias_correction2_sqrt, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
                         WEIGHT_DTYPE: tl.constexpr):
    """Program p updates elements [start, start + BLOCKS_PER_PROGRAM * BLOCK) of tensor i = program_tensor[p], start =
    program_start[p] (fewer at the tensor's end), BLOCK at a time; the table's row i holds the addresses of weight,
    gradient, master, exp_avg, exp_avg_sq and the element count."""
    program = tl.program_id(0)
    row = table_ptr + tl.load(program_tensor_ptr + program) * 6
    # Addresses loaded from a table carry no alignment Triton can see: say they are 16-byte aligned (the launcher
    # checks), and that programs start at multiples of BLOCK; full blocks then run unmasked, so that loads and stores
    # move 16 bytes at a time (a mask against an arbitrary count would split them into single elements).
    weight_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(WEIGHT_DTYPE)), 16)
    grad_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(WEIGHT_DTYPE)), 16)
    master_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
    exp_avg_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.float32)), 16)
    exp_avg_sq_ptr = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.float32)), 16)
    count = tl.load(row + 5)
    start = tl.multiple_of(tl.load(program_start_ptr + program), BLOCK)
    for j in tl.static_range(BLOCKS_PER_PROGRAM):
        offsets = start + j * BLOCK + tl.arange(0, BLOCK)
        if start + (j + 1) * BLOCK <= count:
            _update(weight_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, None, decay_factor,
                    beta1, beta2, eps, step_size, bias_correction2_sqrt, WEIGHT_DTYPE, False)
        else:  # the tensor's last block, or past its end: an all-false mask moves nothing
            _update(weight_ptr, grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, offsets < count,
                    decay_factor, beta1, beta2, eps, step_size, bias_correction2_sqrt, WEIGHT_DTYPE, True)


def _check(weights, grads, masters, exp_avgs, exp_avg_sqs) -> None:
    lengths = {len(weights), len(grads), len(masters), len(exp_avgs), len(exp_avg_sqs)}
    if len(lengths) != 1:
        raise ValueError(f"master_adamw_step: lists of different lengths {sorted(lengths)}")
    for index, (w, g, m, a, s) in enumerate(zip(weights, grads, masters, exp_avgs, exp_avg_sqs)):
        if w.dtype not in _WEIGHT_DTYPES or g.dtype != w.dtype:
            raise ValueError(f"master_adamw_step: tensor {index}: weight and gradient must both be bf16 or fp16, "
                             f"got {w.dtype} and {g.dtype}")
        if any(t.dtype != torch.float32 for t in (m, a, s)):
            raise ValueError(f"master_adamw_step: tensor {index}: master and moments must be float32")
        if any(t.shape != w.shape or t.stride() != w.stride() or t.device != w.device for t in (g, m, a, s)):
            raise ValueError(f"master_adamw_step: tensor {index}: gradient, master and moments must have the "
                             f"weight's shape {tuple(w.shape)}, strides {w.stride()} and device")
        if not _dense(w):
            raise ValueError(f"master_adamw_step: tensor {index} is not dense (shape {tuple(w.shape)}, strides "
                             f"{w.stride()}): its elements must fill one run of memory")


def _dense(t: torch.Tensor) -> bool:
    """The elements fill one contiguous run of memory in some order of axes (channels-last included)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class LaunchTables:
    """The kernel's tables on the device: per program its tensor and first element (built once per list of sizes and
    launch) and per tensor its five addresses and size (rebuilt only when an address changes: gradients that a CUDA
    graph hands over keep theirs from step to step)."""

    def __init__(self, counts: Sequence[int], device: torch.device, launch: MasterAdamWLaunch = DEFAULT_LAUNCH):
        tensors, starts = [], []
        for index, count in enumerate(counts):
            programs = triton.cdiv(count, launch.span)
            tensors.append(torch.full((programs,), index, dtype=torch.int32))
            starts.append(torch.arange(programs, dtype=torch.int64) * launch.span)
        self.program_tensor = torch.cat(tensors).to(device)
        self.program_start = torch.cat(starts).to(device)
        self.counts = tuple(counts)
        self.device = device
        self.launch = launch
        self.rows: list[list[int]] | None = None
        self.table: torch.Tensor | None = None

    def addresses(self, rows: list[list[int]]) -> torch.Tensor:
        if rows != self.rows:
            self.rows, self.table = rows, torch.tensor(rows, dtype=torch.int64).to(self.device)
        return self.table


def master_adamw_step(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      masters: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                      exp_avg_sqs: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, step: int, tables: LaunchTables | None = None,
                      launch: MasterAdamWLaunch = DEFAULT_LAUNCH) -> LaunchTables | None:
    """One AdamW step (`step` counts from 1) for all tensors in one launch (see the module docstring); returns the
    launch tables to pass back next step (None where the reference ran). One weight dtype per call. The tensors are
    checked when their addresses change (every call where gradients are fresh allocations, once where a CUDA graph
    hands over the same buffers each step)."""
    rows = [[w.data_ptr(), g.data_ptr(), m.data_ptr(), a.data_ptr(), s.data_ptr(), w.numel()]
            for w, g, m, a, s in zip(weights, grads, masters, exp_avgs, exp_avg_sqs)]
    if tables is None or rows != tables.rows:
        _check(weights, grads, masters, exp_avgs, exp_avg_sqs)
    if not weights:
        return tables
    reference = not (weights[0].is_cuda or _INTERPRET) or any(address % 16 for row in rows for address in row[:5])
    if reference:  # CPU tensors outside the interpreter, or an address the kernel's 16-byte accesses cannot take
        master_adamw_reference(weights, grads, masters, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2,
                               eps=eps, weight_decay=weight_decay, step=step)
        return None
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1:
        raise ValueError(f"master_adamw_step: one weight dtype per call, got {sorted(map(str, dtypes))}")
    device = weights[0].device
    counts = tuple(row[5] for row in rows)
    if tables is None or tables.counts != counts or tables.device != device or tables.launch != launch:
        tables = LaunchTables(counts, device, launch)
    grid = (tables.program_tensor.numel(),)
    _master_adamw_kernel[grid](tables.addresses(rows), tables.program_tensor, tables.program_start,
                               1 - lr * weight_decay, beta1, beta2, eps, lr / (1 - beta1 ** step),
                               (1 - beta2 ** step) ** 0.5, BLOCK=launch.block,
                               BLOCKS_PER_PROGRAM=launch.blocks_per_program,
                               WEIGHT_DTYPE=_WEIGHT_DTYPES[dtypes.pop()], num_warps=launch.num_warps)
    return tables
