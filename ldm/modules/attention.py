"""Attention for every network: one entry point (`attention`) and the LDM spatial transformer built on it.

`attention(q, k, v)` dispatches to the fastest exact implementation for the device, dtype and shape: PyTorch's
`scaled_dot_product_attention` with an explicitly chosen backend (cuDNN, flash, memory-efficient, math), PyTorch's own
choice ("sdpa"), or the Triton flash-attention kernel of `kernels/attention.py` ("triton"). None of them forms the
L_q x L_k matrix except "math" (and "sdpa" when PyTorch falls back to math). The choice comes from `AUTO_TABLE`;
override it per module (`backend=` / the `attention_backend` constructor arguments), for the process
(`set_attention_backend(name)`), or with the environment variable LDM_ATTENTION_BACKEND. A backend that refuses the
inputs hands over to the next one in the table; choices and fallbacks are logged once per (backend, shape class).
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.modules.nn_dims import check_dims, conv_nd, spatial_dims, zero_module
from ldm.modules.normalization import GroupNormAct

logger = logging.getLogger(__name__)

# Hidden width of the transformer's feed-forward, as a multiple of its model width (as in the original LDM).
FEED_FORWARD_MULT = 4

ATTENTION_BACKEND_ENV = "LDM_ATTENTION_BACKEND"
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# "auto": the table; "sdpa": PyTorch's own pick among its backends; "triton": kernels/attention.py.
BACKENDS = ("auto", "sdpa", *SDPA_BACKENDS, "triton")

# Backends to try, fastest first, per (device type, dtype class, head-dim class, length class); a key part may be "any".
# dtype class: "half" (bf16 / fp16), "float32", "float64"; head-dim class: the head dim rounded up to a power of two
# >= 16, or "large" above 512; length class: "short" when L_k <= SHORT_KEYS, else "long".
# The rows come from benchmarks/bench_attention.py on an H100 (bf16, non-causal), which prints a suggested table from
# the fastest forward+backward per shape; update them from its JSON. Measured on an H100 (2026-11-23, TFLOP/s forward /
# forward+backward): at (4, 8, 4096, 64) cuDNN 467/426, ours 431/372, flash 296/270; at (4, 8, 4096, 128) cuDNN
# 609/523, ours 508/279; at (1, 1, 32768, 256) cuDNN 674/434, flash 330/283, ours 227/153; at (1, 1, 32768, 512), which
# flash and cuDNN refuse, ours 183/90 against memory-efficient 119/37 and math 39/51. Head dim 32 is not measured yet.
AUTO_TABLE: dict[tuple[str, str, int | str, str], tuple[str, ...]] = {
    ("cuda", "half", 16, "any"): ("cudnn", "flash", "triton", "efficient", "math"),
    ("cuda", "half", 32, "any"): ("cudnn", "flash", "triton", "efficient", "math"),
    ("cuda", "half", 64, "any"): ("cudnn", "flash", "triton", "efficient", "math"),
    ("cuda", "half", 128, "any"): ("cudnn", "flash", "triton", "efficient", "math"),
    ("cuda", "half", 256, "any"): ("cudnn", "flash", "triton", "efficient", "math"),
    ("cuda", "half", 512, "any"): ("triton", "efficient", "math"),
    ("cuda", "half", "large", "any"): ("efficient", "math"),
    # Flash and cuDNN take only half types; the Triton kernel's fp32 path uses slow IEEE products.
    ("cuda", "float32", "any", "any"): ("efficient", "math"),
    ("cuda", "float64", "any", "any"): ("math",),
    # CPU and other devices: PyTorch's choice (its CPU flash kernel, or math).
    ("any", "any", "any", "any"): ("sdpa",),
}
SHORT_KEYS = 128

_requested_backend: str | None = None  # set_attention_backend's choice; None: the environment variable, else "auto"
_logged: set[tuple] = set()  # (backend, shape class) whose choice was logged
_refused: set[tuple] = set()  # (backend, shape class) that refused once: skipped afterwards
_chosen: dict[tuple, str] = {}  # (requested, shape class) -> backend that ran last


def set_model_attention_backend(model: nn.Module, name: str | None) -> nn.Module:
    """Sets `attention_backend` on every attention layer of `model` (None: follow set_attention_backend /
    LDM_ATTENTION_BACKEND); returns `model`. Models call it with their `attention_backend` constructor argument."""
    if name is not None:
        check_backend_name(name, "attention_backend")
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = name
    return model


class BackendRefused(RuntimeError):
    """A backend does not take these inputs (raised and caught inside the dispatcher)."""


def check_backend_name(name: str, where: str) -> str:
    """Return name if it is one of BACKENDS, else raise ValueError naming `where` (a config key or variable)."""
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_attention_backend(name: str | None) -> None:
    """Use backend `name` (one of BACKENDS) for every `attention` call without its own `backend`; None: back to
    the environment variable LDM_ATTENTION_BACKEND, or "auto" when it is unset."""
    global _requested_backend
    _requested_backend = None if name is None else check_backend_name(name, "set_attention_backend")


@contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """`set_attention_backend(name)` for the duration of a `with` block."""
    global _requested_backend
    previous = _requested_backend
    set_attention_backend(name)
    try:
        yield
    finally:
        _requested_backend = previous


def requested_backend(backend: str | None = None) -> str:
    """The backend a call asks for: its own `backend`, else set_attention_backend's, else LDM_ATTENTION_BACKEND's,
    else "auto"."""
    if backend is not None:
        return check_backend_name(backend, "attention(backend=...)")
    if _requested_backend is not None:
        return _requested_backend
    from_env = os.environ.get(ATTENTION_BACKEND_ENV)
    return check_backend_name(from_env, ATTENTION_BACKEND_ENV) if from_env else "auto"


def _dtype_class(dtype: torch.dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else str(dtype).removeprefix("torch.")


def _head_dim_class(head_dim: int) -> int | str:
    return "large" if head_dim > 512 else max(16, 1 << (head_dim - 1).bit_length())


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the attention runs in: autocast's for fp32 inputs inside an autocast region, else q's."""
    device = q.device.type
    if q.dtype == torch.float32 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return q.dtype


