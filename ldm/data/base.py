"""`DataModuleFromConfig`: builds each split's dataset from config and hands out resumable, sharded loaders."""
from __future__ import annotations

import math
import random
import sys
import types
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.data.transforms import DataFileError
from ldm.engine.signals import ignore_in_worker
from ldm.util import config_path, instantiate_from_config

SPLITS = ("train", "validation", "test")
SKIPPED_READS = "skipped_reads"  # item key with on_bad_file: skip (see ItemSeededDataset)


class ShardedResumableSampler(Sampler[int]):
    """Indices of one rank's shard, reshuffled each epoch from (seed, epoch), startable mid-epoch.

    Every rank draws the same permutation and takes every `world_size`-th index (the list is padded by wrapping so
    all ranks see as many items), so ranks see distinct items. `begin_epoch(epoch, start)` skips the first `start`
    indices of that epoch's shard: a resumed run continues where it stopped instead of replaying the epoch.
    (Not named `set_epoch`: Fabric's loader wrapper calls that with its own count of iterations.)

    With `item_seeds`, it yields `(index, item_seed(seed, epoch, rank, position))` pairs for an `ItemSeededDataset`.
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 item_seeds: bool = False):
        self.length, self.shuffle, self.seed, self.rank, self.world_size = length, shuffle, seed, rank, world_size
        self.item_seeds = item_seeds
        self.epoch = 0
        self.start = 0

    def begin_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        per_rank = math.ceil(self.length / self.world_size)
        order += order[: per_rank * self.world_size - self.length]
        return order[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = self.shard()
        if not self.item_seeds:
            return iter(order[self.start:])
        return ((order[position], item_seed(self.seed, self.epoch, self.rank, position))
                for position in range(self.start, len(order)))

    def __len__(self) -> int:
        return max(0, math.ceil(self.length / self.world_size) - self.start)


def item_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """Seed (< 2**63) for the random transforms of the item at `position` of `rank`'s shard in `epoch`.

    A function of where the item falls in training, not of what a loader worker drew before: a resumed run (which
    starts its workers afresh, mid-epoch) draws the same augmentations as an uninterrupted one, whatever
    `num_workers` is."""
    entropy = [value % 2 ** 64 for value in (seed, epoch, rank, position)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) >> 1


def find_randomizables(root: Any) -> list:
    """Objects reachable from `root` through attributes, lists, tuples and dict values that have their own
    generator behind a `set_random_state(seed=...)` method (MONAI's random transforms and their `Compose`), in a
    fixed order; the search does not go below such an object (it seeds what it holds) nor into tensors or arrays."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, type, types.ModuleType)):
            continue
        seen.add(id(obj))
        if callable(getattr(obj, "set_random_state", None)):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            stack.extend(reversed(obj))
        elif isinstance(obj, dict):
            stack.extend(reversed(list(obj.values())))
        elif hasattr(obj, "__dict__"):
            stack.extend(reversed(list(vars(obj).values())))
    return found


@contextmanager
def seeded_global_generators(seed: int) -> Iterator[None]:
    """Seed python's, numpy's and torch's CPU global generators for the block, then put their states back (CUDA
    generators are not touched: `torch.manual_seed` would reseed them too)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class ItemSeededDataset(Dataset):
    """`dataset` read with keys `(index, seed)`: the item's randomness is seeded from `seed` (see `item_seed`).

    During `dataset[index]` the global generators (python, numpy, torch CPU) and the dataset's own generators
    (`find_randomizables`, e.g. MONAI random transforms) are seeded from `seed`; the global states are restored
    afterwards, so that loading in the training process (`num_workers: 0`) leaves the training noise alone.

    A file found corrupt only when read (DataFileError) meets the dataset's `on_bad_file`: "skip" logs it and reads
    the next index instead (the same one on every run, so resumes stay exact), and items then carry
    `SKIPPED_READS`, how many reads their slot skipped (the trainer logs the total); "error" (the default) raises it
    with a pointer to the option.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.on_bad_file = getattr(dataset, "on_bad_file", None)
        self._randomizables: list | None = None  # found on first use, in each process

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if self.on_bad_file != "skip":
            try:
                return self._read(index, seed)
            except DataFileError as err:
                if self.on_bad_file is None:
                    raise
                raise DataFileError(f"{err} (on_bad_file: skip would skip it)") from None
        for skipped, substitute in enumerate(self._substitutes(index)):
            try:
                item = self._read(substitute, seed)
            except DataFileError as err:
                print(f"on_bad_file: skip: {err}", file=sys.stderr)
                continue
            return {**item, SKIPPED_READS: skipped} if isinstance(item, dict) else item
        scope = "" if getattr(self.dataset, "bucket_ids", None) is None else f" in the bucket of item {index}"
        raise DataFileError(f"on_bad_file: skip: none of the {len(self.dataset)} items of "
                            f"{type(self.dataset).__name__}{scope} could be read")

    def _substitutes(self, index: int) -> Iterator[int]:
        """`index`, then the items read in its place while reads fail: the following ones, wrapping round; with
        aspect-ratio buckets (`bucket_ids`) only those of its bucket, so that its batch keeps one size."""
        following = (i % len(self.dataset) for i in range(index, index + len(self.dataset)))
        bucket_ids = getattr(self.dataset, "bucket_ids", None)
        if bucket_ids is None:
            return following
        return (i for i in following if bucket_ids[i] == bucket_ids[index])

    def _read(self, index: int, seed: int) -> Any:
        if self._randomizables is None:
            self._randomizables = find_randomizables(self.dataset)
        with seeded_global_generators(seed):
            for offset, randomizable in enumerate(self._randomizables):
                randomizable.set_random_state(seed=(seed + offset) % 2 ** 32)
            return self.dataset[index]


def seed_worker(worker_id: int) -> None:
    """Seed python's and numpy's generators in a loader worker from torch's per-worker seed (for randomness outside
    item loading; the items themselves, MONAI transforms included, are seeded by `ItemSeededDataset`)."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def init_worker(worker_id: int) -> None:
    """A loader worker's set-up: SIGTERM and SIGUSR1 are left to the training process (`ldm.engine.signals`), then
    `seed_worker`."""
    ignore_in_worker()
    seed_worker(worker_id)


class WrappedDataset(Dataset):
    """Wraps any indexable with a length (a list of dicts, for instance) as a torch Dataset."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]

    @property
    def bucket_ids(self) -> Any:
        """The wrapped dataset's aspect-ratio buckets per item, if it has them (the loader batches by bucket)."""
        return getattr(self.data, "bucket_ids", None)

    @property
    def buckets(self) -> Any:
        return getattr(self.data, "buckets", None)


class DataModuleFromConfig:
    """The `data` section: `batch_size`, `num_workers` and a `{target, params}` config per split.

    Same keys as the original `main.DataModuleFromConfig`. `wrap` wraps each dataset in `WrappedDataset`.
    """

    def __init__(self, batch_size: int, train: Any = None, validation: Any = None, test: Any = None,
                 num_workers: int | None = None, wrap: bool = False, shuffle_val_dataloader: bool = False,
                 shuffle_test_loader: bool = False, pin_memory: bool = True):
        if batch_size < 1:
            raise ValueError(f"data.params.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = batch_size * 2 if num_workers is None else num_workers
        self.shuffle = {"train": True, "validation": shuffle_val_dataloader, "test": shuffle_test_loader}
        self.pin_memory = pin_memory
        self.configs = {"train": train, "validation": validation, "test": test}
        self.datasets: dict[str, Dataset] = {}
        for split, config in self.configs.items():
            if config is None:
                continue
            dataset = instantiate_from_config(config)
            dataset = WrappedDataset(dataset) if wrap else dataset
            if len(dataset) == 0:
                raise ValueError(f"{config_path(config, default='data.params.' + split)}: the {split} dataset "
                                 f"({type(dataset).__name__}) is empty")
            self.datasets[split] = dataset

    def describe(self) -> str:
        return "\n".join(f"  {split}: {type(ds).__name__}, {len(ds)} items" for split, ds in self.datasets.items())

    def has(self, split: str) -> bool:
        return split in self.datasets

    def peek(self) -> tuple[str, Any]:
        """(split, its item 0) for the first configured split: the item read with its transforms seeded and the
        global generators left as they were, to check the model against the data before training."""
        split = next(split for split in SPLITS if split in self.datasets)
        return split, ItemSeededDataset(self.datasets[split])[(0, 0)]

    def dataloader(self, split: str, rank: int = 0, world_size: int = 1, seed: int = 0,
                   drop_last: bool = False) -> DataLoader:
        """A loader of `split` for one rank, batches as dicts of tensors; its sampler is a `ShardedResumableSampler`,
        or for a dataset with aspect-ratio buckets (`bucket_ids`) a `ldm.data.buckets.BucketSampler`.

        Each item's random transforms are seeded from (seed, epoch, rank, position in the epoch) through
        `ItemSeededDataset`, so a resumed run sees the same augmented batches as an uninterrupted one."""
        if split not in self.datasets:
            raise KeyError(f"data: no '{split}' split configured (have: {', '.join(self.datasets) or 'none'})")
        dataset = self.datasets[split]
        if getattr(dataset, "bucket_ids", None) is not None:  # items of several sizes: a batch from one bucket each
            from ldm.data.buckets import BucketSampler  # here, not above: it imports this module's sampler
            sampler = BucketSampler(dataset.bucket_ids, self.batch_size, self.shuffle[split], seed=seed, rank=rank,
                                    world_size=world_size, item_seeds=True, drop_last=dataset.buckets.drop_last)
        else:
            sampler = ShardedResumableSampler(len(dataset), self.shuffle[split], seed=seed, rank=rank,
                                              world_size=world_size, item_seeds=True)
        return DataLoader(
            ItemSeededDataset(dataset), batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=drop_last,
            persistent_workers=self.num_workers > 0, worker_init_fn=init_worker,
            generator=torch.Generator().manual_seed(seed + 7919 * rank),
        )
