"""Checkpoint files: atomic writes, keep-last-k rotation, safe loading, RNG state capture.

A checkpoint is a plain dict readable without our code (CompVis tools read `state_dict` and `global_step`):
`state_dict`, `optimizer_states`, `lr_schedulers`, `global_step`, `epoch`, `batch_in_epoch`, `rng`, `seed`, `config`,
`best` (the monitored key's best value and step, ldm/engine/monitor.py).

In `checkpoints/`: `step=N.ckpt` (the newest `keep_last_k` kept), `last.ckpt` (the newest step file) and `best.ckpt`
(the state at the best validation of the monitored key; rotation never deletes it). A model may write files of its own
beside each (`save_beside_checkpoint`, e.g. `lora-step=N.safetensors`); rotation leaves those.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np
import torch

LAST = "last.ckpt"
BEST = "best.ckpt"
_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, read-only folder); the message names the file and the OS
    error. The file it was to replace is left as it was."""


class _WriteRecorder:
    """A file handle that keeps the first OSError of its writes: torch's zip writer replaces it by a RuntimeError
    about stream positions, which names neither the file nor the cause."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def _temporary(path: Path, kind: str) -> Path:
    """This process's temporary file for `path`: `kind` "tmp" for writes, "link" for links (distinct, so that a
    write and a link to the same target never share one)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(handle)` on a temporary file in the same folder, fsync it, then rename it over `path`.

    A kill at any moment leaves either the old file or the new one, never a torn one. An OS error (disk full,
    read-only folder) raises CheckpointWriteError naming `path` and the error, the old file left as it was.
    """
    path = Path(path)
    tmp = _temporary(path, "tmp")
    try:
        with open(tmp, "wb") as handle:
            recorder = _WriteRecorder(handle)
            try:
                write(recorder)
            except Exception as err:
                if recorder.error is None:
                    raise
                raise CheckpointWriteError(f"cannot write {path}: {recorder.error}") from err
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except CheckpointWriteError:
        raise
    except OSError as err:
        raise CheckpointWriteError(f"cannot write {path}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj)` to `path` through `atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def saved_entry(path: str | Path, key: str) -> Any:
    """`checkpoint[key]` (None if absent) without reading the tensors: the file is memory-mapped, weights_only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    return checkpoint.get(key) if isinstance(checkpoint, dict) else None


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load a checkpoint with `weights_only=True` (no code runs from the file); errors name the file. `mmap`: tensors
    stay on disk until used (zip-format files only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL \S+|Unsupported operand \S+", str(err))
        raise CheckpointError(
            f"checkpoint {path} cannot be read (UnpicklingError: {refused.group(0) if refused else err}): it holds "
            f"Python objects beyond tensors and plain containers, which could run code when unpickled, so it is "
            f"refused (weights_only loading)") from None
    except Exception as err:
        hint = "" if zipfile.is_zipfile(path) else ": truncated or corrupt (no zip directory at its end)"
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}){hint}") from err
    if isinstance(checkpoint, dict) and "shards" in checkpoint:  # an FSDP run's: its weights in a folder beside it
        from ldm.engine.sharded import consolidated
        checkpoint = consolidated(checkpoint, path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict' entry: not a checkpoint of this repo")
    return checkpoint


def _listed(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _by_prefix(keys: list[str]) -> str:
    """Counts per first dotted component, e.g. `loss.* 17, scale_factor 1`: what an `ignore_keys` entry would cover."""
    counts: dict[str, int] = {}
    for key in keys:
        head = key.split(".", 1)[0] + (".*" if "." in key else "")
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{head} {count}" for head, count in counts.items())


def key_summary(keys: list[str], what: str, limit: int = 5) -> str:
    """`"<n> <what> (<counts per prefix>): <first names>"`, e.g. `17 unexpected keys (loss.* 17): loss.logvar, ...`."""
    return f"{len(keys)} {what} ({_by_prefix(keys)}): {_listed(keys, limit)}"


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
    return "; ".join(parts) + qkv_bias_hint(missing, unexpected)


_QKV_BIAS = re.compile(r"\.?attn\.?to_[qkv]\.?bias$")  # LitEma's copies drop the dots


def qkv_bias_hint(missing: list[str], unexpected: list[str]) -> str:
    """A hint when the only difference is the q/k/v biases of the UNet's plain attention blocks (a checkpoint from
    before `attention_qkv_bias` existed, or one written with the other setting); else ""."""
    for keys, others, value in ((missing, unexpected, "false"), (unexpected, missing, "true")):
        if keys and not others and all(_QKV_BIAS.search(key) for key in keys):
            return (f" (only the UNet attention blocks' q/k/v biases differ: set attention_qkv_bias: {value} in the "
                    f"UNet's params, unet_config or network_config)")
    return ""


def ignored(key: str, ignore_keys: Sequence[str]) -> bool:
    """Whether `key` starts with one of the `ignore_keys` prefixes (CompVis `ignore_keys` semantics)."""
    return any(key.startswith(prefix) for prefix in ignore_keys)


def covering_prefixes(keys: list[str], loaded: list[str]) -> list[str]:
    """The fewest, shortest `ignore_keys` entries that skip all of `keys` and none of `loaded`: for each key its
    shortest dotted prefix (ending in '.') that no loaded key shares, else the key itself; sorted."""
    loaded_prefixes = {".".join(parts[:depth]) + "." for key in loaded for parts in [key.split(".")]
                       for depth in range(1, len(parts))}
    chosen = set()
    for key in keys:
        parts = key.split(".")
        chosen.add(next((prefix for depth in range(1, len(parts))
                         if (prefix := ".".join(parts[:depth]) + ".") not in loaded_prefixes), key))
    return sorted(p for p in chosen if not any(q != p and p.startswith(q) for q in chosen))


def load_selected_state(model: torch.nn.Module, state_dict: Mapping[str, Any], source: str | Path,
                        ignore_keys: Sequence[str] = (), strict: bool = True) -> tuple[list[str], list[str]]:
    """Load initial weights into `model` the way a model's `ckpt_path` does; returns (missing, unexpected) keys.

    Keys starting with any of `ignore_keys` are skipped on both sides: such checkpoint entries are not loaded and
    such model entries keep their initial values. The rest must fit exactly when `strict`: otherwise
    CheckpointError names `source` and the model and lists missing keys, unexpected keys and shape mismatches (a
    few names each, counts per top-level prefix, the `ignore_keys` that would cover them), and the model is left
    untouched. With `strict=False` the matching tensors are loaded and the rest is returned. Shape mismatches and a
    checkpoint of which nothing matches raise either way, since neither can be what was meant.
    """
    if isinstance(ignore_keys, str):  # each character would be a prefix: "loss" would skip every key starting "l"
        raise TypeError(f"ignore_keys: expected a list of key prefixes, e.g. [{ignore_keys}], got the string "
                        f"{ignore_keys!r}")
    name = type(model).__name__
    kept = {key: value for key, value in state_dict.items() if not ignored(key, ignore_keys)}
    missing, unexpected, shapes = state_mismatch(model, kept)
    missing = [key for key in missing if not ignored(key, ignore_keys)]
    if kept and len(unexpected) == len(kept):
        raise CheckpointError(f"checkpoint {source} does not fit {name}: none of its {len(kept)} tensors "
                              f"({_by_prefix(sorted(kept))}) is a key of the model ({_by_prefix(missing)}); not "
                              f"even strict: false would load anything from it")
    if shapes:
        raise CheckpointError(f"checkpoint {source} does not fit {name}: {len(shapes)} shape mismatches: "
                              f"{_listed(shapes, 5)} (a different architecture or config? ignore_keys can leave "
                              f"them out)")
    if strict and (missing or unexpected):
        parts = [key_summary(keys, what) for what, keys in (("missing keys", missing), ("unexpected keys", unexpected))
                 if keys]
        loaded = sorted(set(kept) - set(unexpected))
        prefixes = covering_prefixes(missing + unexpected, loaded)
        raise CheckpointError(f"checkpoint {source} does not fit {name} (a different architecture or config?): "
                              f"{'; '.join(parts)}{qkv_bias_hint(missing, unexpected)}. To load only what matches, "
                              f"skip these keys with ignore_keys (here: [{_listed(prefixes, 8)}]) or set strict: "
                              f"false next to ckpt_path")
    model.load_state_dict(kept, strict=False)
    return missing, unexpected


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


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of `model`'s parameters holding NaN or Inf."""
    return [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter.detach()).all()]


def step_checkpoints(directory: str | Path) -> list[Path]:
    """`step=N.ckpt` files in `directory`, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step=*.ckpt") if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_link(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` in one rename (a copy where hard links are not supported)."""
    tmp = _temporary(target, "link")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write {target}: {err}") from err


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed writer left behind (ours never outlive the call that made them)."""
    for pattern in (".*.tmp-*", ".*.link-*"):
        for stale in directory.glob(pattern):
            stale.unlink(missing_ok=True)


def save_rotating(state: dict, directory: str | Path, step: int, keep_last_k: int, keep: Sequence[Path] = ()) -> Path:
    """Save `step=<step>.ckpt` and point `last.ckpt` at it (both atomic, the state serialised once), then delete
    step files beyond the newest `keep_last_k`, this one first among them (only `step=N.ckpt` files: `last.ckpt`,
    `best.ckpt` and the files in `keep` stay)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    step_path = directory / f"step={step}.ckpt"
    atomic_torch_save(state, step_path)
    atomic_link(step_path, directory / LAST)
    if keep_last_k > 0:  # the file just saved counts as the newest, even with higher steps left by an earlier run
        kept = {Path(path).name for path in keep} | {step_path.name}
        others = [path for path in step_checkpoints(directory) if path.name != step_path.name]
        for old in others[:max(len(others) - (keep_last_k - 1), 0)]:
            if old.name not in kept:
                old.unlink()
    return step_path


def save_best(state: dict, directory: str | Path, same_as: Path | None = None) -> Path:
    """Make `best.ckpt` hold `state` atomically: a link to `same_as` (a step file just saved from this very state,
    so it is not serialised twice) or a save of its own."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / BEST
    if same_as is not None:
        atomic_link(same_as, path)
    else:
        atomic_torch_save(state, path)
    return path


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
