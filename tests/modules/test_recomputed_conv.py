"""norm_act_conv: conv(GroupNorm+SiLU(x)) that saves x only and recomputes the norm in backward."""
import pytest
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import ResnetBlock, build_encoder_decoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.resampling import Upsample
from ldm.modules.recomputed_conv import norm_act_conv, prepared_conv
from kernels import channel_sum as channel_sum_module
from kernels.channel_sum import channel_sum as original_channel_sum
from ldm.modules.nn_dims import conv_nd
from ldm.modules.normalization import GroupNormAct, set_kernels
from tests.modules.helpers import randomize_zero_parameters

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def _pair(dims: int, dtype=torch.float32, out_channels: int = 6, **conv_kwargs):
    torch.manual_seed(0)
    norm = GroupNormAct(8, 4, kernels="torch").to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    conv = CONV[dims](8, out_channels, 3, **({"padding": 1} | conv_kwargs)).to(dtype)
    return norm, conv


@pytest.mark.parametrize("dims, conv_kwargs", [(3, {}), (2, {}), (3, {"stride": 2, "bias": False}),
                                               (2, {"dilation": 2, "padding": 2})])
def test_gradients_match_finite_differences(dims, conv_kwargs):
    """The full Jacobian, one finite difference per input element: small shapes (one sample, 2 output channels; at
    2 x 8 x 6^3 -> 6 channels the 3D cases took minutes)."""
    norm, conv = _pair(dims, torch.float64, out_channels=2, **conv_kwargs)
    x = torch.randn(1, 8, *[4 if dims == 3 else 5] * dims, dtype=torch.float64, requires_grad=True)
    params = [p for p in (norm.weight, norm.bias, conv.weight, conv.bias) if p is not None]
    assert torch.autograd.gradcheck(lambda x, *_: norm_act_conv(norm, conv, x), (x, *params))


