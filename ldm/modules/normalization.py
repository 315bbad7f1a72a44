"""GroupNorm with an optional fused SiLU: the one place every model takes its normalisation from."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GroupNormAct(nn.GroupNorm):
    """GroupNorm over `num_groups` groups, followed by SiLU when `act` is True.

    x: (B, C, *spatial) -> same shape and dtype. Statistics are computed in fp32 by PyTorch's kernel.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-6, act: bool = True):
        if num_channels % num_groups:
            raise ValueError(f"GroupNormAct: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.silu(y) if self.act else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"
