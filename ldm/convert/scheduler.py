"""diffusers' scheduler config (`<pipeline>/scheduler/scheduler_config.json`) as the model params of ours that sample
the same way: the noise schedule, the parameterization, the sampler and its conventions.

    DDIMScheduler -> ddim, PNDMScheduler (skip_prk_steps: true, i.e. PLMS) -> plms, DDPMScheduler -> ddpm

Name mapping: diffusers' `scaled_linear` is our (CompVis) `linear`, their `linear` our `sqrt_linear`,
`squaredcos_cap_v2` our `cosine`; epsilon / sample / v_prediction are eps / x0 / v. `timestep_spacing`,
`steps_offset`, `set_alpha_to_one`, `clip_sample` and `clip_sample_range` keep their names (see
`ldm.models.diffusion.sampling`). A key that the class does not take is ignored, as diffusers ignores it (Stable
Diffusion 2.x's DDIM config carries PNDM's `skip_prk_steps`); a value of a key it takes that we cannot honour is an
error naming it, as is any other scheduler class.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ldm.convert.weights_io import ConversionError

SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "PNDMScheduler": "plms", "DDPMScheduler": "ddpm"}
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
SPACINGS = ("leading", "linspace", "trailing")

_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0}
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
# Each class's constructor arguments with their defaults: what a config that leaves a key out means.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_COMMON, **_THRESHOLDING, "clip_sample": True, "clip_sample_range": 1.0,
                      "set_alpha_to_one": True, "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False},
    "DDPMScheduler": {**_COMMON, **_THRESHOLDING, "clip_sample": True, "clip_sample_range": 1.0,
                      "variance_type": "fixed_small", "rescale_betas_zero_snr": False},
}
# Values we cannot honour, by key: (whether the value is supported, what is).
_SUPPORTED = {
    "trained_betas": (lambda v: v is None, "null (the betas come from beta_schedule)"),
    "thresholding": (lambda v: not v, "false (dynamic thresholding is not implemented)"),
    "skip_prk_steps": (lambda v: bool(v), "true (PLMS; PNDM's Runge-Kutta warm-up steps are not implemented)"),
    "variance_type": (lambda v: v == "fixed_small", "fixed_small (the posterior variance)"),
    "beta_schedule": (lambda v: v in BETA_SCHEDULES, f"one of {', '.join(BETA_SCHEDULES)}"),
    "prediction_type": (lambda v: v in PREDICTION_TYPES, f"one of {', '.join(PREDICTION_TYPES)}"),
    "timestep_spacing": (lambda v: v in SPACINGS, f"one of {', '.join(SPACINGS)}"),
}


def sampler_options_from_scheduler(config: Mapping[str, Any], source: str = "scheduler config") -> dict[str, Any]:
    """Model params (`DDPM` / `LatentDiffusion` keys) that sample as diffusers' scheduler `config` does: timesteps,
    beta_schedule (with linear_start / linear_end), parameterization, rescale_betas_zero_snr, sampler,
    timestep_spacing, and the conventions the sampler has (steps_offset for leading spacing, set_alpha_to_one,
    clip_sample / clip_sample_range)."""
    name = config.get("_class_name")
    if name not in SCHEDULER_SAMPLERS:
        raise ConversionError(f"{source}: scheduler class {name!r} has no sampler here (supported: "
                              f"{', '.join(f'{k} ({v})' for k, v in SCHEDULER_SAMPLERS.items())})")
    defaults = _DEFAULTS[name]
    settings = {key: config.get(key, default) for key, default in defaults.items()}
    wrong = [f"{key}={json.dumps(settings[key])} (supported: {what})" for key, (ok, what) in _SUPPORTED.items()
             if key in settings and not ok(settings[key])]
    if wrong:
        raise ConversionError(f"{source}: {name} {'; '.join(wrong)}")
    sampler = SCHEDULER_SAMPLERS[name]
    params: dict[str, Any] = {"timesteps": int(settings["num_train_timesteps"]),
                              "beta_schedule": BETA_SCHEDULES[settings["beta_schedule"]]}
    if params["beta_schedule"] != "cosine":
        params.update(linear_start=float(settings["beta_start"]), linear_end=float(settings["beta_end"]))
    params.update(parameterization=PREDICTION_TYPES[settings["prediction_type"]],
                  rescale_betas_zero_snr=bool(settings.get("rescale_betas_zero_snr", False)), sampler=sampler,
                  timestep_spacing=settings["timestep_spacing"])
    if settings["timestep_spacing"] == "leading":
        params["steps_offset"] = int(settings["steps_offset"])  # diffusers reads it for leading spacing only
    if "set_alpha_to_one" in settings:
        params["set_alpha_to_one"] = bool(settings["set_alpha_to_one"])
    if "clip_sample" in settings:
        params["clip_sample"] = bool(settings["clip_sample"])
        if params["clip_sample"]:
            params["clip_sample_range"] = float(settings["clip_sample_range"])
    return params


def scheduler_config_of(folder: str | Path) -> dict[str, Any] | None:
    """A diffusers pipeline folder's `scheduler/scheduler_config.json`, or None when it has none."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


# Stable Diffusion 1.x / 2.x's scheduler (both releases' DDIM settings; the 1.x pipelines ship them on PNDM).
STABLE_DIFFUSION_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                              "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                              "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading"}
_SD_CONTEXT_DIMS = {768: "1.x", 1024: "2.x"}  # the text encoder's width: CLIP ViT-L, OpenCLIP ViT-H


def stable_diffusion_release(unet_params: Mapping[str, Any]) -> str | None:
    """"1.x" or "2.x" for the UNet params of a Stable Diffusion 1.x / 2.x network (320 channels, cross-attention
    to a 768 / 1024 wide text encoder, no vector conditioning as SDXL has), else None."""
    if unet_params.get("model_channels") != 320 or unet_params.get("num_classes") is not None:
        return None
    return _SD_CONTEXT_DIMS.get(unet_params.get("context_dim"))
