"""Original CompVis latent-diffusion / stable-diffusion configs run as written: their `lightning` section and model
options are translated (ldm/engine/original_config.py), their `ldm.modules.encoders.modules` targets resolve, and a
UNet with their plain self-attention blocks takes their weights (ldm/convert/unet.py). The fixtures under
tests/fixtures/original_configs/ keep every key of the originals; only sizes, data and checkpoint paths differ."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from ldm.cli import load_config, main as train_main, model_config_for
from ldm.convert.unet import export_state, infer_config, load_unet, state_to_ours
from ldm.engine.config import trainer_config_from
from ldm.engine.original_config import LIGHTNING_DEFAULT_MAX_EPOCHS, port_lightning
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel
from ldm.sample_cli import main as sample_main
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config

FIXTURES = Path(__file__).parent / "fixtures" / "original_configs"

pytestmark = pytest.mark.usefixtures("single_thread")


def fixture(name: str) -> str:
    return str(FIXTURES / f"{name}.yaml")


# ----------------------------------------------------------------------------------------------- lightning section
def test_lightning_trainer_keys_are_translated():
    lightning = {
        "trainer": {"benchmark": True, "gpus": "0,1,", "precision": 16, "num_sanity_val_steps": 0,
                    "val_check_interval": 1.0, "limit_val_batches": 1.0, "accumulate_grad_batches": 2},
        "modelcheckpoint": {"params": {"monitor": "val/loss", "mode": "min", "every_n_train_steps": 500,
                                       "save_last": True}},
        "callbacks": {
            "image_logger": {"target": "main.ImageLogger",
                             "params": {"batch_frequency": 750, "max_images": 8, "enable_autocast": False,
                                        "log_images_kwargs": {"N": 4}}},
            "learning_rate_logger": {"target": "main.LearningRateMonitor", "params": {"logging_interval": "step"}},
        },
        "find_unused_parameters": False,
    }
    trainer, notices = port_lightning(lightning)
    assert trainer == {
        "benchmark": True, "accelerator": "cuda", "devices": [0, 1], "precision": "16-mixed", "val_check_interval": 0,
        "limit_val_batches": -1, "accumulate_grad_batches": 2,
        "callbacks": {"image_logger": {"target": "main.ImageLogger",
                                       "params": {"batch_frequency": 750, "max_images": 4}}},
        "checkpoint": {"monitor": "val/loss", "mode": "min", "every_n_steps": 500}}
    for key in ("num_sanity_val_steps", "enable_autocast", "learning_rate_logger", "save_last",
                "find_unused_parameters"):
        assert sum(key in line for line in notices) == 1, key
    trainer_config_from({**trainer, "max_steps": 10})  # a valid trainer section of ours


@pytest.mark.parametrize("trainer, expected", [
    ({"devices": "0,"}, {"devices": [0]}),
    ({"devices": "2"}, {"devices": 2}),
    ({"gpus": 0}, {"accelerator": "cpu", "devices": 1}),
    ({"gpus": 2}, {"accelerator": "cuda", "devices": 2}),
    ({"accelerator": "ddp"}, {"strategy": "ddp"}),
    ({"precision": "bf16"}, {"precision": "bf16-mixed"}),
    ({"precision": 32}, {"precision": "32"}),
])
def test_lightning_device_and_precision_values(trainer, expected):
    assert port_lightning({"trainer": trainer})[0] == expected


def test_metrics_over_trainsteps_checkpoint_keeps_every_step_file():
    trainer, notices = port_lightning({"callbacks": {"metrics_over_trainsteps_checkpoint": {
        "params": {"every_n_train_steps": 2000}}}})
    assert trainer == {"checkpoint": {"every_n_steps": 2000, "keep_last_k": 0}}
    assert trainer_config_from({**trainer, "max_steps": 1}).checkpoint.keep_last_k == 0
    default, _ = port_lightning({"callbacks": {"metrics_over_trainsteps_checkpoint": None}})
    assert default["checkpoint"] == {"every_n_steps": 10000, "keep_last_k": 0}  # the original main.py's


def test_every_refused_key_of_the_section_is_reported_at_once_with_what_to_use():
    lightning = {"trainer": {"resume_from_checkpoint": "a.ckpt", "val_check_interval": 0.25, "gpu": 1,
                             "precision": "half"},
                 "modelcheckpoint": {"params": {"dirpath": "ckpts", "save_top_k": 3}},
                 "callbacks": {"image_logger": {"target": "main.ImageLogger", "params": {
                     "batch_frequency": 5, "log_images_kwargs": {"ddim_steps": 50, "quantize_denoised": True}}}},
                 "logger": {"target": "x"}}
    with pytest.raises(ConfigError) as caught:
        port_lightning(lightning)
    lines = str(caught.value).splitlines()
    assert lines[0] == "lightning: 9 keys of the original config cannot be ported:"
    expected = {
        "lightning.trainer.resume_from_checkpoint": "-r/--resume",
        "lightning.trainer.val_check_interval": "give a number of batches",
        "lightning.trainer.gpu": "ours are",
        "lightning.trainer.precision": "use one of",
        "lightning.modelcheckpoint.params.dirpath": "-l/--logdir",
        "lightning.modelcheckpoint.params.save_top_k": "use 1, or -1",
        "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps": "model.params.log_sampler_steps",
        "lightning.callbacks.image_logger.params.log_images_kwargs.quantize_denoised": "use N or max_images",
        "lightning.logger": "trainer.logger",
    }
    assert len(lines) == 1 + len(expected)
    for key, instead in expected.items():
        line = next(line for line in lines if line.strip().startswith(key + ":"))
        assert instead in line, line


def test_an_original_config_without_a_run_length_trains_for_lightnings_default(capsys):
    config = load_config([fixture("cin-ldm-vq-f8")], [])
    assert config.trainer.max_epochs == LIGHTNING_DEFAULT_MAX_EPOCHS
    assert f"max_epochs: {LIGHTNING_DEFAULT_MAX_EPOCHS}" in capsys.readouterr().out
    assert config.trainer.callbacks.image_logger.target == "main.ImageLogger"
    assert trainer_config_from(config.trainer).benchmark is True
    config = load_config([fixture("cin-ldm-vq-f8")], ["trainer.max_steps=3"])
    assert config.trainer.max_steps == 3 and "max_epochs" not in config.trainer


def test_a_model_zoo_config_without_lightning_section_gets_lightnings_default_too(tmp_path):
    zoo = OmegaConf.load(fixture("cin-ldm-vq-f8"))  # models/ldm/*/config.yaml: model and data only
    zoo.pop("lightning")
    OmegaConf.save(zoo, tmp_path / "config.yaml")
    assert load_config([str(tmp_path / "config.yaml")], []).trainer == {"max_epochs": LIGHTNING_DEFAULT_MAX_EPOCHS}


def test_an_original_training_config_runs_with_train_ldm(tmp_path):
    code = train_main("train", ["--base", fixture("cin-ldm-vq-f8"), "-t", "--no-test", "-l", str(tmp_path),
                                "trainer.max_steps=1", "trainer.logger=[csv]"])
    assert code == 0
    assert len(list(tmp_path.glob("*_cin-ldm-vq-f8/checkpoints/last.ckpt"))) == 1


# ---------------------------------------------------------------------------------------------------- model section
def test_encoders_modules_targets_resolve_to_ours():
    from ldm.modules.encoders import ClassEmbedder
    from ldm.modules.text_encoders import FrozenCLIPEmbedder

    assert get_obj_from_str("ldm.modules.encoders.modules.ClassEmbedder") is ClassEmbedder
    assert get_obj_from_str("ldm.modules.encoders.modules.FrozenCLIPEmbedder") is FrozenCLIPEmbedder
    with pytest.raises(ConfigError, match=r"cond_stage_config.target: 'ldm.modules.encoders.modules.BERTEmbedder' "
                                          r".*not available here; use ldm.modules.encoders.modules.FrozenCLIPEmb"):
        get_obj_from_str("ldm.modules.encoders.modules.BERTEmbedder", "cond_stage_config.target")


def test_spatial_rescaler_interpolates_then_maps_channels():
    rescaler = instantiate_from_config({"target": "ldm.modules.encoders.modules.SpatialRescaler", "params": {
        "n_stages": 2, "in_channels": 5, "out_channels": 3}})  # semantic_synthesis256's, shrunk
    x = torch.randn(2, 5, 16, 12)
    quarter = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    expected = torch.einsum("oc,bchw->bohw", rescaler.channel_mapper.weight[:, :, 0, 0], quarter)
    torch.testing.assert_close(rescaler(x), expected)
    volume = instantiate_from_config({"target": "ldm.modules.encoders.SpatialRescaler",
                                      "params": {"in_channels": 2, "dims": 3}})
    x = torch.randn(1, 2, 4, 8, 8)
    torch.testing.assert_close(volume(x), F.interpolate(x, scale_factor=0.5, mode="trilinear"))


def test_class_embedder_key_becomes_the_cond_stage_key(tmp_path):
    config = load_config([fixture("cin256-v2")], [])
    params = config.model.params
    assert params.cond_stage_key == "class_label" and "key" not in params.cond_stage_config.params
    # The original's default key is 'class': the labels then came from batch['class'].
    without_key = OmegaConf.load(fixture("cin256-v2"))
    without_key.model.params.cond_stage_config.params.pop("key")
    OmegaConf.save(without_key, tmp_path / "without_key.yaml")
    config = load_config([str(tmp_path / "without_key.yaml")], [])
    assert config.model.params.cond_stage_key == "class"
    with pytest.raises(ConfigError, match=r"cond_stage_key: 'label' with the original ClassEmbedder"):
        load_config([fixture("cin256-v2")], ["model.params.cond_stage_key=label"])


def test_unused_unet_image_size_of_an_inference_config_is_the_models(capsys):
    config = load_config([fixture("v1-inference")], [])
    assert config.model.params.unet_config.params.image_size == config.model.params.image_size == 64
    assert "unet_config.params.image_size: 32 -> 64" in capsys.readouterr().out
    assert "trainer" not in config and "data" not in config  # an inference config needs neither


def test_concat_mode_and_unreached_attention_resolutions():
    config = load_config([fixture("lsun_churches-ldm-kl-8")], [])
    assert list(config.model.params.unet_config.params.attention_resolutions) == [1, 2]
    model = instantiate_from_config(model_config_for(config.model, training=True))
    assert model.conditioning_key is None  # concat_mode is ignored for an unconditional model

    def conditioning_key(concat_mode, conditioning_key=None):
        overrides = [f"model.params.concat_mode={concat_mode}", "model.params.cond_stage_key=image",
                     "model.params.cond_stage_config={target: torch.nn.Identity}"]
        if conditioning_key:
            overrides.append(f"model.params.conditioning_key={conditioning_key}")
        params = load_config([fixture("lsun_churches-ldm-kl-8")], overrides).model.params
        return type(model)._conditioning_key_of(params.concat_mode, params.get("conditioning_key"),
                                                params.cond_stage_config)

    assert conditioning_key(True) == "concat"
    assert conditioning_key(False) == "crossattn"
    assert conditioning_key(True, "concat") == "concat"
    with pytest.raises(ValueError, match=r"concat_mode: true contradicts conditioning_key 'crossattn'"):
        conditioning_key(True, "crossattn")


def test_an_inference_config_without_data_samples(tmp_path):
    config = load_config([fixture("cin256-v2")], [])
    torch.manual_seed(0)
    model = instantiate_from_config(model_config_for(config.model, training=False))
    checkpoint = tmp_path / "weights" / "model.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, checkpoint)
    outdir = tmp_path / "samples"
    code = sample_main(["-r", str(checkpoint), "-c", fixture("cin256-v2"), "--cond", "labels:3", "--steps", "2",
                        "--device", "cpu", "--outdir", str(outdir)])
    assert code == 0
    assert (outdir / "sample_0000.png").is_file()


# ------------------------------------------------------------------------------------- plain self-attention weights
def _celebahq_unet(**sizes) -> dict:
    """unet_config.params of configs/latent-diffusion/celebahq-ldm-vq-4.yaml, with `sizes` replacing some."""
    return {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
            "num_head_channels": 32, **sizes}


def test_full_size_celebahq_unet_has_the_originals_parameter_count():
    with torch.device("meta"):
        unet = UNetModel(**_celebahq_unet())
    # 274.06M as the original's (its q/k/v biases included: without them 274.02M)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == 274.06
    attention = [m for m in unet.modules() if isinstance(m, AttentionBlock)]
    assert all(m.attn.to_q.bias is not None for m in attention)


def _legacy_attention_block(x, tensors, name, heads):
    """The original AttentionBlock from its formulas: GroupNorm(32), 1x1 conv to qkv, heads laid out as
    [q_h, k_h, v_h] per head, softmax(q k^T / sqrt(d)) v, 1x1 conv proj_out, residual."""
    b, c, *spatial = x.shape
    h = F.group_norm(x, 32, tensors[f"{name}.norm.weight"], tensors[f"{name}.norm.bias"], eps=1e-5)
    qkv = F.conv1d(h.reshape(b, c, -1), tensors[f"{name}.qkv.weight"], tensors[f"{name}.qkv.bias"])
    q, k, v = qkv.reshape(b * heads, 3 * c // heads, -1).split(c // heads, dim=1)
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(c // heads), dim=-1)
    a = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, -1)
    out = F.conv1d(a, tensors[f"{name}.proj_out.weight"], tensors[f"{name}.proj_out.bias"])
    return x + out.reshape(x.shape)


def test_plain_attention_unet_round_trips_through_the_compvis_layout(tmp_path):
    torch.manual_seed(0)
    unet = UNetModel(**_celebahq_unet(image_size=8, model_channels=32, attention_resolutions=[2, 1],
                                      num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16))
    for parameter in unet.parameters():  # the zero-initialised outputs too, so that every tensor matters
        torch.nn.init.normal_(parameter, std=0.2)
    theirs = export_state(unet, "compvis")
    assert theirs["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)
    assert theirs["middle_block.1.proj_out.weight"].shape == (64, 64, 1)
    back = state_to_ours(unet, theirs, "compvis", "", "test")
    assert back.keys() == unet.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in unet.state_dict().items())

    block = unet.middle_block[1]  # 64 channels, 4 heads
    x = torch.randn(2, 64, 2, 2)
    torch.testing.assert_close(block(x), _legacy_attention_block(x, theirs, "middle_block.1", heads=4),
                               atol=1e-5, rtol=1e-5)

    path = tmp_path / "unet.pt"
    torch.save({f"model.diffusion_model.{key}": value for key, value in theirs.items()}, path)
    with pytest.raises(Exception, match=r"plain self-attention block .*give num_heads or num_head_channels"):
        infer_config(theirs, "compvis")
    loaded = load_unet(path, num_head_channels=16)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(loaded(x, t), unet(x, t), atol=0, rtol=0)
