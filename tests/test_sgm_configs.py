"""configs/sgm: SDXL base and BraTS EDM build at full size (meta device) with the promised sizes and routes; the tiny
3D EDM config trains through the CLI and sample.py draws from it."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import torch
from torch import nn

from ldm.cli import load_config, main, model_config_for
from ldm.modules.conditioner import GeneralConditioner
from ldm.modules.embedders import ClassEmbedder
from ldm.sample_cli import main as sample_main
from ldm.util import instantiate_from_config
from tests.engine.helpers import only_run_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sgm"
SDXL_UNET_PARAMETERS = 2_567_463_684  # diffusers' UNet2DConditionModel of the SDXL base (tests/modules)
BRATS_UNET_PARAMETERS = 169_336_196   # the UNet of configs/latent-diffusion/brats_mask_concat_3d.yaml


class PooledStandIn(nn.Module):
    """Stands in for OpenCLIP ViT-bigG: labels (B,) -> (tokens (B, 1, width), pooled (B, width))."""

    def __init__(self, width: int):
        super().__init__()
        self.embedder = ClassEmbedder(width, n_classes=4)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.embedder(labels)
        return pooled[:, None], pooled


def sdxl_with_stand_ins():
    """sdxl_base.yaml with its two text encoders replaced by embedders of their output widths."""
    config = load_config([str(CONFIGS / "sdxl_base.yaml")], [])
    models = config.model.params.conditioner_config.params.emb_models
    models[0].target, models[0].params = "ldm.modules.embedders.ClassEmbedder", {
        "embed_dim": 768, "n_classes": 4, "add_sequence_dim": True}
    models[1].target, models[1].params = "tests.test_sgm_configs.PooledStandIn", {"width": 1280}
    return config


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_base_builds_at_full_size_and_routes_as_sgm():
    config = sdxl_with_stand_ins()
    with torch.device("meta"):
        model = instantiate_from_config(model_config_for(config.model, training=True))
    assert count(model.model.diffusion_model) == SDXL_UNET_PARAMETERS
    assert model.scale_factor == 0.13025 and model.disable_first_stage_autocast
    conditioner = instantiate_from_config(config.model.params.conditioner_config)
    assert isinstance(conditioner, GeneralConditioner)
    batch = {"txt": torch.tensor([0, 3]), "original_size_as_tuple": torch.tensor([[1024, 1024], [768, 1344]]),
             "crop_coords_top_left": torch.tensor([[0, 0], [16, 8]]),
             "target_size_as_tuple": torch.tensor([[1024, 1024], [1024, 1024]])}
    out = conditioner(batch)
    unet = model.model.diffusion_model
    assert out["crossattn"].shape == (2, 1, 2048) and out["crossattn"].shape[2] == unet.context_dim
    assert out["vector"].shape == (2, 2816) and out["vector"].shape[1] == unet.adm_in_channels
    c, uc = conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=conditioner.dropped_keys)
    assert bool((uc["crossattn"] == 0).all()) and bool((uc["vector"][:, :1280] == 0).all())
    torch.testing.assert_close(uc["vector"][:, 1280:], c["vector"][:, 1280:])  # size embeddings are never dropped


def test_sdxl_base_text_encoders_are_named_when_missing():
    from ldm.util import ConfigError
    config = load_config([str(CONFIGS / "sdxl_base.yaml")], [])
    with pytest.raises(ConfigError, match="FrozenCLIPEmbedder"):
        instantiate_from_config(config.model.params.conditioner_config)


def test_edm_brats_3d_builds_at_full_size():
    config = load_config([str(CONFIGS / "edm_brats_3d.yaml")],
                         ["model.params.scale_factor=0.9", "model.params.first_stage_config.params.ckpt_path=null"])
    with torch.device("meta"):
        model = instantiate_from_config(model_config_for(config.model, training=True))
    assert count(model.model.diffusion_model) == BRATS_UNET_PARAMETERS
    assert model.latent_shape == (4, 32, 32, 32) and model.sampler.num_steps == 25
    assert model.conditioner.dropped_keys == ["mask"]


def test_edm_mni152_3d_trains_and_samples(tmp_path):
    fast = ["trainer.max_steps=2", "trainer.logger=[csv]", "data.params.num_workers=0", "data.params.batch_size=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "model.params.sampler_config.params.num_steps=2",
            "trainer.callbacks.image_logger.params.batch_frequency=100"]
    assert main("ldm", ["-b", str(CONFIGS / "edm_mni152_3d.yaml"), "-t", "-l", str(tmp_path / "logs"), *fast]) == 0
    run = only_run_dir(tmp_path / "logs")
    assert list((run / "images" / "test").glob("samples_*.nii.gz"))
    outdir = tmp_path / "samples"
    assert sample_main(["-r", str(run), "--cond", "split:test", "--n_samples", "2", "--sampler", "heun",
                        "--steps", "2", "--scale", "1.5", "--outdir", str(outdir)]) == 0
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["sampler"]["name"] == "heun" and manifest["conditioning"]["keys"] == ["mask"]
    assert nib.load(outdir / "sample_0000.nii.gz").shape == (32, 32, 32)
    assert nib.load(outdir / "sample_0000_mask.nii.gz").shape[:3] == (32, 32, 32)
    # the written masks condition a second round, as sample.py --cond <folder>
    assert sample_main(["-r", str(run), "--cond", str(outdir), "--n_samples", "1", "--sampler", "dpmpp_2m",
                        "--steps", "2", "--outdir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "sample_0000.nii.gz").is_file()
