"""Convolutional Encoder / Decoder of the stage-1 autoencoders, for 2D and 3D images (`dims`).

The Encoder maps x: (B, in_channels, *spatial) to (B, 2*z_channels or z_channels, *spatial / 2**(L-1)) with
L = len(ch_mult); the Decoder maps z: (B, z_channels, *latent) back to (B, out_ch, *latent * 2**(L-1)).
Config keys are those of CompVis latent-diffusion's `ddconfig` plus `dims`, `norm_num_groups`, `use_checkpoint`,
`kernels`, `attention_backend` and `recompute_cheap`.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import attention, set_model_attention_backend
from ldm.modules.nn_dims import check_dims, conv_nd, conv_without_bias, residual_sum, spatial_dims
from ldm.modules.resampling import Downsample, Upsample
from ldm.modules.diffusionmodules.slab_decode import decode_in_slabs
from ldm.modules.recomputed_conv import norm_act_conv, set_recompute_cheap
from ldm.modules.normalization import GroupNormAct, set_kernels


class _Checkpointed(nn.Module):
    """A block whose activations are recomputed in backward when `use_checkpoint` is on (memory for compute)."""

    use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ResnetBlock(_Checkpointed):
    """GroupNorm+SiLU -> conv -> GroupNorm+SiLU -> dropout -> conv, plus a (1x1-projected) skip.

    x: (B, in_channels, *spatial) -> (B, out_channels, *spatial).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float, dims: int, num_groups: int,
                 use_checkpoint: bool = False):
        super().__init__()
        self.norm1 = GroupNormAct(in_channels, num_groups)
        self.conv1 = conv_nd(dims, in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNormAct(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else conv_nd(dims, in_channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    recompute_cheap = False  # keep the norms' inputs only: GroupNorm+SiLU recomputed in backward (recomputed_conv.py)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_cheap:
            h = norm_act_conv(self.norm1, self.conv1, x)
            if self.dropout.p == 0 or not self.training:  # dropout sits before conv2
                return self.skip(x) + norm_act_conv(self.norm2, self.conv2, h)
            h = self.norm2(h)
        else:  # conv1's bias is added inside norm2, not in a pass of its own (nor its gradient reduced in one); the
            # shortcut's gradient joins norm1's backward (Triton), not added to its input gradient in a pass of its own
            y, x = self.norm1(x, pass_input=True)
            h = self.norm2(conv_without_bias(self.conv1, y), input_bias=self.conv1.bias)
        return residual_sum(self.skip, x, self.conv2, self.dropout(h), fused_add=self.norm1.uses_triton(x))


class AttentionBlock(_Checkpointed):
    """Single-head self-attention over all spatial positions as tokens, with a residual connection.

    x: (B, C, *spatial) -> same shape; attention runs on N = prod(spatial) tokens of width C.
    """

    def __init__(self, channels: int, dims: int, num_groups: int, use_checkpoint: bool = False):
        super().__init__()
        self.norm = GroupNormAct(channels, num_groups, act=False)
        self.qkv = conv_nd(dims, channels, 3 * channels, 1)
        self.proj_out = conv_nd(dims, channels, channels, 1)
        self.use_checkpoint = use_checkpoint
        self.attention_backend: str | None = None  # set by the Encoder / Decoder (set_model_attention_backend)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        # (B, 3C, *spatial) -> 3 x (B, 1, N, C): one head whose tokens are the flattened positions. Token-major
        # memory (a copy for contiguous x, free for channels-last x): cuDNN and flash attention need the head dim
        # contiguous and refuse (B, 1, N, C) views with stride N along C.
        y, x = self.norm(x, pass_input=True)  # the residual's gradient joins the norm's backward (Triton)
        tokens = self.qkv(y).flatten(2).transpose(1, 2).contiguous()
        q, k, v = tokens.unsqueeze(1).chunk(3, dim=-1)
        h = attention(q, k, v, self.attention_backend)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, *spatial)
        return x + self.proj_out(h)


def _mid_block(channels: int, dropout: float, dims: int, num_groups: int, use_checkpoint: bool) -> nn.Sequential:
    """ResNet block, self-attention, ResNet block at the lowest resolution."""
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout, dims, num_groups, use_checkpoint),
        AttentionBlock(channels, dims, num_groups, use_checkpoint),
        ResnetBlock(channels, channels, dropout, dims, num_groups, use_checkpoint),
    )


