"""A model's `ckpt_path` naming a pretrained file of another layout: a CompVis / Stable Diffusion single file
(`.ckpt` or `.safetensors`) or a diffusers folder, converted into the state dict of the model the config built.

Sections, by our model's type: an AutoencoderKL takes the autoencoder (`first_stage_model.*` of a single file, the
file itself for a VAE file, `vae/` of a folder); a DDPM's network `model.*` takes the UNet (`model.diffusion_model.*`,
`unet/`); a LatentDiffusion both, as does a DiffusionEngine (`model.diffusion_model.*`, `first_stage_model.*`). An EMA (`model_ema.*`) starts from the converted network's weights (a file's own
`model_ema.*` is not read), and `scale_factor` keeps the config's value unless the file has one. What the file lacks
stays missing, and a config whose architecture differs from the file's fails naming the keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.convert import unet as unet_convert
from ldm.convert import vae as vae_convert
from ldm.convert.diffusers_folder import component_folder, read_component
from ldm.convert.weights_io import ConversionError, read_state_dict
from ldm.engine.checkpoint import CheckpointError

_FOREIGN = {"compvis", "diffusers"}


def _source_sections(path: Path) -> tuple[Callable[[str, str], tuple[dict, str] | None], bool, float | None]:
    """(lookup(component, single-file prefix) -> (tensors, prefix) or None, whether the source is foreign, the
    latent scale factor it states: a diffusers vae's `scaling_factor`, a single file's `scale_factor` tensor)."""
    if path.is_dir():
        def from_folder(component: str, _: str):
            folder = component_folder(path, component)
            if not (folder / "config.json").is_file() or (folder == path and component != _folder_kind(path)):
                return None
            return read_component(folder)[1], ""
        vae_config = component_folder(path, "vae") / "config.json"
        scale = json.loads(vae_config.read_text()).get("scaling_factor") if vae_config.is_file() else None
        return from_folder, True, scale
    try:
        state = read_state_dict(path, mmap=True)
    except ConversionError:
        if path.suffix == ".safetensors":
            raise
        return (lambda component, prefix: None), False, None  # the checkpoint loader reports what is wrong
    detectors = {"vae": vae_convert.detect_layout, "unet": unet_convert.detect_layout}

    def from_file(component: str, prefix: str):
        found = next((p for p in (prefix, "") if detectors[component](state, p) in _FOREIGN), None)
        return None if found is None else (state, found)
    foreign = any(from_file(c, p) is not None for c, p in (("vae", "first_stage_model."),
                                                           ("unet", unet_convert.SINGLE_FILE_PREFIX)))
    scale = state.get("scale_factor")
    return from_file, foreign, float(scale) if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None


def _folder_kind(folder: Path) -> str | None:
    """`vae` or `unet` for a component folder itself, from its config.json's class."""
    name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    return {"AutoencoderKL": "vae", "UNet2DConditionModel": "unet"}.get(name)


