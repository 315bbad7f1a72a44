"""trainer.strategy / trainer.timeout_s -> Fabric strategies, checked without launching processes.

FSDP cannot run on CPU here (Fabric refuses it off GPU, and torch's FullyShardedDataParallel needs an accelerator), so
its wrap and activation-checkpointing policies are applied to our networks directly: the policy's choice of units,
and the checkpointed UNet's outputs and gradients against the plain one.
"""
from datetime import timedelta

import pytest
import torch
from lightning.fabric.plugins.precision.fsdp import FSDPPrecision
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from ldm.engine.config import fabric_kwargs, trainer_config_from
from ldm.modules.diffusionmodules.model import Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import ConfigError


def tiny_unet() -> UNetModel:
    return UNetModel(image_size=8, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=(1, 2), num_heads=2, use_spatial_transformer=True,
                     context_dim=4, attention_backend="math")


def strategy_of(**trainer) -> object:
    return fabric_kwargs(trainer_config_from({"accelerator": "cuda", "max_steps": 1, **trainer}))["strategy"]


def test_fsdp_wraps_the_unet_and_autoencoder_blocks():
    strategy = strategy_of(strategy="fsdp")
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    policy = strategy._fsdp_kwargs["auto_wrap_policy"]
    for network, blocks in ((tiny_unet(), {"ResBlock": 8, "SpatialTransformer": 4}),
                            (Encoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[4], in_channels=1,
                                     resolution=8, z_channels=2, norm_num_groups=4), {"ResnetBlock": 4,
                                                                                      "AttentionBlock": 2})):
        # one unit per block: input 2 + middle 2 + output 4 ResBlocks, a SpatialTransformer at ds 2 in each; the
        # encoder: one ResnetBlock per level + 2 in the middle, attention at resolution 4 and in the middle
        units = set(policy._run_policy(network, set(), -1))
        counted = {}
        for unit in units:  # (FSDP wraps the root itself: embeddings, in/out convolutions)
            counted[type(unit).__name__] = counted.get(type(unit).__name__, 0) + 1
        assert counted == blocks


def test_activation_checkpointing_wraps_the_blocks_and_keeps_outputs_and_gradients():
    strategy = strategy_of(strategy={"name": "fsdp", "activation_checkpointing": True})
    torch.manual_seed(0)
    plain, checkpointed = tiny_unet(), tiny_unet()
    checkpointed.load_state_dict(plain.state_dict())
    _setup_activation_checkpointing(checkpointed, strategy._activation_checkpointing_kwargs)
    wrapped = [type(m._checkpoint_wrapped_module).__name__ for m in checkpointed.modules()
               if isinstance(m, CheckpointWrapper)]
    assert sorted(set(wrapped)) == ["ResBlock", "SpatialTransformer"] and len(wrapped) == 12
    x, t, context = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.randn(2, 3, 4)
    outputs = [network(x, t, context=context) for network in (plain, checkpointed)]
    torch.testing.assert_close(outputs[1], outputs[0])
    for output in outputs:
        output.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert strategy_of(strategy="fsdp")._activation_checkpointing_kwargs == {}


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16),
                                              ("32-true", torch.float32)])
def test_fsdp_mixed_precision_follows_trainer_precision(precision, dtype):
    """Fabric builds FSDP's precision plugin from trainer.precision; its MixedPrecision is what FSDP receives."""
    config = FSDPPrecision(trainer_config_from({"max_steps": 1, "precision": precision}).precision) \
        .mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (dtype, dtype, dtype)


def test_fsdp_options_reach_the_strategy():
    strategy = strategy_of(strategy={"name": "fsdp", "state_dict_type": "sharded", "sharding_strategy": "SHARD_GRAD_OP",
                                     "cpu_offload": True})
    assert strategy._state_dict_type == "sharded"
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP" and strategy.cpu_offload.offload_params


@pytest.mark.parametrize("name, cls", [("ddp", DDPStrategy), ("fsdp", FSDPStrategy)])
def test_timeout_reaches_the_process_group(name, cls):
    strategy = strategy_of(strategy=name, timeout_s=90)
    assert isinstance(strategy, cls) and strategy._timeout == timedelta(seconds=90)
    assert strategy_of(strategy="ddp") == "ddp"  # no timeout: Fabric's own strategy and default


@pytest.mark.parametrize("trainer, culprit", [
    ({"strategy": "deepspeed"}, "'deepspeed' is not one of auto, ddp, fsdp"),
    ({"strategy": {"name": "fsdp", "activation_checkpoint": True}}, "unknown FSDP option.*'activation_checkpoint'"),
    ({"strategy": {"name": "ddp", "state_dict_type": "sharded"}}, "are FSDP's"),
    ({"strategy": {"name": "fsdp", "state_dict_type": "local"}}, "state_dict_type: 'local'"),
    ({"strategy": "auto", "timeout_s": 60}, "timeout_s: set for strategy 'auto'"),
    ({"strategy": "ddp", "timeout_s": -1}, "timeout_s: expected a positive number"),
    ({"strategy": "fsdp", "accelerator": "cpu"}, "fsdp runs on CUDA GPUs only"),
])
def test_bad_strategy_options_name_the_culprit(trainer, culprit):
    with pytest.raises(ConfigError, match=culprit):
        trainer_config_from({"max_steps": 1, **trainer})
