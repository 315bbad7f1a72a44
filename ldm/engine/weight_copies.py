"""bf16 working copies of fp32 weights, written by the optimizer step: a training step without weight casts.

Under bf16 autocast every step casts each convolution and linear weight down (4 bytes read, 2 written per parameter),
casts its bf16 gradient back up (2 read, 4 written), and fused AdamW then reads that fp32 gradient. With
`WeightCopies(optimizer)` the network's training forward reads a bf16 copy of each such weight instead
(ldm/engine/cuda_graph.py puts the copies in the parameters' place for the call): autocast has nothing to cast,
autograd leaves each gradient in bf16 on its copy, and the optimizer step updates the fp32 parameter from it and writes
the result, rounded, into the copy, for all copies in one launch (kernels/master_adamw.py: fp32 parameter and moments
read and written, bf16 gradient read and copy written, 28 bytes per parameter as in fused AdamW's own update). Per
step that is 12 bytes per parameter and two passes over the weights fewer, and bf16 instead of fp32 gradient buffers.

The fp32 parameters stay the model's weights (the "masters"): state_dict, checkpoints, EMA, exports and evaluation see
exactly what they saw before. Each copy is its parameter cast to bf16 (round to nearest even), the tensor autocast's
cast would have made, so training follows the same path; torch's AdamW and this update differ only in the order of
fp32 operations.

In the optimizer each copy takes its parameter's place: `param_groups` hold the copies, whose `.grad` the training
loop clips, logs and zeroes as any gradient; the state is keyed by them in torch AdamW's own format (`step`,
`exp_avg`, `exp_avg_sq`; the moments fp32 in the parameter's strides), so a checkpoint written with copies resumes
without them and the other way round. The other parameters (norms' affine weights, biases a kernel adds in fp32) go
through the optimizer's own step, fused AdamW where configured.

Supported: torch.optim.AdamW, or Adam with no weight decay (their update is then the same); not amsgrad, maximize or
differentiable. A parameter must change only through the optimizer step while it has a copy: a copy is written by the
step and nothing else (loading a checkpoint before the copies are made, as the training loop does, is fine).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from kernels.master_adamw import LaunchTables, master_adamw_step

COPY_DTYPES = (torch.bfloat16, torch.float16)


def unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why `optimizer`'s update cannot be done on working copies, or None when it can."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
        return f"{name} is not AdamW or Adam"
    for index, group in enumerate(optimizer.param_groups):
        for flag in ("amsgrad", "maximize", "differentiable"):
            if group.get(flag):
                return f"{name} param group {index} has {flag}=True"
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        if not decoupled and group["weight_decay"] != 0:
            return f"{name} param group {index} has L2 weight decay {group['weight_decay']} (AdamW's is supported)"
    return None


class WeightCopies:
    """Working copies of some of an Adam(W) optimizer's fp32 parameters; see the module docstring.

    Wraps `optimizer.step` (an attribute of this optimizer object: `step()` hides the copies from the optimizer's own
    update, then updates them here) and hooks its `load_state_dict` (moments stay fp32 for a bf16 copy)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        problem = unsupported(optimizer)
        if problem is not None:
            raise ValueError(f"WeightCopies: {problem}")
        self.optimizer = optimizer
        self.master_of: dict[torch.Tensor, torch.Tensor] = {}  # copy -> its fp32 parameter (tensors hash by identity)
        self.copy_of: dict[torch.Tensor, torch.Tensor] = {}
        self._tables: dict[tuple, LaunchTables | None] = {}
        self._loading: dict | None = None
        self._own_step = optimizer.step
        optimizer.step = self.step
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(self._after_load)

    def attach(self, params: Sequence[torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        """The working copy of each of `params` (fp32 parameters of this optimizer), made on first request: a leaf
        tensor of `dtype` with the parameter's strides and requires_grad, in the parameter's place in the optimizer
        (its state moves with it)."""
        if dtype not in COPY_DTYPES:
            raise ValueError(f"WeightCopies: copies are bf16 or fp16, got {dtype}")
        places = {id(p): (group, i) for group in self.optimizer.param_groups for i, p in enumerate(group["params"])}
        copies = []
        for param in params:
            copy = self.copy_of.get(param)
            if copy is None:
                copy = self._make_copy(param, dtype, places)
            elif copy.dtype != dtype:
                raise ValueError(f"WeightCopies: a parameter of shape {tuple(param.shape)} already has a "
                                 f"{copy.dtype} copy, {dtype} asked for")
            copies.append(copy)
        return copies

    def _make_copy(self, param: torch.Tensor, dtype: torch.dtype, places: dict) -> torch.Tensor:
        if id(param) not in places:
            raise ValueError(f"WeightCopies: a parameter of shape {tuple(param.shape)} is not one of this "
                             f"{type(self.optimizer).__name__}'s")
        if param.dtype != torch.float32:
            raise ValueError(f"WeightCopies: parameters with copies must be float32 (they are the masters), got "
                             f"{param.dtype} for one of shape {tuple(param.shape)}")
        with torch.no_grad():
            copy = torch.empty_like(param, dtype=dtype).copy_(param)  # strides kept (channels-last weights)
        copy.requires_grad_(True)
        group, index = places[id(param)]
        group["params"][index] = copy
        state = self.optimizer.state.pop(param, None)
        if state:  # moments in the parameter's strides (a checkpoint of another layout keeps its own)
            self.optimizer.state[copy] = _on_host_step({
                **state, **{name: _like(param, state[name]) for name in ("exp_avg", "exp_avg_sq") if name in state}})
        self.copy_of[param] = copy
        self.master_of[copy] = param
        return copy

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The optimizer's own step for the parameters without copies, then the copies' update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.optimizer.param_groups
        kept = [group["params"] for group in groups]
        try:
            for group in groups:
                group["params"] = [p for p in group["params"] if p not in self.master_of]
            self._own_step()
        finally:
            for group, params in zip(groups, kept):
                group["params"] = params
        self._update_copies()
        return loss

    @torch.no_grad()
    def _update_copies(self) -> None:
        decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        for index, group in enumerate(self.optimizer.param_groups):
            by_step: dict[int, list[torch.Tensor]] = {}
            for copy in group["params"]:
                if copy in self.master_of and copy.grad is not None:
                    state = self.optimizer.state[copy]
                    if not state:
                        master = self.master_of[copy]
                        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(master),
                                     exp_avg_sq=torch.zeros_like(master))
                    by_step.setdefault(int(state["step"]) + 1, []).append(copy)
            beta1, beta2 = (float(beta) for beta in group["betas"])
            weight_decay = group["weight_decay"] if decoupled or group.get("decoupled_weight_decay") else 0.0
            for step, copies in by_step.items():
                states = [self.optimizer.state[c] for c in copies]
                key = (index, tuple(id(c) for c in copies))
                self._tables[key] = master_adamw_step(
                    copies, [c.grad for c in copies], [self.master_of[c] for c in copies],
                    [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], lr=float(group["lr"]),
                    beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=weight_decay, step=step,
                    tables=self._tables.get(key))
                for state in states:
                    state["step"] = torch.tensor(float(step))

    def _before_load(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        self._loading = state_dict

    def _after_load(self, optimizer: torch.optim.Optimizer) -> None:
        """The base class cast the copies' moments to the copies' dtype: put the saved fp32 values back."""
        saved, self._loading = self._loading, None
        if saved is None:
            return
        ids = [i for group in saved["param_groups"] for i in group["params"]]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, copy in zip(ids, params):
            if copy in self.master_of and i in saved["state"]:
                master, state = self.master_of[copy], saved["state"][i]
                optimizer.state[copy] = _on_host_step({
                    "step": state["step"], **{name: _like(master, state[name]) for name in ("exp_avg", "exp_avg_sq")}})


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` as an fp32 tensor on param's device with param's strides (itself when it already is one)."""
    if value.dtype == torch.float32 and value.device == param.device and value.stride() == param.stride():
        return value
    return torch.empty_like(param, dtype=torch.float32).copy_(value)


def _on_host_step(state: dict) -> dict:
    """The state with its step count as a CPU tensor, where this class reads it every step (no device sync)."""
    return {**state, "step": torch.tensor(float(state["step"]))}


def copies_from(owners: Iterable[WeightCopies]) -> Callable[[Sequence[torch.Tensor], torch.dtype], list]:
    """A function (params, dtype) -> each parameter's working copy from the owner whose optimizer holds it, or None
    where no owner does (such a parameter keeps autocast's cast)."""
    owners = list(owners)

    def attach(params: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor | None]:
        found = []
        for param in params:
            owner = next((o for o in owners if param in o.copy_of or any(
                p is param for group in o.optimizer.param_groups for p in group["params"])), None)
            found.append(owner.attach([param], dtype)[0] if owner is not None else None)
        return found
    return attach
