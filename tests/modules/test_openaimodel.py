import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.embeddings import timestep_embedding
from ldm.modules.diffusionmodules import openaimodel
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, Downsample, ResBlock, UNetModel, Upsample
from ldm.util import instantiate_from_config
from tests.modules.helpers import randomize_zero_parameters

TINY = dict(in_channels=3, model_channels=32, out_channels=2, num_res_blocks=1, channel_mult=(1, 2))

VARIANTS = {
    "self_attention_heads": dict(attention_resolutions=[2], num_heads=2),
    "self_attention_head_channels": dict(attention_resolutions=[1, 2], num_head_channels=16, num_heads_upsample=1),
    "spatial_transformer": dict(attention_resolutions=[2], num_head_channels=16, use_spatial_transformer=True,
                                context_dim=5, transformer_depth=2),
    "updown_scale_shift": dict(attention_resolutions=[], num_heads=1, resblock_updown=True,
                               use_scale_shift_norm=True),
    "no_conv_resample": dict(attention_resolutions=[2], num_heads=1, conv_resample=False, dropout=0.1),
}


def make_inputs(model, batch, spatial, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *spatial, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, 4, model.context_dim, generator=gen) if model.context_dim else None
    return x, t, context


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dims, spatial", [(2, (8, 12)), (3, (4, 8, 8))])
def test_output_shape_and_zero_output_at_init(variant, dims, spatial):
    torch.manual_seed(0)
    model = UNetModel(image_size=list(spatial), dims=dims, **TINY, **VARIANTS[variant]).eval()
    x, t, context = make_inputs(model, 2, spatial)
    out = model(x, t, context=context)
    assert out.shape == (2, TINY["out_channels"], *spatial)
    assert torch.equal(out, torch.zeros_like(out))
    randomize_zero_parameters(model)
    out = model(x, t, context=context)
    assert out.shape == (2, TINY["out_channels"], *spatial)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_anisotropic_3d_latents_and_float_timesteps():
    torch.manual_seed(0)
    model = UNetModel(image_size=(8, 16, 16), in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                      attention_resolutions=[4], channel_mult=(1, 1, 2), num_head_channels=32, dims=3)
    randomize_zero_parameters(model)
    x = torch.randn(1, 4, 8, 16, 16)
    out = model(x, torch.tensor([17.5]))
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, torch.tensor([900.0])))


def test_3d_resampling_acts_on_all_three_axes():
    x = torch.randn(1, 2, 2, 4, 6)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    torch.testing.assert_close(Upsample(2, dims=3, with_conv=False)(x), up)
    blocks_mean = x.reshape(1, 2, 1, 2, 2, 2, 3, 2).mean(dim=(3, 5, 7))
    torch.testing.assert_close(Downsample(2, dims=3, with_conv=False)(x), blocks_mean)
    assert Downsample(2, dims=3, with_conv=True)(x).shape == (1, 2, 1, 2, 3)


@pytest.mark.parametrize("use_scale_shift_norm", [True, False])
def test_resblock_matches_its_formula(use_scale_shift_norm):
    """h = conv(silu(gn(x))) on the halved grid; then silu(gn(h) * (1 + scale) + shift) or silu(gn(h + e))."""
    torch.manual_seed(0)
    block = ResBlock(32, 16, 0.0, 64, dims=2, use_scale_shift_norm=use_scale_shift_norm, down=True)
    randomize_zero_parameters(block)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)

    def gn(t, norm):
        return F.group_norm(t, 32, norm.weight, norm.bias, eps=1e-5)

    x_down = F.avg_pool2d(x, 2)
    h = F.conv2d(F.avg_pool2d(F.silu(gn(x, block.in_norm)), 2), block.in_conv.weight, block.in_conv.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_proj[1].weight, block.emb_proj[1].bias)[:, :, None, None]
    if use_scale_shift_norm:
        scale, shift = e[:, :64], e[:, 64:]
        h = F.silu(gn(h, block.out_norm) * (1 + scale) + shift)
    else:
        h = F.silu(gn(h + e, block.out_norm))
    h = F.conv2d(h, block.out_conv.weight, block.out_conv.bias, padding=1)
    expected = F.conv2d(x_down, block.skip.weight, block.skip.bias) + h
    torch.testing.assert_close(block(x, emb), expected)


