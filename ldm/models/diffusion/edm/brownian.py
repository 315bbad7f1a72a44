"""Noise for the SDE solvers of `k_samplers` drawn from one Brownian motion W over the noise levels.

The solvers ask for `noise(sigma, sigma_next)`: a unit Gaussian like x. Drawn as the normalized increment
(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| of a single path W, the noise of a step and of its sub-steps
are the increments of the same path, so a solver's sample converges as its steps shrink (independent draws per
call would give a different sample at every step count). torchsde's `BrownianTree` gives W at any level from one
seed, in any query order, without storing the path.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torchsde


class BrownianTreeNoiseSampler:
    """`noise(sigma, sigma_next)` -> (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|, shaped like x:
    (B, C, *spatial), for levels inside [sigma_min, sigma_max].

    seed: one int (one path of x's shape), one int per batch item (item b's noise depends only on seed[b], so a
    sample is reproducible alone) or None (an int drawn from torch's global generator).
    """

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor | float, sigma_max: torch.Tensor | float,
                 seed: int | Sequence[int] | None = None):
        low, high = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        if not low < high:
            raise ValueError(f"BrownianTreeNoiseSampler: needs sigma_min < sigma_max, got {float(low)} and "
                             f"{float(high)}")
        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, []).item())
        self.per_item = not isinstance(seed, int)
        if self.per_item and len(seed) != x.shape[0]:
            raise ValueError(f"BrownianTreeNoiseSampler: {len(seed)} seeds for a batch of {x.shape[0]}")
        seeds, start = (list(seed), torch.zeros_like(x[0])) if self.per_item else ([seed], torch.zeros_like(x))
        self.trees = [torchsde.BrownianTree(low, start, high, entropy=s) for s in seeds]

    def increment(self, level_from: torch.Tensor, level_to: torch.Tensor) -> torch.Tensor:
        """W(level_to) - W(level_from)."""
        low, high, sign = (level_from, level_to, 1) if level_from < level_to else (level_to, level_from, -1)
        with warnings.catch_warnings():
            # The tree rounds its ends to its tolerance, so sigma_min / sigma_max queried back may lie a rounding
            # outside; it warns and clamps them to its ends, which is what the solvers need.
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            parts = [tree(low, high) for tree in self.trees]
        return sign * (torch.stack(parts) if self.per_item else parts[0])

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        return self.increment(sigma, sigma_next) / (sigma_next - sigma).abs().sqrt()
