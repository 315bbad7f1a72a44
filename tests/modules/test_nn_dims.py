"""ldm/modules/nn_dims.py: convolutions whose bias gradient comes from kernels.channel_sum (kernels: triton) match
PyTorch's convolution, output and every gradient, in both layouts; through Triton's interpreter on CPU."""
import os

import pytest
import torch
from torch import nn

from kernels import channel_sum as channel_sum_module
from kernels.channel_sum import channel_sum as original_channel_sum
from ldm.engine.memory_format import channels_last
from ldm.modules.nn_dims import KernelChoiceConv, concat_skip, conv_nd
from ldm.modules.normalization import GroupNormAct, set_kernels
from ldm.modules.resampling import Upsample

needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_conv_matches(conv: nn.Module, reference: nn.Module, x: torch.Tensor):
    """conv(x) and every gradient (x's, the weight's, the bias's) against reference's; returns both outputs."""
    out, expected = conv(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    want = torch.autograd.grad(expected, (x, reference.weight, reference.bias), grad)
    for name, a, b in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    return out, expected


@needs_triton
@pytest.mark.parametrize("dims, kernel, stride", [(3, 3, 1), (3, 1, 1), (3, 3, 2), (2, 3, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_bias_gradient_matches_pytorch(dims, kernel, stride, channels_last):
    torch.manual_seed(0)
    # 12 -> 10 channels: more than 8 on both sides, not a thin convolution (kernels/thin_conv.py)
    conv = conv_nd(dims, 12, 10, kernel, stride=stride, padding=kernel // 2).to(DEVICE)
    reference = getattr(nn, f"Conv{dims}d")(12, 10, kernel, stride=stride, padding=kernel // 2).to(DEVICE)
    reference.load_state_dict(conv.state_dict())
    set_kernels(conv, "triton")
    x = torch.randn(2, 12, *(9,) * dims, device=DEVICE)  # fp32: the channel_sum kernel takes fp32 and half inputs
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    out, expected = assert_conv_matches(conv, reference, x.requires_grad_())
    assert out.stride() == expected.stride()


def test_set_kernels_reaches_convolutions_norms_and_upsamplers():
    model = nn.Sequential(conv_nd(3, 4, 4, 3, padding=1), GroupNormAct(4, 2), conv_nd(2, 4, 4, 1),
                          Upsample(4, dims=3, with_conv=False))
    assert all(m.kernels == "torch" for m in model if isinstance(m, (KernelChoiceConv, Upsample)))
    set_kernels(model, "triton")
    assert [m.kernels for m in model] == ["triton"] * 4
    assert isinstance(model[0], nn.Conv3d) and isinstance(model[2], nn.Conv2d)  # state dicts and isinstance unchanged
    assert set(model[0].state_dict()) == {"weight", "bias"}


@needs_triton
def test_bias_gradient_through_a_channel_concatenation(monkeypatch):
    """In a UNet the encoder's outputs reach the loss through torch.cat, whose backward hands each a channel slice."""
    torch.manual_seed(0)
    conv = conv_nd(3, 10, 12, 3, padding=1).to(DEVICE)
    set_kernels(conv, "triton")
    reference = nn.Conv3d(10, 12, 3, padding=1).to(DEVICE)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 10, 6, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    other = torch.randn(2, 5, 6, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    weights = torch.randn(2, 17, 6, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    sliced = []
    monkeypatch.setattr(channel_sum_module, "channel_sum",
                        lambda g: sliced.append(g.stride(0) == 17 * 6 ** 3
                                                and channel_sum_module._channel_rows(g) is not None)
                        or original_channel_sum(g))
    for module in (conv, reference):
        (torch.cat([other, module(x)], dim=1) * weights).sum().backward()
    assert sliced == [True]  # the bias gradient arrived as a 17-channel-wide slice, and the kernel summed it
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_concat_skip_is_cat_and_gives_h_a_dense_gradient(memory_format):
    """Forward: torch.cat along channels. Backward: the same gradients as torch.cat's, h's dense in h's layout (what
    the convolutions it came from would otherwise copy it to), skip's the strided slice cat hands it."""
    torch.manual_seed(0)
    h = torch.randn(2, 3, 4, 4, 4).contiguous(memory_format=memory_format).requires_grad_()
    skip = torch.randn(2, 5, 4, 4, 4).contiguous(memory_format=memory_format).requires_grad_()
    weights = torch.randn(2, 8, 4, 4, 4).contiguous(memory_format=memory_format)
    out = concat_skip(h, skip)
    torch.testing.assert_close(out, torch.cat([h, skip], dim=1), rtol=0, atol=0)
    grads = {}
    h.register_hook(lambda g: grads.setdefault("h", g))
    skip.register_hook(lambda g: grads.setdefault("skip", g))
    (out * weights).sum().backward()
    torch.testing.assert_close(h.grad, weights[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(skip.grad, weights[:, 3:], rtol=0, atol=0)
    assert grads["h"].is_contiguous(memory_format=memory_format)
    assert not grads["skip"].is_contiguous(memory_format=memory_format)


@needs_triton
@pytest.mark.parametrize("recompute_cheap", [False, True])
def test_triton_upsampler_matches_torch(recompute_cheap, monkeypatch):
    """Upsample with kernels: triton (kernels/upsample.py on channels-last x) against kernels: torch, output and every
    gradient, with the upsampled tensor kept or recomputed in backward."""
    torch.manual_seed(0)
    ours, reference = Upsample(6, dims=3, with_conv=True).to(DEVICE), Upsample(6, dims=3, with_conv=True).to(DEVICE)
    reference.load_state_dict(ours.state_dict())
    set_kernels(ours, "triton")
    ours.recompute_cheap = reference.recompute_cheap = recompute_cheap
    from kernels import upsample
    calls = []
    original = upsample.upsample_nearest
    monkeypatch.setattr(upsample, "upsample_nearest", lambda x, f: calls.append(f) or original(x, f))
    x = torch.randn(2, 6, 3, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [module(x_) for module, x_ in zip((ours, reference), xs)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(outs[0])
    for out in outs:
        (out * weights).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    assert calls and all(f == (2, 2, 2) for f in calls)  # the kernel ran (twice where recomputed), the reference not
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("c_in, c_out", [(4, 16), (16, 4), (1, 12)])
def test_thin_convolutions_take_the_thin_conv_kernels(c_in, c_out, monkeypatch):
    """A 3x3x3 conv_nd convolution with at most 8 channels on one side, channels-last input and kernels: triton runs
    in kernels/thin_conv.py and matches nn.Conv3d; contiguous input or kernels: torch takes cuDNN's path."""
    import kernels.thin_conv as thin
    calls = []
    real = thin.thin_conv3d
    monkeypatch.setattr(thin, "thin_conv3d", lambda x, w, b: calls.append(tuple(w.shape)) or real(x, w, b))
    torch.manual_seed(0)
    conv = conv_nd(3, c_in, c_out, 3, padding=1).to(DEVICE)
    reference = nn.Conv3d(c_in, c_out, 3, padding=1).to(DEVICE)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, c_in, 4, 5, 3, device=DEVICE)
    conv(x.contiguous(memory_format=torch.channels_last_3d))
    assert calls == []  # kernels: torch
    set_kernels(conv, "triton")
    conv(x)
    assert calls == []  # contiguous input
    x = channels_last(x).requires_grad_()  # channels-last strides, one channel too
    _, expected = assert_conv_matches(conv, reference, x)
    assert calls == [(c_out, c_in, 3, 3, 3)]
    monkeypatch.setattr(thin, "positions_fit", lambda x: False)  # beyond int32 positions: cuDNN's path
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
