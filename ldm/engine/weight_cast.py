"""Autocast's weight casts done once per call, one pass each way (for CUDA-graphed training, ldm/engine/cuda_graph.py).

Under autocast every convolution and linear layer casts its fp32 weight (and bias) to the compute dtype in forward, a
copy kernel per tensor, and in backward casts that tensor's gradient back to fp32, another (the backward ones in
PyTorch's unvectorised copy kernel). In the 166M UNet's graphed step on an H200 (benchmarks/bench_models.py
--weight-casts both, profiled) doing them here took the step's copies from 1.82 ms to 1.29 ms of GPU time and from 374
to 108 kernels. `call_with_weights_cast` makes the same casts with one `torch._foreach_copy_` each way and
hands the module the cast tensors in place of its parameters for the call, so autocast finds them already in its
dtype and launches nothing. The result is the same bit for bit: the same round-to-nearest cast forward, the same exact
upcast of each gradient backward.

Which parameters (`parameters_cast_by_autocast`): read off the autograd graph of one call's output, those whose only
use is a single cast to the autocast dtype, and those whose only use is a concatenation of parameters whose only use
is in turn a single cast (self-attention's q, k and v weights, the joined timestep projections: casting each part
before `torch.cat` gives the same tensor as casting the whole after it, and the same upcast gradients, without the
cast kernel per layer and direction). A parameter used anywhere as it is (GroupNorm's affine weights, a bias
that a Triton kernel adds in fp32, the thin convolutions' fp32 weights) or cast more than once (a shared weight, whose
gradients autocast sums in fp32) keeps autocast's own handling. A read that autograd does not see (a parameter
detached and handed to a kernel beside a cast of it) would see the cast tensor instead: no layer here does that.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

_CAST_NODE = "ToCopyBackward0"
_CONCAT_NODE = "CatBackward0"


def parameters_cast_by_autocast(module: nn.Module, output: Any, dtype: torch.dtype) -> list[str]:
    """Names of `module`'s parameters that reach `output` (a call's result: tensors in any nesting) only through one
    cast to `dtype`, directly or as parts of one concatenation of such parameters that is cast, in
    `named_parameters()` order. Empty when this PyTorch has no autograd node metadata to read the cast's dtype from
    (`Node._input_metadata`): then nothing is cast early."""
    owners = {id(p): name for name, p in module.named_parameters() if p.requires_grad and p.dtype != dtype}
    consumers: dict[str, list] = {name: [] for name in owners.values()}
    users: dict[Any, list] = {}  # autograd node -> the nodes that take its output
    stack = [t.grad_fn for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is None:
                continue
            name = owners.get(id(getattr(parent, "variable", None)))
            if name is not None:
                consumers[name].append(node)
            else:
                users.setdefault(parent, []).append(node)
                stack.append(parent)

    def only_input_of_one_cast(name: str) -> bool:
        if len(consumers[name]) != 1:
            return False
        node = consumers[name][0]
        if _is_cast_to(node, dtype):
            return True
        if type(node).__name__ != _CONCAT_NODE or len(users.get(node, [])) != 1 or not _is_cast_to(users[node][0],
                                                                                                    dtype):
            return False
        parts = [owners.get(id(getattr(parent, "variable", None))) for parent, _ in node.next_functions]
        return all(part is not None and consumers[part] == [node] for part in parts)

    return [name for name in consumers if only_input_of_one_cast(name)]


def _is_cast_to(node: Any, dtype: torch.dtype) -> bool:
    if type(node).__name__ != _CAST_NODE:
        return False
    metadata = getattr(node, "_input_metadata", None)  # the cast's output, which this node takes the gradient of
    return bool(metadata) and len(metadata) == 1 and metadata[0].dtype == dtype


class _CastOnce(torch.autograd.Function):
    """params (any dtypes) -> their casts to `dtype`, one multi-tensor copy; backward: the gradients cast back to each
    parameter's dtype, one multi-tensor copy. Layouts (channels-last weights) are kept."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dtypes = [p.dtype for p in params]
        cast = [torch.empty_like(p, dtype=dtype) for p in params]
        torch._foreach_copy_(cast, list(params))
        return tuple(cast)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        upcast = [torch.empty_like(g, dtype=d) for g, d in zip(grads, ctx.dtypes)]
        torch._foreach_copy_(upcast, list(grads))
        return (None, *upcast)


@contextmanager
def parameters_replaced(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, `module`'s parameter `name` (dotted, as in named_parameters) reads as `tensors[name]`;
    the parameters are put back on exit, also after an exception."""
    slots = []
    try:
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            slots.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = tensor
        yield
    finally:
        for owner, leaf, parameter in reversed(slots):
            owner._parameters[leaf] = parameter


def call_with_weights_cast(module: nn.Module, names: Sequence[str], dtype: torch.dtype, fn: Callable,
                           *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) (a call of `module`'s forward) with `module`'s parameters `names` cast to `dtype` up front,
    in one pass, and their gradients cast back in one pass (see the module docstring)."""
    if not names:
        return fn(*args, **kwargs)
    parameters = dict(module.named_parameters())
    cast = _CastOnce.apply(dtype, *(parameters[name] for name in names))
    with parameters_replaced(module, dict(zip(names, cast))):
        return fn(*args, **kwargs)
