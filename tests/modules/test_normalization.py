"""GroupNormAct and the `kernels` switch: the Triton kernels (interpreted on CPU) give the models the same outputs and
gradients as PyTorch's GroupNorm."""
import copy

import pytest
import torch

from ldm.modules.diffusionmodules.model import Decoder, Encoder, ResnetBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
from ldm.modules.normalization import GroupNormAct, set_group_norm_tuning, set_kernels


def outputs_and_grads(model, inputs):
    model.zero_grad()
    out = model(*inputs)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_model_results(model, inputs, atol=2e-5):
    torch_model = set_kernels(copy.deepcopy(model), "torch")
    triton_model = set_kernels(copy.deepcopy(model), "triton")
    out_ref, grads_ref = outputs_and_grads(torch_model, inputs)
    out, grads = outputs_and_grads(triton_model, inputs)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=atol, rtol=1e-3, msg=name)


@pytest.mark.parametrize("act", [False, True])
def test_module_scale_shift_matches_torch_path(act):
    norm = GroupNormAct(8, 4, act=act)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, scale, shift = torch.randn(2, 8, 3, 4, 5), torch.randn(2, 8, 1, 1, 1), torch.randn(2, 8, 1, 1, 1)
    expected = norm.__class__.forward(set_kernels(copy.deepcopy(norm), "torch"), x, scale, shift)
    got = set_kernels(norm, "triton")(x, scale, shift)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act,scale_shift,bias_shape",
                         [(False, False, (8,)), (True, True, (8,)), (True, False, (2, 8))])
def test_module_input_bias_matches_torch_path(act, scale_shift, bias_shape):
    """The convolution's bias (+ a per-sample embedding) added by the norm: output and every gradient, input_bias's
    included."""
    torch.manual_seed(0)
    norm = GroupNormAct(8, 4, act=act)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, input_bias = torch.randn(2, 8, 3, 4, 5), 3 * torch.randn(bias_shape)
    scale, shift = (torch.randn(2, 8), torch.randn(2, 8)) if scale_shift else (None, None)
    results = {}
    for kernels in ("torch", "triton"):
        module = set_kernels(copy.deepcopy(norm), kernels)
        x_leaf, bias_leaf = x.clone().requires_grad_(), input_bias.clone().requires_grad_()
        out = module(x_leaf, scale, shift, input_bias=bias_leaf)
        out.square().mean().backward()
        results[kernels] = dict(out=out.detach(), x=x_leaf.grad, input_bias=bias_leaf.grad, weight=module.weight.grad,
                                bias=module.bias.grad)
    for name, expected in results["torch"].items():
        torch.testing.assert_close(results["triton"][name], expected, atol=2e-5, rtol=1e-4, msg=name)


def test_unet_resblock_with_scale_shift_norm_same_with_triton_kernels():
    torch.manual_seed(0)
    block = ResBlock(32, emb_channels=8, dropout=0.0, dims=3, use_scale_shift_norm=True)
    for p in block.parameters():  # the zero-initialised output convolution would hide the first norm's gradients
        torch.nn.init.normal_(p, std=0.2)
    assert_same_model_results(block, (torch.randn(2, 32, 3, 4, 4), torch.randn(2, 8)))


def test_unet_resblock_with_added_embedding_same_with_triton_kernels():
    """The embedding and in_conv's bias enter out_norm as one (N, C) input bias."""
    torch.manual_seed(0)
    block = ResBlock(32, emb_channels=8, dropout=0.0, dims=2, out_channels=64)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert_same_model_results(block, (torch.randn(2, 32, 5, 6), torch.randn(2, 8)))


def assert_equals_plain_composition(block, inputs, plain):
    """block(*inputs) and plain(*inputs) (the block's layers one after another): outputs and the gradients of the
    parameters and inputs (x's joins the shortcut's and the first norm's: in the norm's kernel with Triton)."""
    results = []
    for fn in (block, plain):
        block.zero_grad()
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        results.append((out.detach(), grads | {f"input {i}": t.grad for i, t in enumerate(leaves)}))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("shortcut", ["identity", "conv"])
def test_resblocks_equal_the_plain_composition_with_biased_convs(kernels, shortcut):
    """Conv biases folded into the next norm (input_bias) and into a 1x1 shortcut's bias give what the blocks' layers
    give one after another, gradients included; identity and convolution shortcuts."""
    torch.manual_seed(0)
    widen = 2 if shortcut == "conv" else 1
    ae = set_kernels(ResnetBlock(16, 16 * widen, 0.0, 3, 8), kernels)
    assert_equals_plain_composition(ae, (torch.randn(2, 16, 3, 4, 5),),
                                    lambda x: ae.skip(x) + ae.conv2(ae.norm2(ae.conv1(ae.norm1(x)))))
    unet = set_kernels(ResBlock(32, emb_channels=8, dropout=0.0, dims=3, out_channels=32 * widen), kernels)
    for p in unet.parameters():  # the zero-initialised output convolution would hide the rest
        torch.nn.init.normal_(p, std=0.2)

    def unet_plain(x, emb):
        h = unet.in_conv(unet.in_norm(x)) + unet.emb_proj(emb)[:, :, None, None, None]
        return unet.skip(x) + unet.out_conv(unet.out_norm(h))
    assert_equals_plain_composition(unet, (torch.randn(2, 32, 3, 4, 5), torch.randn(2, 8)), unet_plain)


