"""`trainer.cuda_graph`: a network's training forward and backward replayed as CUDA graphs.

A 3D UNet step at small batch is bound by the host, not the GPU: hundreds of kernel launches, each behind Python,
autograd and dispatch (benchmarks/bench_models.py measured 152 ms of wall time for 51 ms of GPU work). Captured once
as CUDA graphs (ldm/engine/graph_capture.py), the forward and the backward each become one launch; the loss, the
optimizer and everything the loop does around them stay eager.

`graph_training_forward(module)` replaces `module.forward` (on the instance: parameters, state_dict and checkpoints are
untouched). The first call in training mode with autograd on and CUDA inputs captures the graphs for that call's
input signature (shapes, dtypes, which arguments are tensors, autocast state); later calls with the same signature
replay them. Anything else runs eagerly: eval mode, no grad, CPU inputs, and other signatures (the last, smaller batch
of an epoch, announced once).

What capture needs, and the loop guarantees: the network runs once per backward (its activations live in the graph's
memory and the next replay overwrites them); one backward per optimizer step (the backward replay hands its gradient
buffers over as `.grad`, and the next replay overwrites them: gradient accumulation would lose a micro-batch); parameters are updated in place (optimizers and EMA copies do that); no host synchronisation inside the
network's forward.

Under autocast, the capture first finds the weights that autocast casts (one probe call) and the graphs then cast them
once per call in one pass each way instead of one copy kernel per weight and direction (ldm/engine/weight_cast.py;
bit for bit the same result). `cast_weights_once=False` keeps autocast's own casts. With `weight_copies` (a function
from ldm/engine/weight_copies.py: parameters, dtype -> their working copies, None for those without) the weights that
have copies are not cast at all: the training calls, graphed or eager, read the copies, whose gradients the optimizer
step takes (trainer.bf16_weight_copies).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ldm.engine.graph_capture import CapturedTraining
from ldm.engine.weight_cast import call_with_weights_cast, parameters_cast_by_autocast, parameters_replaced

WeightCopyProvider = Callable[[list, torch.dtype], list]


class _PositionalCall(nn.Module):
    """Calls `forward` of `target` with tensors given positionally, rebuilding (args, kwargs) around them.

    The capture calls a function of tensors only; the graphed parameters are `target`'s.
    `cast` ((names, dtype), set after a probe call) makes the call cast those parameters of target's up front;
    `copies` (name -> working copy) puts those tensors in the parameters' place for the call.
    """

    def __init__(self, target: nn.Module, eager_forward: Callable, spec: pytree.TreeSpec, leaves: list,
                 tensor_slots: list[int]):
        super().__init__()
        self.target = target
        self._eager_forward = eager_forward
        self._spec = spec
        self._leaves = leaves
        self._slots = tensor_slots
        self.cast: tuple[list[str], torch.dtype] = ([], torch.float32)
        self.copies: dict[str, torch.Tensor] = {}

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self._leaves)
        for slot, tensor in zip(self._slots, tensors):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        names, dtype = self.cast
        with parameters_replaced(self.target, self.copies):
            return call_with_weights_cast(self.target, names, dtype, self._eager_forward, *args, **kwargs)

    def grad_sources(self) -> list[torch.Tensor]:
        """target's parameters, each replaced by its working copy where it has one."""
        return [self.copies.get(name, p) for name, p in self.target.named_parameters()]


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class GraphedTrainingForward:
    """The replacement forward installed by `graph_training_forward`; see the module docstring.

    captures: how many graphs were captured (0 or 1); eager_calls / graph_calls: counts, for tests and logs;
    weights_cast: the parameters the graphs cast once per call (ldm/engine/weight_cast.py); weights_copied: those
    read through working copies (ldm/engine/weight_copies.py).
    """

    def __init__(self, module: nn.Module, name: str, warmup_iters: int = 3, cast_weights_once: bool = True,
                 weight_copies: WeightCopyProvider | None = None):
        self.module = module
        self.name = name
        self.cast_weights_once = cast_weights_once
        self.weight_copies = weight_copies
        self.copies: dict[str, torch.Tensor] = {}
        self.copies_state: tuple[bool, torch.dtype] | None = None  # the autocast state the copies are for
        self.warmup_iters = warmup_iters
        self.eager_forward = type(module).forward.__get__(module)
        self.signature: tuple | None = None
        self.graphed: Callable | None = None
        self.captures = 0
        self.weights_cast: list[str] = []
        self.weights_copied: list[str] = []
        self.eager_calls = 0
        self.graph_calls = 0
        self._announced: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        tensors = [leaves[i] for i in slots]
        if not self._graphable(tensors):
            return self._eager(args, kwargs)
        signature = (spec, tuple(None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves),
                     tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors), _autocast_state())
        if self.graphed is None:
            self._capture(signature, spec, leaves, slots, tensors)
        elif signature != self.signature:
            self._announce_once(f"cuda_graph: {self.name} called with inputs {_describe(signature)}, captured for "
                                f"{_describe(self.signature)}: running these eagerly (e.g. an epoch's last, smaller "
                                f"batch)")
            return self._eager(args, kwargs)
        self.graph_calls += 1
        return self.graphed(*tensors)

    def _graphable(self, tensors: list[torch.Tensor]) -> bool:
        return (self.module.training and torch.is_grad_enabled() and bool(tensors)
                and all(t.is_cuda for t in tensors) and not torch.cuda.is_current_stream_capturing())

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        """An uncaptured call; a training call under the copies' autocast reads the working copies, so that its
        gradients reach the optimizer as the graphs' do (the fp32 parameters are no longer in its param_groups)."""
        self.eager_calls += 1
        training = self.module.training and torch.is_grad_enabled() and _autocast_state() == self.copies_state
        with parameters_replaced(self.module, self.copies if training else {}):
            return self.eager_forward(*args, **kwargs)

    def _capture(self, signature: tuple, spec: pytree.TreeSpec, leaves: list, slots: list[int],
                 tensors: list[torch.Tensor]) -> None:
        """Warm up and capture forward and backward for these inputs (copies of them are the graphs' static inputs)."""
        positional = _PositionalCall(self.module, self.eager_forward, spec,
                                     [None if i in slots else leaf for i, leaf in enumerate(leaves)], slots)
        enabled, dtype = _autocast_state()
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        try:
            # Autocast's weight-cast cache must be off while capturing (a cached cast would outlive the graph).
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                if enabled and (self.cast_weights_once or self.weight_copies is not None):
                    names = parameters_cast_by_autocast(self.module, positional(*samples), dtype)
                    positional.copies = self._copies(names, dtype)
                    names = [n for n in names if n not in positional.copies]
                    positional.cast = (names if self.cast_weights_once else [], dtype)
                self.graphed = CapturedTraining(positional, samples, positional.grad_sources(),
                                                warmup_iters=self.warmup_iters)
        except Exception as err:
            raise RuntimeError(f"cuda_graph: capturing {self.name} ({type(self.module).__name__}) for inputs "
                               f"{_describe(signature)} failed: {err}. Capture needs a forward without host "
                               f"synchronisation (.item(), data-dependent Python branches, CPU tensors); turn "
                               f"trainer.cuda_graph off to run eagerly") from err
        torch.cuda.empty_cache()  # the warm-up's activations: the graph keeps its own memory pool
        self.signature = signature
        self.captures += 1
        self.weights_cast = positional.cast[0]
        self.weights_copied = list(positional.copies)
        kind = str(dtype).replace('torch.', '')
        cast = (f"; {len(self.weights_cast)} weights cast to {kind} once per call" if self.weights_cast else "")
        if self.weights_copied:
            cast += f"; {len(self.weights_copied)} weights read from {kind} copies the optimizer writes"
        tqdm.write(f"cuda_graph: captured {self.name} forward + backward for inputs {_describe(signature)}{cast}")

    def _copies(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Working copies of the named parameters from `weight_copies` (those it has none for are left out)."""
        if self.weight_copies is None or not names:
            return {}
        parameters = dict(self.module.named_parameters())
        found = self.weight_copies([parameters[n] for n in names], dtype)
        self.copies = {name: copy for name, copy in zip(names, found) if copy is not None}
        self.copies_state = (True, dtype)
        return self.copies

    def _announce_once(self, message: str) -> None:
        if message not in self._announced:
            self._announced.add(message)
            tqdm.write(message)


def _describe(signature: tuple) -> str:
    shapes = ", ".join(f"{tuple(shape)} {str(dtype).replace('torch.', '')}" for shape, dtype, _, _ in signature[2])
    enabled, dtype = signature[3]
    return f"[{shapes}]" + (f" under {str(dtype).replace('torch.', '')} autocast" if enabled else "")


def graph_training_forward(module: nn.Module, name: str = "network", cast_weights_once: bool = True,
                           weight_copies: WeightCopyProvider | None = None) -> GraphedTrainingForward:
    """Install a `GraphedTrainingForward` as `module.forward`; returns it. Installing twice is an error."""
    if isinstance(module.__dict__.get("forward"), GraphedTrainingForward):
        raise RuntimeError(f"cuda_graph: {name} is already graphed")
    graphed = GraphedTrainingForward(module, name, cast_weights_once=cast_weights_once, weight_copies=weight_copies)
    module.forward = graphed
    return graphed
