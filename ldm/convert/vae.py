"""AutoencoderKL weights in the CompVis / Stable Diffusion layout (`encoder.down.0.block.0.conv1`, the section
`first_stage_model.*` of a single-file checkpoint) and in diffusers' (`encoder.down_blocks.0.resnets.0.conv1`, a
`vae/` folder), to and from ours (`encoder.down.0.0.conv1`).

The architecture is read from the weights: channel widths, levels, ResNet blocks per level, which levels have
attention, latent widths. Only the GroupNorm group count is not in the weights: diffusers' config.json gives it,
else 32 (every published Stable Diffusion autoencoder).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.convert.diffusers_folder import component_folder, read_component
from ldm.convert.keymap import Mapped, from_ours, mapped, to_ours
from ldm.convert.weights_io import ConversionError, read_state_dict
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttentionBlock, ResnetBlock
from ldm.modules.resampling import Downsample, Upsample

COMPVIS, DIFFUSERS = "compvis", "diffusers"
# Nominal training size put into the inferred ddconfig: it only places attention (attn_resolutions).
_NOMINAL_RESOLUTION = 256

_NAMES = {  # per layout: ResNet block parts, attention parts (norm, q, k, v, out), the mid block, the output norm
    COMPVIS: dict(shortcut="nin_shortcut", attn=("norm", "q", "k", "v", "proj_out"),
                  mid=("mid.block_1", "mid.attn_1", "mid.block_2"), norm_out="norm_out"),
    DIFFUSERS: dict(shortcut="conv_shortcut", attn=("group_norm", "to_q", "to_k", "to_v", "to_out.0"),
                    mid=("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"),
                    norm_out="conv_norm_out"),
}


def detect_layout(state: Mapping[str, torch.Tensor], prefix: str = "") -> str | None:
    """`compvis`, `diffusers` or `ours` from the first block's name under `prefix`; None if no autoencoder is there."""
    probes = {COMPVIS: "encoder.down.0.block.0.conv1.weight", DIFFUSERS: "encoder.down_blocks.0.resnets.0.conv1.weight",
              "ours": "encoder.down.0.0.conv1.weight"}
    return next((layout for layout, key in probes.items() if prefix + key in state), None)


def _block(layout: str, coder: str, level: int, kind: str, index: int) -> str:
    """Their name of the `index`-th ResNet (`kind` res) or attention (attn) block of a level."""
    if layout == COMPVIS:
        return f"{coder}.{'down' if coder == 'encoder' else 'up'}.{level}.{'block' if kind == 'res' else 'attn'}.{index}"
    return (f"{coder}.{'down_blocks' if coder == 'encoder' else 'up_blocks'}.{level}."
            f"{'resnets' if kind == 'res' else 'attentions'}.{index}")


