"""The training / validation / test loop on Lightning Fabric.

Fabric owns devices, distribution and precision; this file owns the order of things: accumulate, clip, step,
log, validate, checkpoint, and resume exactly where a run stopped. Models plug in through
`ldm.engine.interface.TrainableModel`.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from tqdm.auto import tqdm

from ldm.data.base import SKIPPED_READS
from ldm.engine import checkpoint as ckpt
from ldm.engine import cpu_bf16, sharded, weight_copies
from ldm.engine.config import TrainerConfig, fabric_kwargs
from ldm.engine.cuda_graph import graph_training_forward
from ldm.engine.evaluation import (TEST_METRICS, batch_size_of, computed_metrics, kept_rows, padding_rows,
                                   report_test_metrics, test_evaluator_of)
from ldm.engine.guard import NonFiniteLossError, StepGuard, describe_loss, gradient_norm, weights_finite
from ldm.engine.images import batch_affines, save_images
from ldm.engine.interface import optional_hook
from ldm.engine.loggers import RunLogger
from ldm.engine.memory_format import batch_to_channels_last, model_to_channels_last
from ldm.engine.monitor import BestRecord, monitored_key
from ldm.engine.signals import TRAINING, PreemptionFlags
from ldm.engine.strategy import fsdp_options
from ldm.util import ConfigError


def _as_optimizers(configured: Any) -> tuple[list, list]:
    """Normalise `configure_optimizers()` output to (optimizers, schedulers)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured], []
    if isinstance(configured, tuple) and len(configured) == 2 and isinstance(configured[1], (list, tuple)):
        return list(configured[0]), list(configured[1])
    return list(configured), []


def cuda_memory_scalars() -> dict[str, float]:
    """Peak allocated and reserved GiB since the previous call (steady state, not cuDNN's autotuning), and the
    caching allocator's cumulative retries: each one freed all cached blocks and synchronised, a sign of memory
    pressure or fragmentation that slows steps (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps)."""
    scalars = {"perf/peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
               "perf/peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30,
               "perf/alloc_retries": float(torch.cuda.memory_stats().get("num_alloc_retries", 0))}
    torch.cuda.reset_peak_memory_stats()
    return scalars


