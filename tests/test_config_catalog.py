"""The config catalogue: every YAML under configs/autoencoder, configs/latent-diffusion and configs/demo.

Each file loads, builds its data section on stand-in data and its model at a tiny size (dotlist overrides shrink
channels and resolution, as a user would on the command line), and takes a training step; LDM configs also sample.
Each LDM config agrees with the autoencoder config whose latent space it trains in (first stage, latent shape,
UNet channels, data split). The twins (VQ / KL, unconditional / mask-conditioned) differ only where they should,
the 2D CompVis autoencoders keep the original layout, and the 2D demo pair runs end to end through the CLI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.cli import load_config, main, model_config_for
from ldm.util import instantiate_from_config
from tests.data.brats_tree import write_tree
from tests.engine.helpers import load_last, only_run_dir

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CATALOG = sorted(path.relative_to(CONFIGS).as_posix() for folder in ("autoencoder", "latent-diffusion", "demo")
                 for path in (CONFIGS / folder).glob("*.yaml"))
SPLITS = ("train", "validation", "test")

#: Each LDM config and the autoencoder config whose checkpoint its first_stage_config loads.
FIRST_STAGE = {
    "demo/ldm_2d.yaml": "demo/ae_2d.yaml",
    "demo/ldm_3d.yaml": "demo/ae_3d.yaml",
    "demo/text_2d.yaml": "demo/ae_2d.yaml",
    "latent-diffusion/brats_mask_concat_3d.yaml": "autoencoder/brats_kl_f4_3d.yaml",
    "latent-diffusion/brats_uncond_3d.yaml": "autoencoder/brats_kl_f4_3d.yaml",
    "latent-diffusion/class_cond_2d.yaml": "autoencoder/kl_f4.yaml",
}
#: The first-stage class an LDM builds from an autoencoder trained as `target`.
FIRST_STAGE_TARGET = {
    "ldm.models.autoencoder.AutoencoderKL": "ldm.models.autoencoder.AutoencoderKL",
    "ldm.models.autoencoder.VQModel": "ldm.models.autoencoder.VQModelInterface",
}
#: The ddconfig keys of CompVis' autoencoder configs: the 2D ports use exactly these.
COMPVIS_DDCONFIG_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                         "num_res_blocks", "attn_resolutions", "dropout"}
STAND_IN_CLASSES = ("cat", "dog", "owl")
#: Data parameters that set which items an autoencoder and its LDM see, and at what size.
SHARED_DATA_KEYS = ("split", "split_ratios", "ratios", "seed", "crop_to", "size", "spacing_mm", "channels",
                    "modalities", "root")


def load(name: str, *overrides: str) -> DictConfig:
    return load_config([str(CONFIGS / name)], list(overrides))


def is_ldm(config: DictConfig) -> bool:
    return "first_stage_config" in config.model.params


def ddconfig_of(config: DictConfig) -> DictConfig:
    params = config.model.params
    return params.first_stage_config.params.ddconfig if is_ldm(config) else params.ddconfig


def down_factor(ddconfig: DictConfig) -> int:
    return 2 ** (len(ddconfig.ch_mult) - 1)


def dataset_params(config: DictConfig, split: str) -> DictConfig:
    return config.data.params[split].params


def plain(node: DictConfig) -> dict:
    """A config node as a dict, interpolations (e.g. a root following a `???` train root) kept as written."""
    return OmegaConf.to_container(node)


@pytest.fixture(scope="module")
def stand_in_roots(tmp_path_factory) -> dict[str, Path]:
    """Folders for the configs whose data root is `???`: a BraTS 2021 tree and class folders of RGB PNGs."""
    brats = tmp_path_factory.mktemp("brats")
    write_tree(brats, count=10, shape=(24, 24, 24))  # 8 / 1 / 1 subjects
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(30):
        path = images / STAND_IN_CLASSES[index % 3] / f"{index:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return {"ldm.data.brats2021.BraTS2021_3D": brats, "ldm.data.image_folder.ImageFolder": images}


def tiny_overrides(config: DictConfig, roots: dict[str, Path]) -> list[str]:
    """Dotlist overrides that shrink `config` to CPU-test size: 8 autoencoder channels, a 32-channel UNet, a latent
    side of 4 (or the UNet's downsampling factor, if larger), data cropped to match, stand-in data roots."""
    params = config.model.params
    prefix = "model.params.first_stage_config.params" if is_ldm(config) else "model.params"
    ddconfig = ddconfig_of(config)
    latent = 4
    out = [f"{prefix}.ddconfig.ch=8", f"{prefix}.ddconfig.norm_num_groups=4"]
    if is_ldm(config):
        unet = params.unet_config.params
        latent = max(latent, 2 ** (len(unet.channel_mult) - 1))
        out += [f"{prefix}.ckpt_path=null", "model.params.unet_config.params.model_channels=32",
                "model.params.unet_config.params.num_head_channels=32", f"model.params.image_size={latent}",
                f"model.params.unet_config.params.image_size={latent}", "model.params.sampler_steps=2"]
        cond_stage = params.cond_stage_config
        if isinstance(cond_stage, DictConfig) and "n_classes" in cond_stage.get("params", {}).keys() \
                and OmegaConf.is_missing(cond_stage.params, "n_classes"):  # `in` alone skips ??? values
            out.append(f"model.params.cond_stage_config.params.n_classes={len(STAND_IN_CLASSES)}")
    else:
        out += [f"{prefix}.lossconfig.params.{key}={value}" for key, value in
                {"perceptual_weight": 0, "disc_start": 0, "disc_ndf": 8, "disc_num_layers": 2}.items()]
    resolution = latent * down_factor(ddconfig)
    out.append(f"{prefix}.ddconfig.resolution={resolution}")
    out += ["data.params.batch_size=2", "data.params.num_workers=0"]
    for split in SPLITS:
        data = dataset_params(config, split)
        if "crop_to" in data:
            out.append(f"data.params.{split}.params.crop_to={[resolution] * len(data.crop_to)}")
        if "size" in data:
            out.append(f"data.params.{split}.params.size={resolution}")
    if OmegaConf.is_missing(dataset_params(config, "train"), "root"):
        out.append(f"data.params.train.params.root={roots[config.data.params.train.target]}")
    return out


def latent_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The autoencoder's deterministic latent of x: the posterior mean (KL) or the quantised code vectors (VQ)."""
    encoded = model.encode(x)
    return encoded[0] if isinstance(encoded, tuple) else encoded.mode()


def test_catalogue_holds_the_documented_configs():
    """The configs the README lists (2D CompVis autoencoders, BraTS 3D, demos), and every LDM config is paired with its
    autoencoder config below."""
    assert {"autoencoder/kl_f4.yaml", "autoencoder/kl_f8.yaml", "autoencoder/vq_f4.yaml",
            "autoencoder/brats_kl_f4_3d.yaml", "autoencoder/brats_vq_f4_3d.yaml", "demo/ae_2d.yaml",
            "demo/ldm_2d.yaml", "latent-diffusion/brats_mask_concat_3d.yaml", "latent-diffusion/brats_uncond_3d.yaml",
            "latent-diffusion/class_cond_2d.yaml"} <= set(CATALOG)
    assert {name for name in CATALOG if is_ldm(load(name))} == set(FIRST_STAGE)


@pytest.mark.parametrize("name", CATALOG)
def test_builds_trains_and_runs_at_tiny_size(name, stand_in_roots):
    config = load(name)
    config = load(name, *tiny_overrides(config, stand_in_roots))
    data = instantiate_from_config(config.data)
    assert all(data.has(split) for split in SPLITS)
    model = instantiate_from_config(model_config_for(config.model, training=True))
    model.learning_rate = 1e-4
    batch = next(iter(data.dataloader("train")))
    optimizers = model.configure_optimizers()
    optimizers = optimizers[0] if isinstance(optimizers, tuple) else optimizers
    model.train()
    for index, optimizer in enumerate(optimizers):
        loss, _ = model.training_step(batch, 0, index)
        assert torch.isfinite(loss), f"{name}: optimizer {index} loss {loss}"
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ddconfig = ddconfig_of(config)
    latent_size = [ddconfig.resolution // down_factor(ddconfig)] * (batch["image"].ndim - 2)
    if is_ldm(config):
        assert tuple(model.get_input(batch).shape) == (2, config.model.params.channels, *latent_size)
        samples = model.test_step(batch, 0)["samples"]  # 2 sampler steps, with guidance where configured
        assert samples.shape == batch["image"].shape and torch.isfinite(samples).all()
    else:
        with torch.no_grad():
            assert tuple(latent_of(model, batch["image"]).shape) == (2, config.model.params.embed_dim, *latent_size)
            assert model(batch["image"])[0].shape == batch["image"].shape


@pytest.mark.parametrize("ldm_name", sorted(FIRST_STAGE))
def test_ldm_config_agrees_with_its_autoencoder_config(ldm_name, stand_in_roots):
    """The first stage is the autoencoder config's model, the UNet works on its latent grid (plus concatenated
    conditioning channels, counted on a data item), and both see the same items at the same size."""
    ae, ldm = load(FIRST_STAGE[ldm_name]), load(ldm_name)
    first_stage, params = ldm.model.params.first_stage_config, ldm.model.params
    unet = params.unet_config.params
    assert first_stage.target == FIRST_STAGE_TARGET[ae.model.target]
    assert first_stage.params.ddconfig == ae.model.params.ddconfig
    assert first_stage.params.embed_dim == ae.model.params.embed_dim
    assert list(first_stage.params.ignore_keys) == ["loss"]
    ddconfig, embed_dim = ae.model.params.ddconfig, ae.model.params.embed_dim
    assert params.image_size == unet.image_size == ddconfig.resolution // down_factor(ddconfig)
    assert params.channels == unet.out_channels == embed_dim

    conditioning = params.get("conditioning_key")
    extra_channels = 0
    if conditioning in ("concat", "hybrid"):
        tiny = load(ldm_name, *tiny_overrides(ldm, stand_in_roots))
        item = instantiate_from_config(tiny.data.params.train)[0]
        extra_channels = item[params.cond_stage_key].shape[0]
    assert unet.in_channels == embed_dim + extra_channels
    if conditioning in ("crossattn", "hybrid"):
        assert unet.use_spatial_transformer
        if "embed_dim" in params.cond_stage_config.get("params", {}):
            assert unet.context_dim == params.cond_stage_config.params.embed_dim
    if conditioning is None:
        assert params.cond_stage_config == "__is_unconditional__"

    for split in SPLITS:
        ae_data, ldm_data = plain(dataset_params(ae, split)), plain(dataset_params(ldm, split))
        assert ae.data.params[split].target == ldm.data.params[split].target
        for key in SHARED_DATA_KEYS:
            assert ae_data.get(key) == ldm_data.get(key), f"data.params.{split}.params.{key}"
        spatial = ae_data.get("crop_to", ae_data.get("size"))
        assert spatial in (ddconfig.resolution, [ddconfig.resolution] * ddconfig.get("dims", 2))


def test_brats_vq_twin_differs_from_the_kl_autoencoder_only_in_the_regulariser():
    kl, vq = load("autoencoder/brats_kl_f4_3d.yaml"), load("autoencoder/brats_vq_f4_3d.yaml")
    assert (kl.model.target, vq.model.target) == ("ldm.models.autoencoder.AutoencoderKL",
                                                  "ldm.models.autoencoder.VQModel")
    assert {**kl.model.params.ddconfig, "double_z": False} == vq.model.params.ddconfig
    assert vq.model.params.embed_dim == kl.model.params.embed_dim
    assert vq.model.params.lossconfig.target == "ldm.modules.losses.VQLPIPSWithDiscriminator"
    assert kl.data == vq.data


def test_brats_unconditional_twin_differs_from_the_mask_concat_ldm_only_in_the_conditioning():
    mask = load("latent-diffusion/brats_mask_concat_3d.yaml")
    uncond = load("latent-diffusion/brats_uncond_3d.yaml")
    assert mask.model.params.first_stage_config == uncond.model.params.first_stage_config
    assert {**mask.model.params.unet_config.params, "in_channels": 4} == uncond.model.params.unet_config.params
    assert uncond.model.params.conditioning_key is None
    for split in SPLITS:
        assert dataset_params(uncond, split).mask == "none"
        assert {**plain(dataset_params(mask, split)), "mask": "none"} == plain(dataset_params(uncond, split))


def test_compvis_2d_autoencoders_keep_the_original_layout():
    """CompVis' ddconfig keys and nothing else; KL-f8 has the parameter count of Stable Diffusion's VAE (the same
    architecture), and VQ-f4 is KL-f4 with a codebook in place of the Gaussian posterior."""
    configs = {name: load(f"autoencoder/{name}.yaml") for name in ("kl_f4", "kl_f8", "vq_f4")}
    for config in configs.values():
        assert set(config.model.params.ddconfig) == COMPVIS_DDCONFIG_KEYS
    with torch.device("meta"):
        kl_f8 = instantiate_from_config(model_config_for(
            load("autoencoder/kl_f8.yaml", "model.params.lossconfig.params.perceptual_weight=0").model, True))
    assert sum(p.numel() for p in kl_f8.parameters()) - sum(p.numel() for p in kl_f8.loss.parameters()) == 83_653_863
    kl_f4, vq_f4 = configs["kl_f4"].model.params, configs["vq_f4"].model.params
    assert {**kl_f4.ddconfig, "double_z": False} == vq_f4.ddconfig
    assert (vq_f4.n_embed, vq_f4.embed_dim) == (8192, kl_f4.embed_dim)
    assert configs["kl_f4"].data == configs["kl_f8"].data == configs["vq_f4"].data


def test_2d_demo_pipeline_runs_through_the_cli(tmp_path):
    """ae_2d trains, ldm_2d trains on its checkpoint, and the test stage writes class-conditional samples."""
    fast = ["trainer.max_steps=2", "trainer.logger=[csv]", "trainer.limit_val_batches=1", "data.params.num_workers=0",
            "data.params.batch_size=4"]
    assert main("ae", ["-b", str(CONFIGS / "demo" / "ae_2d.yaml"), "-t", "--no_test", "-l", str(tmp_path / "ae"),
                       *fast]) == 0
    ae_run = only_run_dir(tmp_path / "ae")
    assert load_last(ae_run)["global_step"] == 2
    ae_checkpoint = ae_run / "checkpoints" / "last.ckpt"
    assert main("ldm", ["-b", str(CONFIGS / "demo" / "ldm_2d.yaml"), "-t", "--no_test", "-l", str(tmp_path / "ldm"),
                        *fast, f"model.params.first_stage_config.params.ckpt_path={ae_checkpoint}",
                        "model.params.sampler_steps=2", "model.params.log_sampler_steps=2"]) == 0
    ldm_run = only_run_dir(tmp_path / "ldm")
    state = load_last(ldm_run)
    assert state["global_step"] == 2
    assert any(key.startswith("cond_stage_model.") for key in state["state_dict"])  # the trained class embedder
    assert main("ldm", ["-r", str(ldm_run)]) == 0  # test stage: one batch of samples for the test items' labels
    samples = sorted((ldm_run / "images" / "test").glob("samples_*.png"))
    assert len(samples) == 1
    assert Image.open(samples[0]).size == (32, 4 * 32)  # one 32 x 32 digit per row
