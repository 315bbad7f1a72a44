"""Diffusion UNet weights in the CompVis / Stable Diffusion layout (`input_blocks.1.0.in_layers.0`, the section
`model.diffusion_model.*` of a single-file checkpoint) and in diffusers' (`down_blocks.0.resnets.0.norm1`, a `unet/`
folder), to and from our UNetModel (`input_blocks.1.0.in_norm`).

The architecture is read from the weights: widths per level, ResNet blocks per level, where the spatial
transformers are, their depth, context width and projections, class embeddings. Attention heads leave no trace in
the weights: diffusers' config.json gives them; a single file gets Stable Diffusion's (8 heads with a 768-wide
context as in SD 1.x, else 64 channels per head as in SD 2.x and SDXL) unless `num_heads` / `num_head_channels` say.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ldm.convert.diffusers_folder import component_folder, read_component
from ldm.convert.keymap import Mapped, from_ours, mapped, to_ours
from ldm.convert.weights_io import ConversionError, read_state_dict
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, ResBlock, UNetModel
from ldm.modules.resampling import Downsample, Upsample

COMPVIS, DIFFUSERS = "compvis", "diffusers"
SINGLE_FILE_PREFIX = "model.diffusion_model."
_SD1_CONTEXT = 768  # SD 1.x's CLIP ViT-L text width; its UNet has 8 heads per transformer

_RESBLOCK = {COMPVIS: {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_proj.1": "emb_layers.1",
                       "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection"},
             DIFFUSERS: {"in_norm": "norm1", "in_conv": "conv1", "emb_proj.1": "time_emb_proj", "out_norm": "norm2",
                         "out_conv": "conv2", "skip": "conv_shortcut"}}
_TOP = {COMPVIS: {"input_blocks.0.0": "input_blocks.0.0", "out.0": "out.0", "out.1": "out.2",
                  "time_embed.0": "time_embed.0", "time_embed.2": "time_embed.2"},
        DIFFUSERS: {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.1": "conv_out",
                    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}}


def detect_layout(state: Mapping[str, torch.Tensor], prefix: str = "") -> str | None:
    """`compvis`, `diffusers` or `ours` from the first ResNet block's name under `prefix`; None if no UNet is there."""
    probes = {COMPVIS: "input_blocks.1.0.in_layers.0.weight", DIFFUSERS: "down_blocks.0.resnets.0.norm1.weight",
              "ours": "input_blocks.1.0.in_norm.weight"}
    return next((layout for layout, key in probes.items() if prefix + key in state), None)


# ----------------------------------------------------------------------------------------------- layout
def layout_of(model: UNetModel, layout: str) -> list[Mapped]:
    """Our UNetModel's modules against their names in `layout` (`compvis` or `diffusers`)."""
    if layout not in _TOP:
        raise ConversionError(f"unknown UNet layout {layout!r} (known: {', '.join(_TOP)})")
    entries = [mapped(ours, theirs) for ours, theirs in _TOP[layout].items()]
    if isinstance(model.label_emb, nn.Sequential):  # sgm's vector conditioning (SDXL): diffusers' text_time MLP
        for ours, theirs in (("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")):
            entries.append(mapped(ours, ours if layout == COMPVIS else theirs))
    elif model.label_emb is not None:
        entries.append(mapped("label_emb", "label_emb" if layout == COMPVIS else "class_embedding",
                              params=("weight",)))
    level, index = 0, 0
    for n, block in enumerate(model.input_blocks):
        if n == 0:
            continue
        if isinstance(block[0], Downsample):
            entries += _layer(block[0], f"input_blocks.{n}.0",
                              f"input_blocks.{n}.0" if layout == COMPVIS else f"down_blocks.{level}.downsamplers.0",
                              layout)
            level, index = level + 1, 0
            continue
        for k, layer in enumerate(block):
            theirs = (f"input_blocks.{n}.{k}" if layout == COMPVIS else
                      f"down_blocks.{level}.{'resnets' if k == 0 else 'attentions'}.{index}")
            entries += _layer(layer, f"input_blocks.{n}.{k}", theirs, layout)
        index += 1
    mid = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")
    for k, layer in enumerate(model.middle_block):
        entries += _layer(layer, f"middle_block.{k}", f"middle_block.{k}" if layout == COMPVIS else mid[k], layout)
    per_level = len(model.output_blocks) // (level + 1)
    for n, block in enumerate(model.output_blocks):
        up_level, index = divmod(n, per_level)
        for k, layer in enumerate(block):
            if layout == COMPVIS:
                theirs = f"output_blocks.{n}.{k}"
            elif isinstance(layer, Upsample):
                theirs = f"up_blocks.{up_level}.upsamplers.0"
            else:
                theirs = f"up_blocks.{up_level}.{'resnets' if k == 0 else 'attentions'}.{index}"
            entries += _layer(layer, f"output_blocks.{n}.{k}", theirs, layout)
    return entries


