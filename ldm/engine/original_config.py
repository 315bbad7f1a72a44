"""Original configs of CompVis latent-diffusion / stable-diffusion (their main.py) as ours: the `lightning` section
becomes our `trainer` section, and model options whose meaning differs here are translated. A key with a faithful
meaning is translated; one that changes nothing here is dropped with a notice; any other is refused, all of a
section in one ConfigError, one line each with what to use instead. docs/original_configs.md lists them."""
from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.engine.config import PRECISIONS, CheckpointConfig, TrainerConfig, parse_devices
from ldm.util import ConfigError

# ---------------------------------------------------------------------------------------- lightning section
# Lightning 1.x trained for 1000 epochs when a config set neither max_steps nor max_epochs, as the CompVis configs do.
LIGHTNING_DEFAULT_MAX_EPOCHS = 1000
# Lightning's `precision` values -> ours (its 16 was mixed precision with float32 weights).
_LIGHTNING_PRECISION = {"16": "16-mixed", "32": "32", "64": "64", "bf16": "bf16-mixed"}
# Lightning Trainer keys that change nothing about the run here: accepted with a notice.
_HARMLESS_TRAINER = {
    "num_sanity_val_steps": "no sanity validation runs before training here (the first validation comes at "
                            "val_check_interval)",
    "weights_summary": "display only (the parameter count is printed at start-up)",
    "enable_model_summary": "display only (the parameter count is printed at start-up)",
    "progress_bar_refresh_rate": "display only",
    "enable_progress_bar": "display only",
    "log_gpu_memory": "display only",
}
# Lightning Trainer keys with no counterpart here, and what to use instead.
_REFUSED_TRAINER = {
    "resume_from_checkpoint": "use -r/--resume CHECKPOINT (or a run folder)",
    "check_val_every_n_epoch": "use val_check_interval (in optimizer steps)",
    "amp_backend": "use precision: 16-mixed or bf16-mixed",
    "amp_level": "use precision: 16-mixed or bf16-mixed",
    "auto_lr_find": "set model.base_learning_rate",
    "auto_scale_batch_size": "set data.params.batch_size",
    "max_time": "use max_steps or max_epochs",
    "min_epochs": "use max_steps or max_epochs",
    "min_steps": "use max_steps or max_epochs",
    "logger": "use trainer.logger: [tensorboard, csv]",
    "default_root_dir": "use -l/--logdir",
    "plugins": "use strategy (auto, ddp, fsdp, single_device) and precision",
    "replace_sampler_ddp": "the data module shards the data over the ranks itself",
}
_REFUSED_LIGHTNING = {"logger": "use trainer.logger: [tensorboard, csv]"}


def _fraction_or_count(value: Any, whole: int) -> tuple[Any, str | None]:
    """(our value, error): Lightning's float 1.0 is the whole epoch (`whole`), other floats a fraction of it."""
    if isinstance(value, float) and not isinstance(value, bool):
        if value == 1.0:
            return whole, None
        if value.is_integer() and value > 1:
            return int(value), None
        return None, f"{value} (a fraction of an epoch): give a number of batches (an integer) instead"
    return value, None


def _port_trainer(values: dict, where: str, notices: list[str], errors: list[str]) -> dict:
    """Lightning Trainer arguments -> our trainer keys; refused keys go to `errors`, one line each."""
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    ported: dict = {}
    for key, value in values.items():
        line = f"{where}.{key}"
        if key in _HARMLESS_TRAINER:
            notices.append(f"{line}: ignored, {_HARMLESS_TRAINER[key]}")
        elif key in _REFUSED_TRAINER:
            errors.append(f"{line}: not supported; {_REFUSED_TRAINER[key]}")
        elif key == "gpus":
            if "devices" in values:
                errors.append(f"{line}: give devices or gpus, not both (gpus is Lightning 1.x's name for devices)")
            elif value in (None, 0, "0", ""):
                ported.update(accelerator="cpu", devices=1)
            else:
                try:
                    ported.update(accelerator="cuda", devices=parse_devices(value, line))
                except ConfigError as err:
                    errors.append(str(err))
        elif key == "devices":
            try:
                ported[key] = parse_devices(value, line)
            except ConfigError as err:
                errors.append(str(err))
        elif key == "accelerator" and value in ("ddp", "ddp_spawn", "dp"):
            ported.update(strategy="ddp")  # Lightning 1.x's accelerator named the distribution strategy
            if value != "ddp":
                notices.append(f"{line}: {value} runs as ddp here")
        elif key == "precision":
            ours = _LIGHTNING_PRECISION.get(str(value), str(value))
            if ours not in PRECISIONS:
                errors.append(f"{line}: {value!r} is not a precision here; use one of {', '.join(PRECISIONS)}")
            ported[key] = ours
        elif key == "val_check_interval":
            interval, problem = _fraction_or_count(value, 0)
            if problem:
                errors.append(f"{line}: {problem} (optimizer steps between validations)")
            ported[key] = interval
        elif key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            limit, problem = _fraction_or_count(value, -1)
            if problem:
                errors.append(f"{line}: {problem}")
            ported[key] = limit
        elif key in known:
            ported[key] = value
        else:
            errors.append(f"{line}: not a trainer option here; ours are {', '.join(sorted(known))}")
    return ported


