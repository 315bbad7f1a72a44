"""The diffusion UNet of latent diffusion (Dhariwal & Nichol's ADM UNet), for 2D and 3D, keeping its config keys.

Differences from the CompVis original, on purpose:
- in 3D, down- and upsampling halve and double all three spatial axes (the original kept depth, for video);
- the self-attention block keeps its weights in the transformer's projections (`CrossAttention`: separate q, k, v);
- precision belongs to the training loop, so `use_fp16` is rejected rather than converting blocks;
- gradient checkpointing works per UNet block with `torch.utils.checkpoint` (non-reentrant).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import CrossAttention, SpatialTransformer, attention, set_model_attention_backend
from ldm.modules.diffusionmodules.embeddings import timestep_embedding
from ldm.modules.nn_dims import SkipConcat, conv_nd, conv_without_bias, residual_sum, spatial_dims, zero_module
from ldm.modules.recomputed_conv import prepared_conv, set_recompute_cheap
from ldm.modules.resampling import Downsample, Upsample
from ldm.modules.normalization import GroupNormAct, set_kernels

# The original UNet's GroupNorm32 uses PyTorch's default eps, unlike the autoencoder and the transformer (1e-6).
UNET_NORM_EPS = 1e-5


def _norm(channels: int, act: bool) -> GroupNormAct:
    return GroupNormAct(channels, eps=UNET_NORM_EPS, act=act)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep (and class) embedding, optionally resampling (`up` / `down`).

    With `use_scale_shift_norm` the embedding gives (scale, shift) applied as norm(h) * (1 + scale) + shift;
    otherwise it is added to h before the second norm. The last convolution is zero-initialised.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 dims: int = 2, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down cannot both be True")
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = _norm(channels, act=True)
        if up:
            self.resample = Upsample(channels, dims, with_conv=False)
        elif down:
            self.resample = Downsample(channels, dims, with_conv=False)
        else:
            self.resample = nn.Identity()
        self.in_conv = conv_nd(dims, channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        # With scale-shift the norm applies the modulation before its SiLU (one fused kernel with kernels: triton).
        self.out_norm = _norm(out_channels, act=True)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else conv_nd(dims, channels, out_channels, 1)

    recompute_cheap = False  # keep the norms' inputs only: norm (+ resampling) recomputed in backward

    def forward(self, x: torch.Tensor, emb: torch.Tensor | dict[nn.Module, torch.Tensor]) -> torch.Tensor:
        """x: (B, channels, *spatial), emb: (B, emb_channels), or every block's emb_proj of it as made by
        `project_embedding` -> (B, out_channels, *spatial resampled)."""
        # Resample between the norm and the conv, as the original does, so the conv runs at the new resolution.
        if self.recompute_cheap:
            return self._forward_recomputing(x, emb)
        y, x = self.in_norm(x, pass_input=True)  # the shortcut's gradient joins the norm's backward (Triton)
        h = conv_without_bias(self.in_conv, self.resample(y))
        x = self.resample(x)
        emb_out = self._projected(emb)
        # in_conv's bias and the embedding enter out_norm as its input and sample biases: no pass of their own over h,
        # nor their sum, nor its reduction to the bias's gradient, forward or backward.
        if self.use_scale_shift_norm:
            scale, shift = emb_out.to(h.dtype).chunk(2, dim=1)
            h = self.out_norm(h, scale, shift, input_bias=self.in_conv.bias)
        else:
            h = self.out_norm(h, input_bias=self.in_conv.bias, sample_bias=emb_out)
        return residual_sum(self.skip, x, self.out_conv, self.dropout(h), fused_add=self.out_norm.uses_triton(h))

    def _projected(self, emb: torch.Tensor | dict[nn.Module, torch.Tensor]) -> torch.Tensor:
        return emb[self] if isinstance(emb, dict) else self.emb_proj(emb)

    def _forward_recomputing(self, x: torch.Tensor, emb: torch.Tensor | dict[nn.Module, torch.Tensor]) -> torch.Tensor:
        """`forward` with recompute_cheap: the norms (and resampling) recomputed in backward, convs biased."""
        h = prepared_conv(self._in_prepare, self.in_conv, x, (self.in_norm.weight, self.in_norm.bias))
        x = self.resample(x)
        emb_out = self._projected(emb)
        # scale and shift in h's dtype, as forward passes them; the embedding as out_norm's sample bias, as forward does
        modulation = emb_out.to(h.dtype).chunk(2, dim=1) if self.use_scale_shift_norm else (emb_out,)
        out_params = (self.out_norm.weight, self.out_norm.bias, *modulation)
        if self.dropout.p == 0 or not self.training:  # dropout sits before out_conv
            return self.skip(x) + prepared_conv(self._out_prepare, self.out_conv, h, out_params)
        return self.skip(x) + self.out_conv(self.dropout(self._out_prepare(h, *out_params)))

    def _in_prepare(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.resample(self.in_norm.normalize(x, weight, bias))

    def _out_prepare(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     *modulation: torch.Tensor) -> torch.Tensor:
        """norm(h) * (1 + scale) + shift (modulation = scale, shift), or norm(h + emb_out) (modulation = emb_out), each
        (B, C)."""
        if self.use_scale_shift_norm:
            return self.out_norm.normalize(h, weight, bias, *modulation)
        return self.out_norm.normalize(h, weight, bias, sample_bias=modulation[0])


class AttentionBlock(nn.Module):
    """Self-attention over the voxels of a feature map, as a residual block (zero-initialised output).

    `qkv_bias`: q, k and v projections with biases, as the original's (its fused `qkv` 1x1 convolution has one);
    false gives the transformer's bias-free projections. Weights live in `attn` (a `CrossAttention`'s to_q, to_k,
    to_v, to_out), so LoRA and the converters see the same names in both blocks.
    """

    def __init__(self, channels: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if channels % heads:
            raise ValueError(f"AttentionBlock: channels={channels} is not divisible by heads={heads}")
        self.norm = _norm(channels, act=False)
        self.attn = CrossAttention(channels, None, heads, channels // heads)
        if qkv_bias:
            self.attn.to_q, self.attn.to_k, self.attn.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.qkv_bias = qkv_bias
        zero_module(self.attn.to_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *spatial) -> same shape."""
        y, x = self.norm(x, pass_input=True)  # the residual's gradient joins the norm's backward (Triton)
        tokens = y.flatten(2).transpose(1, 2)
        attn = self.attn
        projections = (attn.to_q, attn.to_k, attn.to_v)
        if all(type(p) is nn.Linear for p in projections):  # one matmul; wrapped ones (LoRA) are called as modules
            bias = torch.cat([p.bias for p in projections]) if self.qkv_bias else None
            q, k, v = F.linear(tokens, torch.cat([p.weight for p in projections]), bias).chunk(3, dim=-1)
        else:
            q, k, v = (p(tokens) for p in projections)
        out = attention(*(attn._split_heads(t) for t in (q, k, v)), attn.attention_backend)
        out = attn.dropout(attn.to_out(out.transpose(1, 2).flatten(2)))
        return x + out.transpose(1, 2).reshape(x.shape)


