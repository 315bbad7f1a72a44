"""The `trainer` config section: a strict dataclass (a misspelt key is an error) and its mapping onto Fabric."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.engine.strategy import check_strategy, fabric_strategy
from ldm.util import ConfigError

MONITOR_MODES = ("min", "max")
PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000   # also saved at the end of training and on SIGUSR1/SIGTERM/exceptions
    keep_last_k: int = 3        # step=N.ckpt files kept besides last.ckpt and best.ckpt; <= 0 keeps all
    monitor: str | None = None  # validation key picking best.ckpt; null: the model's `monitor` (engine/monitor.py)
    mode: str = "min"           # min: lower is better; max: higher is better

    def __post_init__(self) -> None:
        if self.monitor is not None and not isinstance(self.monitor, str):
            raise ConfigError(f"trainer.checkpoint.monitor: expected a validation key such as 'val/loss' or null, "
                              f"got {self.monitor!r}")
        if self.mode not in MONITOR_MODES:
            raise ConfigError(f"trainer.checkpoint.mode: {self.mode!r} is not one of {', '.join(MONITOR_MODES)}")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"        # auto, ddp, fsdp, single_device, or {name: fsdp, ...} (ldm/engine/strategy.py)
    timeout_s: float | None = None  # collectives' timeout of the process group (ddp, fsdp); null: torch's 30 min
    precision: str = "32"
    max_epochs: int = -1          # -1: no epoch limit (max_steps decides)
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    limit_train_batches: int = -1  # batches per epoch; -1 = all
    limit_val_batches: int = -1
    limit_test_batches: int = -1
    val_check_interval: int = 0    # validate every N optimizer steps; 0 = at the end of each epoch
    log_every_n_steps: int = 10
    max_bad_steps: int = 5         # consecutive non-finite losses tolerated (steps skipped) before the run stops
    benchmark: bool = True         # cudnn.benchmark
    channels_last: bool = False    # on CUDA: rank-4/5 weights and batch tensors stored NHWC / NDHWC (memory_format.py)
    cuda_graph: bool = False       # on CUDA: the model's cuda_graph_modules() replay forward + backward as CUDA graphs
    bf16_weight_copies: bool = False  # with cuda_graph, bf16-mixed: graphed weights read from bf16 copies AdamW writes
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    callbacks: dict = field(default_factory=dict)  # name -> {target, params}, e.g. image_logger
    logger: list = field(default_factory=lambda: ["tensorboard", "csv"])

    def __post_init__(self) -> None:
        self.devices = parse_devices(self.devices, "trainer.devices")
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.accumulate_grad_batches < 1:
            raise ConfigError(f"trainer.accumulate_grad_batches: must be >= 1, got {self.accumulate_grad_batches}")
        unknown_loggers = set(self.logger) - {"tensorboard", "csv"}
        if unknown_loggers:
            raise ConfigError(f"trainer.logger: unknown logger(s) {sorted(unknown_loggers)} (known: tensorboard, csv)")
        if self.cuda_graph and self.accumulate_grad_batches > 1:
            raise ConfigError("trainer.cuda_graph: not with accumulate_grad_batches > 1 (a replay overwrites the "
                              "gradients of the previous micro-batch, see ldm/engine/cuda_graph.py); raise the "
                              "batch size or turn cuda_graph off")
        if self.bf16_weight_copies and not (self.cuda_graph and self.precision == "bf16-mixed"):
            raise ConfigError(f"trainer.bf16_weight_copies: needs cuda_graph: true and precision: bf16-mixed (got "
                              f"cuda_graph: {str(self.cuda_graph).lower()}, precision: {self.precision}); the copies "
                              f"stand in for the casts of the graphed networks' weights under bf16 autocast")
        check_strategy(self.strategy, self.timeout_s, self.accelerator)
        if self.max_steps < 0 and self.max_epochs < 0:
            raise ConfigError("trainer: set max_steps or max_epochs (both are -1, the run would never end)")


def parse_devices(value: Any, where: str) -> int | list[int] | str:
    """Lightning's device values: a count, a list of GPU indices, 'auto', or a string of either: '0,' and '0,1' are
    indices, '2' a count, '-1' all."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = text if text == "auto" else [int(p) for p in text.split(",") if p.strip()] if "," in text \
                else int(text)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a device count, 'auto' or GPU indices like '0,1,'") from None
    valid = value == "auto" or (isinstance(value, int) and not isinstance(value, bool)) or \
        (isinstance(value, list) and value and all(isinstance(i, int) and i >= 0 for i in value))
    if not valid:
        raise ConfigError(f"{where}: {value!r} is not a device count, 'auto' or a list of GPU indices")
    return value


def _strict(cls: type, values: dict, where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(names)})")
    kwargs = dict(values)
    for name, value in kwargs.items():
        default = names[name].default
        expected = (int, float) if type(default) is float else type(default)
        if default is not dataclasses.MISSING and default is not None and type(default) in (int, float, bool) \
                and names[name].type != "Any" \
                and (not isinstance(value, expected) or (isinstance(value, bool) and type(default) is not bool)):
            raise ConfigError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
    if isinstance(kwargs.get("checkpoint"), dict):
        kwargs["checkpoint"] = _strict(CheckpointConfig, kwargs["checkpoint"], f"{where}.checkpoint")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def trainer_config_from(section: DictConfig | dict | None) -> TrainerConfig:
    """Parse the `trainer` section; unknown keys and bad values raise ConfigError naming them."""
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section or {})
    return _strict(TrainerConfig, values, "trainer")


def fabric_kwargs(cfg: TrainerConfig) -> dict:
    """Arguments for `lightning.fabric.Fabric` from the trainer section."""
    strategy = fabric_strategy(cfg.strategy, cfg.timeout_s)
    kwargs = dict(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                  strategy=strategy, precision=cfg.precision)
    # Under `fabric run --devices 2 ...` the launcher's flags (LT_* variables) win over the config.
    return {name: value for name, value in kwargs.items() if os.environ.get(f"LT_{name.upper()}") is None}

