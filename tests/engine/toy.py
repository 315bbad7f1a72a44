"""A tiny model and dataset implementing the loop interface, so engine tests need no real network."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset


class RegressionData(Dataset):
    """y = x @ w_true + noise; items {"image": (1, 4, 4) x, "target": (1,) y, "index": int}."""

    def __init__(self, length: int = 32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(length, 1, 4, 4, generator=generator)
        self.w = torch.randn(16, generator=generator)
        self.y = self.x.flatten(1) @ self.w + 0.01 * torch.randn(length, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.x[index], "target": self.y[index : index + 1], "index": index}


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class ToyRegressor(nn.Module):
    """Linear regression; `two_optimizers` adds a second parameter group stepped by its own optimizer (a GAN's shape);
    `nan_from_step` makes the loss NaN from that global step on; `sleep_s` slows each step (signal tests);
    `raise_at_step` raises an exception at that step; `inf_grad_from_step` gives infinite gradients from that step
    on; `nan_item` makes the loss NaN for batches holding that dataset item; `noise_std` adds random noise to the prediction (so the run depends on the RNG state)."""

    def __init__(self, two_optimizers: bool = False, nan_from_step: int = -1, use_scheduler: bool = False,
                 sleep_s: float = 0.0, raise_at_step: int = -1, inf_grad_from_step: int = -1,
                 noise_std: float = 0.0, nan_item: int = -1):
        super().__init__()
        self.linear = nn.Linear(16, 1)
        self.critic = nn.Linear(16, 1) if two_optimizers else None
        self.nan_from_step = nan_from_step
        self.use_scheduler = use_scheduler
        self.sleep_s = sleep_s
        self.raise_at_step = raise_at_step
        self.inf_grad_from_step = inf_grad_from_step
        self.noise_std = noise_std
        self.nan_item = nan_item
        self.learning_rate = 0.0
        self.global_step = 0
        self.seen_indices: list[int] = []

    def configure_optimizers(self):
        optimizers = [torch.optim.Adam(self.linear.parameters(), lr=self.learning_rate)]
        if self.critic is not None:
            optimizers.append(torch.optim.Adam(self.critic.parameters(), lr=self.learning_rate))
        if self.use_scheduler:
            return optimizers, [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 4)) for o in optimizers]
        return optimizers

    def _loss(self, batch) -> torch.Tensor:
        prediction = self.linear(batch["image"].flatten(1))
        prediction = prediction + self.noise_std * torch.randn_like(prediction)
        if 0 <= self.inf_grad_from_step <= self.global_step:
            prediction = InfiniteGradient.apply(prediction)
        loss = (prediction - batch["target"]).pow(2).mean()
        if 0 <= self.nan_from_step <= self.global_step or self.nan_item in batch["index"].tolist():
            loss = loss * float("nan")
        return loss

    def training_step(self, batch, batch_idx: int, optimizer_idx: int):
        time.sleep(self.sleep_s)
        if self.global_step == self.raise_at_step:
            raise RuntimeError(f"toy failure at step {self.global_step}")
        if optimizer_idx == 0:
            self.seen_indices += batch["index"].tolist()
            loss = self._loss(batch)
            return loss, {"train/loss": loss.detach()}
        critic = self.critic(batch["image"].flatten(1)).pow(2).mean()
        return critic, {"train/critic_loss": critic.detach()}

    def validation_step(self, batch, batch_idx: int):
        return {"loss": self._loss(batch)}

    def test_step(self, batch, batch_idx: int):
        return {"inputs": batch["image"].clamp(-1, 1)}

    def log_images(self, batch, split: str, max_images: int):
        return {"inputs": batch["image"][:max_images].clamp(-1, 1)}


class GraphableToy(ToyRegressor):
    """ToyRegressor that names its linear layer for `trainer.cuda_graph`."""

    def cuda_graph_modules(self) -> dict:
        return {"linear": self.linear}