def project_embedding(emb: torch.Tensor, blocks: Sequence[ResBlock]) -> dict[nn.Module, torch.Tensor]:
    """{block: block.emb_proj(emb)} for every block, as one matmul: SiLU(emb) once, times all the blocks' Linear
    weights concatenated. Per block that saves a SiLU, a matmul and its bias add forward, and backward their gradients
    and the add that accumulates emb's gradient: ~10 small kernels a block, 24 blocks in a 3-level 3D UNet. The weights
    stay each block's own (state dicts unchanged); whole-model FSDP (the trainer's) gathers them all for the forward.
    emb: (B, emb_channels) -> (B, out_features of the block's Linear) each."""
    if not blocks:
        return {}
    linears = [block.emb_proj[1] for block in blocks]
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears])
    projected = F.linear(F.silu(emb), weight, bias)
    return dict(zip(blocks, projected.split([linear.out_features for linear in linears], dim=1)))


def unwrapped(layer: nn.Module) -> nn.Module:
    """The block inside FSDP's and activation checkpointing's wrappers (they wrap whole blocks, see
    ldm/engine/strategy.py), which take the block's arguments as they are."""
    while True:
        inner = getattr(layer, "_fsdp_wrapped_module", None) or getattr(layer, "_checkpoint_wrapped_module", None)
        if inner is None:
            return layer
        layer = inner


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks also get the embedding (or their projections of it) and SpatialTransformers
    the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | dict[nn.Module, torch.Tensor],
                context: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(unwrapped(layer), ResBlock):
                x = layer(x, emb)
            elif isinstance(unwrapped(layer), SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _level_context_dims(context_dim: int | Sequence[int] | None, channel_mult: Sequence[int],
                        attention_resolutions: Sequence[int]) -> list[int | None]:
    """context_dim as one width per level of channel_mult; ValueError for a list of another length, or whose levels
    with transformers (those in attention_resolutions, and the last, whose width the middle block takes) differ."""
    levels = len(channel_mult)
    if context_dim is None or isinstance(context_dim, int):
        return [context_dim] * levels
    widths = list(context_dim)
    if len(widths) != levels or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"UNetModel: context_dim must be an int or one positive int per level of channel_mult "
                         f"({levels}), got {widths}")
    attended = sorted({level for level in range(levels) if 2 ** level in attention_resolutions} | {levels - 1})
    if len({widths[level] for level in attended}) > 1:
        raise ValueError(f"UNetModel: context_dim {widths} gives the levels with transformers ({attended}; the "
                         f"middle block takes the last) different widths, but the UNet takes one context tensor, "
                         f"which must match each of them (as in sgm); make them equal")
    return widths


