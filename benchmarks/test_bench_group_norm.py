"""pytest-benchmark entries for the GroupNorm kernels (GPU only; not collected by the CPU suite, whose testpaths is tests/).

    python -m pytest benchmarks/test_bench_group_norm.py --benchmark-columns=median,iqr,rounds

The same cases as benchmarks/bench_group_norm.py (bf16, 32 groups, SiLU; ours and eager PyTorch, forward and
forward+backward, contiguous and channels-last), timed by pytest-benchmark with a synchronize per call: host launch
cost included, L2 not cleared. bench_group_norm.py is the reference for GPU time and bandwidth.
"""
import pytest
import torch
from torch.nn import functional as F

from kernels.group_norm import group_norm_act

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")

SHAPES = [(1, 64, 128, 128, 128), (2, 128, 64, 64, 64), (8, 256, 16, 16, 16), (8, 320, 64, 64)]
GROUPS = 32


def ours(x, w, b):
    return group_norm_act(x, w, b, GROUPS, 1e-6, act=True)[0]


def eager(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype), 1e-6))


@pytest.mark.parametrize("direction", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", [ours, eager], ids=["ours", "eager"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, shape, layout, impl, direction):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    w = torch.ones(shape[1], device="cuda", requires_grad=True)
    b = torch.zeros(shape[1], device="cuda", requires_grad=True)
    x.requires_grad_(direction == "forward_backward")
    dy = torch.randn_like(x)

    def step():
        if direction == "forward":
            with torch.no_grad():
                impl(x, w, b)
        else:
            torch.autograd.grad(impl(x, w, b), (x, w, b), dy)
        torch.cuda.synchronize()
    step()
    benchmark(step)
