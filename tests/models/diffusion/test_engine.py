"""DiffusionEngine: sgm configs build (target aliases), training steps, EMA, sampling, errors naming the key."""
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import main
from ldm.models.diffusion.edm.samplers import SAMPLERS as EDM_SAMPLERS
from ldm.models.diffusion.engine import DiffusionEngine
from ldm.sample_cli import main as sample_main
from ldm.util import ConfigError, instantiate_from_config
from tests.engine.helpers import only_run_dir

ROOT = Path(__file__).resolve().parents[3]
FAST = ["trainer.max_steps=2", "trainer.logger=[csv]", "data.params.num_workers=0", "data.params.batch_size=4",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.params.sampler_config.params.num_steps=2",
        "trainer.callbacks.image_logger.params.batch_frequency=100"]


def sgm_toy_config(**overrides):
    """sgm's toy class-conditional config (configs/example_training/toy/mnist_cond.yaml) with its sgm target names,
    shrunk: only the data and sizes differ."""
    sgm = "sgm.modules.diffusionmodules."
    config = {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "input_key": "image",
            "denoiser_config": {"target": sgm + "denoiser.Denoiser", "params": {
                "scaling_config": {"target": sgm + "denoiser_scaling.EDMScaling", "params": {"sigma_data": 1.0}}}},
            "network_config": {"target": sgm + "openaimodel.UNetModel", "params": {
                "image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32, "attention_resolutions": [],
                "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 32, "num_classes": "sequential",
                "adm_in_channels": 16}},
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
                {"is_trainable": True, "input_key": "cls", "ucg_rate": 0.2,
                 "target": "sgm.modules.encoders.modules.ClassEmbedder",
                 "params": {"embed_dim": 16, "n_classes": 10}}]}},
            "first_stage_config": {"target": "sgm.models.autoencoder.IdentityFirstStage"},
            "loss_fn_config": {"target": sgm + "loss.StandardDiffusionLoss", "params": {
                "loss_weighting_config": {"target": sgm + "loss_weighting.EDMWeighting", "params": {"sigma_data": 1.0}},
                "sigma_sampler_config": {"target": sgm + "sigma_sampling.EDMSampling"}}},
            "sampler_config": {"target": sgm + "sampling.EulerEDMSampler", "params": {
                "num_steps": 3, "discretization_config": {"target": sgm + "discretizer.EDMDiscretization"},
                "guider_config": {"target": sgm + "guiders.VanillaCFG", "params": {"scale": 3.0}}}},
            "use_ema": True, "ema_decay_rate": 0.9,
        },
    }
    config["params"].update(overrides)
    return OmegaConf.create({"model": config}).model


def toy_batch():
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.rand(3, 1, 8, 8, generator=generator) * 2 - 1, "cls": torch.tensor([1, 4, 9])}


def test_sgm_config_builds_trains_and_samples():
    model = instantiate_from_config(sgm_toy_config())
    assert isinstance(model, DiffusionEngine)
    assert any(k.startswith("model.diffusion_model.label_emb.0.0") for k in model.state_dict())
    model.learning_rate = 1e-3
    optimizer, = model.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.trainable_parameters()}
    assert any(p is model.conditioner.embedders[0].embedding.weight for p in model.trainable_parameters())
    model.train()
    batch = toy_batch()
    loss, scalars = model.training_step(batch, 0, 0)
    loss.backward()
    optimizer.step()
    before = model.model_ema.num_updates.item()
    model.on_train_batch_end(batch, 0)
    assert model.model_ema.num_updates.item() == before + 1
    model.eval()
    first = model.validation_step(batch, 0)["val/loss"]
    assert torch.equal(first, model.validation_step(batch, 0)["val/loss"])  # seeded by batch_idx
    out = model.test_step(batch, 0)
    assert out["samples"].shape == (3, 1, 8, 8) and bool(out["samples"].abs().le(1).all())
    images = model.log_images(batch, "val", 2)
    assert images["samples"].shape == (2, 1, 8, 8) and images["inputs"].shape == (2, 1, 8, 8)


