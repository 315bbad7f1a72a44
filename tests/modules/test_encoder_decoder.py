import pytest
import torch

from ldm.modules.diffusionmodules.model import (AttentionBlock, Decoder, Encoder, Upsample, build_encoder_decoder)
from ldm.modules.normalization import set_kernels


def _ddconfig(dims: int, **overrides) -> dict:
    config = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], in_channels=2, out_ch=3,
                  resolution=8, z_channels=4, double_z=True, dims=dims, norm_num_groups=4)
    return {**config, **overrides}


@pytest.mark.parametrize("dims,spatial", [(2, (8, 12)), (3, (8, 4, 6))])
def test_shapes_round_trip(dims, spatial):
    torch.manual_seed(0)
    encoder, decoder = build_encoder_decoder(_ddconfig(dims))
    x = torch.randn(2, 2, *spatial)
    moments = encoder(x)
    assert moments.shape == (2, 8, *[s // 2 for s in spatial])
    assert decoder(moments[:, :4]).shape == (2, 3, *spatial)
    assert encoder.factor == decoder.factor == 2


def test_single_z_and_three_levels_3d():
    encoder, decoder = build_encoder_decoder(_ddconfig(3, ch_mult=[1, 1, 2], double_z=False, attn_resolutions=[]))
    z = encoder(torch.randn(1, 2, 8, 8, 8))
    assert z.shape == (1, 4, 2, 2, 2)
    assert decoder(z).shape == (1, 3, 8, 8, 8)


def test_odd_sizes_fail_clearly_when_downsampling_and_work_without():
    encoder, _ = build_encoder_decoder(_ddconfig(3))
    with pytest.raises(ValueError, match=r"\[7, 8, 8\] is not divisible by the downsampling factor 2"):
        encoder(torch.randn(1, 2, 7, 8, 8))
    encoder, decoder = build_encoder_decoder(_ddconfig(2, ch_mult=[1], attn_resolutions=[], resolution=7))
    assert decoder(encoder(torch.randn(1, 2, 7, 9))[:, :4]).shape == (1, 3, 7, 9)


def test_attention_placement_by_level_size():
    count = lambda module: sum(isinstance(m, AttentionBlock) for m in module.modules())
    # per-axis resolution [8, 8, 4]: levels (8, 8, 4) and (4, 4, 2); an int matches a level's largest side
    encoder, decoder = build_encoder_decoder(_ddconfig(3, resolution=[8, 8, 4], attn_resolutions=[4]))
    assert count(encoder.down[0]) == 0 and count(encoder.down[1]) == 1  # one ResNet block, one attention
    assert count(decoder.up[0]) == 2 and count(decoder.up[1]) == 0  # decoder levels: num_res_blocks + 1
    encoder, _ = build_encoder_decoder(_ddconfig(3, resolution=[8, 8, 4], attn_resolutions=[[8, 8, 4]]))
    assert count(encoder.down[0]) == 1 and count(encoder.down[1]) == 0
    assert count(encoder.mid) == 1
    with pytest.raises(ValueError, match="attn_resolutions entry 16 matches no level"):
        build_encoder_decoder(_ddconfig(3, attn_resolutions=[16]))


def test_attention_block_matches_reference_softmax_attention():
    torch.manual_seed(0)
    block = AttentionBlock(8, dims=3, num_groups=4)
    x = torch.randn(2, 8, 2, 3, 4)
    h = block.norm(x)
    q, k, v = (t.flatten(2) for t in block.qkv(h).chunk(3, dim=1))  # (B, C, N)
    weights = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / 8 ** 0.5, dim=-1)
    out = torch.einsum("bnm,bcm->bcn", weights, v).reshape(2, 8, 2, 3, 4)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_gives_token_major_qkv(monkeypatch, channels_last):
    """cuDNN and flash attention refuse a head dim with stride != 1: q, k, v must be token-major in either layout."""
    from ldm.modules.diffusionmodules import model as model_module

    seen = []

    def spy(q, k, v, backend=None):
        seen.append([t.stride(-1) for t in (q, k, v)])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(model_module, "attention", spy)
    block = AttentionBlock(8, dims=3, num_groups=4)
    x = torch.randn(2, 8, 2, 3, 4)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    block(x)
    assert seen == [[1, 1, 1]]


def test_upsample_without_conv_is_nearest_repeat():
    x = torch.randn(1, 2, 3, 5)
    expected = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(Upsample(2, dims=2, with_conv=False)(x), expected)


def test_upsample_keeps_bf16_under_autocast(monkeypatch):
    """CUDA autocast would run nearest interpolation in fp32 (twice the bytes, two casts): it runs with autocast off."""
    from ldm.modules import nn_dims

    states = []
    interpolate = nn_dims.F.interpolate

    def spy(x, **kwargs):
        states.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return interpolate(x, **kwargs)

    monkeypatch.setattr(nn_dims.F, "interpolate", spy)
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nn_dims.upsample_nearest(x, 2)
    assert states == [(torch.bfloat16, False)] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4))


