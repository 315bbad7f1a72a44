"""Model weights to and from `.safetensors`, a format that holds tensors only (no pickle, so no code can run when
a downloaded file is read).

    python -m ldm.engine.export logs/<run>/checkpoints/last.ckpt model.safetensors [--ema] [--overwrite]

A checkpoint's `state_dict` is written as it is, or with `--ema` with the averaged weights of a `LitEma` in place of
the network's own: `DDPM`/`LatentDiffusion` keep the network under `model.` and its averages under `model_ema.`
(the parameter name without dots), so `model.<name>` takes the value of `model_ema.<name without dots>` and the
`model_ema.` entries are left out. Such a file loads into the same model built with `use_ema: false` (or with
`strict=False`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from ldm.engine.checkpoint import (CheckpointError, load_checkpoint, load_selected_state, state_mismatch)

MODEL_PREFIX = "model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("decay", "num_updates")  # LitEma buffers that are not averaged weights
SUFFIX = ".safetensors"


def ema_weights(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """`state_dict` with each `model.<name>` replaced by its average `model_ema.<name without dots>` and the
    `model_ema.` entries dropped. Raises CheckpointError when there are no averages or they do not match."""
    shadows = {key[len(EMA_PREFIX):]: value for key, value in state_dict.items() if key.startswith(EMA_PREFIX)}
    averaged = {name: value for name, value in shadows.items() if name not in EMA_BOOKKEEPING}
    if not averaged:
        raise CheckpointError(f"{source} has no EMA weights ({EMA_PREFIX}* entries): was it trained with "
                              f"use_ema: false? Export it without --ema")
    weights, used = {}, set()
    for key, value in state_dict.items():
        if key.startswith(EMA_PREFIX):
            continue
        shadow = key[len(MODEL_PREFIX):].replace(".", "") if key.startswith(MODEL_PREFIX) else None
        if shadow in averaged:
            if averaged[shadow].shape != value.shape:
                raise CheckpointError(f"{source}: {EMA_PREFIX}{shadow} has shape {tuple(averaged[shadow].shape)}, "
                                      f"{key} has {tuple(value.shape)}")
            weights[key] = averaged[shadow]
            used.add(shadow)
        else:
            weights[key] = value
    unused = sorted(set(averaged) - used)
    if unused:
        raise CheckpointError(f"{source}: EMA entries without a matching {MODEL_PREFIX}* weight: "
                              f"{', '.join(EMA_PREFIX + name for name in unused[:10])}")
    return weights


def _tensors_only(state_dict: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """Contiguous copies that share no memory (safetensors stores each tensor once, by itself)."""
    others = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if others:
        raise CheckpointError(f"{source}: state_dict entries that are not tensors cannot go to safetensors: "
                              f"{', '.join(others[:10])}")
    return {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_safetensors(ckpt_path: str | Path, out_path: str | Path, ema: bool = False,
                       overwrite: bool = False) -> dict[str, torch.Tensor]:
    """Write the `state_dict` of checkpoint `ckpt_path` (its EMA weights with `ema`) to `out_path` (*.safetensors),
    atomically; an existing `out_path` is an error unless `overwrite`. Returns the tensors written."""
    out_path = Path(out_path)
    if out_path.suffix != SUFFIX:
        raise CheckpointError(f"output {out_path}: the name must end in {SUFFIX}")
    if out_path.exists() and not overwrite:
        raise CheckpointError(f"output {out_path} exists; pass --overwrite (overwrite=True) to replace it")
    if not out_path.parent.is_dir():
        raise CheckpointError(f"output {out_path}: folder {out_path.parent} does not exist")
    checkpoint = load_checkpoint(ckpt_path)
    source = str(ckpt_path)
    state = ema_weights(checkpoint["state_dict"], source) if ema else checkpoint["state_dict"]
    tensors = _tensors_only(state, source)
    metadata = {"format": "pt", "source": Path(ckpt_path).name, "weights": "ema" if ema else "raw",
                "global_step": str(checkpoint.get("global_step", "unknown"))}
    _atomic_write_bytes(safetensors_save(tensors, metadata=metadata), out_path)
    return tensors


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, on CPU; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"safetensors file {path} cannot be read ({type(err).__name__}: {err})") from err


def load_safetensors(model: torch.nn.Module, path: str | Path, strict: bool = True,
                     ignore_keys: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Load a `.safetensors` file into `model` as a model's `ckpt_path` is loaded (`load_selected_state`: keys
    starting with `ignore_keys` skipped on both sides, strict by default, shape mismatches and a file of which
    nothing matches refused either way); returns (missing, unexpected) keys."""
    state = read_safetensors(path)
    try:
        return load_selected_state(model, state, path, ignore_keys=ignore_keys, strict=strict)
    except CheckpointError as err:
        missing = state_mismatch(model, state)[0]
        if strict and missing and all(key.startswith(EMA_PREFIX) for key in missing):
            raise CheckpointError(f"{err} (an --ema export has no {EMA_PREFIX}* entries: build the model with "
                                  f"use_ema: false, or load with strict=False)") from None
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.engine.export",
                                     description="Export a checkpoint's model weights to a .safetensors file.")
    parser.add_argument("checkpoint", help="a checkpoint of this repo, e.g. logs/<run>/checkpoints/last.ckpt")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (model_ema.*) as the model's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        tensors = export_safetensors(args.checkpoint, args.output, ema=args.ema, overwrite=args.overwrite)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {args.output}: {len(tensors)} tensors, {size / 2 ** 20:.1f} MiB, "
          f"{'EMA' if args.ema else 'raw'} weights of {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
