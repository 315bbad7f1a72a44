"""The NaN/Inf guard: decide, identically on every rank, whether a step's losses and gradients are finite."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps with a NaN/Inf loss or gradient; the last good checkpoint is left as it was."""


def gradient_norm(parameters) -> torch.Tensor:
    """2-norm of this rank's gradients (a local shard under FSDP: enough to tell finite from not), fp32.

    One multi-tensor norm per device and dtype (`torch.nn.utils.get_total_norm`), not a cast and a norm kernel per
    gradient: ~1400 launches for a 700-parameter UNet, each step, with the GPU idle behind them."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads).float()


class StepGuard:
    """Counts consecutive bad optimizer steps; the step after more than `max_bad_steps` of them raises.

    A step is bad when any of its losses (any optimizer, any micro-batch) or any gradient is not finite; a bad step
    is skipped on every rank (the decision is all-reduced, so ranks never disagree about stepping).
    """

    def __init__(self, fabric, max_bad_steps: int):
        self.fabric = fabric
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0

    def agreed(self, finite: torch.Tensor) -> torch.Tensor:
        """This rank's finiteness flag -> every rank's (min over ranks), fp32 1.0 or 0.0 on the device; no host
        synchronisation (the caller reads it with what else it needs from the GPU)."""
        finite = finite.float().reshape(()).to(self.fabric.device)
        if self.fabric.world_size > 1:
            finite = self.fabric.all_reduce(finite, reduce_op="min")
        return finite

    def end_step(self, global_step: int, problems: list[str]) -> None:
        """Record one optimizer step; `problems` describes what was not finite (empty for a good step)."""
        if not problems:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        message = f"non-finite values at global step {global_step}: " + "; ".join(problems)
        if self.bad_in_a_row > self.max_bad_steps:
            raise NonFiniteLossError(f"{message}. {self.bad_in_a_row} bad steps in a row (trainer.max_bad_steps="
                                     f"{self.max_bad_steps}); stopping, the last checkpoint is untouched")
        if self.fabric.is_global_zero:
            tqdm.write(f"skipping step: {message}")


def describe_loss(loss: float, scalars: dict[str, float], optimizer_idx: int) -> str:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    return f"loss of optimizer {optimizer_idx} = {loss:.4g} (terms: {terms or 'none logged'})"
