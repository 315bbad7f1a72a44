import warnings

import lpips
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import (LPIPSWithDiscriminator, MissingWeightsError, NLayerDiscriminator, SlicedLPIPS,
                                VQLPIPSWithDiscriminator, load_lpips)
from ldm.modules.losses.adversarial import adaptive_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.discriminator import ActNorm


class SquaredError(nn.Module):
    """An LPIPS stand-in: mean squared difference per image, (N, 3, H, W) x 2 -> (N, 1, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x, y):
        self.calls.append(tuple(x.shape))
        return (x - y).pow(2).mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def random_alexnet_lpips():
    """Real LPIPS (shipped linear heads) on a randomly initialised AlexNet: no download needed."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's deprecation notice for lpips's `pretrained=` call
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)


# ------------------------------------------------------------------------------------------------- GAN pieces
def test_gan_losses_against_references():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.3])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.65))
    reference = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones(2))
                       + F.binary_cross_entropy_with_logits(fake, torch.zeros(2)))
    torch.testing.assert_close(vanilla_d_loss(real, fake), reference)


def test_adaptive_weight_is_the_gradient_norm_ratio_and_finite_at_zero_gradients():
    weight = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    out = x @ weight
    nll, g = out.abs().sum(), -(3 * out).mean()
    expected = torch.autograd.grad(nll, weight, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, weight, retain_graph=True)[0].norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(nll, g, weight), expected)
    zero_g = 0.0 * out.sum()
    assert adaptive_weight(nll, zero_g, weight).item() == 1e4  # clamped, not inf
    assert adaptive_weight(0.0 * out.sum(), zero_g, weight).item() == 0.0  # 0 / eps, not nan


@pytest.mark.parametrize("dims,size,n_layers", [(2, 24, 3), (3, 12, 2)])
def test_patch_discriminator_shapes(dims, size, n_layers):
    disc = NLayerDiscriminator(input_nc=2, ndf=4, n_layers=n_layers, dims=dims)
    patches = size // 2 ** n_layers - 2
    assert disc(torch.randn(2, 2, *[size] * dims)).shape == (2, 1, *[patches] * dims)
    with pytest.raises(ValueError, match=f"each side needs >= {size}"):
        disc(torch.randn(2, 2, *[size - 1] * dims))


def test_actnorm_initialises_to_zero_mean_unit_variance_on_first_training_batch():
    norm = ActNorm(3, dims=3)
    x = torch.randn(4, 3, 2, 3, 2) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1, 1) + 7.0
    y = norm(x)
    per_channel = y.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-4, rtol=0)
    loc = norm.loc.clone()
    norm(x * 3)  # initialised once only
    assert torch.equal(norm.loc, loc)
    restored = ActNorm(3, dims=3)
    restored.load_state_dict(norm.state_dict())  # initialised in the checkpoint: not again
    restored(x * 3)
    assert torch.equal(restored.loc, loc)
    fresh = ActNorm(3, dims=3)
    fresh.load_state_dict(ActNorm(3, dims=3).state_dict())  # never initialised: the first batch still does it
    fresh(x)
    torch.testing.assert_close(fresh.loc, loc)
    disc = NLayerDiscriminator(input_nc=1, ndf=4, n_layers=1, use_actnorm=True, dims=2)
    assert any(isinstance(m, ActNorm) for m in disc.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())


# ------------------------------------------------------------------------------------------- perceptual (2.5D)
def test_sliced_lpips_with_all_slices_averages_over_the_three_axes():
    torch.manual_seed(0)
    network = SquaredError()
    sliced = SlicedLPIPS(network, dims=3, slices_per_axis=100)
    x, y = torch.randn(2, 1, 4, 5, 6), torch.randn(2, 1, 4, 5, 6)
    # every slice of every axis is drawn, so each axis averages to the volume's mean squared error
    torch.testing.assert_close(sliced(x, y), (x - y).pow(2).flatten(1).mean(1))
    assert sorted(network.calls) == [(2 * 4, 3, 5, 6), (2 * 5, 3, 4, 6), (2 * 6, 3, 4, 5)]  # grey -> 3 channels


def test_sliced_lpips_channel_handling():
    network = SquaredError()
    x, y = torch.randn(2, 4, 6, 7), torch.randn(2, 4, 6, 7)
    per_channel = (x - y).pow(2).mean(dim=(2, 3)).mean(1)  # each channel as a grey image, then averaged
    torch.testing.assert_close(SlicedLPIPS(network, dims=2)(x, y), per_channel)
    assert network.calls == [(8, 3, 6, 7)]
    torch.testing.assert_close(SlicedLPIPS(network, dims=2)(x[:, :3], y[:, :3]),
                               (x[:, :3] - y[:, :3]).pow(2).mean(dim=(1, 2, 3)))


