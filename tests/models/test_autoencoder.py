import contextlib

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from ldm.engine.checkpoint import atomic_torch_save
from ldm.engine.interface import TrainableModel
from ldm.models.autoencoder import AutoencoderKL, psnr, ssim
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

CONFIG = """
target: ldm.models.autoencoder.AutoencoderKL
params:
  embed_dim: 3
  monitor: val/rec_loss
  ddconfig:
    dims: 3
    double_z: true
    z_channels: 4
    resolution: 16
    in_channels: 1
    out_ch: 1
    ch: 8
    ch_mult: [1, 2]
    num_res_blocks: 1
    attn_resolutions: []
    dropout: 0.0
    norm_num_groups: 4
  lossconfig:
    target: ldm.modules.losses.LPIPSWithDiscriminator
    params:
      disc_start: 3
      kl_weight: 1.0e-6
      perceptual_weight: 0
      disc_in_channels: 1
      disc_num_layers: 1
      disc_ndf: 8
      dims: 3
"""


pytestmark = pytest.mark.usefixtures("single_thread")


def _model(seed: int = 0, **params) -> AutoencoderKL:
    torch.manual_seed(seed)
    config = OmegaConf.create(CONFIG)
    config.params.update(params)
    model = instantiate_from_config(config)
    model.learning_rate = 1e-3
    return model


def _volume(size: int = 16, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A smooth random volume in [-1, 1]: (batch, 1, size, size, size)."""
    noise = torch.randn(batch, 1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    volume = F.interpolate(noise, size=(size,) * 3, mode="trilinear", align_corners=False)
    return volume / volume.abs().amax(dim=(1, 2, 3, 4), keepdim=True)


@contextlib.contextmanager
def _only(optimizers, index):
    """What the training loop does around `training_step`: the other optimizer's parameters are frozen."""
    others = [p for i, o in enumerate(optimizers) if i != index for g in o.param_groups for p in g["params"]]
    for p in others:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in others:
            p.requires_grad_(True)


def test_shapes_and_interface():
    model = _model()
    assert isinstance(model, TrainableModel) and model.monitor == "val/rec_loss"
    x = _volume(batch=2)
    posterior = model.encode(x)
    assert isinstance(posterior, DiagonalGaussianDistribution) and posterior.mean.shape == (2, 3, 8, 8, 8)
    assert model.decode(posterior.sample()).shape == x.shape
    reconstruction, _ = model(x, sample_posterior=False)
    torch.testing.assert_close(reconstruction, model.decode(posterior.mode()))


def test_2d_model_and_lossless_use_inside_a_latent_diffusion_model():
    ddconfig = dict(dims=2, z_channels=4, resolution=8, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2, 2],
                    num_res_blocks=1, attn_resolutions=[2], norm_num_groups=4)
    model = AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=2)
    z = model.encode(torch.rand(2, 3, 8, 8) * 2 - 1).sample()
    assert z.shape == (2, 2, 2, 2) and model.decode(z).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="cannot train with lossconfig Identity"):
        model.configure_optimizers()


def test_optimizers_split_autoencoder_and_discriminator():
    model = _model()
    ae, disc = model.configure_optimizers()
    ae_params = {id(p) for g in ae.param_groups for p in g["params"]}
    disc_params = {id(p) for g in disc.param_groups for p in g["params"]}
    assert id(model.loss.logvar) in ae_params and not ae_params & disc_params
    assert ae_params | disc_params == {id(p) for p in model.parameters()}
    assert disc_params == {id(p) for p in model.loss.discriminator.parameters()}
    assert ae.defaults["betas"] == (0.5, 0.9) and ae.defaults["lr"] == 1e-3
    assert ae.defaults["fused"] and disc.defaults["fused"]


@pytest.mark.parametrize("global_step", [0, 3])
def test_training_step_losses_are_finite_with_gradients_only_where_expected(global_step):
    model = _model()
    optimizers = model.configure_optimizers()
    model.global_step = global_step  # disc_start is 3
    batch = {"image": _volume(batch=2)}
    disc = list(model.loss.discriminator.parameters())
    autoencoder = [p for p in model.parameters() if all(p is not q for q in disc)]
    for index in (0, 1):
        model.zero_grad(set_to_none=True)
        with _only(optimizers, index):
            loss, scalars = model.training_step(batch, 0, index)
            loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in scalars.values())
        trained, frozen = (autoencoder, disc) if index == 0 else (disc, autoencoder)
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None for p in trained)
        grads_nonzero = any(p.grad.abs().sum() > 0 for p in trained)
        assert grads_nonzero == (index == 0 or global_step >= 3)  # an idle discriminator gets zero gradients
    assert (scalars["train/disc_loss"] > 0) == (global_step >= 3)


