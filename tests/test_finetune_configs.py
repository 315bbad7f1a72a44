"""configs/finetune: each config's networks build at full size (meta device) as the architectures diffusers' published
configs give (their weights convert into them key for key; sdxl_lora's LoRA is the one peft puts on diffusers' UNet),
the whole model section builds with small networks and text-encoder stand-ins of the pretrained widths, the SDXL
conditioner turns CaptionedImages batches into the UNet's inputs, and absent weights fail in one line naming what is
missing and how to fetch it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import load_config, model_config_for
from ldm.convert import unet as convert_unet
from ldm.convert import vae as convert_vae
from ldm.engine.checkpoint import CheckpointError
from ldm.modules.lora import add_lora, lora_options
from ldm.util import ConfigError, instantiate_from_config

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                 upcast_attention=True, sample_size=96)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
                 transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                 block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2)
CASES = {"sd15.yaml": SD15_UNET, "sd21_v.yaml": SD21_UNET, "sdxl_base.yaml": SDXL_UNET, "sdxl_lora.yaml": SDXL_UNET}


def tiny_text(width: int, pooled: int | None = None) -> dict:
    """A random CLIP text model of the pretrained one's output width (one layer)."""
    config = {"hidden_size": width, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {**config, "projection_dim": pooled} if pooled else config


def with_stand_ins(config, weights: bool = True, text: bool = True):
    """`config` without weight files (weights) and with text encoders of the pretrained ones' widths (text)."""
    params = config.model.params
    if weights:
        params.ckpt_path = None
    if text and "conditioner_config" in params:
        models = params.conditioner_config.params.emb_models
        models[0].params.text_config, models[1].params.text_config = tiny_text(768), tiny_text(1280, pooled=1280)
    elif text:
        params.cond_stage_config.params.text_config = tiny_text(768 if params.unet_config.params.context_dim == 768
                                                                else 1024)
    return config


def load(name: str):
    return load_config([str(CONFIGS / name)], ["data.params.train.params.root=unused"])


def diffusers_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in module.state_dict().items()}


def networks(config):
    """(UNet config, first-stage config) of a LatentDiffusion or DiffusionEngine model section."""
    params = config.model.params
    return (params.network_config if "network_config" in params else params.unet_config), params.first_stage_config


@pytest.mark.parametrize("name", list(CASES))
def test_networks_are_the_published_architectures(name):
    config = load(name)
    unet_config, first_stage_config = networks(config)
    with torch.device("meta"):
        unet = instantiate_from_config(unet_config)
        first_stage = instantiate_from_config(first_stage_config)
        theirs_unet = diffusers.UNet2DConditionModel(**CASES[name])
        theirs_vae = diffusers.AutoencoderKL(**SD_VAE)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in theirs_unet.parameters())
    # diffusers' full-size weights go into the configured networks key for key (names and shapes checked)
    assert len(convert_unet.state_to_ours(unet, diffusers_state(theirs_unet), "diffusers", "", name)) == \
        len(unet.state_dict())
    assert len(convert_vae.state_to_ours(first_stage, diffusers_state(theirs_vae), "diffusers", "", name)) == \
        len(first_stage.state_dict())
    assert unet.use_checkpoint and config.trainer.precision == "bf16-mixed"
    lora_config = config.model.params.get("lora_config")
    if lora_config is not None:  # the same LoRA as peft puts on diffusers' UNet for these targets
        from peft import LoraConfig, inject_adapter_in_model

        options = lora_options(lora_config)
        add_lora(unet, options["rank"], options["alpha"], options["target_modules"])
        targets = [t if t != "to_out" else "to_out.0" for t in options["target_modules"]]
        inject_adapter_in_model(LoraConfig(r=options["rank"], lora_alpha=options["alpha"], target_modules=targets),
                                theirs_unet)
        ours_lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
        assert ours_lora == sum(p.numel() for n, p in theirs_unet.named_parameters() if "lora_" in n) > 0


