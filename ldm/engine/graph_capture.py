"""A network's training forward and backward captured as two CUDA graphs and replayed under autograd, the parameters'
gradients handed over by the backward replay instead of flowing through autograd.

`torch.cuda.make_graphed_callables` captures the same two graphs, but makes every parameter an input of its autograd
function: ~860 for the 166M UNet. Entering that function took ~1 ms of host time per call while the GPU waited for
the forward graph (a traced netgraph step read by benchmarks/trace_summary.py, H200). Here the function's inputs are
the call's tensors and one empty tensor that requires grad (so the outputs do, as the parameters would make them);
its backward replays the backward graph, then gives each parameter its gradient buffer as `.grad` (or adds it to a
`.grad` already there) on the host, while the GPU runs the backward graph.

What the caller guarantees (ldm/engine/cuda_graph.py documents it for the training loop): one forward per backward,
since outputs and gradient buffers live in the graphs' memory and the next replay overwrites them; the parameters are
updated in place; no host synchronisation in the forward. Gradients handed over as `.grad` are the graph's buffers:
`zero_grad()` (set to None) before the next backward, as the loop does. Since autograd never sees the parameters,
their gradient hooks (`register_hook`, `register_post_accumulate_grad_hook`, DDP's reducer) do not run: single-process
training, as `trainer.cuda_graph` requires.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.utils import _pytree as pytree


def hand_over_gradients(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Each parameter's gradient from the backward graph: `.grad` becomes the buffer itself when it is None (no copy,
    as autograd does with a fresh gradient), is left alone when it already is that buffer (zeroed in place since and
    now rewritten by the replay), and is added to otherwise. None (a parameter the output does not depend on): nothing."""
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        current = param.grad
        if current is None:
            param.grad = grad
        elif current.data_ptr() != grad.data_ptr():
            current.add_(grad)


def _in_layout_of(source: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
    """`grad` with `source`'s strides (a copy in the graph when they differ, e.g. a channels-last weight's gradient
    that the backward produced contiguous): optimizers such as fused AdamW need gradients laid out as their
    parameters, which autograd's own accumulation would have ensured."""
    if grad is None or grad.stride() == source.stride():
        return grad
    return torch.empty_like(source).copy_(grad)


class _Replay(torch.autograd.Function):
    """(graphs, anchor, *inputs) -> the forward graph's outputs; backward replays the backward graph."""

    @staticmethod
    def forward(ctx, graphs: "CapturedTraining", anchor: torch.Tensor, *inputs: torch.Tensor):
        ctx.graphs = graphs
        outputs = graphs.replay_forward(inputs)
        ctx.mark_non_differentiable(*(o for o, d in zip(outputs, graphs.differentiable) if not d))
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        return (None, None, *ctx.graphs.replay_backward(grad_outputs))


class CapturedTraining:
    """`fn`'s forward and backward for the static inputs `samples`, as CUDA graphs; call it like `fn` with tensors of
    the samples' shapes, dtypes and devices. See the module docstring."""

    def __init__(self, fn: Callable[..., Any], samples: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                 warmup_iters: int = 3):
        self.samples = list(samples)
        self.params = [p for p in params if p.requires_grad]
        grad_sources = [s for s in self.samples if s.requires_grad] + self.params
        self._warm_up(fn, grad_sources, warmup_iters)

        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph):
            outputs, self.out_spec = pytree.tree_flatten(fn(*self.samples))
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise TypeError(f"CUDA-graph capture: the network must return tensors only, got "
                            f"{[type(o).__name__ for o in outputs]}")
        self.outputs = outputs
        self.differentiable = [o.requires_grad for o in outputs]
        differentiable = [o for o in outputs if o.requires_grad]
        self.grad_outputs = [torch.empty_like(o) for o in differentiable]
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool()):
            grads = torch.autograd.grad(differentiable, grad_sources, grad_outputs=self.grad_outputs,
                                        allow_unused=True) if differentiable else [None] * len(grad_sources)
            grads = [_in_layout_of(source, grad) for source, grad in zip(grad_sources, grads)]
        self.input_grads = [grads.pop(0) if s.requires_grad else None for s in self.samples]
        self.param_grads = grads
        self.anchor = torch.empty(0, device=self.samples[0].device, requires_grad=bool(grad_sources))

    def _warm_up(self, fn: Callable[..., Any], grad_sources: list[torch.Tensor], iters: int) -> None:
        """A few eager forward + backward calls on a side stream, so that cuDNN's and Triton's autotuning and lazy
        initialisation happen here and not in the capture; their gradients are discarded."""
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(iters):
                outputs = [o for o in pytree.tree_leaves(fn(*self.samples))
                           if isinstance(o, torch.Tensor) and o.requires_grad]
                if outputs:
                    torch.autograd.grad(outputs, grad_sources, grad_outputs=[torch.zeros_like(o) for o in outputs],
                                        allow_unused=True)
                del outputs
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def replay_forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for static, given in zip(self.samples, inputs):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        self.forward_graph.replay()
        return tuple(o.detach() for o in self.outputs)

    def replay_backward(self, grad_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        given = [g for g, d in zip(grad_outputs, self.differentiable) if d]
        for static, grad in zip(self.grad_outputs, given):
            if static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        self.backward_graph.replay()
        hand_over_gradients(self.params, self.param_grads)
        return [None if g is None else g.detach() for g in self.input_grads]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return pytree.tree_unflatten(list(_Replay.apply(self, self.anchor, *inputs)), self.out_spec)