def test_sliced_lpips_on_real_lpips_is_zero_for_identical_volumes_and_positive_otherwise(random_alexnet_lpips):
    sliced = SlicedLPIPS(random_alexnet_lpips, dims=3, slices_per_axis=2).train()
    assert not sliced.network.training  # no dropout inside a loss
    assert not any(p.requires_grad for p in sliced.parameters())
    x = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    same = sliced(x, x.clone())
    other = sliced(x, (x + 0.3 * torch.randn_like(x)).clamp(-1, 1))
    assert same.shape == other.shape == (2,)
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    assert (other > 1e-3).all()


def test_load_lpips_reads_a_local_torchvision_file_and_never_downloads(tmp_path, random_alexnet_lpips):
    with pytest.raises(MissingWeightsError, match=r"not at .*missing\.pth.*perceptual_weight: 0"):
        load_lpips("alex", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown perceptual_net 'resnet'"):
        load_lpips("resnet", tmp_path / "missing.pth")
    # a torchvision-style AlexNet state dict (`features.<index>.*`, plus a classifier entry that is not needed)
    torch.manual_seed(1)
    state = {"features." + name.split(".", 1)[1]: torch.randn_like(value)
             for name, value in random_alexnet_lpips.net.state_dict().items()}
    assert state["features.0.weight"].shape == (64, 3, 11, 11) and "features.10.bias" in state
    torch.save({**state, "classifier.6.bias": torch.zeros(1000)}, tmp_path / "alexnet.pth")
    loaded = load_lpips("alex", tmp_path / "alexnet.pth").net.state_dict()
    torch.testing.assert_close(loaded["slice1.0.weight"], state["features.0.weight"])
    torch.testing.assert_close(loaded["slice5.10.bias"], state["features.10.bias"])
    torch.save({"classifier.6.bias": torch.zeros(1000)}, tmp_path / "wrong.pth")
    with pytest.raises(MissingWeightsError, match="not torchvision's 'alex' ImageNet state dict"):
        load_lpips("alex", tmp_path / "wrong.pth")


# --------------------------------------------------------------------------------------- LPIPSWithDiscriminator
def _setup(dims=2, **params):
    """A loss, inputs in [-1, 1], a reconstruction depending on a `last_layer` weight, and a posterior."""
    torch.manual_seed(0)
    spatial = [12] * dims
    loss = LPIPSWithDiscriminator(**{"disc_start": 5, "perceptual_weight": 0.0, "disc_in_channels": 2,
                                     "disc_num_layers": 2, "disc_ndf": 4, "dims": dims, "kl_weight": 0.1, **params})
    x = torch.rand(2, 2, *spatial) * 2 - 1
    last_layer = torch.randn(2, 2, requires_grad=True)
    reconstructions = torch.einsum("oc,bc...->bo...", last_layer, x).tanh()
    posterior = DiagonalGaussianDistribution(torch.randn(2, 4, *[s // 2 for s in spatial]))
    return loss, x, reconstructions, posterior, last_layer


@pytest.mark.parametrize("dims", [2, 3])
def test_discriminator_inactive_before_disc_start_and_active_after(dims):
    loss, x, rec, posterior, last_layer = _setup(dims)
    nll = (x - rec).abs().sum() / 2  # logvar 0
    expected = nll + 0.1 * posterior.kl().sum() / 2

    before, log = loss(x, rec, posterior, 0, global_step=4, last_layer=last_layer)
    torch.testing.assert_close(before, expected)
    assert log["train/g_loss"] == 0 and log["train/d_weight"] == 0 and log["train/disc_factor"] == 0
    d_before, _ = loss(x, rec, posterior, 1, global_step=4)
    assert d_before.item() == 0.0

    after, log = loss(x, rec, posterior, 0, global_step=5, last_layer=last_layer)
    g_loss = -loss.discriminator(rec).mean()
    assert log["train/d_weight"] > 0 and log["train/disc_factor"] == 1
    torch.testing.assert_close(after, expected + log["train/d_weight"] * g_loss)
    d_after, log = loss(x, rec, posterior, 1, global_step=5)
    torch.testing.assert_close(d_after, hinge_d_loss(loss.discriminator(x), loss.discriminator(rec)))
    assert d_after.item() > 0 and torch.isfinite(d_after)
    assert loss.discriminator_active(5) and not loss.discriminator_active(4)


def test_idle_discriminator_loss_is_zero_and_reaches_every_parameter():
    loss = _setup()[0]
    idle = loss.idle_discriminator_loss()
    idle.backward()
    assert idle.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in loss.discriminator.parameters())


def test_no_adaptive_weight_without_gradients_and_last_layer_required_with_them():
    loss, x, rec, posterior, last_layer = _setup()
    with torch.no_grad():
        value, log = loss(x, rec.detach(), posterior, 0, global_step=10, split="val")
    assert log["val/d_weight"] == 0 and torch.isfinite(value) and "val/total_loss" in log
    with pytest.raises(ValueError, match="last_layer"):
        loss(x, rec, posterior, 0, global_step=10)


def test_l2_pixel_weight_and_learnable_logvar():
    loss, x, rec, posterior, _ = _setup(rec_loss="l2", pixelloss_weight=2.0, logvar_init=0.5, kl_weight=0.0)
    value, log = loss(x, rec, posterior, 0, global_step=0)
    per_element = 2.0 * (x - rec).pow(2)
    expected = (per_element / torch.exp(torch.tensor(0.5)) + 0.5).sum() / 2
    torch.testing.assert_close(value, expected)
    value.backward()
    assert loss.logvar.grad is not None and torch.isfinite(loss.logvar.grad)


def test_perceptual_term_adds_per_item_lpips_to_every_element():
    network = SquaredError()
    loss, x, rec, posterior, _ = _setup(dims=3, perceptual_weight=0.5, perceptual_network=network,
                                        perceptual_slices=100, kl_weight=0.0)
    value, log = loss(x, rec, posterior, 0, global_step=0)
    p_loss = (x - rec).pow(2).flatten(1).mean(1)  # the stand-in's 2.5D value with all slices drawn
    expected = ((x - rec).abs() + 0.5 * p_loss.view(2, 1, 1, 1, 1)).sum() / 2
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(log["train/p_loss"], p_loss.mean())


def test_perceptual_weight_zero_builds_no_network_and_bad_options_raise():
    assert _setup()[0].perceptual_loss is None
    with pytest.raises(ValueError, match="disc_loss must be one of"):
        _setup(disc_loss="wasserstein")
    with pytest.raises(ValueError, match="rec_loss must be 'l1' or 'l2'"):
        _setup(rec_loss="l3")
    loss, x, rec, posterior, last_layer = _setup()
    with pytest.raises(ValueError, match="disc_conditional=False but cond is given"):
        loss(x, rec, posterior, 1, global_step=10, cond=x)


def test_conditional_discriminator_sees_the_condition():
    loss, x, rec, posterior, last_layer = _setup(disc_conditional=True, disc_in_channels=4)
    d_loss, _ = loss(x, rec, posterior, 1, global_step=10, cond=x)
    reference = hinge_d_loss(loss.discriminator(torch.cat([x, x], 1)), loss.discriminator(torch.cat([rec, x], 1)))
    torch.testing.assert_close(d_loss, reference)


# ------------------------------------------------------------------------------------- VQLPIPSWithDiscriminator
def test_vq_loss_is_mean_reconstruction_plus_codebook_and_gan_terms():
    torch.manual_seed(0)
    loss = VQLPIPSWithDiscriminator(disc_start=5, codebook_weight=0.5, perceptual_weight=0.0, disc_in_channels=2,
                                    disc_num_layers=2, disc_ndf=4, dims=3, pixel_loss="l2")
    _, x, rec, _, last_layer = _setup(dims=3)
    codebook_loss = torch.tensor(0.8)
    before, log = loss(codebook_loss, x, rec, 0, global_step=4, last_layer=last_layer)
    expected = (x - rec).pow(2).mean() + 0.5 * 0.8
    torch.testing.assert_close(before, expected)
    assert log["train/quant_loss"] == pytest.approx(0.8) and log["train/g_loss"] == 0
    after, log = loss(codebook_loss, x, rec, 0, global_step=5, last_layer=last_layer)
    torch.testing.assert_close(after, expected + log["train/d_weight"] * -loss.discriminator(rec).mean())
    assert log["train/d_weight"] > 0
    d_loss, _ = loss(codebook_loss, x, rec, 1, global_step=5)
    torch.testing.assert_close(d_loss, hinge_d_loss(loss.discriminator(x), loss.discriminator(rec)))
    with pytest.raises(ValueError, match="pixel_loss must be 'l1' or 'l2'"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, pixel_loss="huber")