@pytest.mark.parametrize("reuse", [True, False])
def test_discriminator_step_reuses_the_autoencoder_steps_reconstruction(reuse):
    """With reuse, the discriminator scores exactly the (detached) reconstruction of the autoencoder step on the same
    batch and the decoder runs once per step; without it (CompVis), the autoencoder runs again."""
    model = _model(discriminator_reuses_reconstruction=reuse)
    optimizers = model.configure_optimizers()
    model.global_step = 3  # disc_start
    batch = {"image": _volume(batch=2)}
    outputs = []
    model.decoder.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    with _only(optimizers, 0):
        model.training_step(batch, 7, 0)[0].backward()
    with _only(optimizers, 1):
        loss, scalars = model.training_step(batch, 7, 1)
        loss.backward()
    assert len(outputs) == (1 if reuse else 2)
    with _only(optimizers, 1):
        expected, _ = model.loss(batch["image"], outputs[-1], None, 1, 3, split="train")
    torch.testing.assert_close(loss, expected)
    assert model._for_discriminator is None  # nothing held between steps
    # a stash from another batch is never used
    with _only(optimizers, 0):
        model.training_step(batch, 8, 0)
    with _only(optimizers, 1):
        model.training_step({"image": _volume(batch=2, seed=1)}, 9, 1)
    assert len(outputs) == (3 if reuse else 4)


def test_validation_test_and_image_logging():
    model = _model().eval()
    batch = {"image": _volume(batch=3), "path": ["a", "b", "c"]}
    scalars = model.validation_step(batch, 0)
    assert {"val/rec_loss", "val/kl_loss", "val/total_loss", "val/l1", "val/psnr", "val/ssim"} <= set(scalars)
    assert all(torch.isfinite(v) and not v.requires_grad for v in scalars.values())
    images = model.test_step(batch, 0)
    assert set(images) == {"inputs", "reconstructions"} and images["reconstructions"].abs().max() <= 1
    logged = model.log_images(batch, split="val", max_images=2)
    assert set(logged) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (2, 1, 16, 16, 16) for v in logged.values())


def test_validation_image_metrics():
    """val/l1 is the mean absolute error of the clamped reconstruction; SSIM is 1 for a perfect one and falls with
    noise; PSNR is the closed form 10 log10(4 / MSE)."""
    model = _model().eval()
    x = _volume(batch=2)
    scalars = model.validation_step({"image": x}, 0)
    reconstructions, _ = model.reconstruct(x, sample=False)
    error = reconstructions.clamp(-1, 1) - x
    torch.testing.assert_close(scalars["val/l1"], error.abs().mean())
    torch.testing.assert_close(scalars["val/psnr"], (10 * torch.log10(4 / error.pow(2).flatten(1).mean(1))).mean())
    assert -1 <= scalars["val/ssim"] < 1  # an untrained model: near 0
    noise = 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    perfect, slightly, more = (ssim(x, x + k * noise) for k in (0, 1, 2))
    torch.testing.assert_close(perfect, torch.ones(2))
    assert (more < slightly).all() and (slightly < 1).all()
    small = torch.rand(1, 2, 5, 6) * 2 - 1  # sides below the 11-voxel window: the window shrinks
    assert torch.isclose(ssim(small, small), torch.ones(1)).all()


def test_colorized_label_maps_are_logged_as_rgb():
    model = _model(colorize_nlabels=1)
    logged = model.log_images({"image": _volume()}, split="train", max_images=1)
    assert all(v.shape == (1, 3, 16, 16, 16) and v.min() >= -1 and v.max() <= 1 for v in logged.values())


def test_checkpoint_round_trip_with_ignored_keys(tmp_path, capsys):
    trained = _model(seed=1)
    atomic_torch_save({"state_dict": trained.state_dict(), "global_step": 7}, tmp_path / "last.ckpt")
    restored = _model(seed=2, ckpt_path=str(tmp_path / "last.ckpt"), ignore_keys=["loss."])
    x = _volume()
    with torch.no_grad():
        torch.testing.assert_close(restored(x, sample_posterior=False)[0], trained(x, sample_posterior=False)[0])
    assert not torch.equal(restored.loss.discriminator.main[0].weight, trained.loss.discriminator.main[0].weight)
    out = capsys.readouterr().out
    assert "ignore_keys [loss.]: 11 checkpoint entries skipped, 11 model entries left as initialised" in out