def test_unconditional_engine_samples_without_conditioner():
    config = sgm_toy_config(conditioner_config=None)
    config.params.network_config.params.num_classes = None
    config.params.network_config.params.adm_in_channels = None
    config.params.sampler_config.params.guider_config = None
    model = instantiate_from_config(config).eval()
    assert model.sample({}, {}, 2, (1, 8, 8)).shape == (2, 1, 8, 8)


def test_guidance_on_an_unconditional_model_is_an_error_naming_the_guider():
    config = sgm_toy_config(conditioner_config=None)
    config.params.network_config.params.num_classes = None
    config.params.network_config.params.adm_in_channels = None
    with pytest.raises(ConfigError, match=r"guider_config: VanillaCFG\(scale=3.0\) needs an unconditional"):
        instantiate_from_config(config)


def test_bad_sections_name_the_key():
    with pytest.raises(ConfigError, match="missing required argument 'network_config'"):
        config = sgm_toy_config()
        del config.params["network_config"]
        instantiate_from_config(config)
    config = sgm_toy_config()
    config.params.denoiser_config.params.scaling_config.target = "sgm.modules.diffusionmodules.denoiser_scaling.EDM"
    with pytest.raises(ConfigError, match=r"scaling_config.target: cannot import .*denoiser_scaling.EDM' \(no 'EDM'"):
        instantiate_from_config(config)
    config = sgm_toy_config()
    config.params.sampler_config.target = "sgm.modules.diffusionmodules.sampling.EulerSampler"
    with pytest.raises(ConfigError, match=r"sampler_config.target: cannot import .*EulerSampler"):
        instantiate_from_config(config)


def test_bad_optimizer_and_scale_factor():
    with pytest.raises(ConfigError, match=r"optimizer_config: unknown keys 'lr'"):
        instantiate_from_config(sgm_toy_config(optimizer_config={"target": "torch.optim.SGD", "lr": 0.1}))
    with pytest.raises(ConfigError, match="scale_factor: must be positive"):
        instantiate_from_config(sgm_toy_config(scale_factor=0.0))
    model = instantiate_from_config(sgm_toy_config(optimizer_config={"target": "torch.optim.SGD",
                                                                     "params": {"momentum": 0.5}}))
    model.learning_rate = 0.1
    optimizer, = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.5


def test_data_checks_name_the_keys():
    model = instantiate_from_config(sgm_toy_config())
    item = {"image": torch.zeros(1, 8, 8), "cls": torch.tensor(3)}
    model.check_against_data(item)
    with pytest.raises(ConfigError, match=r"conditioner_config: GeneralConditioner: ClassEmbedder needs batch entry "
                                          r"'cls'"):
        model.check_against_data({"image": torch.zeros(1, 8, 8), "label": torch.tensor(3)})
    config = sgm_toy_config()
    config.params.network_config.params.adm_in_channels = 12
    with pytest.raises(ConfigError, match=r"network_config.params.adm_in_channels=12 but the conditioner's vector "
                                          r"outputs have width 16"):
        instantiate_from_config(config).check_against_data(item)
    with pytest.raises(ConfigError, match=r"latent_shape=\[1, 4, 4\] but data items become latents of shape "
                                          r"\[1, 8, 8\]"):
        instantiate_from_config(sgm_toy_config(latent_shape=[1, 4, 4])).check_against_data(item)
    config = sgm_toy_config()
    config.params.network_config.params.in_channels = 2
    with pytest.raises(ConfigError, match=r"in_channels=2 but 1 latent channels = 1 reach the network"):
        instantiate_from_config(config).check_against_data(item)


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory) -> Path:
    """configs/sgm/edm_digits_2d.yaml trained for two steps through train_ldm's CLI (validation, checkpoint, test
    stage)."""
    logs = tmp_path_factory.mktemp("edm_2d")
    assert main("ldm", ["-b", str(ROOT / "configs" / "sgm" / "edm_digits_2d.yaml"), "-t", "-l", str(logs), *FAST]) == 0
    return only_run_dir(logs)


def test_edm_2d_demo_trains_and_tests_through_the_cli(edm_run):
    state = torch.load(edm_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("model_ema.") for k in state)
    assert any(k.startswith("conditioner.embedders.0.") for k in state)
    assert list((edm_run / "images" / "test").glob("samples_*.png"))


