"""Small host-side helpers the kernels share (PyTorch only: importing this module does not load Triton, so the
models can use it on CPU-only machines too)."""
from __future__ import annotations

import functools
import os

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_channels_last(x: torch.Tensor) -> bool:
    """x: (N, C, *spatial) stored with channels innermost, and not also plain contiguous."""
    return x.ndim >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def dense(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t made dense, with channels innermost (channels-last, any rank) or plain contiguous; no copy where it already
    is (e.g. a channel slice of a wider channels-last tensor is copied, a channels-last tensor is not)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()


def empty_channels_last(shape: tuple[int, ...] | torch.Size, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (N, C, *spatial) tensor stored channels-last (any rank), on like's device in like's dtype."""
    n, c, *spatial = shape
    return torch.empty(n, *spatial, c, device=like.device, dtype=like.dtype).movedim(-1, 1)


def row_blocks(rows: int, channels: int, tile: int, max_block_c: int = 256) -> tuple[int, int]:
    """(block_m, block_c) of a register tile of at most `tile` elements over (rows, channels) rows: channels padded
    to a power of two (at most max_block_c), as many rows as fit (a power of two, no more than the rows there are)."""
    block_c = min(_next_power_of_2(channels), max_block_c)
    return max(1, min(tile // block_c, _next_power_of_2(rows))), block_c


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision: IEEE fp32 products for fp32 inputs (exact to rounding, slow); half inputs run on
    the tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors; 1 off CUDA and in Triton's interpreter, which runs programs one after
    another (so no two programs are ever resident together)."""
    if _INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
