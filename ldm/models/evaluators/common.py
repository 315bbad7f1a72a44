"""What the evaluator networks share: batch access, intensity augmentation and the penultimate-layer hook."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


def batch_entry(batch: Mapping[str, Any], key: str, owner: str) -> Any:
    """`batch[key]`; a missing key is a KeyError naming the owner and the keys that are there."""
    if key not in batch:
        raise KeyError(f"{owner}: batch has no {key!r} entry (keys: {', '.join(map(str, batch))})")
    return batch[key]


def check_images(images: torch.Tensor, in_channels: int, dims: int, owner: str) -> None:
    """Raise ValueError naming `owner` unless images are (B, in_channels, *spatial) with `dims` spatial axes."""
    if images.ndim != dims + 2 or images.shape[1] != in_channels:
        raise ValueError(f"{owner}: images have shape {tuple(images.shape)}, expected "
                         f"(B, {in_channels}, {', '.join('DHW'[3 - dims:])}) for a {dims}D network")


def augment_intensity(images: torch.Tensor, jitter: float, noise_std: float) -> torch.Tensor:
    """Per-item random contrast and brightness, then Gaussian noise, so that a network trained on real images is not
    thrown by the small intensity errors of generated ones.

    images: (B, C, *spatial) -> same shape: x * (1 + a) + b + noise with a, b ~ U(-jitter, jitter) per item and
    noise ~ N(0, noise_std^2) per voxel.
    """
    if jitter > 0:
        shape = (images.shape[0],) + (1,) * (images.ndim - 1)
        scale = 1 + torch.empty(shape, device=images.device, dtype=images.dtype).uniform_(-jitter, jitter)
        shift = torch.empty(shape, device=images.device, dtype=images.dtype).uniform_(-jitter, jitter)
        images = images * scale + shift
    if noise_std > 0:
        images = images + noise_std * torch.randn_like(images)
    return images


def last_linear(network: nn.Module, owner: str) -> nn.Linear:
    """The network's last registered `nn.Linear`: its output layer, whose input is the penultimate features."""
    linears = [module for module in network.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise TypeError(f"{owner}: network {type(network).__name__} has no nn.Linear output layer to take "
                        f"penultimate features from")
    return linears[-1]


def inputs_of(layer: nn.Module, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run `network(images)` and return what `layer` received, flattened per item: (B, F)."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        network(images)
    finally:
        handle.remove()
    return captured[-1].flatten(1)


class MeanOverTestSet:
    """A model's `test_evaluator()` (ldm.engine.interface.Evaluator): the mean of a per-item score over the test
    set, summed over ranks. `score(batch, outputs) -> (B,)` gives the scores of one test batch."""

    def __init__(self, name: str, score):
        self.name, self.score = name, score
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        scores = self.score(batch, outputs).detach().double().cpu()
        self.total += scores.sum()
        self.count += scores.numel()

    def compute(self) -> dict[str, float]:
        totals = torch.stack([self.total, self.count])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            totals = totals.to(device)
            torch.distributed.all_reduce(totals)
        total, count = totals.tolist()
        return {self.name: total / count if count else float("nan")}