def shrunk(config):
    """The model section with small networks of the same kind (channels, depths), for building on the CPU."""
    unet_config, first_stage_config = networks(config)
    unet_config.params.model_channels = 32
    if unet_config.params.get("num_head_channels", -1) != -1:
        unet_config.params.num_head_channels = 16
    if not isinstance(unet_config.params.transformer_depth, int):
        unet_config.params.transformer_depth = [1] * len(unet_config.params.channel_mult)
    first_stage_config.params.ddconfig.update(ch=32, ch_mult=[1, 2])
    return config


@pytest.mark.parametrize("name", list(CASES))
def test_model_section_builds_with_small_networks(name):
    config = shrunk(with_stand_ins(load(name)))
    model = instantiate_from_config(model_config_for(config.model, training=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if name == "sdxl_lora.yaml":
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert model.lora["save_layout"] == "kohya"
    else:
        assert trainable and not any("lora_" in n for n in trainable)
    if name == "sd21_v.yaml":
        assert model.parameterization == "v" and model.cond_stage_model.layer == "penultimate"
    if name.startswith("sdxl"):
        assert model.conditioner.dropped_keys and model.optimizer_config["target"] == "torch.optim.AdamW"
    else:  # the noise schedule and the test sampler's timesteps as the pipeline's scheduler config sets them
        scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, set_alpha_to_one=False, clip_sample=False)
        torch.testing.assert_close(model.diffusion.betas.float(), scheduler.betas, rtol=1e-6, atol=0)
        scheduler.set_timesteps(50)
        assert model.test_timesteps.tolist() == scheduler.timesteps.tolist()
        assert model.sampler_options.get("set_alpha_to_one") is False


def test_sdxl_conditioner_gives_the_unet_inputs_from_captioned_images(tmp_path):
    from ldm.data.captions import CaptionedImages
    from torch.utils.data import DataLoader

    for i, (h, w) in enumerate([(40, 56), (64, 48)]):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"picture {i}")
    config = with_stand_ins(load("sdxl_base.yaml"))
    conditioner = instantiate_from_config(config.model.params.conditioner_config)
    data = config.data.params.train.params
    batch = next(iter(DataLoader(CaptionedImages(str(tmp_path), size=32, flip=data.flip), batch_size=2)))
    with torch.no_grad():
        out = conditioner(batch)
    network = config.model.params.network_config.params
    assert out["crossattn"].shape == (2, 77, network.context_dim)
    assert out["vector"].shape == (2, network.adm_in_channels)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variable in ("SD15_PATH", "SD21_PATH", "SDXL_PATH"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("name, repo", [("sd15.yaml", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                        ("sd21_v.yaml", "stabilityai/stable-diffusion-2-1"),
                                        ("sdxl_base.yaml", "stabilityai/stable-diffusion-xl-base-1.0"),
                                        ("sdxl_lora.yaml", "stabilityai/stable-diffusion-xl-base-1.0")])
def test_absent_weights_fail_in_one_line_naming_them_and_how_to_fetch_them(name, repo, empty_hub_cache):
    config = shrunk(load(name))
    with pytest.raises(ConfigError) as text_encoder:
        instantiate_from_config(model_config_for(config.model, training=True))
    message = str(text_encoder.value)
    assert f"'{repo}'" in message and f"hf download {repo}" in message and "\n" not in message
    # the text encoders found (here: stand-ins), the UNet and VAE of ckpt_path are next
    config = shrunk(with_stand_ins(load(name), weights=False))
    with pytest.raises(CheckpointError) as weights:
        instantiate_from_config(model_config_for(config.model, training=True))
    message = str(weights.value)
    assert f"checkpoint {repo} does not exist" in message and f"hf download {repo}" in message
    assert "\n" not in message


def test_env_variable_names_the_weights_folder(monkeypatch, tmp_path, empty_hub_cache):
    monkeypatch.setenv("SD15_PATH", str(tmp_path / "sd15"))
    config = shrunk(with_stand_ins(load("sd15.yaml"), weights=False))
    assert config.model.params.cond_stage_config.params.version == str(tmp_path / "sd15")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'sd15'} does not "
                                                                    f"exist; ckpt_path takes"):
        instantiate_from_config(model_config_for(config.model, training=True))