class UNetModel(nn.Module):
    """Noise-prediction UNet: `forward(x, timesteps, context=None, y=None)` -> (B, out_channels, *spatial).

    `attention_resolutions` are the downsampling factors (1, 2, 4, ...) at which attention follows the ResBlocks;
    `use_spatial_transformer` picks the cross-attention transformer (needs `context_dim`) over plain self-attention.
    Heads: `num_heads` per block, or `num_head_channels` channels per head when that is set. With `legacy` (the
    original default) a transformer's head width is channels // heads even when `num_head_channels` is set.
    `image_size` (int or one size per axis): the grid it is trained on; every size must halve `len(channel_mult) - 1`
    times, and a diffusion model (ldm/models/diffusion/ddpm.py) requires its own image_size to be the same.
    Conditioning as in sgm's UNet: `num_classes` (int) adds a label embedding to the timestep embedding, and
    `num_classes: sequential` with `adm_in_channels` an MLP of a vector y: (B, adm_in_channels) (SDXL's pooled text
    and size embeddings, any `GeneralConditioner` vector). `transformer_depth`: blocks per spatial transformer, one
    int or one per level (`transformer_depth_middle` for the middle block, default the last level's);
    `context_dim`: the context's width, one int or one per level (sgm's list form, e.g. SDXL refiner's); a level's
    transformers get its entry and the middle block the last, but the UNet takes one context tensor (B, L, D) as sgm's
    does, so the entries of the levels with transformers must be one width D;
    `use_linear_in_transformer`: Linear projections in and out of the transformers (SD 2.x / SDXL);
    `spatial_transformer_attn_type` (sgm's key, `softmax` or `softmax-xformers`) is accepted for porting: the
    attention kernel is `attention_backend`'s choice either way.
    `attention_qkv_bias`: the plain self-attention blocks' q, k, v have biases, as the original's (false: none, as
    this UNet had before; runs trained so need it to load).
    `kernels` (`auto`, `triton`, `torch`) picks the GroupNorm implementation (ldm/modules/normalization.py),
    `attention_backend` the attention's (ldm/modules/attention.py; None: the process-wide choice).
    `recompute_cheap` keeps only the ResBlocks' norm inputs (and the upsamplers' inputs) for backward and recomputes
    the norms / interpolations there, not the convolutions (ldm/modules/recomputed_conv.py).
    """

    def __init__(self, image_size: int | Sequence[int], in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, use_checkpoint: bool = False, num_heads: int = -1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int | Sequence[int] = 1, transformer_depth_middle: int | None = None,
                 context_dim: int | Sequence[int] | None = None, legacy: bool = True, use_fp16: bool = False,
                 kernels: str = "auto",
                 attention_backend: str | None = None, recompute_cheap: bool = False,
                 adm_in_channels: int | None = None, use_linear_in_transformer: bool = False,
                 spatial_transformer_attn_type: str = "softmax", attention_qkv_bias: bool = True):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"UNetModel: dims must be 2 or 3, got {dims}")
        self.dims = dims
        if use_fp16:
            raise ValueError("UNetModel: use_fp16=True is not supported; set the precision of the trainer instead "
                             "(e.g. trainer.precision: bf16-mixed) and drop use_fp16 from unet_config")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels (both are -1)")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer=True needs context_dim (the width of the context)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("UNetModel: context_dim is set but use_spatial_transformer is False; "
                             "cross-attention only exists in the spatial transformer")
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):
            raise ValueError(f"UNetModel: spatial_transformer_attn_type {spatial_transformer_attn_type!r} is not "
                             f"one of softmax, softmax-xformers (the kernel itself is attention_backend's choice)")
        if (num_classes == "sequential") != (adm_in_channels is not None):
            raise ValueError(f"UNetModel: num_classes='sequential' and adm_in_channels go together (vector "
                             f"conditioning of width adm_in_channels), got num_classes={num_classes!r}, "
                             f"adm_in_channels={adm_in_channels}")
        if isinstance(num_classes, str) and num_classes != "sequential":
            raise ValueError(f"UNetModel: num_classes must be an int or 'sequential', got {num_classes!r}")
        depths = ([transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int)
                  else list(transformer_depth))
        if len(depths) != len(channel_mult) or any(d < 1 for d in depths):
            raise ValueError(f"UNetModel: transformer_depth must be a positive int or one per level of channel_mult "
                             f"({len(channel_mult)}), got {transformer_depth}")
        depth_middle = depths[-1] if transformer_depth_middle is None else transformer_depth_middle
        context_dims = _level_context_dims(context_dim, channel_mult, attention_resolutions)
        self.down_factor = 2 ** (len(channel_mult) - 1)
        sizes = [image_size] * dims if isinstance(image_size, int) else list(image_size)
        if len(sizes) != dims or any(s % self.down_factor for s in sizes):
            raise ValueError(f"UNetModel: image_size={image_size} must be an int or {dims} ints, each divisible by "
                             f"{self.down_factor} (channel_mult has {len(channel_mult)} levels)")
        reachable = [2 ** level for level in range(len(channel_mult))]
        unreachable = sorted(set(attention_resolutions) - set(reachable))
        if unreachable:
            raise ValueError(f"UNetModel: attention_resolutions {unreachable} are never reached; with channel_mult "
                             f"{list(channel_mult)} the downsampling factors are {reachable}")

        self.image_size = tuple(sizes)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.context_dims = context_dims  # per level (None: no cross-attention)
        self.context_dim = context_dims[-1]  # the one width a context must have
        self.use_checkpoint = use_checkpoint

        def attention_block(ch: int, heads_if_no_width: int, depth: int, level: int) -> nn.Module:
            heads = heads_if_no_width if num_head_channels == -1 else ch // num_head_channels
            if not 1 <= heads <= ch:
                raise ValueError(f"UNetModel: cannot split {ch} channels into attention heads with "
                                 f"num_heads={heads_if_no_width}, num_head_channels={num_head_channels}")
            if not use_spatial_transformer:
                if num_head_channels != -1 and ch % num_head_channels:
                    raise ValueError(f"UNetModel: {ch} channels are not divisible by "
                                     f"num_head_channels={num_head_channels}")
                return AttentionBlock(ch, heads, attention_qkv_bias)
            d_head = ch // heads if legacy or num_head_channels == -1 else num_head_channels
            return SpatialTransformer(ch, heads, d_head, depth, dropout, context_dims[level], dims,
                                      use_linear=use_linear_in_transformer)

        def res_block(ch: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_ch, dims, use_scale_shift_norm, up=up, down=down)

        time_embed_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes == "sequential":  # sgm's nesting, so that its checkpoints' label_emb.0.* keys load
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                                                         nn.Linear(time_embed_dim, time_embed_dim)))
        else:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim) if num_classes is not None else None
        self.adm_in_channels = adm_in_channels

        ch = model_channels
        factor = 1
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if factor in attention_resolutions:
                    layers.append(attention_block(ch, num_heads, depths[level], level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, dims, with_conv=conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                factor *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch),
                                                    attention_block(ch, num_heads, depth_middle, len(channel_mult) - 1),
                                                    res_block(ch, ch))

        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if factor in attention_resolutions:
                    # The original gives transformers num_heads and self-attention blocks num_heads_upsample here.
                    layers.append(attention_block(ch, num_heads if use_spatial_transformer else heads_up,
                                                  depths[level], level))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, dims, with_conv=conv_resample))
                    factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch, act=True), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)))
        # Every ResBlock's embedding projection is computed up front in one matmul (project_embedding).
        self.res_blocks = tuple(m for m in self.modules() if isinstance(m, ResBlock))
        self.concat_skip = SkipConcat()  # the decoder's cat([h, skip]); no parameters
        set_kernels(self, kernels)
        set_model_attention_backend(self, attention_backend)
        set_recompute_cheap(self, recompute_cheap)

    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                      y: torch.Tensor | None) -> None:
        spatial = spatial_dims(x, self.dims)
        batch = x.shape[0]
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNetModel: x has {x.shape[1]} channels, expected in_channels={self.in_channels}")
        if any(s % self.down_factor for s in spatial):
            raise ValueError(f"UNetModel: spatial size {spatial} of x must be divisible by {self.down_factor}")
        if timesteps.shape != (batch,):
            raise ValueError(f"UNetModel: timesteps must have shape ({batch},), got {tuple(timesteps.shape)}")
        if self.context_dim is None and context is not None:
            raise ValueError("UNetModel: context given but the model has no cross-attention "
                             "(set use_spatial_transformer and context_dim)")
        if self.context_dim is not None and (context is None or context.ndim != 3 or context.shape[0] != batch
                                             or context.shape[2] != self.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"UNetModel: context must be ({batch}, L, {self.context_dim}), got {got}")
        if self.num_classes is None and y is not None:
            raise ValueError("UNetModel: class labels y given but num_classes is not set")
        if self.adm_in_channels is not None:
            if y is None or y.shape != (batch, self.adm_in_channels) or not y.is_floating_point():
                got = None if y is None else f"{tuple(y.shape)} {y.dtype}"
                raise ValueError(f"UNetModel: num_classes='sequential' needs a float vector y of shape "
                                 f"({batch}, {self.adm_in_channels}) (adm_in_channels), got {got}")
        elif self.num_classes is not None and (y is None or y.shape != (batch,)
                                               or y.dtype not in (torch.int32, torch.int64)):
            got = None if y is None else f"{tuple(y.shape)} {y.dtype}"
            raise ValueError(f"UNetModel: num_classes={self.num_classes} needs class labels y of shape ({batch},) "
                             f"and an integer dtype (int64), got {got}")

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: dict[nn.Module, torch.Tensor],
             context: torch.Tensor | None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, *spatial), timesteps: (B,) int or float, context: (B, L, context_dim),
        y: (B,) int64 class labels, or (B, adm_in_channels) float with num_classes 'sequential'
        -> (B, out_channels, *spatial)."""
        self._check_inputs(x, timesteps, context, y)
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.to(emb.dtype) if y.is_floating_point() else y)
        emb = project_embedding(emb, self.res_blocks)
        h = x
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, self.concat_skip(h, skips.pop()), emb, context)
        return self.out(h)
