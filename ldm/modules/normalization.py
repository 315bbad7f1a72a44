"""GroupNorm with optional fused input bias, scale-shift and SiLU: the one place every model takes its
normalisation from.

`kernels` chooses the implementation: `torch` (PyTorch's GroupNorm and elementwise ops), `triton` (the fused kernels
in kernels/group_norm.py: one read of x and one write of y, statistics in fp32, x's dtype and memory layout kept) or
`auto` (Triton for CUDA tensors, PyTorch otherwise). Models take a `kernels` argument and apply it to all their norms
with `set_kernels`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.nn_dims import KernelChoice

KERNEL_CHOICES = ("auto", "triton", "torch")


def _check_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    return kernels


class GroupNormAct(KernelChoice, nn.GroupNorm):
    """Optionally `+ input_bias` per (sample,) channel, then GroupNorm over `num_groups` groups, then optionally
    `* (1 + scale) + shift` per sample and channel, then SiLU when `act` is True.

    x: (B, C, *spatial) -> same shape; scale, shift: (B, C) or (B, C, 1, ...), given together or not at all;
    input_bias: (C,) or (B, C), e.g. the bias of a convolution run without it; sample_bias: (B, C), added to a (C,)
    input_bias, e.g. a per-sample embedding (the Triton kernels add both while reading x, instead of separate passes,
    and reduce their gradients from sums they form anyway).
    Statistics are computed in fp32 either way. With `kernels: torch` under autocast the output is fp32 (PyTorch's
    autocast policy for group_norm); the Triton kernels return x's dtype.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-6, act: bool = True,
                 kernels: str = "auto"):
        if num_channels % num_groups:
            raise ValueError(f"GroupNormAct: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = act
        self.kernels = _check_kernels(kernels)
        self.tuning = None  # the Triton kernels' launch choices (kernels.group_norm.GroupNormTuning; None: defaults)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                input_bias: torch.Tensor | None = None, sample_bias: torch.Tensor | None = None,
                pass_input: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """y; with `pass_input`, (y, x) for a block that uses x again (its residual shortcut takes the second): with
        the Triton kernels that x is an output of the norm, so the gradient of its other uses comes into the norm's
        backward kernel, which adds it to x's own, instead of autograd adding the two in a pass over x of its own."""
        return self.normalize(x, self.weight, self.bias, scale, shift, input_bias, sample_bias, pass_input)

    def normalize(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None, input_bias: torch.Tensor | None = None,
                  sample_bias: torch.Tensor | None = None,
                  pass_input: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`forward` with the affine parameters given (for recomputation from saved tensors): weight, bias (C,).

        The torch path adds input_bias in the promoted dtype: under autocast (bf16 x, fp32 convolution bias) the sum
        stays fp32, unrounded, as in the Triton kernels (autocast's group_norm computes in fp32 anyway)."""
        if (scale is None) != (shift is None):
            raise ValueError("GroupNormAct: give scale and shift together")
        if self.uses_triton(x):
            from kernels.group_norm import group_norm_act  # imported on first use: CPU-only runs never load Triton
            y, passed = group_norm_act(x, weight, bias, self.num_groups, self.eps, self.act, scale, shift,
                                       input_bias=input_bias, sample_bias=sample_bias, tuning=self.tuning,
                                       pass_input=pass_input)
            return (y, passed) if pass_input else y
        h = x
        if sample_bias is not None:
            input_bias = sample_bias if input_bias is None else input_bias + sample_bias
        if input_bias is not None:
            h = h + input_bias.reshape(-1, x.shape[1], *(1,) * (x.ndim - 2))
        y = F.group_norm(h, self.num_groups, weight, bias, self.eps)
        if scale is not None:
            spatial = (1,) * (x.ndim - 2)
            y = y * (1 + scale.reshape(*scale.shape[:2], *spatial)) + shift.reshape(*shift.shape[:2], *spatial)
        y = F.silu(y) if self.act else y
        return (y, x) if pass_input else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}, kernels={self.kernels}"


def set_kernels(model: nn.Module, kernels: str) -> nn.Module:
    """Sets the implementation (`auto`, `triton`, `torch`) of every layer in `model` with Triton kernels as an option
    (`ldm.modules.nn_dims.KernelChoice`: GroupNormAct, the convolutions' bias gradient, nearest upsampling); returns
    `model`."""
    _check_kernels(kernels)
    for module in model.modules():
        if isinstance(module, KernelChoice):
            module.kernels = kernels
    return model


def set_group_norm_tuning(model: nn.Module, tuning) -> nn.Module:
    """Sets the Triton kernels' launch choices (a `kernels.group_norm.GroupNormTuning`, or None for the defaults) of
    every GroupNormAct in `model`; returns `model`. For benchmarks that time a launch choice inside a network."""
    for module in model.modules():
        if isinstance(module, GroupNormAct):
            module.tuning = tuning
    return model
