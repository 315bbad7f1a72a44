"""Callbacks: small hooks the loop calls at fixed points. Configured under `trainer.callbacks` (name -> target/params).

Hooks (all optional): `on_train_batch_end(trainer, batch, batch_idx)`, `on_validation_batch_end(trainer, batch,
batch_idx)`. `trainer` is the running `ldm.engine.loop.Trainer`.
"""
from __future__ import annotations

import math

import torch

from ldm.engine.images import batch_affines, save_images, to_grid


class ImageLogger:
    """Saves `model.log_images(...)` as PNG grids (3D: orthogonal mid-slices; also NIfTI) under `images/<split>/`.

    Train images every `batch_frequency` optimizer steps (and at steps 1, 2, 4, ... before that when
    `increase_log_steps`), validation images for the first batch of every validation. Every rank runs the model
    (a sharded model needs all of them), each drawing its share of `max_images` from its own batch; rank zero
    gathers them and writes the files.
    """

    def __init__(self, batch_frequency: int, max_images: int = 4, clamp: bool = True, increase_log_steps: bool = True,
                 log_first_step: bool = False, disabled: bool = False, nifti: bool = True):
        if batch_frequency < 1:
            raise ValueError(f"ImageLogger: batch_frequency must be >= 1, got {batch_frequency}")
        self.batch_frequency = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.log_first_step = log_first_step
        self.disabled = disabled
        self.nifti = nifti
        self.early_steps = {2 ** n for n in range(batch_frequency.bit_length())} if increase_log_steps else set()

    def _due(self, step: int) -> bool:
        return (step > 0 and step % self.batch_frequency == 0) or step in self.early_steps or \
            (step == 0 and self.log_first_step)

    def _log(self, trainer, batch, split: str) -> None:
        module = trainer.module
        was_training = module.training
        module.eval()
        world_size = trainer.fabric.world_size
        share = math.ceil(self.max_images / world_size)  # each rank draws its share of the images from its batch
        with torch.no_grad():
            images = module.log_images(batch, split=split, max_images=share)
        module.train(was_training)
        images = {name: value[:share].detach().cpu() for name, value in images.items() if torch.is_tensor(value)}
        affines, affine_shape = batch_affines(batch)
        affines = None if affines is None else affines[:share].detach().cpu()
        if world_size > 1:
            gathered: list = [None] * world_size
            torch.distributed.all_gather_object(gathered, (images, affines))
            images = {name: torch.cat([part[name] for part, _ in gathered]) for name in images}
            affines = None if affines is None else torch.cat([part for _, part in gathered])
        if not trainer.is_global_zero:
            return
        images = {name: value[: self.max_images] for name, value in images.items()}
        step = trainer.global_step
        save_images(images, trainer.logdir / "images" / split, f"gs-{step:06d}_e-{trainer.epoch:03d}",
                    clamp=self.clamp, nifti=self.nifti, affines=affines, affine_shape=affine_shape)
        for name, value in images.items():
            trainer.logger.log_image(f"{split}/{name}", to_grid(value, clamp=self.clamp), step)

    def on_train_batch_end(self, trainer, batch, batch_idx: int) -> None:
        if not self.disabled and self._due(trainer.global_step):
            self._log(trainer, batch, "train")

    def on_validation_batch_end(self, trainer, batch, batch_idx: int) -> None:
        if not self.disabled and batch_idx == 0:
            self._log(trainer, batch, "val")
