"""kernels/upsample.py: nearest-neighbour upsampling of channels-last tensors against PyTorch's F.interpolate (exact)
and its gradient against autograd through the reference, through Triton's interpreter on CPU (CI) and on CUDA."""
import pytest
import torch
from torch.nn import functional as F

from kernels import upsample as module
from kernels.upsample import kernel_takes, upsample_nearest, upsample_nearest_reference
from tests.kernels.devices import DEVICES, channels_last_randn, needs_a_triton_device

pytestmark = needs_a_triton_device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, factors", [((2, 6, 3, 4, 5), (2, 2, 2)), ((1, 5, 2, 3, 4), (1, 2, 3)),
                                            ((2, 3, 5, 7), (2, 2)), ((2, 4, 9), (3,)), ((1, 300, 2, 2, 2), (2, 2, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_interpolate_and_its_gradient(device, shape, factors, dtype, monkeypatch):
    monkeypatch.setattr(module, "TILE", 64)  # several row blocks, the last one ragged
    x = channels_last_randn(shape, dtype, device).requires_grad_()
    assert kernel_takes(x)
    y = upsample_nearest(x, factors)
    size = [s * f for s, f in zip(shape[2:], factors)]
    expected = F.interpolate(x.detach().float(), size=size, mode="nearest").to(dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert y.movedim(1, -1).is_contiguous()  # channels-last out
    dy = channels_last_randn(y.shape, dtype, device)
    y.backward(dy)
    reference = x.detach().float().requires_grad_()
    upsample_nearest_reference(reference, factors).backward(dy.float())
    # fp32 sums of prod(factors) values; bf16 results rounded once (truncated in Triton's interpreter)
    tolerance = {} if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    torch.testing.assert_close(x.grad.float(), reference.grad, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_int64_offsets(device, monkeypatch):
    monkeypatch.setattr(module, "INT32_LIMIT", 0)  # what a 128 x 256^3 output needs
    x = channels_last_randn((1, 8, 2, 3, 2), torch.float32, device).requires_grad_()
    y = upsample_nearest(x, (2, 2, 2))
    torch.testing.assert_close(y, F.interpolate(x.detach(), scale_factor=2, mode="nearest"), rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.full_like(x, 8.0))


@pytest.mark.parametrize("device", DEVICES)
def test_a_contiguous_gradient_is_taken_too(device):
    x = channels_last_randn((2, 4, 3, 3, 3), torch.float32, device).requires_grad_()
    dy = torch.randn(2, 4, 6, 6, 6, device=device)  # plain contiguous
    upsample_nearest(x, (2, 2, 2)).backward(dy)
    torch.testing.assert_close(x.grad, dy.reshape(2, 4, 3, 2, 3, 2, 3, 2).sum(dim=(3, 5, 7)))


@pytest.mark.parametrize("device", DEVICES)
def test_other_inputs_take_the_reference_and_bad_factors_raise(device):
    x = torch.randn(2, 4, 3, 3, 3, device=device)  # contiguous
    assert not kernel_takes(x)
    torch.testing.assert_close(upsample_nearest(x, (2, 2, 2)), F.interpolate(x, scale_factor=2, mode="nearest"))
    with pytest.raises(ValueError, match=r"upsample_nearest: one positive integer factor per spatial axis"):
        upsample_nearest(x, (2, 2))
    with pytest.raises(ValueError, match=r"got \(2, 0, 2\)"):
        upsample_nearest(x, (2, 0, 2))