def infer_config(state: Mapping[str, torch.Tensor], layout: str, prefix: str = "", norm_num_groups: int = 32,
                 source: str = "weights") -> dict[str, Any]:
    """AutoencoderKL params {ddconfig, embed_dim, lossconfig} that fit their tensors under `prefix`."""
    def weight(name: str) -> torch.Tensor:
        key = f"{prefix}{name}.weight"
        if key not in state:
            raise ConversionError(f"{source}: no tensor {key}, which the {layout} autoencoder layout has")
        return state[key]

    conv_in = weight("encoder.conv_in")
    ch, dims = conv_in.shape[0], conv_in.ndim - 2
    widths, attention, level = [], [], 0
    while f"{prefix}{_block(layout, 'encoder', level, 'res', 0)}.conv1.weight" in state:
        widths.append(weight(f"{_block(layout, 'encoder', level, 'res', 0)}.conv1").shape[0])
        attention.append(f"{prefix}{_block(layout, 'encoder', level, 'attn', 0)}.{_NAMES[layout]['attn'][0]}.weight"
                         in state)
        level += 1
    if not widths or any(w % ch for w in widths):
        raise ConversionError(f"{source}: autoencoder level widths {widths} are not multiples of conv_in's {ch} "
                              f"channels")
    num_res_blocks = 0
    while f"{prefix}{_block(layout, 'encoder', 0, 'res', num_res_blocks)}.conv1.weight" in state:
        num_res_blocks += 1
    z_channels = weight("decoder.conv_in").shape[1]
    factor = 2 ** (len(widths) - 1)
    resolution = _NOMINAL_RESOLUTION if _NOMINAL_RESOLUTION % factor == 0 else factor
    ddconfig = dict(double_z=weight("encoder.conv_out").shape[0] == 2 * z_channels, z_channels=int(z_channels),
                    resolution=resolution, in_channels=int(conv_in.shape[1]),
                    out_ch=int(weight("decoder.conv_out").shape[0]), ch=int(ch),
                    ch_mult=[int(w // ch) for w in widths], num_res_blocks=num_res_blocks,
                    attn_resolutions=[resolution // 2 ** i for i, a in enumerate(attention) if a], dropout=0.0,
                    dims=dims, norm_num_groups=norm_num_groups, downsample_pad_end=True)
    return dict(ddconfig=ddconfig, embed_dim=int(weight("post_quant_conv").shape[1]),
                lossconfig={"target": "torch.nn.Identity"})


def build(params: Mapping[str, Any], source: str = "weights") -> AutoencoderKL:
    """Our AutoencoderKL from `infer_config`'s params (an error in them names the key)."""
    try:
        return AutoencoderKL(**params)
    except ValueError as err:
        raise ConversionError(f"{source}: the autoencoder config inferred from it does not build: {err}") from None


def layout_of(model: AutoencoderKL, layout: str) -> list[Mapped]:
    """Our AutoencoderKL's modules against their names in `layout` (`compvis` or `diffusers`)."""
    if layout not in _NAMES:
        raise ConversionError(f"unknown autoencoder layout {layout!r} (known: {', '.join(_NAMES)})")
    padded_both = [layer for level in model.encoder.down for layer in level
                   if isinstance(layer, Downsample) and layer.pad is None and isinstance(layer.op, torch.nn.modules.conv._ConvNd)]
    if padded_both:
        raise ConversionError(f"this autoencoder's downsampling convolutions pad both sides; the {layout} layout's "
                              f"pad the end only (ddconfig.downsample_pad_end: true), so its weights would compute "
                              f"something else")
    names = _NAMES[layout]
    entries = [mapped("quant_conv"), mapped("post_quant_conv")]
    for coder_name in ("encoder", "decoder"):
        coder = getattr(model, coder_name)
        levels = coder.down if coder_name == "encoder" else coder.up
        for index, level in enumerate(levels):
            # CompVis numbers the decoder's levels by resolution (0 = full size), diffusers in execution order.
            theirs_level = index if coder_name == "encoder" or layout == DIFFUSERS else len(levels) - 1 - index
            counts = {"res": 0, "attn": 0}
            for position, layer in enumerate(level):
                ours = f"{coder_name}.{'down' if coder_name == 'encoder' else 'up'}.{index}.{position}"
                kind = "res" if isinstance(layer, ResnetBlock) else "attn" if isinstance(layer, AttentionBlock) else None
                if kind is not None:
                    theirs = _block(layout, coder_name, theirs_level, kind, counts[kind])
                    counts[kind] += 1
                    entries += (_resnet(ours, theirs, layer, names) if kind == "res"
                                else _attention(ours, theirs, names, layout))
                elif isinstance(layer, (Downsample, Upsample)):
                    entries += _resampler(ours, layer, coder_name, theirs_level, layout)
        for ours_mid, theirs_mid in zip(range(3), names["mid"]):
            layer = coder.mid[ours_mid]
            ours = f"{coder_name}.mid.{ours_mid}"
            theirs = f"{coder_name}.{theirs_mid}"
            entries += (_resnet(ours, theirs, layer, names) if isinstance(layer, ResnetBlock)
                        else _attention(ours, theirs, names, layout))
        entries += [mapped(f"{coder_name}.conv_in"), mapped(f"{coder_name}.norm_out",
                                                            f"{coder_name}.{names['norm_out']}"),
                    mapped(f"{coder_name}.conv_out")]
    return entries


def _resnet(ours: str, theirs: str, block: ResnetBlock, names: Mapping[str, Any]) -> list[Mapped]:
    parts = [mapped(f"{ours}.{part}", f"{theirs}.{part}") for part in ("norm1", "conv1", "norm2", "conv2")]
    if not isinstance(block.skip, torch.nn.Identity):
        parts.append(mapped(f"{ours}.skip", f"{theirs}.{names['shortcut']}"))
    return parts


def _attention(ours: str, theirs: str, names: Mapping[str, Any], layout: str) -> list[Mapped]:
    norm, q, k, v, out = names["attn"]
    linear = layout == DIFFUSERS
    return [mapped(f"{ours}.norm", f"{theirs}.{norm}"),
            mapped(f"{ours}.qkv", f"{theirs}.{q}", f"{theirs}.{k}", f"{theirs}.{v}", linear=linear),
            mapped(f"{ours}.proj_out", f"{theirs}.{out}", linear=linear)]


def _resampler(ours: str, layer: torch.nn.Module, coder: str, level: int, layout: str) -> list[Mapped]:
    conv = layer.op if isinstance(layer, Downsample) else layer.conv
    if not isinstance(conv, torch.nn.modules.conv._ConvNd):
        return []  # average pooling / plain nearest upsampling: no weights
    if layout == COMPVIS:
        theirs = f"{coder}.{'down' if coder == 'encoder' else 'up'}.{level}.{'downsample' if coder == 'encoder' else 'upsample'}.conv"
    else:
        theirs = (f"{coder}.{'down_blocks' if coder == 'encoder' else 'up_blocks'}.{level}."
                  f"{'downsamplers' if coder == 'encoder' else 'upsamplers'}.0.conv")
    return [mapped(f"{ours}.{'op' if isinstance(layer, Downsample) else 'conv'}", theirs)]


def diffusers_config(model: AutoencoderKL, scaling_factor: float) -> dict[str, Any]:
    """diffusers' AutoencoderKL config.json for our model (2D, z_channels == embed_dim, as diffusers builds it)."""
    if model.dims != 2:
        raise ConversionError(f"diffusers' AutoencoderKL is 2D; this autoencoder has dims={model.dims}")
    if model.z_channels != model.embed_dim:
        raise ConversionError(f"diffusers' AutoencoderKL has one latent width; this one has z_channels="
                              f"{model.z_channels} and embed_dim={model.embed_dim}")
    levels = model.encoder.down
    attention = [any(isinstance(layer, AttentionBlock) for layer in level) for level in levels]
    return {"_class_name": "AutoencoderKL", "in_channels": model.in_channels,
            "out_channels": model.decoder.conv_out.out_channels,
            "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention],
            "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attention[::-1]],
            "block_out_channels": [level[0].conv1.out_channels for level in levels],
            "layers_per_block": sum(isinstance(layer, ResnetBlock) for layer in levels[0]), "act_fn": "silu",
            "latent_channels": model.z_channels, "norm_num_groups": model.encoder.norm_out.num_groups,
            "scaling_factor": scaling_factor}


# Sections of a CompVis autoencoder checkpoint that are not the autoencoder: its training loss (LPIPS, discriminator).
_TRAINING_ONLY = ("loss.",)


def read_source(path: str | Path, norm_num_groups: int | None = None
                ) -> tuple[dict[str, torch.Tensor], str, str, dict[str, Any]]:
    """(their tensors, key prefix, layout, AutoencoderKL params) of an autoencoder in a file (a single-file SD
    checkpoint: `first_stage_model.*`; a VAE file) or a diffusers folder (a pipeline's `vae/` or the folder itself)."""
    path = Path(path)
    if path.is_dir():
        config, state, _ = read_component(component_folder(path, "vae"))
        for key, needed in (("use_quant_conv", True), ("use_post_quant_conv", True), ("mid_block_add_attention", True)):
            if config.get(key, needed) != needed:
                raise ConversionError(f"{path}: config.json {key}={config[key]} is not supported (ours has "
                                      f"{key.replace('use_', '').replace('_add_attention', ' attention')})")
        norm_num_groups = norm_num_groups or config.get("norm_num_groups", 32)
        prefix = ""
    else:
        state = read_state_dict(path)
        prefix = next((p for p in ("first_stage_model.", "") if detect_layout(state, p) not in (None, "ours")), None)
        if prefix is None:
            raise ConversionError(f"{path}: no autoencoder in the CompVis or diffusers layout (looked for "
                                  f"[first_stage_model.]encoder.down.0.block.0.conv1.weight and "
                                  f"encoder.down_blocks.0.resnets.0.conv1.weight)")
        if prefix == "":
            state = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY)}
    layout = detect_layout(state, prefix)
    if layout not in _NAMES:
        raise ConversionError(f"{path}: no autoencoder in the CompVis or diffusers layout")
    return state, prefix, layout, infer_config(state, layout, prefix, norm_num_groups or 32, str(path))


def state_to_ours(model: AutoencoderKL, state: Mapping[str, torch.Tensor], layout: str, prefix: str,
                  source: str) -> dict[str, torch.Tensor]:
    """Their tensors under `prefix` -> `model`'s state dict (all keys checked at once)."""
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    return to_ours(layout_of(model, layout), state, shapes, prefix, source, "AutoencoderKL")


def load_autoencoder(path: str | Path, norm_num_groups: int | None = None) -> AutoencoderKL:
    """Our AutoencoderKL with the architecture and weights of a CompVis / SD / diffusers autoencoder."""
    state, prefix, layout, params = read_source(path, norm_num_groups)
    model = build(params, str(path))
    model.load_state_dict(state_to_ours(model, state, layout, prefix, str(path)))
    return model


def export_state(model: AutoencoderKL, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`model`'s tensors named as in `layout` (`compvis`, with prefix `first_stage_model.` inside an SD checkpoint,
    or `diffusers`)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(_TRAINING_ONLY)}
    return from_ours(layout_of(model, layout), state, prefix)
