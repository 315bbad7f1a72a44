"""`trainer.strategy` and `trainer.timeout_s` as a Fabric strategy.

    strategy: auto                  # Fabric decides: ddp on more than one device
    strategy: ddp
    strategy: fsdp                  # FSDP with the defaults below
    strategy:
      name: fsdp
      activation_checkpointing: true   # recompute the wrapped blocks' activations in backward
      state_dict_type: sharded         # full: one file gathered on rank 0; sharded: a folder of per-rank shards
      sharding_strategy: FULL_SHARD    # or SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD
      cpu_offload: false

FSDP wraps (and, when asked, checkpoints) each of the networks' blocks: the UNet's `ResBlock`, `AttentionBlock` and
`SpatialTransformer`, the autoencoder's `ResnetBlock` and `AttentionBlock`. Its mixed precision follows
`trainer.precision` (Fabric's FSDP precision plugin: bf16-mixed keeps fp32 master weights and computes in bf16).
`timeout_s` bounds every collective of the process group (a rank that hangs ends the run after it); null keeps
torch's default (30 minutes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from torch import nn

from ldm.util import ConfigError

NAMES = ("auto", "ddp", "fsdp", "single_device")
STATE_DICT_TYPES = ("full", "sharded")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


@dataclass(frozen=True)
class FSDPOptions:
    activation_checkpointing: bool = False
    state_dict_type: str = "full"
    sharding_strategy: str = "FULL_SHARD"
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.state_dict_type not in STATE_DICT_TYPES:
            raise ConfigError(f"trainer.strategy.state_dict_type: {self.state_dict_type!r} is not one of "
                              f"{', '.join(STATE_DICT_TYPES)}")
        if self.sharding_strategy not in SHARDING_STRATEGIES:
            raise ConfigError(f"trainer.strategy.sharding_strategy: {self.sharding_strategy!r} is not one of "
                              f"{', '.join(SHARDING_STRATEGIES)}")
        for name in ("activation_checkpointing", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"trainer.strategy.{name}: expected true or false, got {getattr(self, name)!r}")


def strategy_name(strategy: Any) -> str:
    """The strategy's name from `trainer.strategy` (a name or a mapping with `name`); unknown ones raise."""
    name = strategy.get("name") if isinstance(strategy, dict) else strategy
    if name not in NAMES:
        raise ConfigError(f"trainer.strategy: {name!r} is not one of {', '.join(NAMES)} (or a mapping with "
                          f"name: fsdp and FSDP options)")
    return name


def fsdp_options(strategy: Any) -> FSDPOptions | None:
    """The FSDP options of `trainer.strategy` (None for other strategies); unknown keys raise naming them."""
    if strategy_name(strategy) != "fsdp":
        if isinstance(strategy, dict) and set(strategy) != {"name"}:
            raise ConfigError(f"trainer.strategy: options {sorted(set(strategy) - {'name'})} are FSDP's; strategy "
                              f"{strategy['name']!r} takes none")
        return None
    values = {key: value for key, value in strategy.items() if key != "name"} if isinstance(strategy, dict) else {}
    known = [field.name for field in dataclasses.fields(FSDPOptions)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"trainer.strategy: unknown FSDP option(s) {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(known)})")
    return FSDPOptions(**values)


def wrapped_block_classes() -> set[type[nn.Module]]:
    """The block classes FSDP wraps as units (and checkpoints with `activation_checkpointing`)."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.model import AttentionBlock as AutoencoderAttention
    from ldm.modules.diffusionmodules.model import ResnetBlock
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, ResBlock

    return {ResBlock, AttentionBlock, SpatialTransformer, ResnetBlock, AutoencoderAttention}


def check_strategy(strategy: Any, timeout_s: Any, accelerator: str) -> None:
    """Raise ConfigError naming the key for options that cannot work together (before any process starts)."""
    fsdp_options(strategy)
    if strategy_name(strategy) == "fsdp" and accelerator == "cpu":
        raise ConfigError("trainer.strategy: fsdp runs on CUDA GPUs only (Fabric and torch's FSDP refuse the CPU); "
                          "use ddp with accelerator: cpu")
    check_timeout(timeout_s, strategy)


def check_timeout(timeout_s: Any, strategy: Any) -> None:
    if timeout_s is None:
        return
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ConfigError(f"trainer.timeout_s: expected a positive number of seconds or null, got {timeout_s!r}")
    if strategy_name(strategy) not in ("ddp", "fsdp"):
        raise ConfigError(f"trainer.timeout_s: set for strategy {strategy_name(strategy)!r}; it applies to a process "
                          f"group, so name the strategy (ddp or fsdp)")


def fabric_strategy(strategy: Any, timeout_s: float | None = None) -> Any:
    """What Fabric's `strategy=` gets: the name itself, or a DDPStrategy / FSDPStrategy carrying the options."""
    name = strategy_name(strategy)
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if name == "ddp" and timeout:
        from lightning.fabric.strategies import DDPStrategy
        return DDPStrategy(**timeout)
    options = fsdp_options(strategy)
    if options is None:
        return name
    from lightning.fabric.strategies import FSDPStrategy
    blocks = wrapped_block_classes()
    # use_orig_params: the optimizers see the model's own parameters (names, per-group settings stay ours).
    return FSDPStrategy(auto_wrap_policy=blocks,
                        activation_checkpointing_policy=blocks if options.activation_checkpointing else None,
                        state_dict_type=options.state_dict_type, sharding_strategy=options.sharding_strategy,
                        cpu_offload=options.cpu_offload, use_orig_params=True, **timeout)