@pytest.mark.parametrize("sampler", sorted(EDM_SAMPLERS))
def test_sample_py_draws_with_every_sampler(edm_run, tmp_path, sampler):
    outdir = tmp_path / sampler
    assert sample_main(["-r", str(edm_run), "--cond", "labels:3,7", "--sampler", sampler, "--steps", "2",
                        "--scale", "1.5", "--batch_size", "2", "--outdir", str(outdir)]) == 0
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["sampler"]["name"] == sampler and manifest["sampler"]["scale"] == 1.5
    assert len(manifest["sampler"]["sigmas"]) == 3 and manifest["sampler"]["sigmas"][-1] == 0.0
    assert [entry["condition"] for entry in manifest["samples"]] == ["label 3", "label 7"]
    assert (outdir / "sample_0001.png").is_file() and (outdir / "samples.png").is_file()


def test_sample_py_sample_is_reproducible_from_its_seed(edm_run, tmp_path):
    args = ["-r", str(edm_run), "--cond", "labels:3,7", "--sampler", "euler_ancestral", "--steps", "2"]
    assert sample_main([*args, "--outdir", str(tmp_path / "both")]) == 0
    first = (tmp_path / "both" / "sample_0000.png").read_bytes()  # seed 23, label 3, its ancestral noise too
    assert sample_main([*args, "--n_samples", "1", "--outdir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "sample_0000.png").read_bytes() == first


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "ddim"], "--sampler ddim: a DiffusionEngine run samples with euler"),
    (["--spacing", "trailing"], "--spacing / --quadratic: a DiffusionEngine samples at its discretization"),
    (["--sampler", "heun", "--eta", "0.5"], "--eta 0.5: only the ancestral samplers"),
    (["--cond", "labels:12"], r"--cond labels:12: labels \[12\]; this model knows \[0, 10\)"),
    (["--cond", "split:nope"], "--cond split:nope: the run's data config has no 'nope' split"),
])
def test_sample_py_errors_are_one_line(edm_run, tmp_path, capsys, argv, message):
    argv = ["-r", str(edm_run), "--outdir", str(tmp_path / "out"), *(["--cond", "labels:1"] if "--cond" not in argv
                                                                    else []), *argv]
    assert sample_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_cli_error_for_guidance_without_a_condition(tmp_path, capsys):
    no_dropout = tmp_path / "no_dropout.yaml"
    no_dropout.write_text("model: {params: {conditioner_config: {params: {emb_models: [{input_key: class_label, "
                          "target: ldm.modules.embedders.ClassEmbedder, params: {embed_dim: 64, n_classes: 10}}]}}}}\n")
    code = main("ldm", ["-b", str(ROOT / "configs" / "sgm" / "edm_digits_2d.yaml"), str(no_dropout), "-t",
                        "-l", str(tmp_path / "logs"), *FAST])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guider_config: VanillaCFG(scale=2.0) needs an unconditional prediction" in err[0]
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("*"))


def test_sample_py_refuses_an_edm_sampler_for_a_ddpm_run(tmp_path):
    from tests.test_sample_cli import assert_error, unconditional_2d
    checkpoint, config = unconditional_2d(tmp_path)
    assert_error(["-r", str(checkpoint), "--config", str(config), "--sampler", "heun"],
                 r"--sampler heun: a DDPM run samples with ddpm, ddim, .*are for DiffusionEngine runs")


def test_latents_whose_std_misses_sigma_data_are_named_once_with_the_scale_factor_to_use():
    """EDM's preconditioning assumes latents of std sigma_data: the first training batch says when they are not
    (the toy images are uniform on [-1, 1], std ~0.58 against sigma_data 1), suggesting scale_factor * 1 / std."""
    batch = toy_batch()
    std = float(batch["image"].std())
    model = instantiate_from_config(sgm_toy_config()).train()
    with pytest.warns(UserWarning, match=rf"std {std:.3g} where the denoiser expects 1 .*scale_factor to about "
                                         rf"{1 / std:.3g}"):
        model.loss(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.loss(batch)  # once per run
        matched = instantiate_from_config(sgm_toy_config(scale_factor=1 / std)).train()
        matched.loss(batch)
        instantiate_from_config(sgm_toy_config()).eval().loss(batch)  # validation: no check
