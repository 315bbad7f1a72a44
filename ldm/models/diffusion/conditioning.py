"""How a conditioning reaches the UNet, per `conditioning_key` (CompVis latent-diffusion vocabulary):

- None: unconditional, `unet(x_t, t)`;
- concat: the conditioning, on the latent grid, is concatenated to x_t along channels (masks, low-res images);
- crossattn: it is the cross-attention context `(B, L, D)` (a `(B, D)` vector is one token, a spatial map is one
  token per voxel);
- hybrid: both, from the same conditioning;
- adm: it is the class-label input `y` of the UNet, `(B,)` int64.
Classifier-free guidance lives here too: condition dropout for training and the guided model for sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")
MASK_TO_LATENT = ("nearest", "area", "encoder")


@dataclass(frozen=True)
class Conditioning:
    """The UNet's inputs besides x_t and t. concat: (B, Cc, *latent); context: (B, L, D); y: (B,) int64."""

    concat: torch.Tensor | None = None
    context: torch.Tensor | None = None
    y: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def unet_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """(x_in, {"context", "y"}) for `unet(x_in, t, **kwargs)`: x (B, C, *latent) -> x_in (B, C + Cc, *latent)."""
        x_in = x if self.concat is None else torch.cat([x, self.concat.to(x.dtype)], dim=1)
        return x_in, {"context": self.context, "y": self.y}

    def where(self, keep: torch.Tensor, null: "Conditioning") -> "Conditioning":
        """Per item: this conditioning where keep (B,) bool is True, `null` elsewhere."""
        def pick(mine: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.view(-1, *([1] * (mine.ndim - 1))), mine, other.to(mine.dtype))
        return replace(self, **{name: pick(value, getattr(null, name)) for name, value in self.tensors().items()})

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Both conditionings stacked along the batch axis (self first)."""
        stacked = {name: torch.cat([value, getattr(other, name)]) for name, value in self.tensors().items()}
        return replace(self, **stacked)


def to_latent_grid(c: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """c: (B, C, *S) -> (B, C, *size) for `mask_to_latent` mode.

    nearest: the voxel nearest each latent voxel's centre ("nearest-exact", so a 4x reduction samples block centres,
    not corners); area: the block average (a one-hot mask becomes per-class occupancy); encoder: the conditioning
    stage must already have produced the grid, anything else is an error.
    """
    size = tuple(size)
    if c.ndim != len(size) + 2:
        raise ValueError(f"concat conditioning must be (B, C, {', '.join('DHW'[3 - len(size):])}) like the latents, "
                         f"got shape {tuple(c.shape)}")
    if tuple(c.shape[2:]) == size:
        return c
    if mode == "encoder":
        raise ValueError(f"mask_to_latent='encoder': the conditioning stage gives spatial size {tuple(c.shape[2:])}, "
                         f"the latent grid is {size}; fix its number of downsampling stages")
    if mode not in MASK_TO_LATENT:
        raise ValueError(f"mask_to_latent: {mode!r} is not one of {', '.join(MASK_TO_LATENT)}")
    c = c if c.is_floating_point() else c.float()
    return F.interpolate(c, size=size, mode="nearest-exact" if mode == "nearest" else "area")


def as_tokens(c: torch.Tensor) -> torch.Tensor:
    """Cross-attention context: (B, D) -> (B, 1, D); (B, L, D) as is; a map (B, C, *S) -> (B, prod(S), C)."""
    if c.ndim == 2:
        return c[:, None]
    if c.ndim == 3:
        return c
    return c.flatten(2).transpose(1, 2)


def build_conditioning(conditioning_key: str | None, c: torch.Tensor | None, latent_size: Sequence[int],
                       mask_to_latent: str = "nearest") -> Conditioning:
    """The UNet inputs for the conditioning stage's output c (None when unconditional)."""
    if conditioning_key not in CONDITIONING_KEYS:
        raise ValueError(f"conditioning_key: {conditioning_key!r} is not one of "
                         f"{', '.join(map(str, CONDITIONING_KEYS))}")
    if conditioning_key is None:
        return Conditioning()
    if c is None:
        raise ValueError(f"conditioning_key={conditioning_key!r} needs a conditioning, got None")
    if conditioning_key == "concat":
        return Conditioning(concat=to_latent_grid(c, latent_size, mask_to_latent))
    if conditioning_key == "crossattn":
        return Conditioning(context=as_tokens(c))
    if conditioning_key == "hybrid":
        on_grid = to_latent_grid(c, latent_size, mask_to_latent)
        return Conditioning(concat=on_grid, context=as_tokens(on_grid))
    if c.ndim != 1 or c.is_floating_point():
        raise ValueError(f"conditioning_key='adm' needs class labels of shape (B,) and an integer dtype, "
                         f"got {tuple(c.shape)} {c.dtype}")
    return Conditioning(y=c.long())


def drop_conditions(cond: Conditioning, null: Conditioning, rate: float,
                    generator: torch.Generator | None = None) -> Conditioning:
    """Classifier-free guidance training: each item's conditioning replaced by `null` with probability `rate`."""
    tensors = cond.tensors()
    if not rate or not tensors:
        return cond
    reference = next(iter(tensors.values()))
    keep = torch.rand(reference.shape[0], generator=generator, device=reference.device) >= rate
    return cond.where(keep, null)


def classifier_free_guidance(model: Callable[..., torch.Tensor], cond: Conditioning, uncond: Conditioning,
                             scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided model (x_t, t) -> uncond_out + scale * (cond_out - uncond_out), both passes in one batch.

    Guidance combines raw network outputs; since x0, eps and v are affine in the output for fixed (x_t, t), this is
    the same guidance whatever the parameterization. scale 1 is the conditional model alone (one pass).
    """
    if scale == 1.0:
        return lambda x, t: model(x, t, cond)
    both = cond.cat(uncond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided
