"""Checkpoint files: atomic writes, keep-last-k rotation, safe loading, RNG state capture.

A checkpoint is a plain dict readable without our code (CompVis tools read `state_dict` and `global_step`):
`state_dict`, `optimizer_states`, `lr_schedulers`, `global_step`, `epoch`, `batch_in_epoch`, `rng`, `seed`, `config`.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

LAST = "last.ckpt"
_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write `obj` to a temporary file in the same folder, fsync it, then rename over `path`.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with `weights_only=True` (no code runs from the file); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand \S+", str(err))
        raise CheckpointError(
            f"checkpoint {path} cannot be read (UnpicklingError: {refused.group(0) if refused else err}): it holds "
            f"Python objects beyond tensors and plain containers, which could run code when unpickled, so it is "
            f"refused (weights_only loading)") from None
    except Exception as err:
        hint = "" if zipfile.is_zipfile(path) else ": truncated or corrupt (no zip directory at its end)"
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}){hint}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict' entry: not a checkpoint of this repo")
    return checkpoint


def _listed(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_mismatch(model: torch.nn.Module, state_dict: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) of `state_dict` against `model`'s own state dict, all sorted."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{key} {tuple(state_dict[key].shape)} (model: {tuple(own[key].shape)})" for key in own
                    if key in state_dict and hasattr(state_dict[key], "shape")
                    and tuple(state_dict[key].shape) != tuple(own[key].shape))
    return missing, unexpected, shapes


def describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = [f"{len(keys)} {what}: {_listed(keys)}" for what, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    return "; ".join(parts)


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str | Path) -> None:
    """Load `state_dict` into `model` strictly; keys or shapes that do not fit raise CheckpointError naming `source`
    and listing the missing keys, unexpected keys and shape mismatches. The model is left untouched then."""
    missing, unexpected, shapes = state_mismatch(model, state_dict)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not fit {type(model).__name__} (another architecture or config?): "
                              f"{describe_mismatch(missing, unexpected, shapes)}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {err}") from err


def step_checkpoints(directory: str | Path) -> list[Path]:
    """`step=N.ckpt` files in `directory`, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step=*.ckpt") if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_link(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` in one rename (a copy where hard links are not supported)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed writer left behind (ours never outlive the call that made them)."""
    for stale in directory.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def save_rotating(state: dict, directory: str | Path, step: int, keep_last_k: int) -> Path:
    """Save `step=<step>.ckpt` and point `last.ckpt` at it (both atomic, the state serialised once), then delete
    step files beyond the newest `keep_last_k`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    step_path = directory / f"step={step}.ckpt"
    atomic_torch_save(state, step_path)
    atomic_link(step_path, directory / LAST)
    if keep_last_k > 0:
        for old in step_checkpoints(directory)[:-keep_last_k]:
            old.unlink()
    return step_path


def capture_rng_state() -> dict:
    """RNG states of python, numpy, torch (CPU and CUDA) in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