def _read_together(values: list) -> list[float | None]:
    """One-element tensors and numbers -> Python floats (None stays None), the tensors in one device-to-host
    transfer: reading several GPU values waits for the GPU once, not once per value."""
    tensors = [v.detach().float().reshape(1) for v in values if isinstance(v, torch.Tensor)]
    read = iter(torch.cat([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else [])
    return [None if v is None else next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


class Trainer:
    """Runs `fit` and `test` for one model. Build it before the model so that every rank exists (`fabric.launch`)."""

    def __init__(self, config: TrainerConfig, seed: int = 23, flags: PreemptionFlags | None = None):
        """flags: installed preemption handlers of the whole run (the command line's); without them `fit` installs
        its own for its duration."""
        self.config = config
        self.seed = seed
        self.flags = flags
        self.fabric = Fabric(**fabric_kwargs(config))
        if os.environ.get("LT_CLI_USED") != "1":  # `fabric run` has already started every process
            self.fabric.launch()
        torch.backends.cudnn.benchmark = config.benchmark
        self.logdir: Path | None = None
        self.logger = RunLogger(".", [], enabled=False)
        self.callbacks: list = []
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.guard = StepGuard(self.fabric, config.max_bad_steps)
        self.best = BestRecord(None)  # the monitored validation key's best value; set up by `fit`
        self.saved_checkpoint: Path | None = None  # the checkpoint saved or loaded last: where tested weights are from
        self.last_good_checkpoint: Path | None = None  # the newest step file saved outside a streak of bad steps
        self.mid_step = False  # between the first and the last optimizer.step() of one global step
        self.raw_model: torch.nn.Module | None = None
        self.module = None  # the Fabric-wrapped model, once set up
        self.run_config: dict = {}
        self._open_run_folder: Callable[[], None] | None = None  # see `attach`
        self.start_step = 0  # global_step when this process started training: what it may save after an exception
        self.skipped_reads: torch.Tensor | None = None  # rank 0's reads of corrupt files skipped (on_bad_file: skip)

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero

    def attach(self, logdir: Path, callbacks: list, run_config: dict,
               open_run_folder: Callable[[], None] | None = None) -> None:
        """Where to write (the same folder on every rank) and what to save in checkpoints.

        `open_run_folder` (called on every rank) prepares the folder, e.g. saves the run's configs; it is called once
        the first training step (or test batch) has gone through, so that a run that cannot take a step leaves its
        folder as it was. Without it the folder is used at once."""
        self.logdir = Path(logdir)
        self.callbacks = callbacks
        self.run_config = run_config
        self._open_run_folder = open_run_folder
        if open_run_folder is None:
            self.logger = RunLogger(self.logdir, self.config.logger, enabled=self.is_global_zero)

    def _ensure_run_folder(self) -> None:
        """Open the run folder (see `attach`) before the first write into it."""
        if self._open_run_folder is None:
            return
        open_run_folder, self._open_run_folder = self._open_run_folder, None
        open_run_folder()
        self.fabric.barrier()
        self.logger = RunLogger(self.logdir, self.config.logger, enabled=self.is_global_zero)

    @property
    def sharded(self) -> bool:
        return isinstance(self.fabric.strategy, FSDPStrategy)

    @property
    def channels_last(self) -> bool:
        """trainer.channels_last, which takes effect on CUDA only (CPU kernels gain nothing from it)."""
        return self.config.channels_last and self.fabric.device.type == "cuda"

    def _to_layout(self, batch):
        return batch_to_channels_last(batch) if self.channels_last else batch

    def _setup(self, model: torch.nn.Module):
        if self.fabric.device.type == "cpu" and self.config.precision not in ("32", "32-true", "64", "64-true"):
            warning = cpu_bf16.warn_if_unsound(model)
            if warning and self.is_global_zero:
                tqdm.write(warning)
        if self.channels_last:
            model_to_channels_last(model)
        if self.sharded:  # FSDP: optimizers must see the wrapped (sharded) parameters
            module = self.fabric.setup_module(model)
            optimizers, schedulers = _as_optimizers(model.configure_optimizers())
            optimizers = [self.fabric.setup_optimizers(opt) for opt in optimizers]
        else:
            optimizers, schedulers = _as_optimizers(model.configure_optimizers())
            if isinstance(self.fabric.strategy, DDPStrategy) and len(optimizers) > 1:
                # Each optimizer's step leaves the other's parameters without gradients.
                self.fabric.strategy._ddp_kwargs.setdefault("find_unused_parameters", True)
            module, *optimizers = self.fabric.setup(model, *optimizers)
        self._mark_forward_methods(module, model)
        self.raw_model, self.module = model, module
        if self.config.cuda_graph:
            self._graph_networks(model, optimizers)
        return module, optimizers, schedulers

    def _graph_networks(self, model: torch.nn.Module, optimizers: list) -> None:
        """trainer.cuda_graph: the model's `cuda_graph_modules()` (name -> module) capture on their first training
        call (ldm/engine/cuda_graph.py). Single-process CUDA runs only; elsewhere a notice, and eager.
        trainer.bf16_weight_copies: the weights they cast read from copies their optimizers write."""
        hook = optional_hook(model, "cuda_graph_modules")
        if hook is None:
            raise ConfigError(f"trainer.cuda_graph: {type(model).__name__} has no cuda_graph_modules() naming the "
                              f"networks to capture")
        if self.fabric.world_size > 1 or self.sharded:
            raise ConfigError(f"trainer.cuda_graph: single-process runs only (this run has "
                              f"{self.fabric.world_size} processes, strategy {self.config.strategy!r})")
        if self.fabric.device.type != "cuda":
            tqdm.write(f"trainer.cuda_graph: no effect on {self.fabric.device.type} (CUDA only); running eagerly")
            return
        copies = self._weight_copies(optimizers) if self.config.bf16_weight_copies else None
        for name, network in hook().items():
            graph_training_forward(network, name, weight_copies=copies)

    def _weight_copies(self, optimizers: list):
        """trainer.bf16_weight_copies: working copies kept by each optimizer that can (ldm/engine/weight_copies.py);
        the parameters of one that cannot keep autocast's casts, with a notice."""
        owners = []
        for index, optimizer in enumerate(optimizers):
            raw = getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper -> the model's optimizer
            problem = weight_copies.unsupported(raw)
            if problem is None:
                owners.append(weight_copies.WeightCopies(raw))
            elif self.is_global_zero:
                tqdm.write(f"trainer.bf16_weight_copies: optimizer {index}'s weights keep autocast's casts: {problem}")
        return weight_copies.copies_from(owners)

    @staticmethod
    def _mark_forward_methods(module, model) -> None:
        """Route `log_images` through the strategy wrapper too (FSDP gathers weights there)."""
        if hasattr(model, "log_images"):
            module.mark_forward_method("log_images")

    # --------------------------------------------------------------------------------------- checkpoints
    def _model_and_optimizer_states(self, optimizers) -> tuple[dict, list]:
        """Full (unsharded) states; under FSDP every rank must call this, rank 0 gets the tensors on CPU."""
        if not self.sharded:
            return self.raw_model.state_dict(), [opt.state_dict() for opt in optimizers]
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        wrapped = self.module._forward_module
        return (get_model_state_dict(wrapped, options=options),
                [get_optimizer_state_dict(wrapped, opt.optimizer, options=options) for opt in optimizers])

    @property
    def sharded_checkpoints(self) -> bool:
        """trainer.strategy's state_dict_type: sharded, under FSDP (ldm/engine/sharded.py)."""
        options = fsdp_options(self.config.strategy)
        return self.sharded and options is not None and options.state_dict_type == "sharded"

    def _weights_state(self, optimizers) -> dict:
        """Model and optimizer states: whole, or with sharded checkpoints each rank's shards written into a folder
        beside the checkpoint file, which names it. Every rank calls this."""
        if not self.sharded_checkpoints:
            model_state, optimizer_states = self._model_and_optimizer_states(optimizers)
            return {"state_dict": model_state, "optimizer_states": optimizer_states}
        folder = sharded.shard_folder_name(self.global_step)
        sharded.save_shards(self.fabric, self.logdir / "checkpoints" / folder, self.module, optimizers)
        return {sharded.SHARDS_KEY: folder}

    def state(self, optimizers, schedulers) -> dict:
        return {
            **self._weights_state(optimizers),
            "lr_schedulers": [s.state_dict() for s in schedulers],
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": self._rng_states(),
            "seed": self.seed,  # data order and augmentation seeds derive from it: a resumed run must keep it
            "precision": self.fabric.strategy.precision.state_dict(),  # the fp16 grad scaler, if any
            "best": self.best.state_dict(),
            "config": self.run_config,
        }

    def _rng_states(self, gather: bool = True) -> list[dict]:
        """Every rank's RNG state, in rank order (each rank draws its own noise)."""
        local = ckpt.capture_rng_state()
        if not gather or self.fabric.world_size == 1:
            return [local]
        states: list = [None] * self.fabric.world_size
        torch.distributed.all_gather_object(states, local)
        return states

    def save_checkpoint(self, optimizers, schedulers, as_step: bool = True, as_best: bool = False) -> None:
        """Save the state as `step=N.ckpt` + `last.ckpt` (rotating) and/or as `best.ckpt`; every rank calls this.

        Never saves non-finite weights (the guard's unread flag is read first), and during a streak of skipped steps
        rotation keeps the last step file saved before it."""
        self.guard.check_weights()
        state = self.state(optimizers, schedulers)
        if self.is_global_zero:
            directory = self.logdir / "checkpoints"
            path = None
            if as_step:
                in_streak = self.guard.bad_in_a_row > 0
                keep = [self.last_good_checkpoint] if in_streak and self.last_good_checkpoint is not None else []
                path = ckpt.save_rotating(state, directory, self.global_step, self.config.checkpoint.keep_last_k,
                                          keep=keep)
                if not in_streak:
                    self.last_good_checkpoint = path
                self.saved_checkpoint = directory / ckpt.LAST
                tqdm.write(f"saved checkpoint {path}")
            if as_best:
                best = ckpt.save_best(state, directory, same_as=path)
                self.logger.log_scalars({f"best/{self.best.key}": self.best.value}, self.global_step)
                tqdm.write(f"best {self.best.key}={self.best.value:.6g} at step {self.global_step}: saved {best}")
            self._save_beside([path, directory / ckpt.LAST] if as_step else [])
            self._save_beside([directory / ckpt.BEST] if as_best else [])
            if self.sharded_checkpoints:  # the shards of the checkpoint files rotation deleted
                sharded.remove_unreferenced(directory)
        self.fabric.barrier()

    def _save_beside(self, checkpoints: list) -> None:
        """The model's files beside each checkpoint file just written (its `save_beside_checkpoint` hook)."""
        hook = optional_hook(self.raw_model, "save_beside_checkpoint")
        for checkpoint in checkpoints if hook is not None else []:
            hook(checkpoint)

    def weights_loaded_from(self, path: str | Path, checkpoint: dict) -> None:
        """The model's weights come from `checkpoint`, read from `path`: `test` reports them as such (until `fit`
        saves anew)."""
        self.saved_checkpoint = Path(path)
        self.global_step = int(checkpoint.get("global_step", 0))

    def _track_best(self, model, resumed: dict | None) -> None:
        """Which validation key picks best.ckpt, and its best value so far: the resumed checkpoint's record or, if
        better, that of the run's best.ckpt (saved after the checkpoint resumed from when the run was killed)."""
        self.best = BestRecord(monitored_key(model, self.config.checkpoint.monitor), self.config.checkpoint.mode)
        if not self.best.enabled:
            return
        records = [resumed.get("best") if resumed is not None else None]
        on_disk = self.logdir / "checkpoints" / ckpt.BEST if self.logdir is not None else None
        if self.is_global_zero and on_disk is not None and on_disk.is_file():
            try:
                records.append(ckpt.saved_entry(on_disk, "best"))
            except ckpt.CheckpointError as err:
                tqdm.write(f"{err}; the next best validation replaces it")
        records = self.fabric.broadcast(records, src=0)  # every rank must decide alike when to save
        for record in records:
            notice = self.best.load_state_dict(record)
            if notice and self.is_global_zero:
                tqdm.write(notice)

    def _restore(self, checkpoint: dict, optimizers, schedulers) -> None:
        if len(checkpoint.get("optimizer_states", [])) != len(optimizers):
            raise ckpt.CheckpointError(f"checkpoint has {len(checkpoint.get('optimizer_states', []))} optimizer "
                                       f"states, the model configures {len(optimizers)}")
        for optimizer, state in zip(optimizers, checkpoint["optimizer_states"]):
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(self.module._forward_module, optimizer.optimizer, state,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(state)
        for scheduler, state in zip(schedulers, checkpoint.get("lr_schedulers", [])):
            scheduler.load_state_dict(state)
        if self.is_global_zero:  # what the next step uses: the saved optimizer's, not the config's
            rates = ", ".join(f"{optimizer.param_groups[0]['lr']:.2e}" for optimizer in optimizers)
            tqdm.write(f"resume: learning rate {rates} (restored with the optimizer and scheduler states)")
        self.global_step = int(checkpoint["global_step"])
        self.epoch = int(checkpoint["epoch"])
        self.batch_in_epoch = int(checkpoint.get("batch_in_epoch", 0))
        if "seed" in checkpoint and int(checkpoint["seed"]) != self.seed:
            tqdm.write(f"resume: using the checkpoint's seed {checkpoint['seed']} (not {self.seed}) so that the data "
                       f"order and augmentations continue as they were")
            self.seed = int(checkpoint["seed"])
        self.fabric.strategy.precision.load_state_dict(checkpoint.get("precision", {}))
        rng = checkpoint.get("rng", [])
        if len(rng) == self.fabric.world_size:
            ckpt.restore_rng_state(rng[self.fabric.global_rank])
        else:
            tqdm.write(f"resume: the checkpoint holds RNG states of {len(rng)} rank(s), this run has "
                       f"{self.fabric.world_size}; reseeding (noise will differ from an uninterrupted run)")
            self._seed_rank()

    # -------------------------------------------------------------------------------------------- training
    @contextmanager
    def _only_optimizing(self, optimizers, index: int):
        """With several optimizers, freeze the others' parameters for this step (their gradients are not wanted)."""
        if len(optimizers) == 1:
            yield
            return
        others = {id(p): p for i, o in enumerate(optimizers) if i != index for g in o.param_groups for p in g["params"]}
        mine = {id(p) for g in optimizers[index].param_groups for p in g["params"]}
        frozen = [p for key, p in others.items() if key not in mine and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _seed_rank(self) -> None:
        """After set-up (all ranks hold the same weights), let each rank draw its own noise."""
        torch.manual_seed(self.seed + 1000003 * self.fabric.global_rank + self.global_step)

    @property
    def _scaler(self):
        return getattr(self.fabric.strategy.precision, "scaler", None)

    def _max_steps_reached(self) -> bool:
        return 0 <= self.config.max_steps <= self.global_step

    def fit(self, model: torch.nn.Module, datamodule, resume: dict | None = None) -> None:
        """Train until max_steps / max_epochs; resume from a loaded checkpoint dict when given."""
        cfg = self.config
        if resume is not None:
            ckpt.load_model_state(model, resume["state_dict"], "the checkpoint to resume from")
        module, optimizers, schedulers = self._setup(model)
        self.pending: list[list[tuple]] = [[] for _ in optimizers]  # (loss, scalars) of the step's micro-batches
        if resume is not None:
            self._restore(resume, optimizers, schedulers)
            resumed_file = self.logdir / "checkpoints" / f"step={self.global_step}.ckpt" if self.logdir else None
            self.last_good_checkpoint = resumed_file if resumed_file is not None and resumed_file.is_file() else None
        else:
            self._seed_rank()
        self.start_step = self.global_step
        self._track_best(model, resume)

        prepare_training_data = optional_hook(model, "prepare_training_data")
        if prepare_training_data is not None:  # e.g. a latent cache, encoded on the device the model now lives on
            prepare_training_data(datamodule, self.fabric)
        loader = datamodule.dataloader("train", self.fabric.global_rank, self.fabric.world_size, self.seed,
                                       drop_last=False)
        sampler = loader.sampler
        loader = self.fabric.setup_dataloaders(loader, use_distributed_sampler=False)
        val_loader = None
        if datamodule.has("validation"):
            val_loader = self.fabric.setup_dataloaders(
                datamodule.dataloader("validation", self.fabric.global_rank, self.fabric.world_size, self.seed),
                use_distributed_sampler=False)
        elif self.best.enabled and self.is_global_zero:
            tqdm.write(f"monitor {self.best.key}: the data section has no 'validation' split, no best.ckpt is kept")

        batches_per_epoch = math.ceil(len(sampler.shard()) / datamodule.batch_size)
        if cfg.limit_train_batches > 0:
            batches_per_epoch = min(batches_per_epoch, cfg.limit_train_batches)
        flags = self.flags or PreemptionFlags().install()
        flags.stage = TRAINING
        progress = tqdm(total=cfg.max_steps if cfg.max_steps > 0 else None, initial=self.global_step,
                        disable=not self.is_global_zero, desc="train", dynamic_ncols=True)
        module.train()
        try:
            self._train_epochs(module, optimizers, schedulers, loader, sampler, datamodule.batch_size, val_loader,
                               batches_per_epoch, flags, progress)
        except (NonFiniteLossError, SystemExit):
            raise
        except BaseException:
            self._save_after_exception(optimizers, schedulers)
            raise
        finally:
            flags.stage = "the end of training"
            if flags is not self.flags:
                flags.uninstall()
            progress.close()

    def _save_after_exception(self, optimizers, schedulers) -> None:
        """Keep what was learnt: the state after the last complete optimizer step is consistent, save it.

        Not when the exception came between two optimizers' steps of one global step (a GAN's generator stepped,
        its discriminator not), nor under FSDP (gathering needs every rank, which may be gone)."""
        path = self.logdir / "checkpoints" / ckpt.LAST if self.logdir is not None else None
        if not self.is_global_zero or path is None or self.global_step == self.start_step:
            return  # nothing learnt here: the checkpoint on disk (if any) holds this very state, or a newer one
        unread = self.guard.take_weights_flag()
        weights_bad = unread is not None and float(unread[1]) != 1.0
        if self.mid_step or self.sharded or weights_bad:
            why = "mid-step" if self.mid_step else "sharded model" if self.sharded else "non-finite weights"
            tqdm.write(f"exception at step {self.global_step}: {path} left as it was ({why})")
            return
        state = self.state(optimizers, schedulers) | {"rng": self._rng_states(gather=False)}
        try:
            ckpt.atomic_torch_save(state, path)
            self._save_beside([path])
        except OSError as err:  # e.g. the disk that failed the run is full: report the run's own error, not this
            tqdm.write(f"exception at step {self.global_step}: {path} left as it was ({err})")
            return
        tqdm.write(f"exception: saved {path} at step {self.global_step}")

    def _train_epochs(self, module, optimizers, schedulers, loader, sampler, batch_size: int, val_loader,
                      batches_per_epoch: int, flags, progress) -> None:
        cfg = self.config
        accumulate = cfg.accumulate_grad_batches
        first_step = None  # this process's first optimizer step: None before it starts, True while it runs
        while not self._max_steps_reached() and (cfg.max_epochs < 0 or self.epoch < cfg.max_epochs):
            sampler.begin_epoch(self.epoch, start=self.batch_in_epoch * batch_size)
            epoch_start = time.perf_counter()
            step_start = time.perf_counter()
            micro = 0
            for batch_idx, batch in enumerate(loader, start=self.batch_in_epoch):
                if batch_idx >= batches_per_epoch:
                    break
                if micro == 0:  # the loader's share of this optimizer step: waiting for its first batch
                    data_wait = time.perf_counter() - step_start
                batch = self._to_layout(batch)
                if isinstance(batch, dict) and SKIPPED_READS in batch:  # summed on the device: no wait for it here
                    skipped = batch[SKIPPED_READS].sum()
                    self.skipped_reads = skipped if self.skipped_reads is None else self.skipped_reads + skipped
                if first_step is None:
                    first_step = self._announce_first_step()
                boundary = micro == accumulate - 1 or batch_idx == batches_per_epoch - 1
                scalars = self._micro_step(module, optimizers, schedulers, batch, batch_idx, accumulate, boundary)
                micro += 1
                if not boundary:
                    continue
                micro = 0
                self._ensure_run_folder()
                self.global_step += 1
                self.batch_in_epoch = batch_idx + 1
                hook = optional_hook(self.raw_model, "on_train_batch_end")
                if hook is not None:
                    hook(batch, batch_idx)
                for callback in self.callbacks:
                    if hasattr(callback, "on_train_batch_end"):
                        callback.on_train_batch_end(self, batch, batch_idx)
                rate = 1.0 / max(time.perf_counter() - step_start, 1e-9)
                step_start = time.perf_counter()
                if first_step:
                    first_step = False
                    if self.is_global_zero:
                        tqdm.write(f"first step: {1.0 / rate:.1f} s (the later ones: perf/steps_per_s)")
                self._log_step(scalars, optimizers, rate, data_wait, progress)
                improved = False
                if val_loader is not None and cfg.val_check_interval > 0 and \
                        self.global_step % cfg.val_check_interval == 0:
                    improved = self.best.update(self.validate(module, val_loader), self.global_step)
                save_now, exit_now = self._signalled(flags)
                save_now = save_now or self.global_step % cfg.checkpoint.every_n_steps == 0 or \
                    self._max_steps_reached()
                if save_now or improved:
                    self.save_checkpoint(optimizers, schedulers, as_step=save_now, as_best=improved)
                if save_now:
                    flags.clear_save()
                if exit_now:
                    tqdm.write(f"SIGTERM: checkpoint saved at step {self.global_step}, exiting")
                    raise SystemExit(0)
                if self._max_steps_reached():
                    return
            self._end_epoch(epoch_start)
            improved = False
            if val_loader is not None and cfg.val_check_interval <= 0:
                improved = self.best.update(self.validate(module, val_loader), self.global_step)
            self.epoch += 1
            self.batch_in_epoch = 0  # saved after these two: a resume starts the next epoch
            last_epoch = cfg.max_epochs >= 0 and self.epoch >= cfg.max_epochs
            if last_epoch or improved:
                self.save_checkpoint(optimizers, schedulers, as_step=last_epoch, as_best=improved)

    def _announce_first_step(self) -> bool:
        """Say why the first step may take minutes on a GPU (silence looks like a hang); returns True."""
        if self.is_global_zero and self.fabric.device.type == "cuda":
            work = ["Triton compiles its kernels"] + (["cuDNN times every convolution shape (trainer.benchmark)"]
                                                      if self.config.benchmark else [])
            if self.config.cuda_graph:
                work.append("the CUDA graphs are captured")
            tqdm.write(f"first step: {', '.join(work)}; with 3D volumes this can take minutes")
        return True

    def _signalled(self, flags) -> tuple[bool, bool]:
        """(save, exit) requested on any rank; one snapshot of both flags, one collective (none in one process)."""
        exit_requested = flags.exit_requested  # read once: a SIGTERM between two reads must not exit unsaved
        save_requested = flags.save_requested or exit_requested
        if self.fabric.world_size == 1:
            return save_requested, exit_requested
        requested = torch.tensor([save_requested, exit_requested], dtype=torch.float32, device=self.fabric.device)
        requested = self.fabric.all_reduce(requested, reduce_op="max") * self.fabric.world_size
        return bool(requested[0] > 0), bool(requested[1] > 0)

    def _micro_step(self, module, optimizers, schedulers, batch, batch_idx: int, accumulate: int,
                    boundary: bool) -> dict:
        """Forward and backward of one batch for every optimizer; optimizer steps on accumulation boundaries.

        Forward and backward do not wait for the GPU: the losses are checked at the optimizer step, with the
        gradients. A non-finite loss in any micro-batch skips that optimizer's whole step (no partial step on the
        others)."""
        logged: dict = {}
        problems: list[str] = []
        for index, optimizer in enumerate(optimizers):
            self.raw_model.global_step = self.global_step
            with self._only_optimizing(optimizers, index):
                with self.fabric.no_backward_sync(module, enabled=not boundary):
                    loss, scalars = module.training_step(batch, batch_idx, index)
                    self.fabric.backward(loss / accumulate)
                self.pending[index].append((loss.detach(), scalars))
                if boundary:
                    problems += self._optimizer_step(module, optimizer, index, schedulers, logged)
        if boundary:
            self.mid_step = False
            self.guard.end_step(self.global_step, problems)
        return logged

    def _optimizer_step(self, module, optimizer, index: int, schedulers, logged: dict) -> list[str]:
        """Check the step's losses (every micro-batch) and gradients, then clip and step, or skip a bad step; returns
        what was not finite (empty for a good step).

        One read from the GPU per step: the finiteness flag (all-reduced: every rank decides alike), the gradient
        norm, the logged scalars and whether the previous step wrote finite weights, together. Under the fp16 grad
        scaler the losses are read first and the gradients unscaled (clipped) only on a good step; the scaler itself
        skips steps whose gradients overflowed."""
        pending, self.pending[index] = self.pending[index], []
        losses_finite = torch.isfinite(torch.stack([loss.float().reshape(()) for loss, _ in pending])).all()
        clip, norm = self.config.gradient_clip_val, None
        if self._scaler is None:
            norm = (self.fabric.clip_gradients(module, optimizer, max_norm=clip, error_if_nonfinite=False) if clip > 0
                    else gradient_norm(p for group in optimizer.param_groups for p in group["params"]))
            finite = self.guard.agreed(losses_finite & torch.isfinite(norm).to(losses_finite.device))
        else:  # the gradients are still scaled: unscale them (clipping does) only on a good step
            finite = self.guard.agreed(losses_finite)
            if clip > 0 and bool(finite):
                norm = self.fabric.clip_gradients(module, optimizer, max_norm=clip, error_if_nonfinite=False)
        unread = self.guard.take_weights_flag()
        weights = [unread[1]] if unread is not None else []
        finite, norm, *rest = _read_together([finite, norm] + weights + [loss for loss, _ in pending]
                                             + [v for _, scalars in pending for v in scalars.values()])
        if unread is not None:
            self.guard.judge_weights(unread[0], rest.pop(0))
        losses, values = rest[:len(pending)], iter(rest[len(pending):])
        per_batch = [{name: next(values) for name in scalars} for _, scalars in pending]  # each micro-batch's terms
        logged.update(per_batch[-1])
        if norm is not None:
            logged[f"train/grad_norm_{index}"] = norm
        problems = []
        if finite != 1.0:  # a NaN loss's gradients are NaN too: name the loss, not its consequence
            problems = [describe_loss(loss, terms, index) for loss, terms in zip(losses, per_batch)
                        if not math.isfinite(loss)]
            if not problems:
                problems = [f"gradient norm of optimizer {index} = {norm:.4g}" if norm is not None and not
                            math.isfinite(norm) else f"another rank's loss or gradients of optimizer {index}"]
        else:
            self.mid_step = True
            optimizer.step()  # with fp16 the scaler skips steps whose gradients overflowed
            self.guard.watch_weights(self.global_step,
                                     weights_finite(p for group in optimizer.param_groups for p in group["params"]))
            if index < len(schedulers):
                schedulers[index].step()
        optimizer.zero_grad(set_to_none=True)
        return problems

    def _log_step(self, scalars: dict, optimizers, rate: float, data_wait: float, progress) -> None:
        lrs = {f"lr/optimizer_{i}": opt.param_groups[0]["lr"] for i, opt in enumerate(optimizers)}
        self.logger.log_scalars(lrs, self.global_step)
        if self.global_step % max(self.config.log_every_n_steps, 1) == 0:
            perf = {"perf/steps_per_s": rate, "perf/data_wait_s": data_wait, "epoch": self.epoch}
            if self.skipped_reads is not None:
                perf["data/skipped_reads"] = self.skipped_reads
            if self.fabric.device.type == "cuda":
                perf.update(cuda_memory_scalars())
            self.logger.log_scalars({**scalars, **perf}, self.global_step)
        loss_keys = [k for k in scalars if k.endswith("loss")][:2]
        progress.set_postfix({k.split("/")[-1]: f"{scalars[k]:.4g}" for k in loss_keys} | {"it/s": f"{rate:.2f}"},
                             refresh=False)
        progress.update(1)

    def _end_epoch(self, epoch_start: float) -> None:
        stats = {"perf/epoch_time_s": time.perf_counter() - epoch_start}
        self.logger.log_scalars(stats, self.global_step)
        if self.is_global_zero:
            tqdm.write(f"epoch {self.epoch}: " + ", ".join(f"{k.split('/')[-1]}={v:.3g}" for k, v in stats.items()))

    # ----------------------------------------------------------------------------------- validation / test
    def _shared_batches(self, loader, limit: int, desc: str | None = None):
        """(batch_idx, batch, rows) over this rank's share of an evaluation loader, at most `limit` batches (< 0: all):
        the batch without its padding rows (`padding_rows`: items another rank holds) and how many rows are left. A
        batch of padding alone comes whole with rows 0, to be run (every rank takes part in as many collectives) and
        its results dropped. `desc`: a progress bar on rank 0."""
        total = len(loader) if limit < 0 else min(limit, len(loader))
        batches = tqdm(loader, total=total, desc=desc, disable=desc is None or not self.is_global_zero)
        for batch_idx, batch in enumerate(batches):
            if batch_idx >= total:
                break
            batch = self._to_layout(batch)
            padding = padding_rows(loader.sampler, loader.batch_size, batch_idx, batch_size_of(batch))
            keep = [row for row, padded in enumerate(padding) if not padded]
            if keep and len(keep) < len(padding):
                batch = kept_rows(batch, keep)
            yield batch_idx, batch, len(keep)

    @torch.no_grad()
    def validate(self, module, val_loader) -> dict:
        """`validation_step` scalars averaged over the (limited) validation set, logged as val/: each rank runs its
        share of the batches, each item counts once (a batch's scalars weigh as many rows as it holds), and the
        weighted sums are reduced over ranks."""
        module.eval()
        sums: dict[str, torch.Tensor] = {}
        rows_seen = 0
        for batch_idx, batch, rows in self._shared_batches(val_loader, self.config.limit_val_batches):
            scalars = module.validation_step(batch, batch_idx)
            for key, value in scalars.items():
                sums[key] = sums.get(key, 0.0) + rows * torch.as_tensor(value, dtype=torch.float64).detach().cpu()
            rows_seen += rows
            for callback in self.callbacks:
                if hasattr(callback, "on_validation_batch_end"):
                    callback.on_validation_batch_end(self, batch, batch_idx)
        keys = list(sums)
        totals = torch.tensor([float(rows_seen)] + [float(sums[key]) for key in keys], dtype=torch.float64)
        if self.fabric.world_size > 1 and keys:
            totals = self.fabric.all_reduce(totals.to(self.fabric.device), reduce_op="sum").cpu()
        means = {key if key.startswith("val/") else f"val/{key}": float(total / max(float(totals[0]), 1.0))
                 for key, total in zip(keys, totals[1:])}
        self.logger.log_scalars(means, self.global_step)
        if self.is_global_zero and means:
            tqdm.write(f"validation @ step {self.global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in means.items()))
        module.train()
        return means

    @torch.no_grad()
    def test(self, model: torch.nn.Module, datamodule) -> list[Path]:
        """Run `test_step` over the test split and save what it returns under `images/test/`; with the model's
        `test_evaluator()`, write its metrics to `metrics/test.json` and log them as `test/<name>`, both at
        `global_step` and naming `saved_checkpoint` (see `weights_loaded_from`)."""
        if self.raw_model is not model:
            if self.channels_last:
                model_to_channels_last(model)
            self.raw_model, self.module = model, self.fabric.setup_module(model)
            self._mark_forward_methods(self.module, model)
        module = self.module
        loader = self.fabric.setup_dataloaders(
            datamodule.dataloader("test", self.fabric.global_rank, self.fabric.world_size, self.seed),
            use_distributed_sampler=False)
        module.eval()
        evaluator = test_evaluator_of(model)
        written: list[Path] = []
        for batch_idx, batch, rows in self._shared_batches(loader, self.config.limit_test_batches, desc="test"):
            images = module.test_step(batch, batch_idx)
            self._ensure_run_folder()
            if rows == 0:  # another rank's items: run for the collectives only
                continue
            if evaluator is not None:
                evaluator.update(batch, images)
            affines, affine_shape = batch_affines(batch)
            written += save_images(images, self.logdir / "images" / "test",
                                   f"b-{batch_idx:04d}_r-{self.fabric.global_rank}", nifti=True, affines=affines,
                                   affine_shape=affine_shape)
        if self.is_global_zero:
            tqdm.write(f"test: wrote {len(written)} files to {self.logdir / 'images' / 'test'} (rank 0)")
        if evaluator is not None:
            metrics = computed_metrics(evaluator)  # on every rank: compute() may sync across ranks
            if self.is_global_zero:
                report_test_metrics(metrics, self.logdir / TEST_METRICS, self.logger, self.global_step,
                                    self.saved_checkpoint)
        return written
