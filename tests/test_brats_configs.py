"""The BraTS configs: full-size models build with the intended sizes, and a tiny copy trains end to end.

Full size (no training): configs/autoencoder/brats_kl_f4_3d.yaml and
configs/latent-diffusion/brats_mask_concat_3d.yaml build their models, with the parameter counts and latent shape the
configs promise, and the LDM's UNet equals MONAI's 166.5M DiffusionModelUNet (the UNet bench_models.py compares
against) up to the q/k/v biases. Tiny (crop 16^3, ch 8, model_channels 32, a fake BraTS tree): the AE trains for 2
steps through the CLI with the discriminator active, then the LDM trains on its checkpoint and generates for the test
masks.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import load_config, main, model_config_for
from ldm.data.brats2021 import SEG_LABELS
from ldm.modules.losses import MissingWeightsError
from ldm.util import ConfigError, instantiate_from_config
from tests.data.brats_tree import write_tree
from tests.engine.helpers import load_last, only_run_dir

REPO = Path(__file__).resolve().parents[1]
AE_CONFIG = REPO / "configs" / "autoencoder" / "brats_kl_f4_3d.yaml"
LDM_CONFIG = REPO / "configs" / "latent-diffusion" / "brats_mask_concat_3d.yaml"
SPLITS = ("train", "validation", "test")

# Full-size parameter counts (checked below against MONAI where an equivalent exists).
AE_PARAMETERS = 40_319_784          # encoder, decoder, quant convs: channels 64, 128, 256
DISCRIMINATOR_PARAMETERS = 2_778_017
UNET_PARAMETERS = 169_336_196       # in 8 (latent 4 + mask 4), channels 128, 256, 512, scale-shift norm
MONAI_UNET_PARAMETERS = 166_498_820  # DiffusionModelUNet(channels=(128, 256, 512), attention (F, T, T), 64-ch heads)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_model(config_file: Path, *overrides: str) -> torch.nn.Module:
    config = load_config([str(config_file)], list(overrides))
    return instantiate_from_config(model_config_for(config.model, training=True))


# ---------------------------------------------------------------------------------------------------- full size
def test_full_size_autoencoder_parameters_and_latent_shape():
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = build_model(AE_CONFIG, "model.params.lossconfig.params.perceptual_weight=0")
        posterior = model.encode(torch.empty(2, 4, 128, 128, 128))
        reconstruction = model.decode(posterior.sample())
    assert count(model) - count(model.loss) == AE_PARAMETERS
    assert count(model.loss.discriminator) == DISCRIMINATOR_PARAMETERS
    assert model.encoder.factor == 4
    assert tuple(posterior.mean.shape) == (2, 4, 32, 32, 32)
    assert tuple(reconstruction.shape) == (2, 4, 128, 128, 128)


def test_full_size_autoencoder_demands_local_vgg_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    with pytest.raises(ConfigError, match=r"model\.params\.lossconfig\.params.*vgg16-397923af\.pth.*"
                                          r"perceptual_weight: 0") as caught:
        with torch.device("meta"):
            build_model(AE_CONFIG)
    assert isinstance(caught.value.__cause__, MissingWeightsError)


def test_full_size_ldm_parameters_and_anchor_architecture():
    from monai.networks.nets import DiffusionModelUNet

    model = build_model(LDM_CONFIG, "model.params.first_stage_config.params.ckpt_path=null")  # CPU: ~2 s, 1.7 GB
    assert count(model.model) == UNET_PARAMETERS
    assert count(model.first_stage_model) == AE_PARAMETERS
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert model.model_ema is not None and torch.isnan(model.scale_factor)  # estimated from the first batch
    unet_params = OmegaConf.to_container(load_config([str(LDM_CONFIG)], []).model.params.unet_config.params)
    with torch.device("meta"):
        out = model.model.to("meta")(torch.empty(4, 8, 32, 32, 32), torch.zeros(4, dtype=torch.long))
        # The anchor's architecture: 4 input channels and no scale-shift (MONAI adds the embedding to h).
        ours = instantiate_from_config({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                        "params": {**unet_params, "in_channels": 4, "use_scale_shift_norm": False}})
        monai = DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=4, channels=(128, 256, 512),
                                   num_res_blocks=2, attention_levels=(False, True, True),
                                   num_head_channels=(0, 64, 64))
    assert tuple(out.shape) == (4, 4, 32, 32, 32)
    assert count(monai) == MONAI_UNET_PARAMETERS
    # q, k, v projections with biases in both (as in the CompVis original), so the counts agree exactly.
    attention_channels = [m.norm.num_channels for m in ours.modules() if type(m).__name__ == "AttentionBlock"]
    assert sorted(attention_channels) == [256] * 5 + [512] * 6  # levels 2-3 (2 down + 3 up each) and the middle
    assert count(monai) == count(ours)


def test_configs_agree_with_each_other():
    """The LDM's first stage is the autoencoder config's model, on the same subject split, in its latent space."""
    ae = load_config([str(AE_CONFIG)], [])
    ldm = load_config([str(LDM_CONFIG)], [])
    ddconfig = ae.model.params.ddconfig
    assert ldm.model.params.first_stage_config.params.ddconfig == ddconfig
    assert ldm.model.params.first_stage_config.params.embed_dim == ae.model.params.embed_dim
    unet = ldm.model.params.unet_config.params
    latent = ddconfig.resolution // 2 ** (len(ddconfig.ch_mult) - 1)
    assert ldm.model.params.image_size == unet.image_size == latent == 32
    assert ldm.model.params.channels == unet.out_channels == ae.model.params.embed_dim
    assert unet.in_channels == ae.model.params.embed_dim + len(SEG_LABELS)  # concat of the one-hot mask
    for split in SPLITS:
        ae_data, ldm_data = ae.data.params[split].params, ldm.data.params[split].params
        assert ae_data.crop_to == ldm_data.crop_to == [ddconfig.resolution] * 3
        assert (ae_data.split_ratios, ae_data.seed) == (ldm_data.split_ratios, ldm_data.seed)


def test_unset_data_root_is_named(tmp_path, capsys):
    """`root: ???` stops the run before its folder exists, with one error line naming the key."""
    code = main("ae", ["-b", str(AE_CONFIG), "-t", "-l", str(tmp_path), "trainer.accelerator=cpu"])
    message = capsys.readouterr().err
    assert code == 2
    assert message.strip().splitlines()[-1] == ("error: data.params.train.params.root: no value (the config leaves it "
                                                "???); set it on the command line, e.g. data.params.train.params.root=...")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------- tiny
def dotlist(prefix: str, values: dict) -> list[str]:
    return [f"{prefix}.{key}={value}" for key, value in values.items()]


def tiny_data(root: Path, batch_size: int) -> list[str]:
    out = [f"data.params.train.params.root={root}", f"data.params.batch_size={batch_size}", "data.params.num_workers=0"]
    for split in SPLITS:
        out.append(f"data.params.{split}.params.crop_to=[16,16,16]")
    return out


TINY_DDCONFIG = {"resolution": 16, "ch": 8, "norm_num_groups": 4}
TINY_TRAINER = ["trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.logger=[csv]",
                "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                "trainer.checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1",
                "trainer.callbacks.image_logger.params.batch_frequency=2"]


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    write_tree(root, count=10, shape=(24, 24, 24))  # 8 / 1 / 1 subjects with the configs' split ratios
    return root


def test_tiny_copies_train_through_the_cli(brats_root, tmp_path):
    ae_args = [
        *dotlist("model.params.ddconfig", TINY_DDCONFIG),
        *dotlist("model.params.lossconfig.params", {"perceptual_weight": 0, "disc_start": 1, "disc_ndf": 8,
                                                    "disc_num_layers": 2}),
        *tiny_data(brats_root, batch_size=1), *TINY_TRAINER,
    ]
    assert main("ae", ["-b", str(AE_CONFIG), "-t", "--no_test", "-l", str(tmp_path / "ae"), *ae_args]) == 0
    ae_run = only_run_dir(tmp_path / "ae")
    assert load_last(ae_run)["global_step"] == 2
    metrics = (ae_run / "metrics.csv").read_text()
    assert "train/disc_loss" in metrics and "val/psnr" in metrics  # discriminator active at step 1; validated
    assert list((ae_run / "images" / "train").glob("*.png"))

    ldm_args = [
        f"model.params.first_stage_config.params.ckpt_path={ae_run / 'checkpoints' / 'last.ckpt'}",
        *dotlist("model.params.first_stage_config.params.ddconfig", TINY_DDCONFIG),
        *dotlist("model.params.unet_config.params", {"image_size": 4, "model_channels": 32}),
        "model.params.image_size=4", "model.params.sampler_steps=2", "model.params.log_sampler_steps=2",
        *tiny_data(brats_root, batch_size=2), *TINY_TRAINER,
    ]
    assert main("ldm", ["-b", str(LDM_CONFIG), "-t", "--no_test", "-l", str(tmp_path / "ldm"), *ldm_args]) == 0
    ldm_run = only_run_dir(tmp_path / "ldm")
    state = load_last(ldm_run)
    assert state["global_step"] == 2
    assert torch.isfinite(state["state_dict"]["scale_factor"])  # estimated from the first batch's latents
    assert main("ldm", ["-r", str(ldm_run)]) == 0  # test stage: samples for the test subject's mask
    samples = sorted((ldm_run / "images" / "test").glob("samples_*.nii.gz"))
    assert samples and nib.load(samples[0]).shape[:3] == (16, 16, 16)
    assert list((ldm_run / "images" / "test").glob("conditioning_*.nii.gz"))
