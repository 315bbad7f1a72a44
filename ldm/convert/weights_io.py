"""Reading and writing flat weight files: `.safetensors` (no pickle), `.ckpt` / `.pt` / `.pth` / `.bin` (torch's
pickle format, read with `weights_only=True`, so a file that would run code is refused)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from ldm.engine.checkpoint import CheckpointError, atomic_write, load_checkpoint

SAFETENSORS = ".safetensors"
PICKLED = (".ckpt", ".pt", ".pth", ".bin")


class ConversionError(ValueError):
    """A weight file or folder that cannot be converted: the message names the file and the keys at fault."""


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, by name. A `.ckpt` with a `state_dict` entry (CompVis, Lightning, ours) gives
    that entry; a file of tensors alone (diffusers' `.bin`) gives itself. `mmap`: tensors of a zip-format pickle
    are read from disk only when used (to look at key names cheaply)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weight file {path} does not exist")
    if path.suffix == SAFETENSORS:
        return _read_safetensors(path)
    if path.suffix not in PICKLED:
        raise ConversionError(f"weight file {path}: unknown extension {path.suffix!r} "
                              f"(expected {SAFETENSORS} or one of {', '.join(PICKLED)})")
    try:
        checkpoint = load_checkpoint(path, mmap=mmap and zipfile.is_zipfile(path))
    except CheckpointError as err:
        if "has no 'state_dict' entry" not in str(err):
            raise ConversionError(str(err)) from None
        checkpoint = {"state_dict": torch.load(path, map_location="cpu", weights_only=True)}
    state = checkpoint["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"weight file {path}: its state_dict is not a mapping of names to tensors")
    return dict(state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        size = path.stat().st_size
        raise ConversionError(f"weight file {path} cannot be read as safetensors ({size} bytes; truncated or "
                              f"corrupt?): {err}") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` file's header ({} when it has none)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return dict(header.get("__metadata__") or {})


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `state` atomically: `.safetensors` (with string `metadata`), or a `.ckpt` / `.pt` / `.pth` holding
    {"state_dict": state} as CompVis tools read it, or a `.bin` of the tensors alone (diffusers')."""
    path = Path(path)
    tensors = {name: _own_storage(tensor.detach().cpu().contiguous()) for name, tensor in state.items()}
    if path.suffix == SAFETENSORS:
        from safetensors.torch import save
        blob = save(tensors, metadata=dict(metadata or {}))
        atomic_write(path, lambda handle: handle.write(blob))
    elif path.suffix in PICKLED:
        payload = tensors if path.suffix == ".bin" else {"state_dict": tensors}
        atomic_write(path, lambda handle: torch.save(payload, handle))
    else:
        raise ConversionError(f"cannot write {path}: unknown extension {path.suffix!r} "
                              f"(expected {SAFETENSORS} or one of {', '.join(PICKLED)})")


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when it views a larger storage (a slice of a fused q/k/v weight): safetensors refuses tensors
    that share memory, and torch.save would write the whole storage."""
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