def test_matches_the_plain_composition_under_bf16_autocast():
    """Same forward, same gradients (fp32 parameters, bf16 convolution) as conv(norm(x)) under autocast."""
    results = []
    for fused in (False, True):
        norm, conv = _pair(3)
        x = torch.randn(2, 8, 6, 6, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm_act_conv(norm, conv, x) if fused else conv(norm(x))
        out.float().square().mean().backward()
        results.append([out.detach(), x.grad, norm.weight.grad, norm.bias.grad, conv.weight.grad, conv.bias.grad])
    for plain, fused in zip(*results):
        assert fused.dtype == plain.dtype
        torch.testing.assert_close(fused, plain, atol=2e-2, rtol=2e-2)
    assert results[1][4].dtype == torch.float32  # parameter gradients in the parameters' dtype


def test_rejects_string_padding():
    norm, conv = _pair(2, padding="same")
    with pytest.raises(ValueError, match="numeric zero padding"):
        norm_act_conv(norm, conv, torch.randn(1, 8, 4, 4, requires_grad=True))


def saved_bytes(fn, rank: int | None = None) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn()` builds its graph (parameters excluded; only
    tensors of `rank` dimensions when given)."""
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, nn.Parameter) and rank in (None, t.dim()):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_resnet_block_keeps_less_and_computes_the_same():
    block = ResnetBlock(16, 16, dropout=0.0, dims=3, num_groups=4)
    x = torch.randn(2, 16, 8, 8, 8, requires_grad=True)
    activation = x.numel() * x.element_size()
    plain = saved_bytes(lambda: block(x))
    out = block(x)
    out.square().mean().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    block.recompute_cheap = True
    recomputed = saved_bytes(lambda: block(x))
    out_recomputed = block(x)
    out_recomputed.square().mean().backward()
    torch.testing.assert_close(out_recomputed, out)
    for before, after in zip(grads, [x.grad] + [p.grad for p in block.parameters()]):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    # plain: per norm -> conv pair the norm's input, its output (kept by SiLU) and the conv's input
    assert plain >= 6 * activation and recomputed <= 2.1 * activation, (plain / activation, recomputed / activation)


def test_autoencoder_setting_reaches_every_block_and_more_than_halves_kept_volumes():
    """Measured on the volumes (rank-5 tensors) autograd keeps: the mid-block attention's token tensors are
    unaffected."""
    ddconfig = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], in_channels=1, out_ch=1,
                    resolution=16, z_channels=4, double_z=True, dims=3, norm_num_groups=4, kernels="torch")
    encoder, decoder = build_encoder_decoder(ddconfig)
    x = torch.randn(1, 1, 16, 16, 16)
    plain = saved_bytes(lambda: decoder(encoder(x)[:, :4]), rank=5)
    reference = decoder(encoder(x)[:, :4])
    encoder_rn, decoder_rn = build_encoder_decoder({**ddconfig, "recompute_cheap": True})
    decoder_rn.load_state_dict(decoder.state_dict())
    encoder_rn.load_state_dict(encoder.state_dict())
    switched = [m for m in (*encoder_rn.modules(), *decoder_rn.modules()) if isinstance(m, (ResnetBlock, Upsample))]
    assert len(switched) == (2 + 2) + (2 + 4 + 1)  # encoder: 2 levels x 1, mid 2; decoder: mid 2, 2 x 2, 1 upsample
    assert all(m.recompute_cheap for m in switched) and encoder_rn.recompute_cheap and decoder_rn.recompute_cheap
    assert not any(m.recompute_cheap for m in decoder.modules() if isinstance(m, (ResnetBlock, Upsample)))
    recomputed = saved_bytes(lambda: decoder_rn(encoder_rn(x)[:, :4]), rank=5)
    torch.testing.assert_close(decoder_rn(encoder_rn(x)[:, :4]), reference)
    assert recomputed < 0.45 * plain, recomputed / plain  # 0.40 when written


def test_upsample_keeps_its_small_input_and_computes_the_same():
    torch.manual_seed(0)
    upsample = Upsample(8, dims=3, with_conv=True)
    x = torch.randn(1, 8, 4, 4, 4, requires_grad=True)
    plain_bytes = saved_bytes(lambda: upsample(x), rank=5)
    out = upsample(x)
    out.square().sum().backward()
    grads = [x.grad.clone(), upsample.conv.weight.grad.clone(), upsample.conv.bias.grad.clone()]
    x.grad = None
    upsample.zero_grad()
    upsample.recompute_cheap = True
    kept_bytes = saved_bytes(lambda: upsample(x), rank=5)
    out_recomputed = upsample(x)
    out_recomputed.square().sum().backward()
    torch.testing.assert_close(out_recomputed, out)
    for before, after in zip(grads, [x.grad, upsample.conv.weight.grad, upsample.conv.bias.grad]):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert kept_bytes == x.numel() * x.element_size() and plain_bytes == 8 * kept_bytes  # 2^3 times smaller


@pytest.mark.parametrize("scale_shift", [True, False])
def test_unet_with_recompute_cheap_computes_the_same_and_keeps_less(scale_shift):
    """ResBlocks (scale-shift or added embedding, resampling inside the block) and upsamplers, all recomputed."""
    def make(recompute):
        torch.manual_seed(0)
        model = UNetModel(image_size=8, dims=3, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                          channel_mult=(1, 2), attention_resolutions=[], num_heads=1, resblock_updown=scale_shift,
                          use_scale_shift_norm=scale_shift, kernels="torch", recompute_cheap=recompute)
        return randomize_zero_parameters(model)

    x = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 900])
    results = []
    for recompute in (False, True):
        model = make(recompute)
        kept = saved_bytes(lambda: model(x, t), rank=5)
        out = model(x, t)
        out.square().mean().backward()
        results.append((kept, out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_kept, plain_out, plain_grads), (kept, out, grads) = results
    # The plain path adds in_conv's bias inside out_norm (input_bias): fp32 sums in another order.
    torch.testing.assert_close(out, plain_out, atol=1e-4, rtol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert kept < 0.6 * plain_kept, kept / plain_kept


def test_triton_norm_recompute_matches_the_plain_composition():
    """The fused Triton GroupNorm (Triton's interpreter on CPU) takes the detached parameters and the scale-shift
    given to `normalize` during the recompute, and returns their gradients."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        norm = GroupNormAct(8, 4, kernels="triton")
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        conv = nn.Conv3d(8, 4, 3, padding=1)
        x = torch.randn(2, 8, 4, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        scale = torch.randn(2, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        shift = torch.randn(2, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
        out = norm_act_conv(norm, conv, x, scale, shift) if fused else conv(norm(x, scale, shift))
        out.square().mean().backward()
        results.append([out.detach(), x.grad, scale.grad, shift.grad, norm.weight.grad, norm.bias.grad,
                        conv.weight.grad])
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


def test_triton_norm_recompute_with_a_sample_bias_matches_the_plain_composition():
    """The UNet ResBlock's recompute path hands its embedding to the Triton norm as a (B, C) sample bias, beside the
    recompute's parameters: output and every gradient (the embedding's included) as the plain composition's."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        norm = GroupNormAct(8, 4, kernels="triton")
        conv = nn.Conv3d(8, 4, 3, padding=1)
        x = torch.randn(2, 8, 4, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        emb = torch.randn(2, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        if fused:
            out = prepared_conv(lambda h, w, b, e: norm.normalize(h, w, b, sample_bias=e), conv, x,
                                (norm.weight, norm.bias, emb))
        else:
            out = conv(norm(x + emb[:, :, None, None, None]))
        out.square().mean().backward()
        results.append([out.detach(), x.grad, emb.grad, norm.weight.grad, norm.bias.grad, conv.weight.grad])
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


def test_triton_bias_gradient_of_a_recomputed_channels_last_conv(monkeypatch):
    """A conv_nd convolution with Triton kernels sums its bias gradient with kernels.channel_sum in the recompute's
    backward too (channels-last, Triton's interpreter on CPU); the result is the plain composition's."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        norm = GroupNormAct(12, 4, kernels="triton")
        conv = conv_nd(3, 12, 10, 3, padding=1)  # more than 8 channels both sides: not a thin convolution
        set_kernels(conv, "triton")
        x = torch.randn(2, 12, 5, 5, 5, generator=torch.Generator().manual_seed(1))
        x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        # a channels-last loss weight keeps the incoming gradient channels-last, as in the models
        weight = torch.randn(2, 10, 5, 5, 5).contiguous(memory_format=torch.channels_last_3d)
        sums = []
        monkeypatch.setattr(channel_sum_module, "channel_sum",
                            lambda g: sums.append(channel_sum_module._channel_rows(g) is not None)
                            or original_channel_sum(g))
        out = norm_act_conv(norm, conv, x) if fused else conv(norm(x))
        (out * weight).sum().backward()
        assert sums == [True]  # the bias gradient came from the Triton channel sum
        results.append([out.detach(), x.grad, norm.weight.grad, conv.weight.grad, conv.bias.grad])
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


def test_resnet_block_with_dropout_recomputes_only_the_first_norm_in_training():
    """Dropout sits between norm2 and conv2: in training that pair runs plainly (same random mask), in eval fused."""
    block = ResnetBlock(16, 16, dropout=0.5, dims=3, num_groups=4)
    x = torch.randn(1, 16, 4, 4, 4, requires_grad=True)
    outputs = {}
    for recompute in (False, True):
        block.recompute_cheap = recompute
        torch.manual_seed(5)
        outputs[recompute] = block(x)
    torch.testing.assert_close(outputs[True], outputs[False])
    kept_train = saved_bytes(lambda: block(x), rank=5)
    block.eval()
    kept_eval = saved_bytes(lambda: block(x), rank=5)
    assert kept_eval < kept_train  # the second pair is fused once dropout is off
