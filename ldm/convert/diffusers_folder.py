"""diffusers' model folders: `<pipeline>/<component>/config.json` beside `diffusion_pytorch_model.safetensors` (or
`model.safetensors` for transformers' text encoders, or the pickled `.bin` of older folders)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.convert.weights_io import ConversionError, read_state_dict, write_state_dict

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")


def component_folder(path: str | Path, component: str) -> Path:
    """`path/component` when `path` is a pipeline folder holding it, else `path` itself (a component's folder)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a folder")
    return path / component if (path / component / "config.json").is_file() else path


def read_component(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config.json, tensors, weight file) of a component folder; a missing file is an error naming it."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: no config.json (not a diffusers model folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_path}: not valid JSON ({err})") from None
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder}: no weight file (looked for {', '.join(WEIGHT_NAMES)}); sharded weights "
                              f"(*.index.json) are not read")
    return config, read_state_dict(weights), weights


def write_component(folder: str | Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                    weight_name: str = WEIGHT_NAMES[0]) -> Path:
    """Write config.json and the tensors (safetensors) into `folder` (created); returns the weight file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    weights = folder / weight_name
    write_state_dict(state, weights, metadata={"format": "pt"})
    return weights
