"""kernels/thin_conv.py: 3x3x3 convolutions with 1 to 8 input or output channels against F.conv3d in float64,
output and the gradients of input, weight and bias; Triton's interpreter on CPU (CI), CUDA when present."""
import pytest
import torch
from torch.nn import functional as F

from kernels.thin_conv import thin_conv3d
from tests.kernels.devices import DEVICES, needs_a_triton_device

pytestmark = needs_a_triton_device


def _case(kind, channels, spatial, device, bias, channels_last_input, thin=1):
    torch.manual_seed(0)
    c_in, c_out = (thin, channels) if kind == "thin_to_wide" else (channels, thin)
    x = torch.randn(2, c_in, *spatial, device=device)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(c_out, c_in, 3, 3, 3, device=device) * 0.3
    b = torch.randn(c_out, device=device) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, weight, b)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["thin_to_wide", "wide_to_thin"])
@pytest.mark.parametrize("channels", [16, 8, 5, 1])  # 16: no padded lanes
@pytest.mark.parametrize("spatial", [(3, 4, 5), (1, 2, 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("thin", [1, 4])
def test_matches_conv3d_forward_and_gradients(device, kind, channels, spatial, bias, thin):
    if thin > channels:
        pytest.skip("the thin side is the smaller one")
    x, weight, b = _case(kind, channels, spatial, device, bias, channels_last_input=kind == "wide_to_thin",
                         thin=thin)
    out = thin_conv3d(x, weight, b)
    params = [t for t in (x, weight, b) if t is not None]
    ref = F.conv3d(*(t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, b)),
                   padding=1)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.movedim(1, -1).is_contiguous()  # channels-last
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    ref_params = [t.detach().double().requires_grad_() for t in params]
    ref = F.conv3d(ref_params[0], ref_params[1], ref_params[2] if bias else None, padding=1)
    expected = torch.autograd.grad(ref, ref_params, grad.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for name, g, e in zip(("x", "weight", "bias"), got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_each_tap_lands_where_conv3d_puts_it(device):
    """A weight with a single non-zero tap, one at a time: a mirrored or shifted tap offset fails here."""
    x = torch.randn(1, 1, 4, 5, 6, device=device)
    for tap in (0, 5, 13, 21, 26):
        weight = torch.zeros(3, 1, 27, device=device)
        weight[:, 0, tap] = torch.tensor([1.0, 2.0, -1.0], device=device)
        weight = weight.reshape(3, 1, 3, 3, 3)
        torch.testing.assert_close(thin_conv3d(x, weight), F.conv3d(x, weight, padding=1))
        wide = torch.randn(1, 3, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last_3d)
        back = weight.transpose(0, 1)
        torch.testing.assert_close(thin_conv3d(wide, back), F.conv3d(wide, back, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_computes_in_its_dtype(device):
    x, weight, b = _case("wide_to_thin", 8, (3, 4, 5), device, True, True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = thin_conv3d(x, weight, b)
        ref = F.conv3d(x, weight, b, padding=1)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, c_in, c_out", [("thin_to_wide", 3, 40), ("wide_to_thin", 200, 8),
                                               ("thin_to_wide", 8, 300), ("thin_to_wide", 4, 4)])
def test_more_thin_channels_and_several_channel_blocks(device, kind, c_in, c_out):
    """3 and 8 thin channels (tap tiles of 128 and 256 columns), wide sides of more than one channel block or chunk
    (200: chunks of 64, the last one ragged; 300: three blocks of 128) and a 4 -> 4 layer (both sides thin)."""
    torch.manual_seed(0)
    x = torch.randn(1, c_in, 3, 4, 2, device=device).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(c_out, c_in, 3, 3, 3, device=device) * 0.1
    b = torch.randn(c_out, device=device)
    params = [t.requires_grad_() for t in (x, weight, b)]
    out = thin_conv3d(*params)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    ref_params = [t.detach().double().requires_grad_() for t in params]
    ref = F.conv3d(*ref_params, padding=1)
    expected = torch.autograd.grad(ref, ref_params, grad.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for name, g, e in zip(("x", "weight", "bias"), got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-4, msg=name)


def test_bad_shapes_name_the_culprit():
    with pytest.raises(ValueError, match="at most 8 input or output channels"):
        thin_conv3d(torch.zeros(1, 9, 3, 3, 3), torch.zeros(12, 9, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3, 3\)"):
        thin_conv3d(torch.zeros(1, 1, 3, 3, 3), torch.zeros(4, 1, 5, 5, 5))
    with pytest.raises(ValueError, match="bias"):
        thin_conv3d(torch.zeros(1, 1, 3, 3, 3), torch.zeros(4, 1, 3, 3, 3), torch.zeros(3))


def test_too_many_voxels_is_refused_before_any_kernel():
    huge = torch.empty(1, 1, 1024, 1024, 2048, device="meta")
    with pytest.raises(ValueError, match="2\\^31 or more voxels"):
        thin_conv3d(huge, torch.zeros(4, 1, 3, 3, 3, device="meta"))


def test_the_models_route_what_the_kernels_take():
    """ldm.modules.nn_dims sends a convolution here by its own copy of the thin-channel limit (it does not import
    Triton); the two must agree."""
    from kernels.thin_conv import MAX_THIN
    from ldm.modules.nn_dims import THIN_CHANNELS
    assert THIN_CHANNELS == MAX_THIN
