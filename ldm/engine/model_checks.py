"""Checks of a built latent diffusion model against its config and its data, run before anything is written.

Channel counts and grid sizes that disagree would otherwise fail inside the first training step, with a traceback
and a run folder left behind; here each gives one ConfigError naming both config keys.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from omegaconf import DictConfig

from ldm.util import ConfigError


def check_latent_diffusion(model: torch.nn.Module, params: DictConfig, item: Mapping[str, Any] | None,
                           where: str = "model.params", data_where: str = "data") -> None:
    """Raise ConfigError when `model` (a LatentDiffusion built from `params`) cannot run on `item`, one data item.

    Checked: `channels` against the first stage's `embed_dim`; the UNet's `in_channels` against `channels` plus the
    channels a concat conditioning adds; its `out_channels` against `channels`; the data's channels against the first
    stage's `in_channels`; `image_size` against the data's spatial size over the first stage's downsampling factor.
    item: {first_stage_key: (C, *spatial), cond_stage_key: ...} unbatched, or None to skip the data checks.
    A model with its own `check_against_data(item, where, data_where)` (the DiffusionEngine) is checked by it."""
    own_check = getattr(model, "check_against_data", None)
    if own_check is not None:
        own_check(item, where, data_where)
        return
    first_stage = getattr(model, "first_stage_model", None)
    if first_stage is None or not all(hasattr(model, name) for name in ("channels", "image_size", "first_stage_key")):
        return  # not a LatentDiffusion (an sgm-style engine describes its latents otherwise)
    unet = params.get("unet_config", {}).get("params", {})
    first = f"{where}.first_stage_config.params"
    embed_dim = getattr(first_stage, "embed_dim", None)
    if embed_dim is not None and model.channels != embed_dim:
        raise ConfigError(f"{where}.channels={model.channels} but {first}.embed_dim={embed_dim}: the diffusion runs on "
                          f"the first stage's latents, so the two must be equal")
    out_channels = unet.get("out_channels", None)
    if out_channels is not None and out_channels != model.channels:
        raise ConfigError(f"{where}.unet_config.params.out_channels={out_channels} but {where}.channels="
                          f"{model.channels}: the network predicts a latent-shaped target")
    concat = _concat_channels(model, item, where)
    in_channels = unet.get("in_channels", None)
    if in_channels is not None and concat is not None and in_channels != model.channels + concat:
        added = f" + {concat} channels of the concat conditioning ({where}.cond_stage_config)" if concat else ""
        raise ConfigError(f"{where}.unet_config.params.in_channels={in_channels} but {where}.channels="
                          f"{model.channels}{added} = {model.channels + concat} channels reach the network")
    if item is None or model.first_stage_key not in item:
        return
    image = torch.as_tensor(item[model.first_stage_key])
    data_key = f"{data_where} items['{model.first_stage_key}']"
    image_channels = getattr(first_stage, "in_channels", None)
    if image_channels is not None and image.shape[0] != image_channels:
        raise ConfigError(f"{data_key} have {image.shape[0]} channels (shape {list(image.shape)}) but "
                          f"{first}.ddconfig.in_channels={image_channels}")
    factor = getattr(getattr(first_stage, "encoder", None), "factor", None)
    if factor is None:
        return
    spatial = list(image.shape[1:])
    latent = [size / factor for size in spatial]
    if latent != [float(size) for size in model.image_size]:
        shown = [int(s) if float(s).is_integer() else round(s, 2) for s in latent]
        raise ConfigError(f"{where}.image_size={list(model.image_size)} but {data_key} of spatial size {spatial} "
                          f"become latents of {shown} ({first}.ddconfig.ch_mult downsamples by {factor})")


def _concat_channels(model: torch.nn.Module, item: Mapping[str, Any] | None, where: str) -> int | None:
    """Channels the conditioning concatenates to the latents: 0 without concat, None if unknown without data."""
    if getattr(model, "conditioning_key", None) not in ("concat", "hybrid"):
        return 0
    if getattr(model, "cond_stage_is_first_stage", False):
        return model.channels
    if item is None or model.cond_stage_key not in item:
        return None
    raw = torch.as_tensor(item[model.cond_stage_key])[None]
    with torch.no_grad():
        condition = model.encode_condition(raw.float() if raw.is_floating_point() else raw)
    if condition.ndim < 2 or math.prod(condition.shape[2:]) == 0:
        raise ConfigError(f"{where}.conditioning_key={model.conditioning_key!r} needs a spatial conditioning, but "
                          f"{where}.cond_stage_config gives shape {list(condition.shape)} for one item")
    return int(condition.shape[1])
