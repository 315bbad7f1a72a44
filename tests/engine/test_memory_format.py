"""trainer.channels_last: the layout helpers, and channels-last models computing what contiguous ones compute."""
from collections import namedtuple

import pytest
import torch
from torch import nn

from ldm.engine.config import TrainerConfig
from ldm.engine.loop import Trainer
from ldm.engine.memory_format import batch_to_channels_last, channels_last, model_to_channels_last
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.modules.helpers import randomize_zero_parameters

CL3D, CL2D = torch.channels_last_3d, torch.channels_last


def test_tensor_layouts_by_rank():
    x5, x4, x3 = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4)
    assert channels_last(x5).is_contiguous(memory_format=CL3D) and not x5.is_contiguous(memory_format=CL3D)
    assert channels_last(x4).is_contiguous(memory_format=CL2D) and not x4.is_contiguous(memory_format=CL2D)
    assert channels_last(x3) is x3
    assert torch.equal(channels_last(x5), x5)  # same values, other strides


def test_one_channel_volume_takes_channels_last_strides_without_a_copy():
    """A one-channel volume's default strides read as NCDHW to PyTorch (suggest_memory_format), so a channels-last
    network's first convolution would output NCDHW; it must carry the channels-last strides, on the same memory."""
    from torch._prims_common import suggest_memory_format
    for x, fmt in ((torch.randn(1, 1, 4, 5, 6), CL3D), (torch.randn(3, 1, 4, 5, 6), CL3D), (torch.randn(2, 1, 4, 5), CL2D)):
        assert suggest_memory_format(x) == torch.contiguous_format
        y = channels_last(x)
        assert suggest_memory_format(y) == fmt, (x.shape, y.stride())
        assert y.data_ptr() == x.data_ptr() and torch.equal(y, x)
    sliced = torch.randn(2, 1, 4, 5, 12)[..., ::2]  # not contiguous: copied into channels-last as any other tensor
    assert suggest_memory_format(channels_last(sliced)) == CL3D and torch.equal(channels_last(sliced), sliced)


def test_batch_walk_converts_floating_volumes_only():
    Pair = namedtuple("Pair", "image label")
    batch = {"image": torch.randn(1, 2, 4, 4, 4), "mask": torch.ones(1, 1, 4, 4, 4, dtype=torch.uint8),
             "affine": torch.eye(4, dtype=torch.float64)[None], "names": ["a"],
             "pair": Pair(torch.randn(1, 3, 4, 4), 3), "list": [torch.randn(1, 1, 2, 2, 2)]}
    out = batch_to_channels_last(batch)
    assert out["image"].is_contiguous(memory_format=CL3D)
    assert out["mask"] is batch["mask"]  # integer tensors are labels: left alone
    assert out["affine"] is batch["affine"] and out["names"] == ["a"]
    assert isinstance(out["pair"], Pair) and out["pair"].image.is_contiguous(memory_format=CL2D)
    assert out["pair"].label == 3
    assert out["list"][0].is_contiguous(memory_format=CL3D)


def test_model_conversion_keeps_parameters_and_covers_mixed_ranks():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 4), nn.BatchNorm3d(4))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    model_to_channels_last(model)
    assert all(a is b for a, b in zip(params, model.parameters()))  # optimizers keep working on them
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model[0].weight.is_contiguous(memory_format=CL3D)
    assert model[1].weight.is_contiguous(memory_format=CL2D)  # a 2D network inside a 3D model (LPIPS)


def _assert_same_output_and_gradients(make_model, inputs, forward, atol):
    """The model and a channels-last copy (weights and inputs): outputs and weight gradients agree."""
    results = []
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = make_model()
        args = [x.clone() for x in inputs]
        if layout == "channels_last":
            model_to_channels_last(model)
            args = [channels_last(x) for x in args]
        out = forward(model, *args)
        out.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach().contiguous(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, atol=atol, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=1e-3, msg=name)


def test_channels_last_3d_autoencoder_matches_contiguous():
    ddconfig = dict(dims=3, double_z=True, z_channels=4, resolution=8, in_channels=2, out_ch=2, ch=8, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[4], dropout=0.0, norm_num_groups=4, kernels="torch")

    def make():
        return AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=4)

    def reconstruct(model, x):
        return model.decode(model.encode(x).mode())

    x = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    _assert_same_output_and_gradients(make, [x], reconstruct, atol=1e-4)


@pytest.mark.parametrize("dims, spatial", [(3, (4, 8, 8)), (2, (8, 8))])
def test_channels_last_unet_matches_contiguous(dims, spatial):
    def make():
        model = UNetModel(image_size=list(spatial), dims=dims, in_channels=3, model_channels=32, out_channels=3,
                          num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=[2], num_head_channels=16,
                          use_scale_shift_norm=True, kernels="torch")
        return randomize_zero_parameters(model)

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, *spatial, generator=gen)
    t = torch.tensor([3, 700])
    _assert_same_output_and_gradients(make, [x], lambda model, x: model(x, t), atol=1e-4)


def test_channels_last_setting_takes_effect_on_cuda_only():
    trainer = Trainer(TrainerConfig(accelerator="cpu", max_steps=1, channels_last=True))
    assert trainer.channels_last is False  # CPU kernels gain nothing from it
    batch = {"image": torch.randn(1, 1, 2, 2, 2)}
    assert trainer._to_layout(batch) is batch


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_on_cuda_converts_model_and_batches():
    trainer = Trainer(TrainerConfig(accelerator="cuda", max_steps=1, channels_last=True))
    assert trainer.channels_last
    model = _Conv()
    trainer._setup(model)
    assert model.conv.weight.is_cuda and model.conv.weight.is_contiguous(memory_format=CL3D)
    out = trainer._to_layout({"image": torch.randn(1, 1, 4, 4, 4, device="cuda")})
    assert out["image"].is_contiguous(memory_format=CL3D)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_channel_input_keeps_a_channels_last_network_channels_last_on_cuda():
    """cuDNN picks the output layout from the input's and weight's strides: with a one-channel volume that was only
    `contiguous(channels_last_3d)`-ed (and a one-input-channel weight) the first convolution output NCDHW."""
    net = model_to_channels_last(nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1)).cuda())
    x = channels_last(torch.randn(1, 1, 8, 8, 8, device="cuda"))
    first = net[0](x)
    assert first.is_contiguous(memory_format=CL3D) and not first.is_contiguous()
    assert net(x).is_contiguous(memory_format=CL3D)
