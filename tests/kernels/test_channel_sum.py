"""kernels/channel_sum.py: per-channel fp32 sums of channels-last tensors against a float64 sum, and the in-place
bias add against PyTorch's, through Triton's interpreter on CPU (CI) and on CUDA when present."""
import pytest
import torch

from kernels import channel_sum as module
from kernels.channel_sum import add_channel_bias_, channel_sum
from tests.kernels.devices import DEVICES, channels_last_randn, needs_a_triton_device

pytestmark = needs_a_triton_device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 5, 3, 4, 6), (3, 8, 17), (2, 64, 9, 9, 9), (1, 300, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_float64_sum(device, shape, dtype):
    x = channels_last_randn(shape, dtype, device)
    out = channel_sum(x)
    assert out.dtype == torch.float32 and out.shape == (shape[1],)
    expected = x.double().sum(dim=[d for d in range(x.ndim) if d != 1])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_many_row_blocks_per_program_and_a_ragged_last_block(device, monkeypatch):
    # a small tile makes each program loop over several row blocks, the last one partly masked
    monkeypatch.setattr(module, "TILE", 64)
    x = channels_last_randn((3, 16, 7, 11, 5), torch.float32, device)
    torch.testing.assert_close(channel_sum(x).double(), x.double().sum(dim=(0, 2, 3, 4)), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_channel_slice_of_a_wider_channels_last_tensor(device, dtype):
    # what torch.cat along channels hands each input in backward: rows 24 channels apart, 10 of them summed
    wide = channels_last_randn((2, 24, 5, 6, 7), dtype, device)
    x = wide[:, 7:17]
    assert module._channel_rows(x).stride() == (24, 1)
    torch.testing.assert_close(channel_sum(x).double(), x.double().sum(dim=(0, 2, 3, 4)), rtol=1e-5, atol=1e-4)
    assert module._channel_rows(wide[:, :, 1:]) is None  # outer axes that do not collapse: the reference
    torch.testing.assert_close(channel_sum(wide[:, :, 1:]), wide[:, :, 1:].float().sum(dim=(0, 2, 3, 4)))


@pytest.mark.parametrize("device", DEVICES)
def test_other_layouts_take_the_reference(device):
    x = torch.randn(2, 6, 4, 5, device=device)
    torch.testing.assert_close(channel_sum(x), x.sum(dim=(0, 2, 3)))
    torch.testing.assert_close(channel_sum(x.double()), x.double().sum(dim=(0, 2, 3)))
    with pytest.raises(ValueError, match=r"channel_sum: x \(N, C, \*spatial\) expected, got \(5,\)"):
        channel_sum(torch.randn(5, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "slice", "contiguous"])
def test_add_channel_bias_is_pytorchs_add_bit_for_bit(device, dtype, layout, monkeypatch):
    """The Triton add (channels-last y, or a channel slice of a wider one) and PyTorch's (other layouts) give y +
    bias.to(y.dtype) exactly, in place; the small tile makes several row blocks, the last one ragged. Triton's
    interpreter rounds fp32 to bf16 by truncation (the GPU rounds to nearest, as PyTorch does): within 2 bf16 steps."""
    monkeypatch.setattr(module, "TILE", 64)
    wide = channels_last_randn((2, 24, 5, 6, 7), dtype, device)
    y = {"channels_last": wide[:, :10].contiguous(memory_format=torch.channels_last_3d), "slice": wide[:, 7:17],
         "contiguous": wide[:, :10].contiguous()}[layout]
    assert (module._channel_rows(y) is not None) == (layout != "contiguous")
    bias = torch.randn(10, device=device)
    expected, before = y + bias.to(dtype).view(1, -1, 1, 1, 1), wide.clone()
    out = add_channel_bias_(y, bias)
    assert out is y
    inexact = dtype == torch.bfloat16 and device == "cpu" and layout != "contiguous"
    torch.testing.assert_close(out, expected, rtol=2 ** -6 if inexact else 0, atol=2 ** -6 if inexact else 0)
    if layout == "slice":  # the channels outside the slice are untouched
        torch.testing.assert_close(wide[:, :7], before[:, :7], rtol=0, atol=0)
        torch.testing.assert_close(wide[:, 17:], before[:, 17:], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_add_channel_bias_gradients(device):
    y0 = channels_last_randn((2, 6, 3, 4, 5), torch.float32, device).requires_grad_()
    bias = torch.randn(6, device=device, requires_grad=True)
    weights = channels_last_randn((2, 6, 3, 4, 5), torch.float32, device)
    (add_channel_bias_(y0 * 1.0, bias) * weights).sum().backward()
    torch.testing.assert_close(y0.grad, weights, rtol=0, atol=0)
    torch.testing.assert_close(bias.grad, weights.sum(dim=(0, 2, 3, 4)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"add_channel_bias_: y \(N, C, \*spatial\) and a \(C,\) bias expected"):
        add_channel_bias_(torch.zeros(2, 6, 3, device=device), torch.zeros(5, device=device))
