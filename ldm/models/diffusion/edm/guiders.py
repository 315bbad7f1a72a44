"""Guiders wrap a conditional denoiser into the model a solver calls: `guider(denoiser, cond, uncond)` ->
`model(x, sigma)`. `denoiser(x, sigma, cond)` maps x: (B, C, *spatial), sigma: (B,) and a conditioning dict (name ->
(B, ...) tensor, e.g. sgm's `vector`, `crossattn`, `concat`) to D(x; sigma, cond)."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

Cond = Mapping[str, torch.Tensor]
ConditionalDenoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class IdentityGuider:
    """The conditional denoiser alone."""

    def __call__(self, denoiser: ConditionalDenoiser, cond: Cond, uncond: Cond | None) -> Model:
        return lambda x, sigma: denoiser(x, sigma, cond)


class VanillaCFG:
    """Classifier-free guidance (Ho & Salimans 2022): D_u + scale (D_c - D_u), both passes in one batch."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, denoiser: ConditionalDenoiser, cond: Cond, uncond: Cond | None) -> Model:
        if uncond is None:
            raise ValueError(f"VanillaCFG(scale={self.scale}): guidance needs an unconditional conditioning; an "
                             f"unconditional model samples with IdentityGuider")
        if set(cond) != set(uncond):
            raise ValueError(f"VanillaCFG: cond has {sorted(cond)}, uncond {sorted(uncond)}")
        both = {name: torch.cat([uncond[name], cond[name]]) for name in cond}

        def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            unconditional, conditional = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            return unconditional + self.scale * (conditional - unconditional)

        return guided
