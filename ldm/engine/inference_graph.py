"""A no-grad function of CUDA tensors replayed from a CUDA graph: the sampler's denoiser (`sample.py --cuda_graph`).

A 3D UNet evaluation at sampling batch sizes launches hundreds of small kernels, and an eager sampling loop waits for
the host to launch them: 50 DDIM steps pay that 50 times. `GraphedInference(fn)` captures `fn` once per input
signature (shapes, strides, dtypes, device of every tensor argument, autocast state), after `warmup` eager calls on a
side stream (cuDNN's and Triton's autotuning and lazy set-up stay out of the graph), then each call copies its
inputs into the graph's static inputs, replays it and returns a copy of the output, so callers may keep outputs
across calls (multistep solvers do).

What `fn` must be (as for any CUDA graph): free of host synchronisation and of Python decisions on tensor values; its
other tensors (weights, a sampling batch's conditioning, captured in a closure) must stay alive and in place between
calls, and change only in place: the graph reads them at the addresses it was captured with (sample.py passes a
batch's conditioning as inputs, `ldm.sample_cli.GuidedDenoiser`, so one graph serves all its batches of a size).
Inputs on another device, or calls with autograd enabled, run `fn` eagerly.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


def _signature(args: tuple[torch.Tensor, ...]) -> tuple:
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in args) + (autocast,)


def static_inputs(args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Writable copies of the arguments for a graph's inputs: in the argument's layout where that is dense
    (channels-last stays so), else contiguous (the samplers' t is an expanded tensor, which cannot be written to)."""
    return [a.clone() for a in args]


class GraphedInference:
    """fn(*tensors) -> tensor, replayed from CUDA graphs; keeps the graphs of the last `max_graphs` signatures.

    `captures` and `replays` count what happened (for tests and notices)."""

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2, max_graphs: int = 2):
        if warmup < 1:
            raise ValueError(f"GraphedInference: warmup must be >= 1 (autotuning must not be captured), got {warmup}")
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = OrderedDict()
        self.captures = 0
        self.replays = 0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or not args or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
                or torch.cuda.is_current_stream_capturing()):
            return self.fn(*args)
        key = _signature(args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, inputs, output = self.graphs[key]
        for static, given in zip(inputs, args):
            static.copy_(given)
        graph.replay()
        self.replays += 1
        return output.clone()

    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        inputs = static_inputs(args)
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        # Autocast's cast cache must be off: a cast cached outside the capture would be read, not made, by the graph.
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            side = torch.cuda.Stream(args[0].device)
            side.wait_stream(torch.cuda.current_stream(args[0].device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*inputs)
            torch.cuda.current_stream(args[0].device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    output = self.fn(*inputs)
            except Exception as err:
                raise RuntimeError(f"cuda_graph: capturing the denoiser for inputs "
                                   f"{[tuple(a.shape) for a in args]} failed: {err}. Capture needs a network without "
                                   f"host synchronisation; sample without --cuda_graph to run eagerly") from err
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"GraphedInference: fn must return one tensor, got {type(output).__name__}")
        self.captures += 1
        return graph, inputs, output
