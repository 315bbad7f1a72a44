"""Convolutions whose cheap input preparation is recomputed in backward instead of kept: conv(prepare(x)) saves x.

In a ResNet block autograd keeps, per GroupNorm+SiLU -> conv pair, the norm's input x, the norm's output (for SiLU's
backward) and the conv's input y = SiLU(GroupNorm(x)); before an upsampling conv it keeps the upsampled tensor, 2^dims
times the size of its input. `prepared_conv` keeps only x (and the parameters) and recomputes y in backward: one
memory-bound pass (a norm, an interpolation), not the convolution, whose weight and input gradients come from
`torch.ops.aten.convolution_backward` on the recomputed y. Gradients are those of the plain composition, under autocast
too: the recompute runs under the forward's autocast state and the convolution's backward in the dtype its forward used.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

from ldm.modules.nn_dims import KernelChoiceConv
from ldm.modules.normalization import GroupNormAct


class _PreparedConvFunction(torch.autograd.Function):
    """conv(prepare(x, *prepare_params)); inputs: x, conv weight, conv bias, prepare, conv, then prepare_params."""

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, prepare, conv, *prepare_params):
        out = conv(prepare(x, *prepare_params))
        ctx.prepare, ctx.conv = prepare, conv
        device = x.device.type
        ctx.autocast = ((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                        if torch.amp.is_autocast_available(device) else None)  # e.g. the meta device
        ctx.compute_dtype = out.dtype
        ctx.has_bias = conv_bias is not None
        ctx.save_for_backward(x, conv_weight, *prepare_params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, conv_weight, *prepare_params = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        needs_params = ctx.needs_input_grad[5:]
        autocast = (torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]) if ctx.autocast
                    else contextlib.nullcontext())
        with torch.enable_grad(), autocast:
            x_ = x.detach().requires_grad_(needs_x)
            params_ = [p.detach().requires_grad_(need) for p, need in zip(prepare_params, needs_params)]
            y = ctx.prepare(x_, *params_)
        conv, compute = ctx.conv, ctx.compute_dtype
        # a convolution whose bias gradient the Triton channel sum forms (nn_dims.KernelChoiceConv) gets it here too
        triton_bias = (ctx.has_bias and needs_b and isinstance(conv, KernelChoiceConv)
                       and conv.uses_triton(grad_out))
        grad_y, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(compute), y.detach().to(compute), conv_weight.to(compute),
            [conv_weight.shape[0]] if ctx.has_bias else None, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0] * len(conv.stride), conv.groups,
            [needs_x or any(needs_params), needs_w, ctx.has_bias and needs_b and not triton_bias])
        if triton_bias:
            from kernels.channel_sum import channel_sum  # imported on first use: CPU-only runs never load Triton
            grad_b = channel_sum(grad_out)
        wanted = [t for t, need in zip((x_, *params_), (needs_x, *needs_params)) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad_y.to(y.dtype)) if wanted else ())
        grad_x = next(grads) if needs_x else None
        grad_params = [next(grads) if need else None for need in needs_params]
        grad_w = grad_w.to(conv_weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(conv_weight.dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_b, None, None, *grad_params


def prepared_conv(prepare: Callable[..., torch.Tensor], conv: nn.Module, x: torch.Tensor,
                  prepare_params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """conv(prepare(x, *prepare_params)) keeping only x and prepare_params for backward. prepare: a cheap function
    that takes every tensor it needs gradients for as an argument (parameters, a timestep modulation); conv: an
    nn.Conv1d/2d/3d with numeric zero padding. x: (B, C, *spatial)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"prepared_conv: needs numeric zero padding, got padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    if not torch.is_grad_enabled():
        return conv(prepare(x, *prepare_params))
    return _PreparedConvFunction.apply(x, conv.weight, conv.bias, prepare, conv, *prepare_params)


def norm_act_conv(norm: GroupNormAct, conv: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None) -> torch.Tensor:
    """conv(norm(x, scale, shift)) keeping only x (and scale, shift): norm is a GroupNormAct. x: (B, C, *spatial)."""
    extra = () if scale is None else (scale, shift)
    return prepared_conv(norm.normalize, conv, x, (norm.weight, norm.bias, *extra))


def set_recompute_cheap(model: nn.Module, enabled: bool) -> nn.Module:
    """Sets `recompute_cheap` on every module of `model` whose class declares it (ResNet blocks, upsamplers, the
    autoencoder's Encoder / Decoder output heads); returns `model`."""
    for module in model.modules():
        if hasattr(type(module), "recompute_cheap"):
            module.recompute_cheap = enabled
    return model
