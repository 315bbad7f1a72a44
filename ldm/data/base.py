"""`DataModuleFromConfig`: builds each split's dataset from config and hands out resumable, sharded loaders."""
from __future__ import annotations

import math
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.util import config_path, instantiate_from_config

SPLITS = ("train", "validation", "test")


class ShardedResumableSampler(Sampler[int]):
    """Indices of one rank's shard, reshuffled each epoch from (seed, epoch), startable mid-epoch.

    Every rank draws the same permutation and takes every `world_size`-th index (the list is padded by wrapping so
    all ranks see as many items), so ranks see distinct items. `begin_epoch(epoch, start)` skips the first `start`
    indices of that epoch's shard: a resumed run continues where it stopped instead of replaying the epoch.
    (Not named `set_epoch`: Fabric's loader wrapper calls that with its own count of iterations.)
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.shuffle, self.seed, self.rank, self.world_size = length, shuffle, seed, rank, world_size
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

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start:])

    def __len__(self) -> int:
        return max(0, math.ceil(self.length / self.world_size) - self.start)


def seed_worker(worker_id: int) -> None:
    """Seed python, numpy and MONAI's per-transform generators in a loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    try:
        from monai.data.utils import set_rnd
    except ImportError:
        return
    if info is not None:
        set_rnd(info.dataset, seed)


class WrappedDataset(Dataset):
    """Wraps any indexable with a length (a list of dicts, for instance) as a torch Dataset."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]


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

    def dataloader(self, split: str, rank: int = 0, world_size: int = 1, seed: int = 0,
                   drop_last: bool = False) -> DataLoader:
        """A loader of `split` for one rank, batches as dicts of tensors; its sampler is a `ShardedResumableSampler`."""
        if split not in self.datasets:
            raise KeyError(f"data: no '{split}' split configured (have: {', '.join(self.datasets) or 'none'})")
        dataset = self.datasets[split]
        sampler = ShardedResumableSampler(len(dataset), self.shuffle[split], seed=seed, rank=rank, world_size=world_size)
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=drop_last,
            persistent_workers=self.num_workers > 0, worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed + 7919 * rank),
        )
