"""A toy model carrying what a diffusion model's checkpoint carries, and toy data with random augmentation.

`EmaRegressor` has, besides its weights: an EMA of its network (`model_ema`, a `LitEma` named as in `DDPM`, so
`python -m ldm.engine.export --ema` applies), a `scale_factor` buffer estimated from the first batch (as
`scale_by_std` does), an AdamW optimizer with an LR warm-up schedule, and noisy predictions (the run depends on the
RNG state). `AugmentedRegressionData` draws from python's, numpy's and torch's global generators for every item,
the way random transforms do in loader workers.
"""
from __future__ import annotations

import random
import time
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ldm.models.autoencoder import load_weights
from ldm.modules.ema import LitEma
from tests.engine.toy import RegressionData


class AugmentedRegressionData(RegressionData):
    """RegressionData whose `image` (1, 4, 4) gets noise from all three global generators on every access."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        noise = 0.05 * torch.randn(1, 4, 4) + 0.05 * float(np.random.normal()) + 0.05 * random.gauss(0.0, 1.0)
        return item | {"image": item["image"] + noise}


class EmaRegressor(nn.Module):
    """y = MLP(scale_factor * x) + noise, for batches {"image": (B, 1, 4, 4), "target": (B, 1)} (any image of 16
    voxels; a batch without targets, e.g. of volumes, regresses to 0).

    hidden: width of the hidden layer (a different width is a different architecture); nan_at_steps: global steps
    whose loss is NaN; fail_at_steps: global steps whose training step raises RuntimeError (a config that breaks
    only once training runs); lr_spikes: {scheduler step: factor} multiplies the learning rate at those steps (a
    factor of 1e40 with `sgd` makes the update overflow to Inf while the loss and gradients stay finite); sgd: plain
    SGD instead of AdamW (whose own checks refuse a step size beyond float32); sleep_s: seconds each training or test
    step sleeps (so signals land mid-run); build_sleep_s: seconds the constructor sleeps (a slow start-up);
    ckpt_path/ignore_keys/strict: initial weights through `ldm.models.autoencoder.load_weights`, as the real models
    take them.
    """

    def __init__(self, hidden: int = 8, ema_decay: float = 0.9, noise_std: float = 0.1,
                 nan_at_steps: Sequence[int] = (), fail_at_steps: Sequence[int] = (),
                 lr_spikes: Mapping[int, float] | None = None, sgd: bool = False, sleep_s: float = 0.0,
                 build_sleep_s: float = 0.0, ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 strict: bool = True):
        super().__init__()
        time.sleep(build_sleep_s)
        self.model = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.model_ema = LitEma(self.model, decay=ema_decay)
        self.register_buffer("scale_factor", torch.tensor(float("nan")))
        self.noise_std = noise_std
        self.nan_at_steps = set(nan_at_steps)
        self.fail_at_steps = set(fail_at_steps)
        self.sgd = sgd
        self.lr_spikes = {int(step): float(factor) for step, factor in (lr_spikes or {}).items()}
        self.sleep_s = sleep_s
        self.learning_rate = 0.0
        self.global_step = 0
        if ckpt_path is not None:
            load_weights(self, ckpt_path, ignore_keys, strict)

    def configure_optimizers(self):
        optimizer = (torch.optim.SGD if self.sgd else torch.optim.AdamW)(self.model.parameters(), lr=self.learning_rate)
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 5) * self.lr_spikes.get(step, 1.0))]

    def _mse(self, batch) -> torch.Tensor:
        x = batch["image"].flatten(1) * self.scale_factor
        prediction = self.model(x) + self.noise_std * torch.randn(x.shape[0], 1)
        target = batch["target"] if "target" in batch else torch.zeros_like(prediction)
        return (prediction - target).pow(2).mean()

    def training_step(self, batch, batch_idx: int, optimizer_idx: int):
        time.sleep(self.sleep_s)
        if self.global_step in self.fail_at_steps:
            raise RuntimeError(f"EmaRegressor: fail_at_steps has global step {self.global_step}")
        if torch.isnan(self.scale_factor):  # first step of a fresh run: 1 / std of the first batch
            self.scale_factor.fill_(1.0 / batch["image"].float().std().item())
        mse = self._mse(batch)
        weight_norm = sum(p.pow(2).sum() for p in self.model.parameters())
        loss = mse + 1e-4 * weight_norm
        if self.global_step in self.nan_at_steps:
            loss = loss * float("nan")
        return loss, {"train/loss": loss.detach(), "train/mse": mse.detach(), "train/weight_norm": weight_norm.detach()}

    def on_train_batch_end(self, batch, batch_idx: int) -> None:
        self.model_ema(self.model)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int):
        with self.model_ema.average_parameters(self.model):
            return {"loss": self._mse(batch)}

    def test_step(self, batch, batch_idx: int):
        time.sleep(self.sleep_s)
        return {"inputs": batch["image"].clamp(-1, 1)}

    def log_images(self, batch, split: str, max_images: int):
        return {"inputs": batch["image"][:max_images].clamp(-1, 1)}
