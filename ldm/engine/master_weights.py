"""AdamW that keeps fp32 master copies of half-precision weights: the weights autocast would cast live in bf16.

`MasterWeightAdamW(params)` converts the given fp32 parameters to `dtype` in place (bf16; strides kept, e.g.
channels-last) and keeps their fp32 values as masters with the two moments; `step()` updates masters and moments
and writes the rounded masters into the weights, for all parameters in one launch (kernels/master_adamw.py). Under
autocast such weights are used as they are (no cast kernel forward, no cast of the gradient back), which saves 12 of
the 40 bytes a step moves per parameter with fp32 weights and fused AdamW. Give it the weights autocast casts
(`ldm.engine.weight_cast.parameters_cast_by_autocast`): parameters used in fp32 (norms' affine weights, biases a
kernel adds in fp32) stay fp32 under another optimizer.

The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments) on the masters. State per
parameter: `master`, `exp_avg`, `exp_avg_sq` (fp32, the parameter's strides) and `step`; `load_state_dict` keeps
them fp32 (the base class would cast them to the parameter's dtype). The model's own state_dict then holds the
rounded weights, the optimizer's the exact ones: the training loop does not use this optimizer yet (its checkpoints
and exports would have to take the masters), benchmarks/bench_models.py --master-weights does.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from kernels.master_adamw import LaunchTables, master_adamw_step

_FP32_STATE = ("master", "exp_avg", "exp_avg_sq")


class MasterWeightAdamW(torch.optim.Optimizer):
    """See the module docstring. params: fp32 parameters (or groups of them) to store in `dtype`."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, dtype: torch.dtype = torch.bfloat16):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"MasterWeightAdamW: dtype must be bfloat16 or float16, got {dtype}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._tables: dict[tuple, LaunchTables | None] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"MasterWeightAdamW: parameters must be float32 (their values become the "
                                     f"masters), got {p.dtype} for one of shape {tuple(p.shape)}")
                master = p.detach().clone()
                self.state[p] = {"master": master, "exp_avg": torch.zeros_like(master),
                                 "exp_avg_sq": torch.zeros_like(master), "step": 0}
                p.data = p.data.to(dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_step.setdefault(self.state[p]["step"] + 1, []).append(p)
            beta1, beta2 = group["betas"]
            for step, params in by_step.items():
                states = [self.state[p] for p in params]
                key = (index, tuple(id(p) for p in params))
                self._tables[key] = master_adamw_step(
                    params, [p.grad for p in params], *([s[name] for s in states] for name in _FP32_STATE),
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    step=step, tables=self._tables.get(key))
                for s in states:
                    s["step"] = step
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """The base class's load, with masters and moments kept fp32 in each parameter's strides."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                for name in _FP32_STATE:
                    self.state[p][name] = torch.empty_like(p, dtype=torch.float32).copy_(saved[i][name])
