"""Whether this CPU's bf16 3D convolutions give sound weight gradients, and a warning where they do not.

With torch 2.14 on an AMD EPYC, oneDNN's bf16 conv3d returned garbage in the weight gradient (entries up to 1e35)
for 2 x 2 x 2 inputs with 32 or more channels and a 3 x 3 x 3 kernel (padding 1), in 3 of 3 seeded trials at every
such width tried, and never at 1^3, 3^3, 4^3 or 8^3 nor below 32 channels: the deepest level of a small 3D UNet on
a CPU. A bf16-mixed CPU run of such a model trains on those gradients without any error. `warn_if_unsound`, called
by the trainer for CPU runs in reduced precision (Fabric runs 16-mixed as bf16 on CPUs) of models with 3D
convolutions, compares that case with float64 once per process and says so when it is wrong.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F


@functools.lru_cache(maxsize=1)
def conv3d_weight_gradients_sound(channels: int = 32, seeds: int = 3) -> bool:
    """Whether bf16 autocast's conv3d weight gradient on this CPU stays within 10% of the largest float64 gradient
    entry at the shape above (a 1 x `channels` x 2^3 input), over `seeds` random cases."""
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1, channels, 2, 2, 2, generator=generator)
        weight = torch.randn(channels, channels, 3, 3, 3, generator=generator) * 1e-2
        exact = weight.double().requires_grad_()
        F.conv3d(x.double(), exact, padding=1).square().mean().backward()
        reduced = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.conv3d(x, reduced, padding=1)
        y.float().square().mean().backward()
        error = (reduced.grad.double() - exact.grad).abs().max()
        if not torch.isfinite(error) or error > 0.1 * exact.grad.abs().max():
            return False
    return True


def warn_if_unsound(model: nn.Module) -> str | None:
    """The warning for a CPU run of `model` in bf16 where this CPU's bf16 conv3d gradients are wrong; None when the
    model has no 3D convolution or they are sound."""
    if not any(isinstance(m, nn.Conv3d) for m in model.modules()) or conv3d_weight_gradients_sound():
        return None
    return ("warning: this CPU's bf16 3D convolutions give wrong weight gradients for 2x2x2 inputs with 32 or more "
            "channels (a oneDNN bug; ldm/engine/cpu_bf16.py); a layer of that size trains on garbage. Train with "
            "trainer.precision=32 on this CPU.")