def _layer(layer: nn.Module, ours: str, theirs: str, layout: str) -> list[Mapped]:
    if isinstance(layer, ResBlock):
        if not isinstance(layer.resample, nn.Identity) and layout != COMPVIS:  # CompVis': parameter-free too
            raise ConversionError(f"{ours}: ResNet blocks that resample (resblock_updown) have no {layout} layout "
                                  f"here")
        names = _RESBLOCK[layout]
        parts = [part for part in names if part != "skip" or not isinstance(layer.skip, nn.Identity)]
        return [mapped(f"{ours}.{part}", f"{theirs}.{names[part]}") for part in parts]
    if isinstance(layer, SpatialTransformer):
        return _transformer(layer, ours, theirs)
    if isinstance(layer, Downsample):
        return [mapped(f"{ours}.op", f"{theirs}.{'op' if layout == COMPVIS else 'conv'}")]
    if isinstance(layer, Upsample):
        return [mapped(f"{ours}.conv", f"{theirs}.conv")]
    if isinstance(layer, AttentionBlock):
        if layout != COMPVIS:
            raise ConversionError(f"{ours}: plain self-attention blocks (use_spatial_transformer: false) have no "
                                  f"{layout} layout here (diffusers' UNet2DConditionModel has none)")
        if not layer.qkv_bias:
            raise ConversionError(f"{ours}: built with attention_qkv_bias: false; the CompVis layout's qkv has biases")
        # their fused qkv, split into q, k, v by split_fused_qkv before the mapping (and fused after it on export)
        return [mapped(f"{ours}.norm", f"{theirs}.norm"), mapped(f"{ours}.attn.to_out", f"{theirs}.proj_out"),
                *(mapped(f"{ours}.attn.to_{part}", f"{theirs}.qkv.{part}") for part in "qkv")]
    raise ConversionError(f"{ours}: no {layout} name for a {type(layer).__name__}")


def _attention_blocks(model: UNetModel) -> dict[str, int]:
    """{name: heads} of the plain self-attention blocks; in the CompVis layout their names are ours."""
    return {name: block.attn.heads for name, block in model.named_modules() if isinstance(block, AttentionBlock)}