def shape_class(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """What the dispatch depends on: (device type, dtype, head dim, value width, length class, needs gradients)."""
    return (q.device.type, _compute_dtype(q), q.shape[-1], v.shape[-1], "short" if k.shape[2] <= SHORT_KEYS else "long",
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))


def table_row(device_type: str, dtype: torch.dtype, head_dim: int, len_k: int) -> tuple[str, ...]:
    """AUTO_TABLE's backends for these inputs: the most specific matching row (key parts widen to "any" from the
    right: length class, then head dim, dtype, device)."""
    parts = (device_type, _dtype_class(dtype), _head_dim_class(head_dim), "short" if len_k <= SHORT_KEYS else "long")
    for specific in range(len(parts), -1, -1):
        key = (*parts[:specific], *("any",) * (len(parts) - specific))
        if key in AUTO_TABLE:
            return AUTO_TABLE[key]
    return ("sdpa",)


def table_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, ...]:
    """`table_row` for q: (B, heads, L_q, d), k: (B, heads, L_k, d), v."""
    return table_row(q.device.type, _compute_dtype(q), q.shape[-1], k.shape[2])


def reset_dispatch_state() -> None:
    """Forget remembered refusals, logged choices and chosen backends (tests, benchmarks)."""
    _logged.clear()
    _refused.clear()
    _chosen.clear()


def _candidates(requested: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, ...]:
    """Backends to try in order: the requested one (the table's row for auto), then the table's row, then "sdpa"."""
    table = table_backends(q, k, v)
    first = table if requested == "auto" else (requested,)
    return tuple(dict.fromkeys((*first, *table, "sdpa")))  # drop repeats, keep order


def _is_refusal(err: RuntimeError) -> bool:
    """SDPA's error when the allowed backends do not take the inputs (not an out-of-memory or a CUDA error)."""
    message = str(err)
    return not isinstance(err, torch.OutOfMemoryError) and ("No available kernel" in message
                                                            or "No viable backend" in message)


def _call_sdpa(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPA_BACKENDS[name]):
        return F.scaled_dot_product_attention(q, k, v)