def converted_state(model: nn.Module, path: str | Path,
                    ignore_keys: Sequence[str] = ()) -> dict[str, torch.Tensor] | None:
    """`model`'s state dict from a foreign pretrained file or folder at `path` (or a `.safetensors` file of ours, as
    `python -m ldm.engine.export` writes them); None when `path` is a pickled checkpoint of ours, for the checkpoint
    loader. A Hugging Face repo id reads its snapshot in the local cache (`in_hub_cache`); a path that is not there
    raises CheckpointError saying what ckpt_path takes and how to fetch it. A section of ours under one of `ignore_keys` (e.g. `first_stage_model.`) is not read."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
    from ldm.models.diffusion.engine import DiffusionEngine

    path = in_hub_cache(Path(path))
    if not path.exists():
        repo = str(path) if _looks_like_repo_id(path) else "<repo id>"
        raise CheckpointError(f"checkpoint {path} does not exist; ckpt_path takes a checkpoint of this repo, a Stable "
                              f"Diffusion single file (.ckpt, .safetensors), a diffusers pipeline folder or the repo "
                              f"id of one in the Hugging Face cache (fetch it on a machine with network: hf download "
                              f"{repo}, then copy the cache or give the folder)")
    lookup, foreign, scale = _source_sections(path)
    if not foreign:
        return read_state_dict(path) if path.suffix == ".safetensors" else None
    sections: list[tuple[str, nn.Module, str, str]] = []  # (our prefix, module, component, single-file prefix)
    if isinstance(model, AutoencoderKL):
        sections.append(("", model, "vae", "first_stage_model."))
    elif isinstance(model, DDPM):
        sections.append(("model.", model.model, "unet", unet_convert.SINGLE_FILE_PREFIX))
        if isinstance(model, LatentDiffusion):
            sections.append(("first_stage_model.", model.first_stage_model, "vae", "first_stage_model."))
    elif isinstance(model, DiffusionEngine):
        sections += [("model.diffusion_model.", model.model.diffusion_model, "unet", unet_convert.SINGLE_FILE_PREFIX),
                     ("first_stage_model.", model.first_stage_model, "vae", "first_stage_model.")]
    else:
        raise ConversionError(f"{path}: pretrained files of other layouts load into AutoencoderKL, DDPM, "
                              f"LatentDiffusion and DiffusionEngine, not {type(model).__name__}")
    state: dict[str, torch.Tensor] = {}
    for ours, module, component, prefix in sections:
        if ours and any(ours.startswith(key) for key in ignore_keys):
            continue
        found = lookup(component, prefix)
        if found is None:
            continue  # its keys stay missing: the strict check names them
        theirs, their_prefix = found
        convert = vae_convert if component == "vae" else unet_convert
        layout = convert.detect_layout(theirs, their_prefix)
        try:
            converted = convert.state_to_ours(module, theirs, layout, their_prefix, str(path))
        except ConversionError as err:
            raise ConversionError(f"{err}; the architecture the file has: python -m ldm.convert {path} "
                                  f"--config") from None
        state.update({ours + key: value for key, value in converted.items()})
    _fill_bookkeeping(model, state, scale)
    return state


def _looks_like_repo_id(path: Path) -> bool:
    return not path.is_absolute() and len(path.parts) == 2 and not path.name.endswith((".ckpt", ".safetensors"))


def in_hub_cache(path: Path) -> Path:
    """`path`, or for a Hugging Face repo id (`owner/name`, no such path here) its snapshot in the local Hugging Face
    cache, as the text encoders' `version` resolves; nothing is downloaded."""
    if path.exists() or not _looks_like_repo_id(path):
        return path
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a repo id at all (HFValidationError)
        return path


def _fill_bookkeeping(model: nn.Module, state: dict[str, torch.Tensor], scale: float | None) -> None:
    """EMA averages start at the converted network; scale_factor: the source's if it states one, else the config's."""
    own = model.state_dict()
    ema = getattr(model, "model_ema", None)
    if ema is not None:
        for name, shadow in ema.shadow_names.items():
            if f"model.{name}" in state:
                state[f"model_ema.{shadow}"] = state[f"model.{name}"].clone()
        state["model_ema.decay"], state["model_ema.num_updates"] = own["model_ema.decay"], own["model_ema.num_updates"]
    if "scale_factor" in own:
        state["scale_factor"] = own["scale_factor"] if scale is None else torch.tensor(scale)


def describe(path: str | Path) -> Mapping[str, str]:
    """{component: layout} found at `path` (for messages and the command line)."""
    lookup, _, _ = _source_sections(Path(path))
    found = {}
    for component, prefix, convert in (("vae", "first_stage_model.", vae_convert),
                                       ("unet", unet_convert.SINGLE_FILE_PREFIX, unet_convert)):
        section = lookup(component, prefix)
        if section is not None:
            found[component] = convert.detect_layout(*section)
    return found
