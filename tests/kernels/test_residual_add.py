"""kernels/residual_add.py: x + y + bias per channel in one pass, against the float64 reference, forward and
gradients; through Triton's interpreter on CPU (CI) and on CUDA when present."""
import pytest
import torch

from kernels.residual_add import residual_bias_add, residual_bias_add_reference
from tests.kernels.devices import DEVICES, needs_a_triton_device

pytestmark = needs_a_triton_device
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, device, channels_last):
    x = torch.randn(shape, device=device, dtype=dtype)
    y = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x, y = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, y))
    bias = torch.randn(shape[1], device=device)
    return [t.requires_grad_() for t in (x, y, bias)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 5, 3, 4, 6), (3, 8, 17), (1, 64, 9, 9, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_forward_and_backward(device, shape, channels_last, dtype):
    x, y, bias = _inputs(shape, dtype, device, channels_last)
    out = residual_bias_add(x, y, bias)
    assert out.dtype == dtype and out.stride() == x.stride()
    ref = residual_bias_add_reference(*(t.detach().double() for t in (x, y, bias)))
    torch.testing.assert_close(out.double(), ref, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 4)
    grad = torch.randn_like(out)
    dx, dy, db = torch.autograd.grad(out, (x, y, bias), grad)
    assert torch.equal(dx, grad) and torch.equal(dy, grad)
    expected = grad.double().sum(dim=[d for d in range(grad.ndim) if d != 1])
    torch.testing.assert_close(db.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_each_channel_gets_its_own_bias(device):
    """The kernel's channel index (flat index // space % C, or % C channels-last) against a bias that names each
    channel: a swapped or shifted index fails."""
    for channels_last in (False, True):
        x, y, _ = _inputs((2, 6, 3, 5), torch.float32, device, channels_last)
        bias = torch.arange(6, dtype=torch.float32, device=device) * 100
        out = residual_bias_add(x.detach() * 0, y.detach() * 0, bias)
        assert torch.equal(out, bias.view(1, 6, 1, 1).expand(2, 6, 3, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_layouts_take_the_reference_path(device):
    x, y, bias = _inputs((1, 4, 3, 3, 3), torch.float32, device, False)
    y_cl = y.detach().movedim(1, -1).contiguous().movedim(-1, 1)
    torch.testing.assert_close(residual_bias_add(x, y_cl, bias), residual_bias_add_reference(x, y, bias))


def test_bad_shapes_name_the_culprit():
    x = torch.zeros(1, 4, 3, 3)
    with pytest.raises(ValueError, match="bias"):
        residual_bias_add(x, x, torch.zeros(5))
    with pytest.raises(ValueError, match="differ"):
        residual_bias_add(x, torch.zeros(1, 4, 3, 2), torch.zeros(4))
