import math

import pytest
import torch

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer, attention
from tests.modules.helpers import randomize_zero_parameters


def reference_attention(q, k, v):
    """Explicit softmax(q k^T / sqrt(d)) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v


@pytest.mark.parametrize("shape_q, shape_kv, d_v", [
    ((2, 3, 7, 8), (2, 3, 5, 8), 8),     # cross-attention: L_q != L_k
    ((1, 1, 9, 16), (1, 1, 9, 16), 4),   # single head, value width != key width
    ((3, 2, 1, 4), (3, 2, 11, 4), 4),    # one query token
])
def test_attention_matches_float64_reference(shape_q, shape_kv, d_v):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(shape_q, generator=gen)
    k = torch.randn(shape_kv, generator=gen)
    v = torch.randn(*shape_kv[:3], d_v, generator=gen)
    out = attention(q, k, v)
    assert out.dtype == torch.float32
    assert out.shape == (*shape_q[:3], d_v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_attention_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention, (q, k, v))


@pytest.mark.parametrize("q_shape, k_shape, v_shape", [
    ((2, 8, 4), (2, 8, 4), (2, 8, 4)),              # missing heads axis
    ((2, 1, 8, 4), (2, 1, 8, 6), (2, 1, 8, 4)),     # q and k widths differ
    ((2, 1, 8, 4), (2, 1, 8, 4), (2, 1, 7, 4)),     # k and v lengths differ
    ((2, 1, 8, 4), (1, 1, 8, 4), (1, 1, 8, 4)),     # batch differs
])
def test_attention_rejects_bad_shapes(q_shape, k_shape, v_shape):
    with pytest.raises(ValueError, match="attention"):
        attention(torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(v_shape))


@pytest.mark.parametrize("self_attention", [False, True])
def test_cross_attention_matches_per_head_reference(self_attention):
    """Output and weight gradients against separate q, k, v projections attended head by head (self-attention runs
    its three projections as one matmul)."""
    torch.manual_seed(0)
    heads, dim_head, query_dim = 3, 4, 10
    context_dim = None if self_attention else 6
    layer = CrossAttention(query_dim, context_dim, heads=heads, dim_head=dim_head).double()
    x = torch.randn(2, 7, query_dim, dtype=torch.float64)
    context = x if self_attention else torch.randn(2, 5, context_dim, dtype=torch.float64)
    q, k, v = layer.to_q(x), layer.to_k(context), layer.to_v(context)
    per_head = []
    for h in range(heads):
        cols = slice(h * dim_head, (h + 1) * dim_head)
        per_head.append(reference_attention(q[..., cols], k[..., cols], v[..., cols]))
    expected = layer.to_out(torch.cat(per_head, dim=-1))
    weights = [layer.to_q.weight, layer.to_k.weight, layer.to_v.weight]
    expected_grads = torch.autograd.grad(expected.square().sum(), weights)
    out = layer(x) if self_attention else layer(x, context)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(torch.autograd.grad(out.square().sum(), weights), expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_cross_attention_without_context_is_self_attention():
    torch.manual_seed(0)
    layer = CrossAttention(8, None, heads=2, dim_head=4)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), layer(x, x))


def test_cross_attention_rejects_wrong_context_width():
    layer = CrossAttention(8, 6, heads=2, dim_head=4)
    with pytest.raises(ValueError, match=r"context must be \(B=2, L_ctx, 6\)"):
        layer(torch.randn(2, 5, 8), torch.randn(2, 3, 8))


def test_transformer_block_uses_context():
    torch.manual_seed(0)
    block = BasicTransformerBlock(8, n_heads=2, d_head=4, context_dim=5)
    x = torch.randn(2, 6, 8)
    context = torch.randn(2, 3, 5)
    out = block(x, context)
    assert out.shape == x.shape
    assert not torch.allclose(out, block(x, context + 1.0))


@pytest.mark.parametrize("dims, spatial", [(2, (4, 6)), (3, (2, 3, 4))])
def test_spatial_transformer_shapes_and_identity_at_init(dims, spatial):
    torch.manual_seed(0)
    block = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=5, dims=dims)
    x = torch.randn(2, 32, *spatial)
    context = torch.randn(2, 3, 5)
    assert torch.equal(block(x, context), x)
    randomize_zero_parameters(block)
    out = block(x, context)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    assert not torch.allclose(out, block(x, torch.randn(2, 3, 5)))


def test_spatial_transformer_3d_equals_2d_on_the_same_tokens():
    """3D differs from 2D only in layout: (D, H, W) flattened equals (D * H, W) flattened."""
    torch.manual_seed(0)
    block3d = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=5, dims=3)
    randomize_zero_parameters(block3d)
    block2d = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=5, dims=2)
    block2d.load_state_dict({name: t.squeeze(-1) if name.startswith("proj_") and t.ndim == 5 else t
                             for name, t in block3d.state_dict().items()})
    x = torch.randn(2, 32, 2, 3, 4)
    context = torch.randn(2, 3, 5)
    expected = block2d(x.reshape(2, 32, 6, 4), context).reshape(x.shape)
    torch.testing.assert_close(block3d(x, context), expected)


def test_spatial_transformer_without_context_dim_runs_without_context():
    block = SpatialTransformer(32, n_heads=1, d_head=8, dims=2)
    x = torch.randn(1, 32, 3, 3)
    assert block(x).shape == x.shape


def test_spatial_transformer_rejects_wrong_rank():
    block = SpatialTransformer(32, n_heads=1, d_head=8, dims=3)
    with pytest.raises(ValueError, match="dims=3"):
        block(torch.randn(1, 32, 4, 4))


def test_models_pass_attention_backend_to_every_attention_layer():
    from ldm.modules.diffusionmodules.model import AttentionBlock, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=8, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                     attention_resolutions=[1, 2], channel_mult=(1, 2), num_heads=2, use_spatial_transformer=True,
                     context_dim=4, attention_backend="math")
    layers = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    assert layers and all(m.attention_backend == "math" for m in layers)
    encoder = Encoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[4], in_channels=1, resolution=8,
                      z_channels=2, norm_num_groups=4, attention_backend="efficient")
    blocks = [m for m in encoder.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(m.attention_backend == "efficient" for m in blocks)
    assert encoder(torch.randn(1, 1, 8, 8)).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        Encoder(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=[], in_channels=1, resolution=8, z_channels=2,
                norm_num_groups=4, attention_backend="fast")
