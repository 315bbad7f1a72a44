"""Decoding in slabs (ldm/modules/diffusionmodules/slab_decode.py) equals the plain decode up to rounding."""
import pytest
import torch

from ldm.modules.diffusionmodules import slab_decode
from ldm.modules.diffusionmodules.model import build_encoder_decoder
from ldm.modules.diffusionmodules.slab_decode import decode_in_slabs
from tests.modules.helpers import randomize_zero_parameters


def _decoder(dims: int, **overrides):
    config = dict(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=1, out_ch=2,
                  resolution=16, z_channels=4, double_z=True, dims=dims, norm_num_groups=4, kernels="torch")
    torch.manual_seed(0)
    decoder = build_encoder_decoder({**config, **overrides})[1]
    return randomize_zero_parameters(decoder).double().eval()


@pytest.mark.parametrize("dims,latent", [(3, (5, 6, 3)), (2, (7, 5))])
@pytest.mark.parametrize("slab", [1, 3, 4, 7, 100])
def test_equals_the_plain_decode_in_float64(dims, latent, slab):
    """Odd sizes, slabs of one row, of sizes that do not divide the output, and one slab for all: exact to 1e-12
    (attention at the middle level and the mid block; a channel change with its 1x1 skip at each level)."""
    decoder = _decoder(dims)
    z = torch.randn(2, 4, *latent, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(decode_in_slabs(decoder, z, slab), decoder(z), atol=1e-12, rtol=0)


def test_storage_device_holds_the_result():
    decoder = _decoder(2)
    z = torch.randn(1, 4, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        out = decode_in_slabs(decoder, z, 6, storage="cpu")
        torch.testing.assert_close(out, decoder(z), atol=1e-12, rtol=0)
    assert out.device == torch.device("cpu")


def test_nearest_upsampling_without_conv_and_silu_free_norms():
    decoder = _decoder(3, resamp_with_conv=False, attn_resolutions=[])
    z = torch.randn(1, 4, 4, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(decode_in_slabs(decoder, z, 2), decoder(z), atol=1e-12, rtol=0)


def test_float32_and_bf16_autocast_stay_close():
    decoder = _decoder(3).float()
    z = torch.randn(1, 4, 6, 4, 4)
    with torch.no_grad():
        plain = decoder(z)
        torch.testing.assert_close(decode_in_slabs(decoder, z, 5), plain, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            slabs, reference = decode_in_slabs(decoder, z, 5), decoder(z)
    assert (slabs.float() - reference.float()).abs().max() < 0.05 * plain.abs().max()


def test_the_decoder_decodes_in_slabs_only_in_inference(monkeypatch):
    calls = []
    monkeypatch.setattr("ldm.modules.diffusionmodules.model.decode_in_slabs",
                        lambda decoder, z, slab: calls.append(slab) or slab_decode.decode_in_slabs(decoder, z, slab))
    decoder = _decoder(3, decode_slab=8)
    z = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        out = decoder(z)  # output depth 16 > 8 rows
        decoder(z[:, :, :2])  # output depth 8: one slab, decoded plainly
    assert calls == [8]
    decoder(z)  # autograd on: plain
    decoder.train()
    with torch.no_grad():
        decoder(z)  # training mode: plain
    assert calls == [8]
    decoder.eval().decode_slab = None
    with torch.no_grad():
        torch.testing.assert_close(out, decoder(z), atol=1e-12, rtol=0)


def test_bad_slab_sizes_are_refused():
    decoder = _decoder(2)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="decode slab must be a positive number of rows"):
            decode_in_slabs(decoder, torch.randn(1, 4, 4, 4, dtype=torch.float64), bad)
        with pytest.raises(ValueError, match="decode_slab must be a positive int"):
            _decoder(2, decode_slab=bad)


def test_a_strided_convolution_is_refused():
    decoder = _decoder(2)
    decoder.conv_out.stride = (2, 2)
    with pytest.raises(ValueError, match="not a stride-1, zero-padded 'same' convolution"):
        decode_in_slabs(decoder, torch.randn(1, 4, 4, 4, dtype=torch.float64), 4)


@pytest.mark.parametrize("act", [True, False])
def test_normalize_with_the_tensors_own_statistics_is_the_norm(act):
    """slab_decode.normalize with whole-tensor statistics equals GroupNormAct's forward; bf16 input keeps its dtype
    and is computed in fp32; a mean of 1000 with deviation 1 stays within fp32 GroupNorm's own error."""
    from ldm.modules.normalization import GroupNormAct

    torch.manual_seed(0)
    norm = GroupNormAct(8, num_groups=4, act=act, kernels="torch")
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    def statistics(x):
        groups = x.double().unflatten(1, (4, 2)).flatten(2)
        return groups.mean(2), torch.rsqrt(groups.var(2, correction=0) + norm.eps)

    x = 1000.0 + torch.randn(2, 8, 3, 4, 5)
    half = torch.randn(2, 8, 3, 4, 5).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(slab_decode.normalize(x, norm, *statistics(x)), norm(x), atol=2e-4, rtol=0)
        out = slab_decode.normalize(half, norm, *statistics(half))
        expected = norm(half.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.01)  # bf16 rounding of the result only