class _Plan:
    """Checked shared hyper-parameters: per-level channels, per-level nominal sizes, and where attention goes."""

    def __init__(self, owner: str, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[Any], resolution: int | Sequence[int], dims: int, norm_num_groups: int):
        self.dims = check_dims(dims, f"{owner}: dims")
        if not ch_mult or any(int(m) < 1 for m in ch_mult):
            raise ValueError(f"{owner}: ch_mult must be a non-empty list of positive ints, got {list(ch_mult)}")
        if num_res_blocks < 1:
            raise ValueError(f"{owner}: num_res_blocks must be >= 1, got {num_res_blocks}")
        self.channels = [ch * int(m) for m in ch_mult]
        bad = [c for c in [ch, *self.channels] if c % norm_num_groups]
        if bad:
            raise ValueError(f"{owner}: channel counts {sorted(set(bad))} (ch * ch_mult) are not divisible by "
                             f"norm_num_groups={norm_num_groups}; change ch or set norm_num_groups in ddconfig")
        self.num_levels = len(self.channels)
        self.factor = 2 ** (self.num_levels - 1)
        sizes = [int(resolution)] * dims if isinstance(resolution, int) else [int(r) for r in resolution]
        if len(sizes) != dims:
            raise ValueError(f"{owner}: resolution {list(resolution)} has {len(sizes)} entries for dims={dims}")
        if any(s % self.factor for s in sizes):
            raise ValueError(f"{owner}: resolution {sizes} is not divisible by the downsampling factor {self.factor} "
                             f"(len(ch_mult) - 1 = {self.num_levels - 1} halvings)")
        self.level_sizes = [tuple(s // 2 ** i for s in sizes) for i in range(self.num_levels)]
        self.attention = [False] * self.num_levels
        for entry in attn_resolutions:
            matches = [i for i, size in enumerate(self.level_sizes) if _resolution_matches(entry, size)]
            if not matches:
                raise ValueError(f"{owner}: attn_resolutions entry {entry!r} matches no level; the level sizes are "
                                 f"{[list(s) for s in self.level_sizes]} (an int matches a level's largest side)")
            for i in matches:
                self.attention[i] = True


def _resolution_matches(entry: Any, size: tuple[int, ...]) -> bool:
    """An int matches a level whose largest side equals it (so attention cost is bounded); a list matches exactly."""
    if isinstance(entry, int):
        return max(size) == entry
    return [int(e) for e in entry] == list(size)


def _level(in_channels: int, out_channels: int, num_blocks: int, attention: bool, resample: nn.Module | None,
           dropout: float, dims: int, num_groups: int, use_checkpoint: bool) -> nn.Sequential:
    """`num_blocks` ResNet blocks (each followed by attention if asked), then the resampler if any."""
    layers: list[nn.Module] = []
    for i in range(num_blocks):
        layers.append(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout, dims, num_groups,
                                  use_checkpoint))
        if attention:
            layers.append(AttentionBlock(out_channels, dims, num_groups, use_checkpoint))
    if resample is not None:
        layers.append(resample)
    return nn.Sequential(*layers)


def _output_head(coder: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """An Encoder's / Decoder's conv_out(norm_out(h)), keeping only h for backward with `recompute_cheap`."""
    if coder.recompute_cheap:
        return norm_act_conv(coder.norm_out, coder.conv_out, h)
    return coder.conv_out(coder.norm_out(h))


class Encoder(nn.Module):
    """x: (B, in_channels, *spatial) -> moments (B, 2*z_channels if double_z else z_channels, *spatial / factor).

    factor = 2**(len(ch_mult) - 1); every spatial size of x must be divisible by it. `resolution` (an int or one
    size per axis) is the nominal training size: it places attention (`attn_resolutions`), not the accepted sizes.
    `kernels` (`auto`, `triton`, `torch`) picks the GroupNorm implementation (ldm/modules/normalization.py),
    `attention_backend` the attention's (ldm/modules/attention.py; None: the process-wide choice).
    `recompute_cheap` keeps only the inputs of GroupNorm+SiLU -> conv and nearest-upsample -> conv pairs for backward
    and recomputes the norm / interpolation there (recomputed_conv.py): less activation memory for one extra
    memory-bound pass each; the convolutions are not recomputed (the Decoder takes the same keys).
    `downsample_pad_end` pads the stride-2 convolutions' input at the end of each axis only, as the CompVis and
    diffusers autoencoders (and so their pretrained weights) do; false pads one row on each side.
    """

    recompute_cheap = False  # conv_out(norm_out(h)) keeps only h (set with the blocks by set_recompute_cheap)

    def __init__(self, *, ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[Any], in_channels: int, resolution: int | Sequence[int], z_channels: int,
                 double_z: bool = True, dropout: float = 0.0, resamp_with_conv: bool = True, dims: int = 2,
                 norm_num_groups: int = 32, use_checkpoint: bool = False, kernels: str = "auto",
                 attention_backend: str | None = None, recompute_cheap: bool = False,
                 downsample_pad_end: bool = False):
        super().__init__()
        plan = _Plan("Encoder", ch, ch_mult, num_res_blocks, attn_resolutions, resolution, dims, norm_num_groups)
        self.dims, self.factor = plan.dims, plan.factor
        self.conv_in = conv_nd(dims, in_channels, ch, 3, padding=1)
        in_chs = [ch, *plan.channels[:-1]]
        self.down = nn.ModuleList([
            _level(in_chs[i], plan.channels[i], num_res_blocks, plan.attention[i],
                   Downsample(plan.channels[i], dims, resamp_with_conv, downsample_pad_end) if i < plan.num_levels - 1 else None,
                   dropout, dims, norm_num_groups, use_checkpoint)
            for i in range(plan.num_levels)
        ])
        self.mid = _mid_block(plan.channels[-1], dropout, dims, norm_num_groups, use_checkpoint)
        self.norm_out = GroupNormAct(plan.channels[-1], norm_num_groups)
        self.conv_out = conv_nd(dims, plan.channels[-1], 2 * z_channels if double_z else z_channels, 3, padding=1)
        set_kernels(self, kernels)
        set_model_attention_backend(self, attention_backend)
        set_recompute_cheap(self, recompute_cheap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = spatial_dims(x, self.dims)
        if any(s % self.factor for s in size):
            raise ValueError(f"Encoder: input spatial size {list(size)} is not divisible by the downsampling factor "
                             f"{self.factor}; crop or pad the input to a multiple of {self.factor}")
        h = self.conv_in(x)  # a one-channel image: the Triton thin-conv kernels (nn_dims.KernelChoiceConv)
        for level in self.down:
            h = level(h)
        return _output_head(self, self.mid(h))


class Decoder(nn.Module):
    """z: (B, z_channels, *latent) -> (B, out_ch, *latent * factor), factor = 2**(len(ch_mult) - 1); any latent size.

    `decode_slab` (rows of the output): in inference (eval mode, no autograd) an output larger than that along its
    first spatial axis is decoded layer by layer in slabs of that many rows (slab_decode.py): the same result up to
    rounding; each layer's temporaries (normalised input, convolution workspace) are one slab's, not the whole
    tensor's, and PyTorch kernels with 32-bit indexing only ever see slabs.
    """

    recompute_cheap = False  # as the Encoder's

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[Any], resolution: int | Sequence[int], z_channels: int,
                 dropout: float = 0.0, resamp_with_conv: bool = True, dims: int = 2, norm_num_groups: int = 32,
                 use_checkpoint: bool = False, kernels: str = "auto", attention_backend: str | None = None,
                 recompute_cheap: bool = False, decode_slab: int | None = None):
        super().__init__()
        if decode_slab is not None and (isinstance(decode_slab, bool) or not isinstance(decode_slab, int)
                                        or decode_slab < 1):
            raise ValueError(f"Decoder: decode_slab must be a positive int (output rows per slab) or null, "
                             f"got {decode_slab!r}")
        self.decode_slab = decode_slab
        plan = _Plan("Decoder", ch, ch_mult, num_res_blocks, attn_resolutions, resolution, dims, norm_num_groups)
        self.dims, self.factor, self.z_channels = plan.dims, plan.factor, z_channels
        self.conv_in = conv_nd(dims, z_channels, plan.channels[-1], 3, padding=1)
        self.mid = _mid_block(plan.channels[-1], dropout, dims, norm_num_groups, use_checkpoint)
        # Levels from the lowest resolution up; each has one ResNet block more than the encoder's (as in CompVis).
        out_chs = plan.channels[::-1]
        in_chs = [out_chs[0], *out_chs[:-1]]
        levels = range(plan.num_levels - 1, -1, -1)
        self.up = nn.ModuleList([
            _level(in_chs[j], out_chs[j], num_res_blocks + 1, plan.attention[i],
                   Upsample(out_chs[j], dims, resamp_with_conv) if i > 0 else None,
                   dropout, dims, norm_num_groups, use_checkpoint)
            for j, i in enumerate(levels)
        ])
        self.norm_out = GroupNormAct(plan.channels[0], norm_num_groups)
        self.conv_out = conv_nd(dims, plan.channels[0], out_ch, 3, padding=1)
        set_kernels(self, kernels)
        set_model_attention_backend(self, attention_backend)
        set_recompute_cheap(self, recompute_cheap)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        spatial_dims(z, self.dims)
        if z.shape[1] != self.z_channels:
            raise ValueError(f"Decoder: expected {self.z_channels} latent channels, got shape {tuple(z.shape)}")
        if (self.decode_slab is not None and not self.training and not torch.is_grad_enabled()
                and z.shape[2] * self.factor > self.decode_slab):
            return decode_in_slabs(self, z, self.decode_slab)
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return _output_head(self, h)


def build_encoder_decoder(ddconfig: Mapping[str, Any], where: str = "ddconfig") -> tuple[Encoder, Decoder]:
    """Split one CompVis-style `ddconfig` between an Encoder and a Decoder; an unknown key is an error naming it."""
    encoder_keys = set(inspect.signature(Encoder).parameters)
    decoder_keys = set(inspect.signature(Decoder).parameters)
    unknown = sorted(set(ddconfig) - encoder_keys - decoder_keys)
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(accepted: {', '.join(sorted(encoder_keys | decoder_keys))})")
    missing = sorted({k for cls in (Encoder, Decoder) for k, p in inspect.signature(cls).parameters.items()
                      if p.default is inspect.Parameter.empty and k not in ddconfig})
    if missing:
        raise ValueError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    encoder = Encoder(**{k: v for k, v in ddconfig.items() if k in encoder_keys})
    decoder = Decoder(**{k: v for k, v in ddconfig.items() if k in decoder_keys})
    return encoder, decoder