def _port_modelcheckpoint(section: dict, where: str, notices: list[str], errors: list[str]) -> dict:
    """`lightning.modelcheckpoint: {target, params}` (Lightning's ModelCheckpoint) -> our `checkpoint` keys."""
    target = section.get("target", "pytorch_lightning.callbacks.ModelCheckpoint")
    if not str(target).endswith("ModelCheckpoint"):
        errors.append(f"{where}.target: {target!r} is not a ModelCheckpoint; set trainer.checkpoint instead")
    for key in sorted(set(section) - {"target", "params"}):
        errors.append(f"{where}.{key}: not supported; options go under params")
    return _port_checkpoint_params(dict(section.get("params") or {}), f"{where}.params", notices, errors)


def _port_checkpoint_params(params: dict, where: str, notices: list[str], errors: list[str]) -> dict:
    checkpoint: dict = {}
    for key, value in params.items():
        line = f"{where}.{key}"
        if key in ("monitor", "mode"):
            checkpoint[key] = value
        elif key == "every_n_train_steps":
            checkpoint["every_n_steps"] = value
        elif key == "save_top_k":
            if value == -1:
                checkpoint["keep_last_k"] = 0
            elif value != 1:
                errors.append(f"{line}: {value} is not supported; checkpoints here are one best.ckpt (by "
                              f"checkpoint.monitor), last.ckpt and the last checkpoint.keep_last_k step files: use 1, "
                              f"or -1 to keep every step file")
        elif key == "save_last" and value:
            notices.append(f"{line}: ignored, last.ckpt is always saved")
        elif key in ("verbose", "save_weights_only"):
            notices.append(f"{line}: ignored, checkpoints here always hold the full training state"
                           if key == "save_weights_only" else f"{line}: ignored, display only")
        elif key in ("dirpath", "filename"):
            errors.append(f"{line}: not supported; checkpoints go to <run folder>/checkpoints/ as step=N.ckpt, "
                          f"last.ckpt and best.ckpt (choose the run folder with -l/--logdir and -n/--name)")
        elif key in ("every_n_epochs", "every_n_val_epochs", "period"):
            errors.append(f"{line}: not supported; use every_n_train_steps (trainer.checkpoint.every_n_steps)")
        else:
            errors.append(f"{line}: not supported; trainer.checkpoint takes "
                          f"{', '.join(f.name for f in dataclasses.fields(CheckpointConfig))}")
    return checkpoint


# Callbacks of the original main.py that our trainer does itself (the value says how), dropped with a notice.
_BUILT_IN_CALLBACKS = {
    "LearningRateMonitor": "the trainer logs lr/optimizer_N every log_every_n_steps",
    "CUDACallback": "display only",
    "SetupCallback": "the trainer makes the run folder",
}
# ImageLogger options of the original main.py and of sgm; the values say what they become.
_IMAGE_LOGGER_DEFAULTS_KEPT = {"rescale": True, "log_on_batch_idx": False}
_LOG_IMAGES_OPTIONS = {
    "ddim_steps": "model.params.log_sampler_steps",
    "ddim_eta": "model.params.sampler_eta", "unconditional_guidance_scale": "model.params.guidance_scale",
}


