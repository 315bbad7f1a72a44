"""Convert pretrained weights between layouts, or print the model config they imply.

    python -m ldm.convert sd15.safetensors --config            # the unet_config / first_stage_config they fit
    python -m ldm.convert sd15_pipeline/ --config              # ... and the sampler its scheduler/ folder sets
    python -m ldm.convert sd15.safetensors out/pipeline        # CompVis single file -> diffusers folder (unet/, vae/)
    python -m ldm.convert out/pipeline sd15_again.safetensors  # diffusers folder -> CompVis single file
    python -m ldm.convert logs/<run>/checkpoints/last.ckpt out.safetensors --ema   # a run of ours -> either

A destination ending in .safetensors / .ckpt is a single file in the CompVis / Stable Diffusion layout
(`model.diffusion_model.*`, `first_stage_model.*`); anything else is a diffusers folder. Errors are one line on
stderr and exit code 2.

--config prints model params: the networks' configs and, from a diffusers folder's scheduler/scheduler_config.json
(or, for a Stable Diffusion 1.x / 2.x single file, SD's own scheduler settings), the noise schedule, the sampler and
its conventions (`ldm.convert.scheduler`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.convert import unet as unet_convert
from ldm.convert import vae as vae_convert
from ldm.convert.diffusers_folder import write_component
from ldm.convert.scheduler import (STABLE_DIFFUSION_SCHEDULER, sampler_options_from_scheduler, scheduler_config_of,
                                   stable_diffusion_release)
from ldm.convert.weights_io import PICKLED, SAFETENSORS, ConversionError, read_state_dict, write_state_dict
from ldm.engine.checkpoint import CheckpointError
from ldm.util import ConfigError

DEFAULT_SCALING_FACTOR = 0.18215  # Stable Diffusion 1.x / 2.x; SDXL's is 0.13025


def _from_pretrained(path: Path, opt: argparse.Namespace) -> dict[str, Any]:
    """{component: our module} for each component found in a foreign file or folder."""
    found: dict[str, Any] = {}
    for component, convert, options in (
            ("unet", unet_convert, dict(num_heads=opt.num_heads, num_head_channels=opt.num_head_channels)),
            ("vae", vae_convert, dict(norm_num_groups=opt.norm_num_groups))):
        try:
            state, prefix, layout, params = convert.read_source(path, **options)
        except ConversionError as err:
            if "no UNet" in str(err) or "no autoencoder" in str(err) or "no config.json" in str(err):
                continue
            raise
        model = convert.build(params, str(path))
        model.load_state_dict(convert.state_to_ours(model, state, layout, prefix, str(path)))
        found[component] = (model, params)
    if not found:
        raise ConversionError(f"{path}: neither a UNet nor an autoencoder in the CompVis or diffusers layout")
    return found


def _from_run(path: Path, ema: bool) -> dict[str, Any]:
    """{component: our module} from a checkpoint of this repository (its config says what to build)."""
    from ldm.engine.checkpoint import load_checkpoint
    from ldm.engine.export import ema_weights
    from ldm.util import instantiate_from_config

    checkpoint = load_checkpoint(path)
    if not checkpoint.get("config"):
        raise ConversionError(f"{path}: a checkpoint of ours without its config; cannot tell the architecture")
    state = ema_weights(checkpoint["state_dict"], str(path)) if ema else checkpoint["state_dict"]
    params = OmegaConf.create(checkpoint["config"]).model.params
    found = {}
    for component, key, prefix in (("unet", "unet_config", "model."), ("vae", "first_stage_config",
                                                                       "first_stage_model.")):
        if key not in params:
            continue
        config = OmegaConf.to_container(params[key], resolve=True)
        config.get("params", {}).pop("ckpt_path", None)
        model = instantiate_from_config(config)
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
                               and not k.startswith(prefix + "loss.")})
        found[component] = (model, config["params"])
    return found


def _write(found: dict[str, Any], destination: Path, scaling_factor: float) -> list[str]:
    written = []
    if destination.suffix in (SAFETENSORS, *PICKLED):
        state = {}
        if "unet" in found:
            state.update(unet_convert.export_state(found["unet"][0], "compvis", unet_convert.SINGLE_FILE_PREFIX))
        if "vae" in found:
            state.update(vae_convert.export_state(found["vae"][0], "compvis", "first_stage_model."))
        write_state_dict(state, destination, metadata={"format": "pt"})
        return [str(destination)]
    if "unet" in found:
        model = found["unet"][0]
        written.append(str(write_component(destination / "unet", unet_convert.diffusers_config(model),
                                           unet_convert.export_state(model, "diffusers"))))
    if "vae" in found:
        model = found["vae"][0]
        written.append(str(write_component(destination / "vae", vae_convert.diffusers_config(model, scaling_factor),
                                           vae_convert.export_state(model, "diffusers"))))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a CompVis / SD single file, a diffusers folder or a run's .ckpt")
    parser.add_argument("destination", type=Path, nargs="?", help="*.safetensors / *.ckpt (CompVis) or a folder")
    parser.add_argument("--config", action="store_true", help="print the model config the weights fit (YAML)")
    parser.add_argument("--ema", action="store_true", help="a run's EMA weights (model_ema.*) for the UNet")
    parser.add_argument("--num_heads", type=int, help="attention heads per transformer (not in the weights)")
    parser.add_argument("--num_head_channels", type=int, help="channels per attention head (not in the weights)")
    parser.add_argument("--norm_num_groups", type=int, help="the autoencoder's GroupNorm groups (default 32)")
    parser.add_argument("--scaling_factor", type=float, default=DEFAULT_SCALING_FACTOR,
                        help="written to a diffusers vae/config.json (default %(default)s)")
    opt = parser.parse_args(argv)
    if opt.destination is None and not opt.config:
        parser.error("give a destination, or --config")
    try:
        source = opt.source
        if not source.exists():
            raise ConversionError(f"{source} does not exist")
        ours = source.is_file() and source.suffix in PICKLED and _is_ours(source)
        found = _from_run(source, opt.ema) if ours else _from_pretrained(source, opt)
        if opt.config:
            sections = {"unet": ("unet_config", "ldm.modules.diffusionmodules.openaimodel.UNetModel"),
                        "vae": ("first_stage_config", "ldm.models.autoencoder.AutoencoderKL")}
            networks = {sections[c][0]: {"target": sections[c][1], "params": params}
                        for c, (_, params) in found.items()}
            sampling = {} if ours else _sampling_params(source, found)
            print(OmegaConf.to_yaml({**sampling, **networks}), end="")
        if opt.destination is not None:
            for path in _write(found, opt.destination, opt.scaling_factor):
                print(f"wrote {path}")
    except (ConversionError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _sampling_params(source: Path, found: dict[str, Any]) -> dict[str, Any]:
    """Schedule and sampler params from a folder's scheduler config, or SD's for an SD 1.x / 2.x single file."""
    if source.is_dir():
        config = scheduler_config_of(source)
        return {} if config is None else sampler_options_from_scheduler(config, str(source / "scheduler"))
    release = stable_diffusion_release(found["unet"][1]) if "unet" in found else None
    if release is None:
        return {}
    params = sampler_options_from_scheduler(STABLE_DIFFUSION_SCHEDULER, f"Stable Diffusion {release}")
    if release == "2.x":  # the weights do not say which: 768-v predicts v, 512-base eps
        del params["parameterization"]
        print("note: Stable Diffusion 2.x: set parameterization (v for the 768-v models, eps for 512-base)",
              file=sys.stderr)
    return params


def _is_ours(path: Path) -> bool:
    """Whether a pickled file holds one of our checkpoints (our UNet or autoencoder names, next to a config)."""
    state = read_state_dict(path, mmap=True)
    return (unet_convert.detect_layout(state, "model.") == "ours"
            or vae_convert.detect_layout(state, "first_stage_model.") == "ours")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
