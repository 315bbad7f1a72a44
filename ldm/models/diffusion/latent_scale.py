"""The scale of a latent diffusion model's latents, z = scale_factor * encode(x): given, or with `scale_by_std`
estimated as 1 / std of the first training batch's latents (over every rank) so that the diffusion sees unit-std data,
and kept as the buffer `scale_factor` so that checkpoints carry it and a resumed run keeps it.

`LatentScale` is a mixin of `LatentDiffusion` and `DiffusionEngine`: their `__init__` calls `init_scale_factor`, their
encode path calls `estimate_scale_factor` on the first training batch and `checked_scale_factor` wherever they scale.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class LatentScale:
    """scale_factor bookkeeping for an nn.Module (see the module docstring)."""

    def init_scale_factor(self, scale_factor: float, scale_by_std: bool, buffer: bool = True) -> None:
        """With scale_by_std the buffer starts as NaN, so that decoding before the estimate fails loudly instead of
        producing garbage. buffer: keep a given factor as a buffer too (LatentDiffusion, whose CompVis checkpoints
        hold `scale_factor`) or as a plain float (DiffusionEngine, whose sgm checkpoints do not)."""
        self.scale_by_std = scale_by_std
        if scale_by_std or buffer:
            self.register_buffer("scale_factor", torch.tensor(float("nan") if scale_by_std else float(scale_factor)))
            self.register_load_state_dict_post_hook(_forget_scale_factor_check)
        else:
            self.scale_factor = float(scale_factor)
        # Whether scale_factor is known to hold a value, kept on the host so that a training step does not wait for
        # the GPU to tell (a load may bring any value: it makes the next check read the buffer again).
        self._scale_factor_set = not scale_by_std

    def scale_factor_is_set(self) -> bool:
        """False while scale_factor is the NaN that scale_by_std starts from; reads the device only until True."""
        if not self._scale_factor_set:
            self._scale_factor_set = not bool(torch.isnan(torch.as_tensor(self.scale_factor)))
        return self._scale_factor_set

    def checked_scale_factor(self) -> torch.Tensor | float:
        if not self.scale_factor_is_set():
            raise RuntimeError(f"{type(self).__name__}: scale_by_std is on but scale_factor has not been estimated "
                               f"yet; it is set by the first training step (or loaded from a checkpoint)")
        return self.scale_factor

    @torch.no_grad()
    def estimate_scale_factor(self, z: torch.Tensor) -> None:
        """scale_factor = 1 / std(z) over z: (B, C, *S) unscaled latents of every rank's batch."""
        z = z.double()
        moments = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device,
                                                                         dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
        total, total_sq, count = moments
        variance = (total_sq - total ** 2 / count) / (count - 1)
        self.scale_factor.fill_(float(variance.rsqrt()))
        self._scale_factor_set = True
        print(f"{type(self).__name__}: scale_by_std set scale_factor = {float(self.scale_factor):.6g}")


def _forget_scale_factor_check(module: LatentScale, incompatible_keys) -> None:
    module._scale_factor_set = False