def _port_image_logger(params: dict, where: str, notices: list[str], errors: list[str]) -> dict:
    ported = dict(params)
    for key, default in _IMAGE_LOGGER_DEFAULTS_KEPT.items():
        if key in ported:
            value = ported.pop(key)
            if value != default:
                errors.append(f"{where}.{key}: {value!r} is not supported; images are always logged as "
                              f"{'rescaled to [0, 1]' if key == 'rescale' else 'due by optimizer step'}")
    if "enable_autocast" in ported:
        ported.pop("enable_autocast")
        notices.append(f"{where}.enable_autocast: ignored, logged images are drawn with the weights' dtype outside "
                       f"autocast (training is unaffected)")
    for key, value in dict(ported.pop("log_images_kwargs", None) or {}).items():
        if key == "N":
            ported["max_images"] = min(int(value), int(ported.get("max_images", value)))
        else:
            instead = _LOG_IMAGES_OPTIONS.get(key)
            errors.append(f"{where}.log_images_kwargs.{key}: not supported; "
                          + (f"set {instead}" if instead else "our log_images takes only max_images (use N or "
                                                               "max_images); its samples follow model.params"))
    return ported


def _port_callbacks(callbacks: dict, notices: list[str], errors: list[str]) -> tuple[dict, dict]:
    """(our callbacks, checkpoint keys) from `lightning.callbacks`."""
    ours, checkpoint = {}, {}
    for name, spec in callbacks.items():
        where = f"lightning.callbacks.{name}"
        spec = dict(spec or {})
        target = str(spec.get("target", ""))
        short = target.rsplit(".", 1)[-1]
        params = dict(spec.get("params") or {})
        if name == "metrics_over_trainsteps_checkpoint":
            # The original main.py: a ModelCheckpoint every N train steps (10000 unless set) that keeps them all.
            checkpoint.update(every_n_steps=10000, keep_last_k=0)
            params.setdefault("save_top_k", -1)
            checkpoint.update(_port_checkpoint_params(params, f"{where}.params", notices, errors))
            notices.append(f"{where}: step=N.ckpt every {checkpoint['every_n_steps']} steps, all kept "
                           f"(trainer.checkpoint.every_n_steps, keep_last_k: 0)")
        elif short in _BUILT_IN_CALLBACKS:
            notices.append(f"{where}: dropped, {_BUILT_IN_CALLBACKS[short]}")
        elif short == "ImageLogger":
            ours[name] = {"target": target, "params": _port_image_logger(params, f"{where}.params", notices, errors)}
        else:
            ours[name] = spec
    return ours, checkpoint


def port_lightning(lightning: dict) -> tuple[dict, list[str]]:
    """An original config's `lightning` section (main.py of CompVis latent-diffusion / stable-diffusion) -> (our
    `trainer` section, notices). Every key that has no faithful meaning here is refused in one ConfigError that
    lists them all, one line each with what to use instead."""
    notices: list[str] = []
    errors: list[str] = []
    trainer = _port_trainer(dict(lightning.get("trainer") or {}), "lightning.trainer", notices, errors)
    callbacks, checkpoint = _port_callbacks(dict(lightning.get("callbacks") or {}), notices, errors)
    if "modelcheckpoint" in lightning:
        checkpoint.update(_port_modelcheckpoint(dict(lightning["modelcheckpoint"] or {}),
                                                "lightning.modelcheckpoint", notices, errors))
    for key in sorted(set(lightning) - {"trainer", "callbacks", "modelcheckpoint"}):
        if key == "find_unused_parameters" and not lightning[key]:
            notices.append(f"lightning.{key}: ignored, false is DDP's default here")
        elif key in _REFUSED_LIGHTNING:
            errors.append(f"lightning.{key}: not supported; {_REFUSED_LIGHTNING[key]}")
        else:
            errors.append(f"lightning.{key}: not supported; the lightning section takes trainer, callbacks and "
                          f"modelcheckpoint")
    if errors:
        raise ConfigError(f"lightning: {len(errors)} key{'s' if len(errors) > 1 else ''} of the original config "
                          f"cannot be ported:\n  " + "\n  ".join(errors))
    if callbacks:
        trainer["callbacks"] = callbacks
    if checkpoint:
        trainer["checkpoint"] = checkpoint
    return trainer, notices


def default_run_length(trainer: dict, notices: list[str]) -> dict:
    """An original config without max_steps and max_epochs trained for Lightning's default number of epochs."""
    if trainer.get("max_steps", -1) in (-1, None) and trainer.get("max_epochs", -1) in (-1, None):
        notices.append(f"trainer: no max_steps or max_epochs, so max_epochs: {LIGHTNING_DEFAULT_MAX_EPOCHS} "
                       f"as Lightning had it (set trainer.max_steps=N to choose)")
        return {**trainer, "max_epochs": LIGHTNING_DEFAULT_MAX_EPOCHS}
    return trainer


