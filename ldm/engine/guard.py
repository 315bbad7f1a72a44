"""The NaN/Inf guard: decide, identically on every rank, whether a step's losses and gradients are finite, and whether
the weights an optimizer step wrote are."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps with a NaN/Inf loss or gradient, or an optimizer step that wrote NaN/Inf weights;
    the last good checkpoint is left as it was."""


def gradient_norm(parameters) -> torch.Tensor:
    """2-norm of this rank's gradients (a local shard under FSDP: enough to tell finite from not), fp32.

    One multi-tensor norm per device and dtype (`torch.nn.utils.get_total_norm`), not a cast and a norm kernel per
    gradient: ~1400 launches for a 700-parameter UNet, each step, with the GPU idle behind them."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads).float()


def weights_finite(parameters) -> torch.Tensor:
    """Whether every element of `parameters` is finite: 0-dim bool on their device, no host synchronisation.

    One multi-tensor max-norm (`torch.nn.utils.get_total_norm` with `inf`): NaN and Inf propagate through it, and
    unlike a 2-norm it cannot overflow on large but finite weights."""
    tensors = [p.detach() for p in parameters]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf")))


class StepGuard:
    """Counts consecutive bad optimizer steps; the step after more than `max_bad_steps` of them raises.

    A step is bad when any of its losses (any optimizer, any micro-batch) or any gradient is not finite; a bad step
    is skipped on every rank (the decision is all-reduced, so ranks never disagree about stepping).

    A step with finite losses and gradients can still write NaN/Inf weights (a learning rate far too high); that
    cannot be undone by skipping, so it stops the run. Its flag (`watch_weights`) is read with the next step's
    values, or before anything is saved (`check_weights`): no extra wait for the GPU per step.
    """

    def __init__(self, fabric, max_bad_steps: int):
        self.fabric = fabric
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0
        self.unread_weights: tuple[int, torch.Tensor] | None = None  # (global step, agreed finiteness flag)

    def agreed(self, finite: torch.Tensor) -> torch.Tensor:
        """This rank's finiteness flag -> every rank's (min over ranks), fp32 1.0 or 0.0 on the device; no host
        synchronisation (the caller reads it with what else it needs from the GPU)."""
        finite = finite.float().reshape(()).to(self.fabric.device)
        if self.fabric.world_size > 1:
            finite = self.fabric.all_reduce(finite, reduce_op="min")
        return finite

    def watch_weights(self, global_step: int, finite: torch.Tensor) -> None:
        """Record whether the weights written by an optimizer step of `global_step` are finite (not read yet)."""
        flag = self.agreed(finite)
        if self.unread_weights is not None:
            flag = torch.minimum(flag, self.unread_weights[1])
        self.unread_weights = (global_step, flag)

    def take_weights_flag(self) -> tuple[int, torch.Tensor] | None:
        """The unread (global step, flag) of `watch_weights`, for the caller to read with its own values."""
        unread, self.unread_weights = self.unread_weights, None
        return unread

    def judge_weights(self, global_step: int, finite: float) -> None:
        """Raise NonFiniteLossError if the flag read for `global_step`'s weights says they are not finite."""
        if finite != 1.0:
            raise NonFiniteLossError(
                f"non-finite weights after the optimizer step at global step {global_step} (its losses and gradients "
                f"were finite: is the learning rate far too high?); stopping, nothing was saved from that step on")

    def check_weights(self) -> None:
        """Read any unread weight flag now (before a save) and raise if those weights are not finite."""
        unread = self.take_weights_flag()
        if unread is not None:
            self.judge_weights(unread[0], float(unread[1]))

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