def split_fused_qkv(model: UNetModel, state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CompVis' AttentionBlock `qkv` 1x1 convolution (3C, C, 1), in the head-interleaved order of its default
    (legacy) attention, rows [q_h, k_h, v_h] per head h, -> `qkv.q`, `qkv.k`, `qkv.v` (C, C) each, heads in order.
    Its `proj_out` (C, C, 1) keeps its name."""
    split = dict(state)
    for name, heads in _attention_blocks(model).items():
        for param in ("weight", "bias"):
            key = f"{prefix}{name}.qkv.{param}"
            if key not in split:
                continue
            fused = split.pop(key)
            per_head = fused.reshape(heads, 3, fused.shape[0] // (3 * heads), *fused.shape[1:])
            for index, part in enumerate("qkv"):
                split[f"{prefix}{name}.qkv.{part}.{param}"] = per_head[:, index].flatten(0, 1)
    return split


def fuse_qkv(model: UNetModel, state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of `split_fused_qkv`, with the 1x1 convolutions' trailing kernel axis on qkv and proj_out."""
    fused = dict(state)
    for name, heads in _attention_blocks(model).items():
        for param in ("weight", "bias"):
            parts = [fused.pop(f"{prefix}{name}.qkv.{part}.{param}") for part in "qkv"]
            stacked = torch.stack([p.unflatten(0, (heads, -1)) for p in parts], dim=1).flatten(0, 2)
            fused[f"{prefix}{name}.qkv.{param}"] = stacked[..., None] if param == "weight" else stacked
        proj_out = f"{prefix}{name}.proj_out.weight"
        fused[proj_out] = fused[proj_out][..., None]
    return fused


def _transformer(layer: SpatialTransformer, ours: str, theirs: str) -> list[Mapped]:
    entries = [mapped(f"{ours}.{part}", f"{theirs}.{part}") for part in ("norm", "proj_in", "proj_out")]
    for d in range(len(layer.transformer_blocks)):
        o, t = f"{ours}.transformer_blocks.{d}", f"{theirs}.transformer_blocks.{d}"
        entries += [mapped(f"{o}.{norm}", f"{t}.{norm}") for norm in ("norm1", "norm2", "norm3")]
        for attn in ("attn1", "attn2"):
            entries += [mapped(f"{o}.{attn}.{p}", f"{t}.{attn}.{p}", params=("weight",))
                        for p in ("to_q", "to_k", "to_v")]
            entries.append(mapped(f"{o}.{attn}.to_out", f"{t}.{attn}.to_out.0"))
        entries += [mapped(f"{o}.ff.proj_in", f"{t}.ff.net.0.proj"), mapped(f"{o}.ff.proj_out", f"{t}.ff.net.2")]
    return entries


# ------------------------------------------------------------------------------------ architecture from weights
def _names(layout: str) -> dict[str, str]:
    if layout == COMPVIS:
        return dict(conv_in="input_blocks.0.0", conv_out="out.2", emb="time_embed.0", label="label_emb")
    return dict(conv_in="conv_in", conv_out="conv_out", emb="time_embedding.linear_1", label="class_embedding")


def _levels(state: Mapping[str, torch.Tensor], layout: str, prefix: str) -> list[list[tuple[str, str | None]]]:
    """Per level, its (ResNet block, attention or None) names in their layout, from the encoder half."""
    levels: list[list[tuple[str, str | None]]] = [[]]
    if layout == COMPVIS:
        n = 1
        while any(k.startswith(f"{prefix}input_blocks.{n}.") for k in state):
            if f"{prefix}input_blocks.{n}.0.op.weight" in state:
                levels.append([])
            else:
                attn = f"input_blocks.{n}.1"
                levels[-1].append((f"input_blocks.{n}.0",
                                   attn if f"{prefix}{attn}.norm.weight" in state else None))
            n += 1
        return levels
    level = 0
    while f"{prefix}down_blocks.{level}.resnets.0.norm1.weight" in state:
        if level:
            levels.append([])
        j = 0
        while f"{prefix}down_blocks.{level}.resnets.{j}.norm1.weight" in state:
            attn = f"down_blocks.{level}.attentions.{j}"
            levels[-1].append((f"down_blocks.{level}.resnets.{j}",
                               attn if f"{prefix}{attn}.norm.weight" in state else None))
            j += 1
        level += 1
    return levels


def infer_config(state: Mapping[str, torch.Tensor], layout: str, prefix: str = "", num_heads: int | None = None,
                 num_head_channels: int | None = None, source: str = "weights") -> dict[str, Any]:
    """UNetModel params that fit their tensors under `prefix`."""
    def tensor(name: str) -> torch.Tensor:
        if f"{prefix}{name}" not in state:
            raise ConversionError(f"{source}: no tensor {prefix}{name}, which the {layout} UNet layout has")
        return state[f"{prefix}{name}"]

    names = _names(layout)
    conv_in = tensor(f"{names['conv_in']}.weight")
    model_channels, dims = int(conv_in.shape[0]), conv_in.ndim - 2
    levels = _levels(state, layout, prefix)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or not levels[0]:
        raise ConversionError(f"{source}: UNet levels with {sorted(len(level) for level in levels)} ResNet blocks; "
                              f"ours has the same number on every level")
    conv1 = "in_layers.2" if layout == COMPVIS else "conv1"
    widths = [int(tensor(f"{level[0][0]}.{conv1}.weight").shape[0]) for level in levels]
    if any(w % model_channels for w in widths):
        raise ConversionError(f"{source}: UNet level widths {widths} are not multiples of {model_channels}")
    attention = [[attn for _, attn in level] for level in levels]
    if any(len(set(a is None for a in level)) > 1 for level in attention):
        raise ConversionError(f"{source}: a UNet level with attention after some of its ResNet blocks only")
    transformers = [level[0] for level in attention if level[0] is not None]
    params: dict[str, Any] = dict(
        image_size=8 * 2 ** (len(levels) - 1), in_channels=int(conv_in.shape[1]), model_channels=model_channels,
        out_channels=int(tensor(f"{names['conv_out']}.weight").shape[0]), num_res_blocks=counts.pop(),
        attention_resolutions=[2 ** i for i, level in enumerate(attention) if level[0] is not None],
        channel_mult=[w // model_channels for w in widths], dims=dims, legacy=False,
        use_scale_shift_norm=_emb_width(state, prefix, levels, layout) == 2 * widths[0])
    if f"{prefix}{names['label']}.weight" in state:
        params["num_classes"] = int(state[f"{prefix}{names['label']}.weight"].shape[0])
    vector = "label_emb.0.0.weight" if layout == COMPVIS else "add_embedding.linear_1.weight"
    if f"{prefix}{vector}" in state:
        params.update(num_classes="sequential", adm_in_channels=int(state[f"{prefix}{vector}"].shape[1]))
    if transformers:
        first = transformers[0]
        if f"{prefix}{first}.qkv.weight" in state:
            return _plain_attention(params, num_heads, num_head_channels, f"{source}: {prefix}{first}")
        def depth(block: str | None) -> int:
            return 1 if block is None else sum(f"{prefix}{block}.transformer_blocks.{d}.norm1.weight" in state
                                               for d in range(64))
        depths = [depth(level[0]) for level in attention]
        middle = depth("middle_block.1" if layout == COMPVIS else "mid_block.attentions.0")
        context_dim = int(tensor(f"{first}.transformer_blocks.0.attn2.to_k.weight").shape[1])
        params.update(use_spatial_transformer=True, context_dim=context_dim,
                      transformer_depth=depths[0] if len(set(depths)) == 1 else depths)
        if middle != depths[-1]:
            params["transformer_depth_middle"] = middle
        if tensor(f"{first}.proj_in.weight").ndim == 2:
            params["use_linear_in_transformer"] = True
        if num_heads is None and num_head_channels is None:
            num_heads, num_head_channels = (8, None) if context_dim == _SD1_CONTEXT else (None, 64)
    params.update(num_heads=num_heads or -1, num_head_channels=num_head_channels or -1)
    if params["num_heads"] == -1 and params["num_head_channels"] == -1:
        params["num_heads"] = 1  # no attention anywhere: heads are never used
    return params


def _plain_attention(params: dict[str, Any], num_heads: int | None, num_head_channels: int | None,
                     where: str) -> dict[str, Any]:
    """UNetModel params of a UNet with CompVis' plain self-attention blocks, whose heads must be given."""
    if num_heads is None and num_head_channels is None:
        raise ConversionError(f"{where} is a plain self-attention block (use_spatial_transformer: false): its heads "
                              f"leave no trace in the weights; give num_heads or num_head_channels (the original "
                              f"config's unet_config values)")
    return {**params, "use_spatial_transformer": False, "num_heads": num_heads or -1,
            "num_head_channels": num_head_channels or -1}


def _emb_width(state: Mapping[str, torch.Tensor], prefix: str, levels, layout: str) -> int:
    emb = "emb_layers.1" if layout == COMPVIS else "time_emb_proj"
    return int(state[f"{prefix}{levels[0][0][0]}.{emb}.weight"].shape[0])


def heads_from_diffusers(config: Mapping[str, Any], widths: list[int]) -> tuple[int | None, int | None]:
    """(num_heads, num_head_channels) from diffusers' config: `num_attention_heads`, else `attention_head_dim`, which
    in UNet2DConditionModel counts heads, per level or for all (its name is a known misnomer)."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    if len(set(per_level)) == 1:
        return int(per_level[0]), None
    head_widths = {w // h for w, h in zip(widths, per_level)}
    if len(head_widths) == 1 and all(w % h == 0 for w, h in zip(widths, per_level)):
        return None, head_widths.pop()
    raise ConversionError(f"attention heads per level {per_level} for widths {widths}: ours has either the same "
                          f"number of heads or the same head width on every level")


def build(params: Mapping[str, Any], source: str = "weights") -> UNetModel:
    """Our UNetModel from `infer_config`'s params."""
    accepted = set(inspect.signature(UNetModel).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConversionError(f"{source}: this UNet needs {', '.join(unknown)}, which our UNetModel does not have")
    try:
        return UNetModel(**params)
    except ValueError as err:
        hint = ("; attention heads leave no trace in the weights: give num_heads or num_head_channels"
                if "heads" in str(err) else "")
        raise ConversionError(f"{source}: the UNet config inferred from it does not build: {err}{hint}") from None


# --------------------------------------------------------------------------------------------- files, folders
def read_source(path: str | Path, num_heads: int | None = None, num_head_channels: int | None = None
                ) -> tuple[dict[str, torch.Tensor], str, str, dict[str, Any]]:
    """(their tensors, key prefix, layout, UNetModel params) of a UNet in a single-file SD checkpoint
    (`model.diffusion_model.*`), a bare UNet file, or a diffusers folder (a pipeline's `unet/` or the folder)."""
    path = Path(path)
    if path.is_dir():
        config, state, _ = read_component(component_folder(path, "unet"))
        _check_diffusers_config(config, path)
        prefix = ""
        if num_heads is None and num_head_channels is None:
            num_heads, num_head_channels = heads_from_diffusers(config, list(config["block_out_channels"]))
    else:
        state = read_state_dict(path)
        prefix = next((p for p in (SINGLE_FILE_PREFIX, "") if detect_layout(state, p) not in (None, "ours")), None)
        if prefix is None:
            raise ConversionError(f"{path}: no UNet in the CompVis or diffusers layout (looked for "
                                  f"[{SINGLE_FILE_PREFIX}]input_blocks.1.0.in_layers.0.weight and "
                                  f"down_blocks.0.resnets.0.norm1.weight)")
    layout = detect_layout(state, prefix)
    if layout not in _TOP:
        raise ConversionError(f"{path}: no UNet in the CompVis or diffusers layout")
    return state, prefix, layout, infer_config(state, layout, prefix, num_heads, num_head_channels, str(path))


_DIFFUSERS_DEFAULTS = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
                       "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
                       "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim_type": None,
                       "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "only_cross_attention": False,
                       "dual_cross_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
                       "time_cond_proj_dim": None, "timestep_post_act": None, "resnet_out_scale_factor": 1.0,
                       "mid_block_scale_factor": 1, "downsample_padding": 1, "attention_type": "default"}


def _check_diffusers_config(config: Mapping[str, Any], path: Path) -> None:
    """Options of diffusers' UNet2DConditionModel that change the maths away from ours are refused by name."""
    allowed = {"addition_embed_type": "text_time"}  # SDXL: sgm's vector conditioning (num_classes: sequential)
    different = [f"{key}={config[key]!r} (ours: {value!r})" for key, value in _DIFFUSERS_DEFAULTS.items()
                 if key in config and config[key] != value and config[key] != allowed.get(key)
                 and not (key == "mid_block_scale_factor" and float(config[key]) == float(value))]
    if different:
        raise ConversionError(f"{path}: unet config.json options that our UNetModel does not compute: "
                              f"{', '.join(different)}")


def state_to_ours(model: UNetModel, state: Mapping[str, torch.Tensor], layout: str, prefix: str,
                  source: str) -> dict[str, torch.Tensor]:
    """Their tensors under `prefix` -> `model`'s state dict (all keys checked at once)."""
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    if layout == COMPVIS:
        state = split_fused_qkv(model, state, prefix)
    return to_ours(layout_of(model, layout), state, shapes, prefix, source, "UNetModel")


def load_unet(path: str | Path, num_heads: int | None = None, num_head_channels: int | None = None) -> UNetModel:
    """Our UNetModel with the architecture and weights of a CompVis / SD / diffusers UNet."""
    state, prefix, layout, params = read_source(path, num_heads, num_head_channels)
    model = build(params, str(path))
    model.load_state_dict(state_to_ours(model, state, layout, prefix, str(path)))
    return model


def export_state(model: UNetModel, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`model`'s tensors named as in `layout` (`compvis`, with prefix `model.diffusion_model.` inside an SD
    checkpoint, or `diffusers`)."""
    theirs = from_ours(layout_of(model, layout), model.state_dict(), prefix)
    return fuse_qkv(model, theirs, prefix) if layout == COMPVIS else theirs


def diffusers_config(model: UNetModel) -> dict[str, Any]:
    """diffusers' UNet2DConditionModel config.json for our model (2D, spatial transformers with a context)."""
    if model.dims != 2 or model.context_dim is None:
        raise ConversionError(f"diffusers' UNet2DConditionModel is 2D with cross-attention; this UNet has "
                              f"dims={model.dims}, context_dim={model.context_dim}")
    levels = [[]]
    for block in list(model.input_blocks)[1:]:
        if isinstance(block[0], Downsample):
            levels.append([])
        else:
            levels[-1].append(block)
    transformers = [next((layer for layer in level[0] if isinstance(layer, SpatialTransformer)), None)
                    for level in levels]
    widths = [level[0][0].out_conv.out_channels for level in levels]
    mid = next(layer for layer in model.middle_block if isinstance(layer, SpatialTransformer))
    # diffusers gives the mid block the last level's head count: a level without transformers carries the mid's
    heads = [(t or mid).transformer_blocks[0].attn1.heads for t in transformers]
    if heads[-1] != mid.transformer_blocks[0].attn1.heads:
        raise ConversionError(f"diffusers' UNet gives its mid block the last level's heads ({heads[-1]}); this "
                              f"UNet's mid block has {mid.transformer_blocks[0].attn1.heads}")
    first = next(t for t in transformers if t is not None)
    if len(mid.transformer_blocks) != len((transformers[-1] or mid).transformer_blocks):
        raise ConversionError("diffusers' UNet gives its mid block the last level's transformer depth; this UNet's "
                              "differs (transformer_depth_middle)")
    if model.adm_in_channels is not None:  # SDXL: pooled text + 6 size/crop numbers of 256 Fourier features each
        vector = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                  "projection_class_embeddings_input_dim": model.adm_in_channels}
    else:
        vector = {"num_class_embeds": model.num_classes}
    return {"_class_name": "UNet2DConditionModel", "sample_size": model.image_size[0],
            "in_channels": model.in_channels, "out_channels": model.out[1].out_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if t is not None else "DownBlock2D" for t in transformers],
            "up_block_types": ["CrossAttnUpBlock2D" if t is not None else "UpBlock2D" for t in transformers[::-1]],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": widths,
            "layers_per_block": len(levels[0]), "cross_attention_dim": model.context_dim,
            "attention_head_dim": heads,
            "transformer_layers_per_block": [len((t or mid).transformer_blocks) for t in transformers],
            "use_linear_projection": isinstance(first.proj_in, nn.Linear), "norm_num_groups": 32,
            "class_embed_type": None, **vector}