def test_unet_applies_kernels_choice_to_every_norm():
    model = UNetModel(image_size=8, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                      attention_resolutions=[2], channel_mult=(1, 2), num_heads=2, use_spatial_transformer=True,
                      context_dim=4, kernels="torch")
    norms = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    assert len(norms) > 5 and all(m.kernels == "torch" for m in norms)


def test_a_module_tuning_reaches_the_kernels(monkeypatch):
    """set_group_norm_tuning sets every norm's launch choices; the module passes them to the kernels, whose result
    (here small tiles in two launches of 3 splits, channels-last) stays PyTorch's."""
    from kernels import group_norm
    from kernels.group_norm import GroupNormTuning

    model = torch.nn.Sequential(GroupNormAct(30, 3, kernels="triton"), GroupNormAct(30, 3, kernels="triton"))
    tuning = GroupNormTuning(forward_tile=128, backward_tile=128, splits=3, fused=False)
    assert set_group_norm_tuning(model, tuning) is model and all(m.tuning is tuning for m in model)
    seen = []
    real_plan = group_norm._plan
    monkeypatch.setattr(group_norm, "_plan", lambda *a: seen.append(real_plan(*a)) or seen[-1])
    x = torch.randn(2, 30, 3, 4, 5).to(memory_format=torch.channels_last_3d).requires_grad_()
    got = model(x)
    got.square().mean().backward()
    assert seen and all((plan.fused, plan.splits, plan.block_s) == (False, 3, 2) for plan in seen)
    expected = set_kernels(copy.deepcopy(model), "torch")(x.detach())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_autoencoder_encoder_decoder_same_with_triton_kernels():
    torch.manual_seed(0)
    config = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], resolution=8, z_channels=2, dims=3,
                  norm_num_groups=4, kernels="triton")
    encoder = Encoder(in_channels=1, **config)
    decoder = Decoder(out_ch=1, **config)
    assert all(m.kernels == "triton" for m in encoder.modules() if isinstance(m, GroupNormAct))
    assert_same_model_results(encoder, (torch.randn(1, 1, 8, 8, 8),))
    assert_same_model_results(decoder, (torch.randn(1, 2, 4, 4, 4),))


def test_channels_last_autoencoder_runs_its_one_channel_layers_in_the_thin_conv_kernels(monkeypatch):
    """A channels-last Encoder / Decoder of a one-channel image: conv_in and the decoder's conv_out go through
    kernels/thin_conv.py with kernels=triton (and, in models this small, every other 3x3x3 convolution with at most 8
    channels on one side and more on the other), and the models give what the torch path gives, gradients included."""
    import kernels.thin_conv as thin
    from ldm.engine.memory_format import channels_last, model_to_channels_last
    calls = []
    real = thin.thin_conv3d
    monkeypatch.setattr(thin, "thin_conv3d", lambda x, w, b: calls.append(tuple(w.shape)) or real(x, w, b))
    torch.manual_seed(0)
    config = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], resolution=8, z_channels=2, dims=3,
                  norm_num_groups=4)
    encoder = model_to_channels_last(Encoder(in_channels=1, **config))
    decoder = model_to_channels_last(Decoder(out_ch=1, **config))
    # batch 2: PyTorch's CPU convolutions return NCDHW for a batch of one, whatever the input's layout
    assert_same_model_results(encoder, (channels_last(torch.randn(2, 1, 8, 8, 8)),))
    assert_same_model_results(decoder, (channels_last(torch.randn(2, 2, 4, 4, 4)),))
    assert (8, 1, 3, 3, 3) in calls and (1, 8, 3, 3, 3) in calls
    assert all(min(shape[:2]) <= 8 and shape[0] != shape[1] for shape in calls), calls


def test_auto_uses_torch_on_cpu_and_bad_choice_is_named():
    norm = GroupNormAct(4, 2)
    assert norm.kernels == "auto" and not norm.uses_triton(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="kernels must be one of auto, triton, torch, got 'cuda'"):
        GroupNormAct(4, 2, kernels="cuda")
    with pytest.raises(ValueError, match="kernels must be one of"):
        Encoder(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=[], in_channels=1, resolution=8, z_channels=2,
                norm_num_groups=4, kernels="fast")


@pytest.mark.parametrize("block", ["unet_attention", "ae_attention", "spatial_transformer"])
def test_attention_blocks_same_with_triton_kernels_input_gradient_included(block):
    """The attention blocks take x back from their norm (pass_input) for the residual: with the Triton kernels the
    residual's gradient is added in the norm's backward; output, parameter and input gradients as with PyTorch's."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.model import AttentionBlock as AEAttentionBlock
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock

    torch.manual_seed(0)
    module = {"unet_attention": lambda: AttentionBlock(32, heads=2),
              "ae_attention": lambda: AEAttentionBlock(32, dims=3, num_groups=8),
              "spatial_transformer": lambda: SpatialTransformer(32, n_heads=2, d_head=8, dims=3)}[block]()
    for p in module.parameters():  # the zero-initialised output projection would hide the rest
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 32, 3, 4, 5)
    results = {}
    for kernels in ("torch", "triton"):
        model = set_kernels(copy.deepcopy(module), kernels)
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        out.square().mean().backward()
        results[kernels] = {"out": out.detach(), "x": leaf.grad,
                            **{n: p.grad for n, p in model.named_parameters()}}
    for name, expected in results["torch"].items():
        torch.testing.assert_close(results["triton"][name], expected, atol=2e-5, rtol=1e-4, msg=name)