def test_bad_inputs_and_configs_raise_clear_errors():
    model = _model()
    with pytest.raises(KeyError, match="no 'image' entry"):
        model.training_step({"volume": _volume()}, 0, 0)
    with pytest.raises(ValueError, match=r"expected \(B, 1, D, H, W\) for dims=3"):
        model.training_step({"image": torch.zeros(1, 1, 16, 16)}, 0, 0)
    with pytest.raises(ValueError, match="lossconfig has dims=2 but ddconfig has dims=3"):
        config = OmegaConf.create(CONFIG)
        config.params.lossconfig.params.dims = 2
        instantiate_from_config(config)
    with pytest.raises(ValueError, match="double_z must be true"):
        config = OmegaConf.create(CONFIG)
        config.params.ddconfig.double_z = False
        instantiate_from_config(config)


def test_tiny_3d_autoencoder_overfits_one_volume():
    """Adam on one smooth 16^3 volume through the loop interface: PSNR (posterior mean) rises by >= 10 dB."""
    model = _model()
    model.learning_rate = 3e-3
    model.loss.disc_start = 10 ** 9
    optimizer = model.configure_optimizers()[0]
    x = _volume()
    with torch.no_grad():
        before = psnr(model(x, sample_posterior=False)[0].clamp(-1, 1), x).item()
    for step in range(80):
        model.global_step = step
        loss, _ = model.training_step({"image": x}, 0, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = psnr(model(x, sample_posterior=False)[0].clamp(-1, 1), x).item()
    assert after >= before + 10.0, (before, after)


# ------------------------------------------------------------------------------------------------------ VQModel
def _vq_model(target: str = "ldm.models.autoencoder.VQModel", **params):
    torch.manual_seed(0)
    config = OmegaConf.create(CONFIG)
    config.target = target
    config.params.pop("monitor")
    config.params.ddconfig.double_z = False
    config.params.lossconfig.target = "ldm.modules.losses.VQLPIPSWithDiscriminator"
    config.params.lossconfig.params.pop("kl_weight")
    config.params.update({"n_embed": 16, **params})
    model = instantiate_from_config(config)
    model.learning_rate = 1e-3
    return model


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_vq_training_steps_with_gradients_only_where_expected(ema_decay):
    model = _vq_model(ema_decay=ema_decay)
    optimizers = model.configure_optimizers()
    codebook = model.quantize.embedding.weight
    in_ae_optimizer = any(p is codebook for g in optimizers[0].param_groups for p in g["params"])
    assert in_ae_optimizer == (ema_decay is None)  # an EMA codebook is not learned by gradient
    model.global_step = 3
    batch = {"image": _volume(batch=2)}
    for index in (0, 1):
        model.zero_grad(set_to_none=True)
        with _only(optimizers, index):
            loss, scalars = model.training_step(batch, 0, index)
            loss.backward()
        assert torch.isfinite(loss) and loss > 0
        trained = [p for g in optimizers[index].param_groups for p in g["params"]]
        assert all(p.grad is not None for p in trained)
        assert all(p.grad is None for p in model.parameters() if all(p is not q for q in trained))
        assert 1 <= scalars["train/perplexity"] <= 16 and 0 < scalars["train/codebook_usage"] <= 1
        assert index == 1 or scalars["train/quant_loss"] > 0
    if ema_decay is not None:
        assert not torch.equal(model.quantize.cluster_size, torch.ones(16))  # the training forward updated it


def test_vq_shapes_codes_and_first_stage_interface():
    model = _vq_model().eval()
    x = _volume(batch=2)
    quant, codebook_loss, info = model.encode(x)
    assert quant.shape == (2, 3, 8, 8, 8) and info["indices"].shape == (2, 8, 8, 8)
    reconstruction, _, _ = model(x)
    torch.testing.assert_close(model.decode_code(info["indices"]), reconstruction)
    scalars = model.validation_step({"image": x}, 0)
    assert {"val/rec_loss", "val/quant_loss", "val/perplexity", "val/psnr"} <= set(scalars)
    assert set(model.log_images({"image": x}, "val", 1)) == {"inputs", "reconstructions"}

    first_stage = _vq_model("ldm.models.autoencoder.VQModelInterface", lossconfig={"target": "torch.nn.Identity"})
    first_stage.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("loss.")})
    h = first_stage.eval().encode(x)
    assert h.shape == (2, 3, 8, 8, 8)
    torch.testing.assert_close(first_stage.decode(h), reconstruction)  # quantises, then decodes
    assert not torch.allclose(first_stage.decode(h, force_not_quantize=True), reconstruction)
