"""A file-backed cache of a training set's latent posteriors: encode once with the frozen first stage, train on it.

Layout of a cache folder: `index.json` (what it was built from, one SHA-256 per file) and per encoding rank r of W a
`moments-r.npy` of shape (n_r * copies, 2 * C, *latent) holding the posterior's [mean, logvar] of items r, r + W, ...
(copy k of local item j in row j * copies + k), and `carry<i>-r.npy` for each carried batch entry (a mask, say) in the
same rows. A folder is built under a temporary name and renamed into place once complete, so that a killed build
leaves nothing that is used; every file is checked against its hash before use, and one that fails is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.base import ItemSeededDataset, item_seed
from ldm.util import file_sha256

LATENT_MOMENTS = "latent_moments"  # batch entry of a cached item: the posterior's [mean, logvar], (2 * C, *latent)
FORMAT = 1
AUGMENTATION_SEED = 0  # the cache does not depend on the run's seed, so that runs with other seeds reuse it


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes): the same weights give the same digest,
    whichever checkpoint file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_digest(config: Any) -> str:
    """SHA-256 of a JSON-able config (dicts compared by content, not key order)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_cache(directory: Path, key: Mapping[str, str]) -> str | None:
    """None when `directory` holds a complete cache built for `key`, else why it must be (re)built."""
    index_path = directory / "index.json"
    if not index_path.is_file():
        return "no cache yet"
    try:
        index = json.loads(index_path.read_text())
        built_for, files = index["key"], index["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"index.json is unreadable ({err})"
    if index.get("format") != FORMAT:
        return f"cache format {index.get('format')} is not {FORMAT}"
    for part, what in (("first_stage", "the first stage's weights changed"), ("data", "the data config changed")):
        if built_for.get(part) != key[part]:
            return what
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            return f"{name} is missing or truncated"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} is corrupt (its SHA-256 differs from index.json's)"
    return None


class CachedLatents(Dataset):
    """Items {LATENT_MOMENTS: (2 * C, *latent), carried entries...} of a checked cache folder, memory-mapped.

    Each read takes one of the item's `copies` augmented encodings at random, drawn from torch's global generator,
    which `ItemSeededDataset` seeds per item and position in training: resumed runs draw the same copies.
    source: the dataset it was encoded from (read again when the cache is rebuilt)."""

    def __init__(self, directory: str | Path, source: Dataset):
        directory = Path(directory)
        self.source = source
        index = json.loads((directory / "index.json").read_text())
        self.length, self.copies, self.world_size = index["length"], index["copies"], index["world_size"]
        self.carry = index["carry"]
        ranks = range(min(self.world_size, self.length))  # ranks past the item count encoded nothing

        def shards(stem: str) -> list[np.ndarray]:
            return [np.load(directory / f"{stem}-{r}.npy", mmap_mode="r") for r in ranks]

        self.moments = shards("moments")
        self.carried = [shards(f"carry{i}") for i in range(len(self.carry))]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        copy = int(torch.randint(self.copies, ())) if self.copies > 1 else 0
        shard, row = index % self.world_size, (index // self.world_size) * self.copies + copy
        item = {LATENT_MOMENTS: torch.from_numpy(np.array(self.moments[shard][row]))}
        for key, shards in zip(self.carry, self.carried):
            item[key] = torch.from_numpy(np.array(shards[shard][row]))
        return item


def _encode_share(dataset: Dataset, encode: Callable[[torch.Tensor], torch.Tensor], image_key: str,
                  carry: Sequence[str], copies: int, batch_size: int, rank: int, world_size: int,
                  folder: Path) -> None:
    """Encode items rank, rank + W, ... (every copy) into this rank's shard files of `folder`."""
    reader = ItemSeededDataset(dataset)
    keys = [(index, copy) for index in range(rank, len(dataset), world_size) for copy in range(copies)]
    moments_file, carried_files = None, []
    for start in range(0, len(keys), batch_size):
        items = [reader[(index, item_seed(AUGMENTATION_SEED, copy, 0, index))] for index, copy in keys[start:start
                                                                                                       + batch_size]]
        for key in (image_key, *carry):
            if not all(isinstance(item.get(key), (torch.Tensor, np.ndarray, int, float)) for item in items):
                raise ValueError(f"cache_latents: item entry {key!r} must be a tensor or number in every item of "
                                 f"{type(dataset).__name__} (got {type(items[0].get(key)).__name__})")
        moments = encode(torch.stack([torch.as_tensor(item[image_key]) for item in items]))
        moments = moments.detach().to("cpu", torch.float64 if moments.dtype == torch.float64 else torch.float32)
        if moments_file is None:
            moments_file = np.lib.format.open_memmap(folder / f"moments-{rank}.npy", mode="w+",
                                                     dtype=moments.numpy().dtype, shape=(len(keys),
                                                                                         *moments.shape[1:]))
            for i, key in enumerate(carry):
                first = np.asarray(torch.as_tensor(items[0][key]))
                carried_files.append(np.lib.format.open_memmap(folder / f"carry{i}-{rank}.npy", mode="w+",
                                                               dtype=first.dtype, shape=(len(keys), *first.shape)))
        moments_file[start:start + len(items)] = moments.numpy()
        for file, key in zip(carried_files, carry):
            file[start:start + len(items)] = np.stack([np.asarray(torch.as_tensor(item[key])) for item in items])
    for file in (moments_file, *carried_files):
        if file is not None:
            file.flush()


def prepare_latent_cache(directory: str | Path, dataset: Dataset, encode: Callable[[torch.Tensor], torch.Tensor],
                         key: Mapping[str, str], image_key: str, carry: Sequence[str], copies: int, batch_size: int,
                         fabric: Any) -> CachedLatents:
    """The cache of `dataset` in `directory`, built first when it is missing, stale or damaged (with a one-line notice).

    encode: images (B, C, *S) -> the posterior's moments (B, 2 * C, *latent); key: {"first_stage", "data"} digests;
    carry: item entries stored beside the moments (the conditioning); fabric: anything with `global_rank`,
    `world_size`, `barrier()` and `broadcast(obj, src)`. Every rank calls this; each encodes its share of the items,
    rank 0 checks the old cache, writes the index and renames the finished folder into place. A `CachedLatents`
    given as `dataset` stands for its source."""
    directory = Path(directory)
    dataset = dataset.source if isinstance(dataset, CachedLatents) else dataset
    if getattr(dataset, "bucket_ids", None) is not None:
        raise ValueError("cache_latents: the train dataset has aspect-ratio buckets (items of several sizes), which "
                         "the latent cache does not store; drop buckets or cache_latents")
    rank, world_size = fabric.global_rank, fabric.world_size
    reason = check_cache(directory, key) if rank == 0 else None
    reason = fabric.broadcast(reason, src=0)
    if reason is None:
        return CachedLatents(directory, dataset)
    building = directory.parent / f".{directory.name}.building"
    if rank == 0:
        print(f"latent cache {directory}: {reason}; encoding {len(dataset)} items x {copies} copies")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
    fabric.barrier()
    _encode_share(dataset, encode, image_key, carry, copies, batch_size, rank, world_size, building)
    fabric.barrier()
    if rank == 0:
        files = {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                 for path in sorted(building.glob("*.npy"))}
        index = {"format": FORMAT, "key": dict(key), "length": len(dataset), "copies": copies,
                 "world_size": world_size, "carry": list(carry), "files": files}
        with open(building / "index.json", "w") as file:
            json.dump(index, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        replaced = directory.parent / f".{directory.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        if directory.exists():
            os.rename(directory, replaced)
        os.rename(building, directory)
        shutil.rmtree(replaced, ignore_errors=True)
    fabric.barrier()
    return CachedLatents(directory, dataset)
