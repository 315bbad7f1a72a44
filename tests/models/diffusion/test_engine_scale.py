"""DiffusionEngine scale_by_std: the factor from the first training batch, kept in checkpoints, shared with
LatentDiffusion (ldm.models.diffusion.latent_scale)."""
import warnings

import pytest
import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.engine import DiffusionEngine
from ldm.models.diffusion.latent_scale import LatentScale
from ldm.util import ConfigError, instantiate_from_config
from tests.models.diffusion.test_engine import sgm_toy_config


def toy_batch(seed: int, scale: float = 3.0):
    """Images of std ~ scale / sqrt(3) (uniform on [-scale, scale]); the toy engine's first stage is the identity."""
    generator = torch.Generator().manual_seed(seed)
    return {"image": (torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1) * scale,
            "cls": torch.randint(0, 10, (4,), generator=generator)}


def test_estimated_factor_gives_the_first_batch_unit_std_and_stays():
    model = instantiate_from_config(sgm_toy_config(scale_by_std=True))
    first = toy_batch(0)
    model.eval()
    with pytest.raises(RuntimeError, match="DiffusionEngine: scale_by_std is on but scale_factor has not been "
                                           "estimated yet"):
        model.encode_first_stage(first["image"])
    model.train()
    model.training_step(first, 0, 0)
    assert float(model.scale_factor) == pytest.approx(1 / first["image"].double().std().item(), rel=1e-6)
    assert model.encode_first_stage(first["image"]).std().item() == pytest.approx(1.0, abs=1e-5)
    estimate = model.scale_factor.clone()
    model.training_step(toy_batch(1, scale=10.0), 1, 0)  # later batches leave it alone
    assert torch.equal(model.scale_factor, estimate)
    images = model.decode_first_stage(model.encode_first_stage(first["image"]))
    torch.testing.assert_close(images, first["image"])


@pytest.mark.filterwarnings("ignore:DiffusionEngine. the first training batch")  # the restored run's other batch
def test_the_factor_survives_save_and_load(tmp_path):
    """Saved in the state dict, loaded through ckpt_path (the loop's resume loads the same state dict): the restored
    engine decodes with it and its first training step does not estimate again."""
    model = instantiate_from_config(sgm_toy_config(scale_by_std=True)).train()
    model.training_step(toy_batch(0), 0, 0)
    state = model.state_dict()
    assert torch.equal(state["scale_factor"], model.scale_factor)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state}, path)
    restored = instantiate_from_config(sgm_toy_config(scale_by_std=True, ckpt_path=str(path)))
    assert torch.equal(restored.scale_factor, model.scale_factor)
    restored.eval()
    x = toy_batch(2)["image"]
    torch.testing.assert_close(restored.encode_first_stage(x), model.encode_first_stage(x))
    restored.train().training_step(toy_batch(3, scale=10.0), 0, 0)
    assert torch.equal(restored.scale_factor, model.scale_factor)


def test_a_given_factor_stays_a_plain_float_as_in_sgm():
    """Without scale_by_std the state dict has no scale_factor (sgm checkpoints load strictly) and nothing is
    estimated."""
    model = instantiate_from_config(sgm_toy_config(scale_factor=0.5)).train()
    assert "scale_factor" not in model.state_dict()
    model.training_step(toy_batch(0), 0, 0)
    assert model.scale_factor == 0.5
    torch.testing.assert_close(model.encode_first_stage(toy_batch(0)["image"]), 0.5 * toy_batch(0)["image"])


def test_scale_by_std_with_a_given_factor_is_an_error_naming_both():
    with pytest.raises(ConfigError, match="scale_factor: 0.13025 is given but scale_by_std estimates it"):
        instantiate_from_config(sgm_toy_config(scale_by_std=True, scale_factor=0.13025))


def test_the_data_check_does_not_estimate_from_one_item():
    """check_against_data runs before training on a single item; only the first training batch may set the factor."""
    model = instantiate_from_config(sgm_toy_config(scale_by_std=True)).train()
    model.first_stage_model.embed_dim = None  # force the encode path of the latent-shape check
    model.check_against_data({"image": torch.full((1, 8, 8), 0.3), "cls": torch.tensor(3)})
    assert not model.scale_factor_is_set()


def test_sigma_data_mismatch_under_scale_by_std_names_sigma_data():
    """scale_by_std gives unit-std latents; a scaling with sigma_data 0.5 (EDMScaling's default) is the thing to
    change, and the warning says so."""
    config = sgm_toy_config(scale_by_std=True)
    config.params.denoiser_config.params.scaling_config.params.sigma_data = 0.5
    model = instantiate_from_config(config).train()
    with pytest.warns(UserWarning, match=r"std 1 where the denoiser expects 0.5 \(sigma_data\); scale_by_std gives "
                                         r"the batch it estimates from std 1: set the scaling's sigma_data to 1"):
        model.loss(toy_batch(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        instantiate_from_config(sgm_toy_config(scale_by_std=True)).train().loss(toy_batch(0))  # sigma_data 1


def test_both_models_share_one_implementation():
    assert issubclass(DiffusionEngine, LatentScale) and issubclass(LatentDiffusion, LatentScale)
    for name in ("estimate_scale_factor", "checked_scale_factor", "scale_factor_is_set", "init_scale_factor"):
        assert name not in vars(DiffusionEngine) and name not in vars(LatentDiffusion)