def _run_sdpa(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_time: bool) -> torch.Tensor:
    """SDPA restricted to one backend (PyTorch's pick for "sdpa"); BackendRefused when that backend refuses.

    The first time per shape class, PyTorch's warnings are collected so that a refusal can be logged with its
    reasons; on success they are re-emitted.
    """
    if not first_time:
        try:
            return _call_sdpa(name, q, k, v)
        except RuntimeError as err:
            if _is_refusal(err):
                raise BackendRefused(str(err).strip()) from err
            raise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = _call_sdpa(name, q, k, v)
        except RuntimeError as err:
            if _is_refusal(err):
                reasons = " ".join(str(w.message).split(" (Triggered internally")[0] for w in caught)
                raise BackendRefused(f"{str(err).strip()} {reasons}".strip()) from err
            raise
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def _run_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The Triton kernel (inputs cast to autocast's dtype inside an autocast region); BackendRefused if it refuses."""
    try:
        from kernels.attention import UnsupportedAttentionInputs, flash_attention
    except ImportError as err:  # no Triton in this environment
        raise BackendRefused(f"kernels.attention is not importable: {err}") from err
    dtype = _compute_dtype(q)
    try:
        return flash_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    except UnsupportedAttentionInputs as err:
        raise BackendRefused(str(err)) from err


def _describe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    dtype = str(_compute_dtype(q)).removeprefix("torch.")
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {dtype} on {q.device.type}"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for every batch element and head, non-causal, no mask.

    q: (B, heads, L_q, d), k: (B, heads, L_k, d), v: (B, heads, L_k, d_v) -> (B, heads, L_q, d_v), dtype of q (of
    autocast inside an autocast region). `backend` (one of BACKENDS) overrides set_attention_backend, the environment
    variable LDM_ATTENTION_BACKEND and the default "auto" for this call. A backend that refuses the inputs hands over
    to the next one of AUTO_TABLE's row, then to PyTorch's own pick; a refusal is remembered per shape class.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be (B, heads, L, d), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(need equal B and heads, q and k equal d, k and v equal L)")
    requested = requested_backend(backend)
    klass = shape_class(q, k, v)
    candidates = _candidates(requested, q, k, v)
    refused_now = []
    for name in candidates:
        if (name, klass) in _refused:
            continue
        first_time = (name, klass) not in _logged
        try:
            out = _run_triton(q, k, v) if name == "triton" else _run_sdpa(name, q, k, v, first_time)
        except BackendRefused as err:
            _refused.add((name, klass))
            refused_now.append(name)
            # Expected while the table's row is walked; worth a warning when the backend was asked for by name.
            level = logging.WARNING if name == requested else logging.INFO
            logger.log(level, "attention: backend %s refused %s (%s); trying the next one", name, _describe(q, k, v),
                       err)
            continue
        if first_time:
            _logged.add((name, klass))
            after = f" after {', '.join(refused_now)} refused" if refused_now else ""
            logger.info("attention: %s backend for %s (requested: %s%s)", name, _describe(q, k, v), requested, after)
        _chosen[(requested, klass)] = name
        return out
    raise RuntimeError(f"attention: no backend takes {_describe(q, k, v)}; tried {', '.join(candidates)}, which "
                       f"refused these inputs or earlier ones of the same shape class")


def chosen_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> str | None:
    """The backend the last `attention` call with inputs of this shape class (and this request) ran on, or None."""
    return _chosen.get((requested_backend(backend), shape_class(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention of x's tokens over context's tokens (over x's own tokens when context is None).

    `attention_backend`: one of BACKENDS for this layer; None follows set_attention_backend / LDM_ATTENTION_BACKEND.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, attention_backend: str | None = None):
        super().__init__()
        if attention_backend is not None:
            check_backend_name(attention_backend, "CrossAttention.attention_backend")
        self.attention_backend = attention_backend
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
        projections = (self.to_q, self.to_k, self.to_v)
        # self-attention: q, k and v in one matmul (one input gradient, no adds of three); wrapped projections (LoRA)
        # are called as modules, since their weight attribute is the base weight alone
        if context is x and all(type(p) is nn.Linear for p in projections):
            weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = (self._split_heads(t) for t in F.linear(x, weight).chunk(3, dim=-1))
        else:
            q, k, v = (self._split_heads(proj(src)) for proj, src in zip(projections, (x, context, context)))
        out = attention(q, k, v, self.attention_backend).transpose(1, 2).flatten(2)
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
    `attention_backend` as in CrossAttention.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 attention_backend: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout, attention_backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, attention_backend)
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
    spatial tokens, zero-initialised 1x1 projection back: the block starts as the identity. With `use_linear` the two
    projections are Linear layers on the tokens (SD 2.x / SDXL; the same maps, weights without the 1x1 kernel axes).
    `attention_backend` as in CrossAttention.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, dims: int = 2, attention_backend: str | None = None,
                 use_linear: bool = False):
        super().__init__()
        self.dims = check_dims(dims, "SpatialTransformer.dims")
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNormAct(in_channels, act=False)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = conv_nd(dims, in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, attention_backend)
            for _ in range(depth))
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(conv_nd(dims, inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, *spatial) with len(spatial) == dims, context: (B, L_ctx, context_dim) or None -> x's shape."""
        spatial = spatial_dims(x, self.dims)
        y, x = self.norm(x, pass_input=True)  # the residual's gradient joins the norm's backward (Triton)
        if self.use_linear:
            tokens = self.proj_in(y.flatten(2).transpose(1, 2))
        else:
            tokens = self.proj_in(y).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear:
            return x + self.proj_out(tokens).transpose(1, 2).unflatten(2, spatial)
        return x + self.proj_out(tokens.transpose(1, 2).unflatten(2, spatial))
