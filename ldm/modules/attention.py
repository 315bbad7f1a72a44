"""Attention for every network: one entry point (`attention`) and the LDM spatial transformer built on it."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.nn_dims import check_dims, conv_nd, spatial_dims, zero_module
from ldm.modules.normalization import GroupNormAct

# Hidden width of the transformer's feed-forward, as a multiple of its model width (as in the original LDM).
FEED_FORWARD_MULT = 4


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for every batch element and head, non-causal, no mask.

    q: (B, heads, L_q, d), k: (B, heads, L_k, d), v: (B, heads, L_k, d_v) -> (B, heads, L_q, d_v), dtype of q.
    The L_q x L_k score matrix is never formed here: PyTorch's fused kernels tile it.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be (B, heads, L, d), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(need equal B and heads, q and k equal d, k and v equal L)")
    return F.scaled_dot_product_attention(q, k, v)


class CrossAttention(nn.Module):
    """Multi-head attention of x's tokens over context's tokens (over x's own tokens when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.context_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, heads * d) -> (B, heads, L, d)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, query_dim), context: (B, L_ctx, context_dim) or None -> (B, L, query_dim)."""
        if context is None:
            context = x
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim:
            raise ValueError(f"CrossAttention: context must be (B={x.shape[0]}, L_ctx, {self.context_dim}), "
                             f"got {tuple(context.shape)}")
        q, k, v = (self._split_heads(proj(src)) for proj, src in
                   ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = attention(q, k, v).transpose(1, 2).flatten(2)
        return self.dropout(self.to_out(out))


class GEGLUFeedForward(nn.Module):
    """Gated-GELU MLP: dim -> (value, gate) of width 4 * dim each -> value * gelu(gate) -> dim."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        hidden = FEED_FORWARD_MULT * dim
        self.proj_in = nn.Linear(dim, 2 * hidden)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim) -> (B, L, dim)."""
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(value * F.gelu(gate)))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU feed-forward.

    Without `context_dim` the second attention is a second self-attention (as in the original LDM).
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim), context: (B, L_ctx, context_dim) or None -> (B, L, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the voxels of a feature map, as a residual block.

    GroupNorm, 1x1 projection to `n_heads * d_head` channels, `depth` transformer blocks over the flattened
    spatial tokens, zero-initialised 1x1 projection back: the block starts as the identity.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, dims: int = 2):
        super().__init__()
        self.dims = check_dims(dims, "SpatialTransformer.dims")
        inner_dim = n_heads * d_head
        self.norm = GroupNormAct(in_channels, act=False)
        self.proj_in = conv_nd(dims, in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim) for _ in range(depth))
        self.proj_out = zero_module(conv_nd(dims, inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, *spatial) with len(spatial) == dims, context: (B, L_ctx, context_dim) or None -> x's shape."""
        spatial = spatial_dims(x, self.dims)
        h = self.proj_in(self.norm(x))
        tokens = h.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        h = tokens.transpose(1, 2).unflatten(2, spatial)
        return x + self.proj_out(h)
