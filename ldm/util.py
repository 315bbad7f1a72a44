"""Build objects from `target:` + `params:` configs, with errors that name the config path."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

# Strings accepted in place of a `cond_stage_config` mapping (CompVis latent-diffusion vocabulary).
CONFIG_SENTINELS = ("__is_first_stage__", "__is_unconditional__")

# Targets of the original repo's main.py, so that its configs port unchanged.
TARGET_ALIASES = {
    "main.DataModuleFromConfig": "ldm.data.base.DataModuleFromConfig",
    "main.ImageLogger": "ldm.engine.callbacks.ImageLogger",
    "ldm.data.base.SimpleDataset": "ldm.data.simple.SimpleDataset",  # kept apart: importing MONAI is slow
    "ldm.lr_scheduler.LambdaLinearScheduler": "ldm.models.diffusion.lr_schedules.LambdaLinearScheduler",
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2": "ldm.models.diffusion.lr_schedules.LambdaWarmUpCosineScheduler2",
    "sgm.modules.GeneralConditioner": "ldm.modules.conditioner.GeneralConditioner",
}

_EDM = "ldm.models.diffusion.edm"
# Modules of Stability's generative-models (sgm), each standing for the modules of ours that define its class names, so
# that sgm configs port unchanged. A module that provides more sgm names (text embedders, say) appends itself here.
MODULE_ALIASES: dict[str, list[str]] = {
    "sgm.models.diffusion": ["ldm.models.diffusion.engine"],
    "sgm.models.autoencoder": ["ldm.models.autoencoder", "ldm.models.diffusion.engine"],
    "sgm.lr_scheduler": ["ldm.models.diffusion.lr_schedules"],
    "sgm.modules.diffusionmodules.openaimodel": ["ldm.modules.diffusionmodules.openaimodel"],
    "sgm.modules.diffusionmodules.denoiser": [f"{_EDM}.denoiser"],
    "sgm.modules.diffusionmodules.denoiser_scaling": [f"{_EDM}.scalings"],
    "sgm.modules.diffusionmodules.discretizer": [f"{_EDM}.discretization"],
    "sgm.modules.diffusionmodules.sigma_sampling": [f"{_EDM}.sigma_sampling"],
    "sgm.modules.diffusionmodules.denoiser_weighting": [f"{_EDM}.loss_weighting"],
    "sgm.modules.diffusionmodules.loss_weighting": [f"{_EDM}.loss_weighting"],
    "sgm.modules.diffusionmodules.loss": [f"{_EDM}.loss"],
    "sgm.modules.diffusionmodules.sampling": [f"{_EDM}.samplers"],
    "sgm.modules.diffusionmodules.guiders": [f"{_EDM}.guiders"],
    "sgm.modules.encoders.modules": ["ldm.modules.conditioner", "ldm.modules.embedders"],
    # CompVis latent-diffusion's conditioning encoders (ClassEmbedder's `key`: ldm.engine.original_config)
    "ldm.modules.encoders.modules": ["ldm.modules.encoders", "ldm.modules.text_encoders"],
}

_TEXT_INSTEAD = ("use ldm.modules.encoders.modules.FrozenCLIPEmbedder (ldm.modules.text_encoders: a CLIP text "
                 "encoder, pretrained or with text_config a random one to train) with conditioning_key crossattn")
# Targets of the original repositories that have no counterpart here, and what to use instead.
REFUSED_TARGETS = {
    "ldm.modules.encoders.modules.BERTEmbedder": f"(BERT tokenizer + transformer of txt2img-1p4B) is not available "
                                                 f"here; {_TEXT_INSTEAD}",
    "ldm.modules.encoders.modules.TransformerEmbedder": f"is not available here; {_TEXT_INSTEAD}",
    "ldm.modules.encoders.modules.FrozenCLIPTextEmbedder": f"(OpenAI's clip package) is not available here; "
                                                           f"{_TEXT_INSTEAD}",
}


# Where the `target`s of a config may come from unless it is trusted: a config names code to run, and a run folder
# downloaded from elsewhere is a config. This repository's packages, the PyTorch and MONAI building blocks configs
# use, and the aliases above. `--trust-config` (LDM_TRUST_CONFIG=1) lifts the restriction for configs one trusts.
TRUSTED_PREFIXES = ("ldm.", "kernels.", "tests.", "torch.nn.", "torch.optim.", "monai.")
TRUST_VARIABLE = "LDM_TRUST_CONFIG"


def config_trusted() -> bool:
    """Whether configs may name any importable target (LDM_TRUST_CONFIG is 1, true or yes)."""
    return os.environ.get(TRUST_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def _is_trusted_module(module: str) -> bool:
    return (module + ".").startswith(TRUSTED_PREFIXES)


def _untrusted(name: str, where: str) -> ConfigError:
    allowed = ", ".join(prefix + "*" for prefix in TRUSTED_PREFIXES)
    return ConfigError(f"{where}: {name!r} is outside the modules a config may name ({allowed} and the aliases of "
                       f"ldm.util): configs run the code they name, so other targets need --trust-config (or "
                       f"{TRUST_VARIABLE}=1) for a config you trust")


def _origin(obj: Any) -> str:
    """The module that defines `obj` (a re-exported `os.system` is `posix`, not the module it was found in)."""
    return obj.__name__ if inspect.ismodule(obj) else str(getattr(obj, "__module__", None) or "")


class ConfigError(ValueError):
    """A config that cannot be built; the message starts with the config path of the culprit."""


def config_path(config: Any, key: str | None = None, default: str = "<config>") -> str:
    """Full dotted path of `config` (or of `config[key]`) inside its root OmegaConf node, e.g. `model.params.unet_config`."""
    if isinstance(config, (DictConfig, ListConfig)):
        try:
            full = config._get_full_key(key) if key is not None else config._get_full_key(None)
        except Exception:
            full = ""
        if full:
            return str(full)
    return f"{default}.{key}" if key else default


def get_obj_from_str(name: str, where: str = "target") -> Any:
    """Import `package.module.Attr` and return `Attr`; a failure names `where` and the missing piece.

    Unless configs are trusted (`config_trusted`), `name` must be an alias or lie under TRUSTED_PREFIXES, checked
    before anything is imported, and so must the module that defines `Attr`."""
    if not isinstance(name, str) or "." not in name:
        raise ConfigError(f"{where}: {name!r} is not a dotted import path like 'package.module.Class'")
    if name in REFUSED_TARGETS:
        raise ConfigError(f"{where}: {name!r} {REFUSED_TARGETS[name]}")
    module_name, attr = TARGET_ALIASES.get(name, name).rsplit(".", 1)
    checked = not config_trusted()
    if checked and module_name not in MODULE_ALIASES and not _is_trusted_module(module_name):
        raise _untrusted(name, where)
    found = (_get_aliased(name, module_name, attr, where) if module_name in MODULE_ALIASES
             else _import_attribute(name, module_name, attr, where))
    if checked and not _is_trusted_module(_origin(found)):
        raise _untrusted(name, where)
    return found


def _import_attribute(name: str, module_name: str, attr: str, where: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{where}: cannot import {name!r} (no module {err.name})") from err
    if not hasattr(module, attr):
        raise ConfigError(f"{where}: cannot import {name!r} (module {module_name} has no attribute {attr!r})")
    return getattr(module, attr)


def _get_aliased(name: str, module_name: str, attr: str, where: str) -> Any:
    """`attr` from the first of our modules standing for the sgm module `module_name` that defines it."""
    for candidate in MODULE_ALIASES[module_name]:
        module = importlib.import_module(candidate)
        if hasattr(module, attr):
            return getattr(module, attr)
    raise ConfigError(f"{where}: cannot import {name!r} (no {attr!r} in {', '.join(MODULE_ALIASES[module_name])}, "
                      f"which stand for {module_name})")


def _plain(value: Any) -> Any:
    """Nested configs that build objects stay OmegaConf nodes (they keep their path); other values become plain."""
    if isinstance(value, DictConfig):
        return value if _builds_objects(value) else OmegaConf.to_container(value, resolve=True)
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _builds_objects(node: DictConfig) -> bool:
    if "target" in node:
        return True
    return any(isinstance(v, DictConfig) and _builds_objects(v) for v in node.values())


def check_arguments(cls: Any, params: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError naming the argument and the class when `params` do not fit `cls`'s constructor."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    accepted = [n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not accepts_any:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{where}: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"for {cls.__qualname__} (accepted: {', '.join(accepted)})"
            )
    missing = [
        n for n, p in signature.parameters.items()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in params
    ]
    if missing:
        raise ConfigError(f"{where}: missing required argument{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(map(repr, missing))} for {cls.__qualname__}")


def instantiate_from_config(config: Any, **extra_params: Any) -> Any:
    """Build `config.target(**config.params, **extra_params)`.

    `config` is a mapping with `target` (dotted import path) and optional `params`. The sentinel strings in
    `CONFIG_SENTINELS` return None. Errors are `ConfigError`s whose message starts with the config path.
    """
    if isinstance(config, str) and config in CONFIG_SENTINELS:
        return None
    where = config_path(config)
    if not isinstance(config, (Mapping, DictConfig)):
        raise ConfigError(f"{where}: expected a mapping with 'target' and 'params', got {type(config).__name__}")
    if "target" not in config:
        raise ConfigError(f"{where}: missing 'target' (keys given: {', '.join(map(str, config.keys())) or 'none'})")
    unknown_keys = sorted(set(map(str, config.keys())) - {"target", "params"})
    if unknown_keys:
        raise ConfigError(f"{where}: unknown keys {', '.join(map(repr, unknown_keys))} next to 'target' "
                          f"(parameters go under 'params')")
    cls = get_obj_from_str(config["target"], where=config_path(config, "target", f"{where}.target")
                           if isinstance(config, DictConfig) else f"{where}.target")
    raw_params = config.get("params", None) or {}
    if not isinstance(raw_params, (Mapping, DictConfig)):
        raise ConfigError(f"{where}.params: expected a mapping, got {type(raw_params).__name__}")
    params = {str(k): _plain(raw_params[k]) for k in raw_params}
    params.update(extra_params)
    params_where = config_path(config, "params", f"{where}.params") if isinstance(config, DictConfig) else f"{where}.params"
    check_arguments(cls, params, params_where)
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as err:  # the constructor refused a value (or found no file
        raise ConfigError(f"{params_where}: {cls.__qualname__}: {err}") from err  # at a path): name the config


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
