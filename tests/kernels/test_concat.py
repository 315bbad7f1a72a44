"""kernels/concat.py: concatenation of channels-last tensors along channels against torch.cat (exact, forward and
gradients), through Triton's interpreter on CPU (CI) and on CUDA."""
import pytest
import torch

from kernels import concat as module
from kernels.concat import concat_channels, kernel_takes
from kernels.layout import is_channels_last
from ldm.modules.nn_dims import concat_skip, conv_nd
from tests.kernels.devices import DEVICES, channels_last_randn, needs_a_triton_device

pytestmark = needs_a_triton_device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_shape, skip_channels", [((2, 6, 3, 4, 5), 10), ((1, 16, 2, 3, 1), 16),
                                                     ((2, 3, 5, 7), 5), ((2, 300, 9), 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_cat_and_its_gradients(device, h_shape, skip_channels, dtype, monkeypatch):
    monkeypatch.setattr(module, "TILE", 64)  # several row blocks, the last one ragged
    h = channels_last_randn(h_shape, dtype, device).requires_grad_()
    skip = channels_last_randn((h_shape[0], skip_channels, *h_shape[2:]), dtype, device).requires_grad_()
    assert kernel_takes(h, skip)
    out = concat_channels(h, skip)
    assert torch.equal(out, torch.cat([h, skip], dim=1)) and is_channels_last(out)
    grad = channels_last_randn(out.shape, dtype, device)
    out.backward(grad)
    c1 = h_shape[1]
    assert torch.equal(h.grad, grad[:, :c1]) and is_channels_last(h.grad)  # dense, channels-last
    assert torch.equal(skip.grad, grad[:, c1:])


@pytest.mark.parametrize("device", DEVICES)
def test_contiguous_gradient_and_int64_offsets(device, monkeypatch):
    monkeypatch.setattr(module, "INT32_LIMIT", 0)  # what a concatenation of 2^31 elements or more needs
    h = channels_last_randn((2, 4, 3, 2, 2), torch.float32, device).requires_grad_()
    skip = channels_last_randn((2, 2, 3, 2, 2), torch.float32, device).requires_grad_()
    out = concat_channels(h, skip)
    grad = torch.randn(out.shape, device=device)  # plain contiguous
    out.backward(grad)
    assert torch.equal(out, torch.cat([h, skip], dim=1))
    assert torch.equal(h.grad, grad[:, :4]) and torch.equal(skip.grad, grad[:, 4:])


@pytest.mark.parametrize("device", DEVICES)
def test_other_inputs_go_to_cat(device):
    h = channels_last_randn((2, 4, 3, 3), torch.float32, device)
    assert not kernel_takes(h.contiguous(), h)                             # h not channels-last
    assert not kernel_takes(h, channels_last_randn((2, 4, 3, 2), torch.float32, device))  # spatial differs
    assert not kernel_takes(h, h.double())                                 # dtypes differ
    assert not kernel_takes(h[:, :, :1, :1], h[:, :, :1, :1])              # one position
    torch.testing.assert_close(concat_channels(h.contiguous(), h), torch.cat([h, h], dim=1))


@pytest.mark.parametrize("device", DEVICES)
def test_concat_skip_with_triton_equals_torch_through_a_convolution(device):
    """The UNet decoder's path: concatenation, then a convolution; output and gradients of both inputs and the
    weights against concat_skip's PyTorch path."""
    torch.manual_seed(0)
    conv = conv_nd(3, 12, 5, 3, padding=1).to(device)
    h = channels_last_randn((2, 8, 4, 4, 4), torch.float32, device)
    skip = channels_last_randn((2, 4, 4, 4, 4), torch.float32, device)
    results = []
    for use_triton in (True, False):
        conv.zero_grad()
        inputs = [t.detach().clone().requires_grad_() for t in (h, skip)]
        out = conv(concat_skip(*inputs, use_triton=use_triton))
        out.square().sum().backward()
        results.append((out, inputs[0].grad, inputs[1].grad, conv.weight.grad.clone()))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_unet_decoder_takes_the_kernel_and_matches_torch(device, monkeypatch):
    """A channels-last UNet with kernels=triton (GroupNorm, bias adds, upsampling, thin convolutions and the skip
    concatenations in Triton) against the same weights with kernels=torch: output and every gradient."""
    from ldm.engine.memory_format import model_to_channels_last
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.normalization import set_kernels
    from tests.modules.helpers import randomize_zero_parameters

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN's fp32 convolutions in fp32, both runs
    calls = []
    original = module._ConcatChannels.apply
    monkeypatch.setattr(module._ConcatChannels, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = UNetModel(image_size=4, dims=3, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                      attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16).to(device)
    randomize_zero_parameters(model)
    model = model_to_channels_last(model)
    x = channels_last_randn((2, 2, 4, 4, 4), torch.float32, device)
    t = torch.tensor([3, 700], device=device)
    results = []
    for kernels in ("triton", "torch"):
        set_kernels(model, kernels)
        model.zero_grad(set_to_none=True)
        out = model(x, t)
        out.square().mean().backward()
        results.append((out.detach(), {name: p.grad for name, p in model.named_parameters()}))
    assert len(calls) == len(model.output_blocks)
    (out, grads), (reference, reference_grads) = results
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
