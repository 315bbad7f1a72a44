"""Sharded checkpoints of FSDP runs (`trainer.strategy: {name: fsdp, state_dict_type: sharded}`).

Every rank writes its own shards of the weights and optimizer states (no rank gathers the whole model), into a
folder beside the usual checkpoint file, which then holds everything else and the folder's name:

    checkpoints/step=120.ckpt       # global_step, epoch, rng, best, config, ..., "shards": "step=120.shards"
    checkpoints/step=120.shards/    # torch.distributed.checkpoint files: "model" and "optimizer_<i>" entries
    checkpoints/last.ckpt           # the same file as step=120.ckpt, as for full checkpoints

So rotation, `last.ckpt`, `best.ckpt` and `-r` work as with full checkpoints. `ldm.engine.checkpoint.load_checkpoint`
reads such a file consolidated (every tensor whole, on CPU), so a run resumes on any number of processes, and
`python -m ldm.engine.export` writes its weights as one .safetensors file. One full .ckpt file, as an unsharded run
saves it:

    python -m ldm.engine.sharded logs/<run>/checkpoints/last.ckpt consolidated.ckpt
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

SHARDS_KEY = "shards"  # the checkpoint file's entry naming its shard folder (a sibling of the file)
SUFFIX = ".shards"


def shard_folder_name(step: int) -> str:
    return f"step={step}{SUFFIX}"


def save_shards(fabric, folder: Path, module, optimizers: list) -> None:
    """Every rank writes its shards of `module` (Fabric-wrapped FSDP) and `optimizers` into `folder`; every rank
    calls this."""
    fabric.save(folder, {"model": module, **{f"optimizer_{i}": opt for i, opt in enumerate(optimizers)}})


def referenced_folders(directory: Path) -> set[str]:
    """Shard folders named by the checkpoint files in `directory` (unreadable files name none)."""
    from ldm.engine.checkpoint import CheckpointError, saved_entry

    names = set()
    for path in directory.glob("*.ckpt"):
        if path.is_file():
            try:
                name = saved_entry(path, SHARDS_KEY)
            except CheckpointError:
                continue
            if isinstance(name, str):
                names.add(name)
    return names


def remove_unreferenced(directory: Path) -> list[Path]:
    """Delete shard folders in `directory` that no checkpoint file names (their files were rotated away)."""
    wanted = referenced_folders(directory)
    removed = [folder for folder in directory.glob(f"*{SUFFIX}") if folder.is_dir() and folder.name not in wanted]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def consolidated(checkpoint: dict, path: Path) -> dict:
    """The checkpoint read from file `path` with its shards put back: `state_dict` and `optimizer_states` whole (CPU
    tensors, as a full-state FSDP checkpoint holds them: optimizer states keyed by parameter name)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from ldm.engine.checkpoint import CheckpointError

    folder = Path(path).parent / checkpoint[SHARDS_KEY]
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {path}: its shard folder {folder} does not exist")
    shards: dict[str, Any] = {}
    try:
        _load_state_dict(shards, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: shards in {folder} cannot be read ({type(err).__name__}: "
                              f"{err})") from err
    if "model" not in shards:
        raise CheckpointError(f"checkpoint {path}: {folder} holds no 'model' entry")
    optimizers = sorted((key for key in shards if key.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    whole = {key: value for key, value in checkpoint.items() if key != SHARDS_KEY}
    return whole | {"state_dict": shards["model"], "optimizer_states": [shards[key] for key in optimizers]}


def main(argv: list[str] | None = None) -> int:
    from ldm.engine.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint

    parser = argparse.ArgumentParser(description="Write a sharded checkpoint as one full .ckpt file.")
    parser.add_argument("checkpoint", help="a checkpoint file of a sharded run (its .shards folder beside it)")
    parser.add_argument("output", help="the .ckpt file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        print(f"error: {output} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    atomic_torch_save(checkpoint, output)
    parameters = sum(t.numel() for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor))
    print(f"wrote {output}: {parameters / 1e6:.2f}M weights at step {checkpoint.get('global_step')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
