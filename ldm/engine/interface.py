"""The narrow interface between a model and the training loop (`ldm.engine.loop.Trainer`).

A model is a plain `torch.nn.Module` that also has the methods below. The loop owns devices, precision,
distribution, gradient accumulation, clipping, checkpoints and logging; the model owns its losses.

Batches are dicts of tensors (plus lists of strings such as `path`), already on the model's device.
Images are `(B, C, H, W)` or `(B, C, D, H, W)` floats in [-1, 1].
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

Batch = dict[str, Any]
Scalars = dict[str, "float | torch.Tensor"]
Images = dict[str, torch.Tensor]


@runtime_checkable
class TrainableModel(Protocol):
    #: Set by the CLI before `configure_optimizers`: base_learning_rate, scaled when `--scale_lr` is on.
    learning_rate: float
    #: Kept current by the loop before every `training_step` (optimizer steps taken so far).
    global_step: int

    def configure_optimizers(self) -> "Sequence[torch.optim.Optimizer] | tuple[Sequence[torch.optim.Optimizer], Sequence[Any]]":
        """Optimizers, or (optimizers, schedulers). Schedulers are `torch.optim.lr_scheduler` objects stepped after
        every optimizer step of their optimizer (the i-th scheduler belongs to the i-th optimizer)."""

    def training_step(self, batch: Batch, batch_idx: int, optimizer_idx: int) -> "tuple[torch.Tensor, Scalars]":
        """Loss for optimizer `optimizer_idx` (0 for single-optimizer models) and scalars to log.

        With several optimizers (a GAN) the loop calls this once per optimizer for the same batch, in order, and
        only the parameters of that optimizer require gradients during the call."""

    def validation_step(self, batch: Batch, batch_idx: int) -> Scalars:
        """Scalars; the loop logs their mean over the validation set under `val/`."""

    def test_step(self, batch: Batch, batch_idx: int) -> Images:
        """Images to save under `images/test/` (PNG grids; 3D also as NIfTI files)."""

    def log_images(self, batch: Batch, split: str, max_images: int) -> Images:
        """Images to show in the logs for this batch, at most `max_images` per entry."""


class Evaluator(Protocol):
    """What a model's optional `test_evaluator()` returns: metrics accumulated over the test batches.

    Under several processes each rank sees its own shard of the test set; `compute()` is called on every rank and
    must return the metrics over all ranks (it syncs itself, as torchmetrics' `Metric.compute` does); only rank 0
    writes them. Its state lives on the model's device if it is a module registered on the model."""

    def update(self, batch: Batch, outputs: Images) -> None:
        """One test batch and what `test_step` returned for it."""

    def compute(self) -> "dict[str, float | torch.Tensor]":
        """Metric name -> value over every test batch (of every rank)."""


def optional_hook(model: torch.nn.Module, name: str):
    """`model.<name>` if the model defines that optional hook, else None. The hooks:

    - `on_train_batch_end(batch, batch_idx)`: after each optimizer step (e.g. for EMA).
    - `cuda_graph_modules()`: name -> network whose training forward and backward `trainer.cuda_graph` captures;
      each must run once per training step, see ldm/engine/cuda_graph.py.
    - `prepare_training_data(datamodule, fabric)`: once per `fit` on every rank, after set-up (weights on the
      device) and before the train loader is built; it may replace the train split (e.g. `LatentDiffusion`'s
      latent cache).
    - `save_beside_checkpoint(path)`: on rank 0 after each checkpoint file is written (`step=N.ckpt`, `last.ckpt`,
      `best.ckpt`), to write files of its own beside it (e.g. the LoRA weights alone, ldm/modules/lora.py).
    - `test_evaluator()`: None or an `Evaluator`, asked once per `Trainer.test`; the loop calls its
      `update(batch, outputs)` after each `test_step` and `compute()` at the end, then writes
      `<logdir>/metrics/test.json` (format in ldm/engine/evaluation.py), logs each metric as `test/<name>` at the
      tested weights' global step and prints one line per metric.

    Besides hooks, the loop reads the attribute `monitor` (a `val/` key such as `val/loss`, or None): the validation
    mean that picks `checkpoints/best.ckpt` unless `trainer.checkpoint.monitor` names another."""
    return getattr(model, name, None)