# ------------------------------------------------------------------------------------------------ model section
ORIGINAL_ENCODERS = "ldm.modules.encoders.modules."
_ORIGINAL_TARGET_PREFIXES = (ORIGINAL_ENCODERS, "main.")


def is_original_config(config: DictConfig) -> bool:
    """A config written for the original main.py: it has a `lightning` section or names its modules (main.* or
    ldm.modules.encoders.modules.*, which only the original has). Interpolations are left unresolved."""
    def names_original(node: Any) -> bool:
        if isinstance(node, dict):
            target = node.get("target")
            if isinstance(target, str) and target.startswith(_ORIGINAL_TARGET_PREFIXES):
                return True
            return any(names_original(value) for value in node.values())
        return isinstance(node, list) and any(names_original(value) for value in node)
    return "lightning" in config or names_original(OmegaConf.to_container(config, resolve=False))


def port_original_model(model: DictConfig, original: bool) -> list[str]:
    """Translate the model section in place; returns notices. Always: the original encoders' options (their
    ClassEmbedder read labels from batch[key] when cond_stage_key was 'class_label', ours reads batch[cond_stage_key];
    FrozenCLIPEmbedder's `device` is dropped, the model moves as a whole). For an `original` config also the UNet's
    `image_size`, which the original UNet stored unused: it becomes the model's (the grid it trains and samples on)."""
    params = model.get("params", None)
    if not isinstance(params, DictConfig):
        return []
    notices = _port_original_encoder(params)
    unet = params.get("unet_config", None)
    unet_params = unet.get("params", None) if isinstance(unet, DictConfig) else None
    if original and isinstance(unet_params, DictConfig) and "image_size" in params and "image_size" in unet_params \
            and unet_params.image_size != params.image_size:
        notices.append(f"model.params.unet_config.params.image_size: {unet_params.image_size} -> {params.image_size} "
                       f"(model.params.image_size); the original UNet did not use it")
        unet_params.image_size = params.image_size
    if original and isinstance(unet_params, DictConfig) and "attention_resolutions" in unet_params:
        notices += _drop_unreached_attention(unet_params)
    return notices


def _drop_unreached_attention(unet_params: DictConfig) -> list[str]:
    """The original UNet put attention where its downsampling factor was listed and ignored factors it never
    reached; ours refuses them, so an original config's are dropped."""
    levels = len(unet_params.get("channel_mult", None) or (1, 2, 4, 8))
    reached = [2 ** level for level in range(levels)]
    listed = list(unet_params.attention_resolutions)
    unreached = [factor for factor in listed if factor not in reached]
    if not unreached:
        return []
    unet_params.attention_resolutions = [factor for factor in listed if factor in reached]
    return [f"model.params.unet_config.params.attention_resolutions: {unreached} dropped, never reached with "
            f"{levels} levels (downsampling factors {reached}); the original built no attention for them"]


def _port_original_encoder(params: DictConfig) -> list[str]:
    stage = params.get("cond_stage_config", None)
    if not isinstance(stage, DictConfig) or not str(stage.get("target", "")).startswith(ORIGINAL_ENCODERS):
        return []
    name = str(stage.target)[len(ORIGINAL_ENCODERS):]
    stage_params = stage.get("params", None) or {}
    if name == "ClassEmbedder":
        cond_key = params.get("cond_stage_key", "image")
        key = stage_params.get("key", "class")
        if cond_key != "class_label":
            raise ConfigError(f"model.params.cond_stage_key: {cond_key!r} with the original ClassEmbedder, which "
                              f"only worked with 'class_label' (it read the labels from batch[key]); set "
                              f"cond_stage_key to the batch key of the labels and drop cond_stage_config.params.key")
        params.cond_stage_key = key
        if "key" in stage_params:
            stage.params.pop("key")
        return [f"model.params.cond_stage_config.params.key: labels are read from batch[{key!r}] "
                f"(model.params.cond_stage_key: {key})"]
    if name == "FrozenCLIPEmbedder" and "device" in stage_params:
        stage.params.pop("device")
        return ["model.params.cond_stage_config.params.device: ignored, the text encoder moves with the model"]
    return []