def test_attention_resolutions_are_downsampling_factors():
    model = UNetModel(16, **TINY, attention_resolutions=[2], num_heads=2, num_heads_upsample=1)
    seen = []
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_hook(lambda m, args, out: seen.append((tuple(args[0].shape[2:]), m.attn.heads)))
    model(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    # encoder level 1 (one ResBlock), middle block, decoder level 1 (num_res_blocks + 1 ResBlocks, upsample heads)
    assert seen == [((8, 8), 2), ((8, 8), 2), ((8, 8), 1), ((8, 8), 1)]


def test_parameter_count_matches_hand_derivation():
    mc, emb, k = 32, 128, 3 * 3   # model_channels, time-embedding width, 3x3 kernel

    def conv(cin, cout, kernel=k):
        return cin * cout * kernel + cout

    def linear(cin, cout):
        return cin * cout + cout

    def norm(c):
        return 2 * c

    def resblock(cin, cout):   # use_scale_shift_norm: the embedding gives 2 * cout values
        skip = conv(cin, cout, 1) if cin != cout else 0
        return norm(cin) + conv(cin, cout) + linear(emb, 2 * cout) + norm(cout) + conv(cout, cout) + skip

    def attention_block(c):   # q, k, v and output projections, all with bias (as the original's qkv convolution)
        return norm(c) + 3 * linear(c, c) + linear(c, c)

    expected = (
        linear(mc, emb) + linear(emb, emb) + 3 * emb                             # time MLP, 3 class embeddings
        + conv(1, mc) + resblock(mc, mc) + conv(mc, mc)                          # encoder level 0 + downsample
        + resblock(mc, 2 * mc) + attention_block(2 * mc)                         # encoder level 1
        + 2 * resblock(2 * mc, 2 * mc) + attention_block(2 * mc)                 # middle
        + resblock(4 * mc, 2 * mc) + resblock(3 * mc, 2 * mc)                    # decoder level 1: skips 64, 32
        + 2 * attention_block(2 * mc) + conv(2 * mc, 2 * mc)                     # ... and upsample
        + resblock(3 * mc, mc) + resblock(2 * mc, mc)                            # decoder level 0: skips 32, 32
        + norm(mc) + conv(mc, 1)                                                 # output
    )
    model = UNetModel(16, in_channels=1, model_channels=mc, out_channels=1, num_res_blocks=1,
                      attention_resolutions=[2], channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True,
                      num_classes=3)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("dim", [6, 7])
def test_timestep_embedding_closed_form(dim):
    timesteps = torch.tensor([0, 1, 37, 999])
    half = dim // 2
    expected = [[math.cos(t * 10000 ** (-i / half)) for i in range(half)]
                + [math.sin(t * 10000 ** (-i / half)) for i in range(half)] + [0.0] * (dim % 2)
                for t in timesteps.tolist()]
    out = timestep_embedding(timesteps, dim)
    assert out.shape == (4, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=2e-4)
    torch.testing.assert_close(timestep_embedding(timesteps.float() + 0.5, 2),
                               torch.stack([torch.cos(timesteps + 0.5), torch.sin(timesteps + 0.5)], dim=1))


def test_class_conditioning():
    torch.manual_seed(0)
    model = UNetModel(8, **TINY, attention_resolutions=[], num_heads=1, num_classes=4)
    randomize_zero_parameters(model)
    x, t, _ = make_inputs(model, 2, (8, 8))
    y = torch.tensor([0, 3])
    out = model(x, t, y=y)
    torch.testing.assert_close(model(x, t, y=y.clone()), out)
    assert not torch.allclose(out, model(x, t, y=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="num_classes=4 needs class labels y"):
        model(x, t)
    with pytest.raises(ValueError, match="num_classes=4 needs class labels y"):
        model(x, t, y=y.float())
    with pytest.raises(ValueError, match="num_classes=4 needs class labels y"):
        model(x, t, y=torch.tensor([0]))
    unconditional = UNetModel(8, **TINY, attention_resolutions=[], num_heads=1)
    with pytest.raises(ValueError, match="num_classes is not set"):
        unconditional(x, t, y=y)


def test_context_checks():
    model = UNetModel(8, **TINY, **VARIANTS["spatial_transformer"])
    x, t, context = make_inputs(model, 2, (8, 8))
    with pytest.raises(ValueError, match=r"context must be \(2, L, 5\), got None"):
        model(x, t)
    with pytest.raises(ValueError, match=r"context must be \(2, L, 5\)"):
        model(x, t, context=context[..., :4])
    plain = UNetModel(8, **TINY, **VARIANTS["self_attention_heads"])
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context=context)


@pytest.mark.parametrize("variant", ["spatial_transformer", "no_conv_resample"])
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    torch.manual_seed(0)
    params = dict(image_size=8, **TINY, **{**VARIANTS[variant], "dropout": 0.1})
    plain = UNetModel(**params)
    randomize_zero_parameters(plain)
    checkpointed = UNetModel(**params, use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, context = make_inputs(plain, 2, (8, 8))

    calls = []
    first_resblock = next(m for m in checkpointed.modules() if isinstance(m, ResBlock))
    first_resblock.register_forward_pre_hook(lambda *_: calls.append(1))

    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)   # same dropout masks in both models
        model(x, t, context=context).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert len(calls) == 2, "a checkpointed block runs its forward again in backward"
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    assert any(g.abs().max() > 0 for name, g in grads[0].items() if name.startswith("input_blocks"))


def test_project_embedding_is_each_blocks_own_projection():
    torch.manual_seed(0)
    blocks = [ResBlock(32, 16, 0.0, out, dims=2, use_scale_shift_norm=shift) for out, shift in
              ((32, False), (64, True), (96, False))]
    emb = torch.randn(3, 16)
    projected = openaimodel.project_embedding(emb, blocks)
    assert list(projected) == blocks
    for block in blocks:
        torch.testing.assert_close(projected[block], block.emb_proj(emb), rtol=1e-6, atol=1e-6)
    assert openaimodel.project_embedding(emb, []) == {}


@pytest.mark.parametrize("variant", ["updown_scale_shift", "spatial_transformer"])
def test_unet_with_projections_in_one_matmul_equals_per_block_projections(variant, monkeypatch):
    """The UNet's one matmul for every ResBlock's embedding projection (project_embedding) against each block
    projecting the embedding itself: output and every gradient."""
    torch.manual_seed(0)
    model = UNetModel(image_size=8, **TINY, **VARIANTS[variant])
    randomize_zero_parameters(model)
    assert len(model.res_blocks) == sum(isinstance(m, ResBlock) for m in model.modules()) > 4
    x, t, context = make_inputs(model, 2, (8, 8))
    results = []
    for per_block in (False, True):
        if per_block:  # ResBlocks given the embedding itself project it with their own emb_proj
            monkeypatch.setattr(openaimodel, "project_embedding", lambda emb, blocks: emb)
        model.zero_grad(set_to_none=True)
        out = model(x, t, context=context)
        out.square().mean().backward()
        results.append((out.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (out, grads), (reference, reference_grads) = results
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert all(grads[f"{name}.weight"].abs().max() > 0 for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".emb_proj." in f".{name}.")


def test_builds_from_an_original_style_config():
    config = OmegaConf.create("""
        target: ldm.modules.diffusionmodules.openaimodel.UNetModel
        params:
          image_size: [4, 8, 8]
          in_channels: 4
          out_channels: 4
          model_channels: 32
          attention_resolutions: [2, 1]
          num_res_blocks: 1
          channel_mult: [1, 2]
          num_head_channels: 24
          use_spatial_transformer: true
          transformer_depth: 1
          context_dim: 8
          use_checkpoint: true
          legacy: false
          dims: 3
          use_fp16: false
    """)
    model = instantiate_from_config(config)
    assert model.use_checkpoint and model.image_size == (4, 8, 8)
    x = torch.randn(1, 4, 4, 8, 8)
    with torch.no_grad():
        assert model(x, torch.tensor([10]), context=torch.randn(1, 3, 8)).shape == x.shape


@pytest.mark.parametrize("legacy", [True, False])
def test_transformer_head_width(legacy):
    """num_head_channels=24 on 32 and 64 channels: 1 and 2 heads of 24 channels, or with legacy of 32 channels."""
    model = UNetModel(8, **TINY, attention_resolutions=[1, 2], num_head_channels=24, use_spatial_transformer=True,
                      context_dim=5, legacy=legacy)
    widths = set()
    for module in model.modules():
        if isinstance(module, SpatialTransformer):
            attn = module.transformer_blocks[0].attn1
            widths.add((module.norm.num_channels, attn.heads, attn.to_q.out_features // attn.heads))
    assert widths == ({(32, 1, 32), (64, 2, 32)} if legacy else {(32, 1, 24), (64, 2, 24)})


@pytest.mark.parametrize("overrides, message", [
    (dict(use_fp16=True), "use_fp16=True is not supported"),
    (dict(attention_resolutions=[4]), r"attention_resolutions \[4\] are never reached"),
    (dict(image_size=[8, 9]), "image_size=.* must be an int or 2 ints, each divisible by 2"),
    (dict(image_size=[8, 8, 8]), "must be an int or 2 ints"),
    (dict(use_spatial_transformer=True), "needs context_dim"),
    (dict(context_dim=8), "use_spatial_transformer is False"),
    (dict(num_heads=-1), "set num_heads or num_head_channels"),
    (dict(num_heads=-1, num_head_channels=48), "cannot split 32 channels"),
    (dict(dims=1), "dims must be 2 or 3"),
])
def test_constructor_rejects_bad_configs(overrides, message):
    params = dict(image_size=8, **TINY, attention_resolutions=[1], num_heads=1)
    params.update(overrides)
    with pytest.raises(ValueError, match=message):
        UNetModel(**params)


def test_forward_rejects_bad_inputs():
    model = UNetModel(8, **TINY, attention_resolutions=[], num_heads=1)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 3, 8, 7), t)
    with pytest.raises(ValueError, match="expected in_channels=3"):
        model(torch.randn(2, 4, 8, 8), t)
    with pytest.raises(ValueError, match="dims=2"):
        model(torch.randn(2, 3, 8, 8, 8), t)
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        model(torch.randn(2, 3, 8, 8), torch.tensor(5))
