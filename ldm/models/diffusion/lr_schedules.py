"""Learning-rate multipliers for `scheduler_config` (CompVis `ldm.lr_scheduler` vocabulary), used with LambdaLR.

Each cycle i lasts `cycle_lengths[i]` optimizer steps: a linear warm-up from `f_start[i]` to `f_max[i]` over
`warm_up_steps[i]` steps, then a decay towards `f_min[i]` at the end of the cycle. `f_min == f_max` gives warm-up then
constant, the usual latent-diffusion setting.
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import Sequence


class LambdaLinearScheduler:
    """Warm-up, then linear decay from f_max to f_min over each cycle: `schedule(step) -> multiplier`."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int]):
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start,
                 "cycle_lengths": cycle_lengths}
        lengths = {name: len(value) for name, value in lists.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{type(self).__name__}: every list needs one entry per cycle, got lengths {lengths}")
        if any(length <= 0 for length in cycle_lengths) or any(w < 0 for w in warm_up_steps):
            raise ValueError(f"{type(self).__name__}: cycle_lengths must be positive and warm_up_steps >= 0")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cycle_starts = [0, *itertools.accumulate(cycle_lengths)]

    def _cycle(self, step: int) -> tuple[int, int]:
        """(cycle index, step within that cycle); steps past the last cycle stay in it."""
        cycle = min(bisect.bisect_right(self.cycle_starts, step) - 1, len(self.cycle_lengths) - 1)
        return cycle, step - self.cycle_starts[cycle]

    def decay(self, cycle: int, step: int) -> float:
        """Multiplier after warm-up, `step` steps into `cycle`."""
        progress = min((self.cycle_lengths[cycle] - step) / self.cycle_lengths[cycle], 1.0)
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * max(progress, 0.0)

    def schedule(self, step: int) -> float:
        cycle, step = self._cycle(step)
        warm_up = self.warm_up_steps[cycle]
        if step < warm_up:
            return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * step / warm_up
        return self.decay(cycle, step)

    def __call__(self, step: int) -> float:
        return self.schedule(step)


class LambdaWarmUpCosineScheduler2(LambdaLinearScheduler):
    """Warm-up, then cosine decay from f_max to f_min over the rest of each cycle."""

    def decay(self, cycle: int, step: int) -> float:
        span = max(self.cycle_lengths[cycle] - self.warm_up_steps[cycle], 1)
        progress = min((step - self.warm_up_steps[cycle]) / span, 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + math.cos(progress * math.pi))
