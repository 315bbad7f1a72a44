"""kernels/channel_sum.py: per-channel fp32 sums of channels-last tensors against a float64 sum, through Triton's
interpreter on CPU (CI) and on CUDA when present."""
import os

import pytest
import torch

from kernels import channel_sum as module
from kernels.channel_sum import channel_sum

DEVICES = ["cuda"] if torch.cuda.is_available() else []
if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICES.append("cpu")
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")


def _channels_last(shape, dtype, device):
    return torch.randn(shape, device=device).to(dtype).movedim(1, -1).contiguous().movedim(-1, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 5, 3, 4, 6), (3, 8, 17), (2, 64, 9, 9, 9), (1, 300, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_float64_sum(device, shape, dtype):
    x = _channels_last(shape, dtype, device)
    out = channel_sum(x)
    assert out.dtype == torch.float32 and out.shape == (shape[1],)
    expected = x.double().sum(dim=[d for d in range(x.ndim) if d != 1])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_many_row_blocks_per_program_and_a_ragged_last_block(device, monkeypatch):
    # a small tile makes each program loop over several row blocks, the last one partly masked
    monkeypatch.setattr(module, "TILE", 64)
    x = _channels_last((3, 16, 7, 11, 5), torch.float32, device)
    torch.testing.assert_close(channel_sum(x).double(), x.double().sum(dim=(0, 2, 3, 4)), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_channel_slice_of_a_wider_channels_last_tensor(device, dtype):
    # what torch.cat along channels hands each input in backward: rows 24 channels apart, 10 of them summed
    wide = _channels_last((2, 24, 5, 6, 7), dtype, device)
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