@pytest.mark.parametrize("shape,memory_format", [((2, 3, 4, 5, 6), torch.channels_last_3d),
                                                 ((2, 3, 4, 5), torch.channels_last)])
def test_upsample_of_channels_last_input_stays_channels_last(shape, memory_format):
    from ldm.modules.nn_dims import upsample_nearest

    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
    reference = x.detach().contiguous().requires_grad_()
    y, expected = upsample_nearest(x, 2), torch.nn.functional.interpolate(reference, scale_factor=2, mode="nearest")
    assert torch.equal(y, expected) and y.is_contiguous(memory_format=memory_format)
    grad = torch.randn_like(expected)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, reference.grad)


def test_broadcast_upsampling_for_outputs_past_int32_matches_interpolate():
    """Outputs of 2^31 elements or more (where PyTorch's CUDA nearest kernel fails) take the broadcast path."""
    from ldm.modules.nn_dims import _upsample_nearest_broadcast

    x = torch.randn(2, 3, 4, 5, 6)
    for factors in ([2, 2, 2], [3, 1, 2]):
        expected = torch.nn.functional.interpolate(x, scale_factor=factors, mode="nearest")
        assert torch.equal(_upsample_nearest_broadcast(x, factors, channels_last=False), expected)


def test_avgpool_resampling_round_trip():
    encoder, decoder = build_encoder_decoder(_ddconfig(3, resamp_with_conv=False))
    assert decoder(encoder(torch.randn(1, 2, 4, 8, 8))[:, :4]).shape == (1, 3, 4, 8, 8)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_gradient_checkpointing_gives_same_outputs_and_gradients(kernels):
    """Recomputation in backward gives what the plain forward and backward give, input gradient included; with the
    Triton kernels too, whose norms pass the block input on to the shortcut (pass_input)."""
    torch.manual_seed(0)
    plain = set_kernels(Encoder(**{k: v for k, v in _ddconfig(3).items() if k != "out_ch"}), kernels)
    checkpointed = set_kernels(Encoder(**{k: v for k, v in _ddconfig(3, use_checkpoint=True).items()
                                          if k != "out_ch"}), kernels)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 2, 8, 8, 8)
    x_plain, x_ckpt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_ckpt = plain(x_plain), checkpointed(x_ckpt)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    torch.testing.assert_close(x_ckpt.grad, x_plain.grad)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_config_errors_name_the_culprit():
    with pytest.raises(ValueError, match="unknown key 'z_channel'"):
        build_encoder_decoder({**_ddconfig(2), "z_channel": 4})
    with pytest.raises(ValueError, match="missing key 'out_ch'"):
        build_encoder_decoder({k: v for k, v in _ddconfig(2).items() if k != "out_ch"})
    with pytest.raises(ValueError, match="not divisible by norm_num_groups=32"):
        build_encoder_decoder(_ddconfig(2, norm_num_groups=32))
    with pytest.raises(ValueError, match="resolution \\[8, 8\\] has 2 entries for dims=3"):
        build_encoder_decoder(_ddconfig(3, resolution=[8, 8]))
    with pytest.raises(ValueError, match="unsupported dims=4"):
        build_encoder_decoder(_ddconfig(4))
    with pytest.raises(ValueError, match="expected 4 latent channels"):
        decoder = Decoder(**{k: v for k, v in _ddconfig(2).items() if k not in ("in_channels", "double_z")})
        decoder(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"expected a \(B, C, D, H, W\) tensor"):
        build_encoder_decoder(_ddconfig(3))[0](torch.randn(1, 2, 8, 8))


def test_channels_last_3d_matches_contiguous():
    torch.manual_seed(0)
    encoder, decoder = build_encoder_decoder(_ddconfig(3))
    x = torch.randn(1, 2, 8, 8, 8)
    expected = decoder(encoder(x)[:, :4])
    encoder, decoder = (m.to(memory_format=torch.channels_last_3d) for m in (encoder, decoder))
    out = decoder(encoder(x.to(memory_format=torch.channels_last_3d))[:, :4])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
