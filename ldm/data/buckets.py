"""Aspect-ratio buckets for multi-aspect training (SDXL, Podell et al. 2023, sec. 2.3), and their sampler.

`make_buckets` lists sizes (height, width) of about one pixel area, `resolution`^2: sides are multiples of `step`,
for each height h <= the square's side the width is the largest multiple of `step` with h * w <= resolution^2, and
the transposes of these; sizes whose aspect ratio leaves [1 / max_ratio, max_ratio] are left out. So no bucket holds
more pixels than the target (the memory a batch needs is bounded by it) and none falls short of it by `step` pixel
rows or more: resolution^2 - step * resolution < h * w <= resolution^2.

An image goes to the bucket whose aspect ratio is nearest in log-ratio, |log(h / w) - log(bh / bw)| (`nearest_bucket`);
the dataset then scales it so that it covers the bucket and crops it to the bucket (see `ldm.data.captions`).

`BucketSampler` hands out batches drawn from one bucket each, sharded over ranks and resumable mid-epoch like the
sampler it extends (`ldm.data.base.ShardedResumableSampler`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ldm.data.base import ShardedResumableSampler


def make_buckets(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """Bucket sizes (height, width) of area about `resolution`^2 (module docstring), widest first (h / w ascending)."""
    area = resolution * resolution
    sizes = set()
    height = step
    while height * height <= area:
        width = area // (height * step) * step
        if width <= max_ratio * height:
            sizes.update({(height, width), (width, height)})
        height += step
    return sorted(sizes, key=lambda size: (size[0] / size[1], size[0]))


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to height / width in log-ratio (the first on a tie)."""
    ratio = math.log(height / width)
    distances = [abs(ratio - math.log(bucket_height / bucket_width)) for bucket_height, bucket_width in buckets]
    return distances.index(min(distances))


@dataclass(frozen=True)
class Buckets:
    """A dataset's `buckets` option: the bucket sizes and whether a bucket's last, incomplete batch is dropped.

    resolution: the side of the square of the buckets' target area. step: sides are multiples of it. max_ratio:
    the largest aspect ratio (long side / short side) >= 1. drop_last: drop each bucket's incomplete last batch
    (false: fill it up with other items of that bucket, which are then seen twice in the epoch).
    """

    resolution: int = 1024
    step: int = 64
    max_ratio: float = 2.0
    drop_last: bool = False
    sizes: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(make_buckets(self.resolution, self.step, self.max_ratio)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Buckets:
        """Buckets from the mapping under a dataset's `buckets` key; a bad or unknown key is a ValueError naming it."""
        if not isinstance(config, Mapping):
            raise ValueError(f"buckets must be a mapping with keys resolution, step, max_ratio, drop_last, "
                             f"got {config!r}")
        known = ("resolution", "step", "max_ratio", "drop_last")
        unknown = sorted(set(map(str, config)) - set(known))
        if unknown:
            raise ValueError(f"buckets: unknown keys {', '.join(unknown)} (known: {', '.join(known)})")
        values = {**{key: getattr(cls, key) for key in known}, **config}
        for key in ("resolution", "step"):
            if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 1:
                raise ValueError(f"buckets.{key} must be a positive int, got {values[key]!r}")
        if values["step"] > values["resolution"]:
            raise ValueError(f"buckets.step ({values['step']}) must not exceed buckets.resolution "
                             f"({values['resolution']})")
        ratio = values["max_ratio"]
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 1 <= ratio < math.inf:
            raise ValueError(f"buckets.max_ratio must be a number >= 1 (long side / short side), got {ratio!r}")
        if not isinstance(values["drop_last"], bool):
            raise ValueError(f"buckets.drop_last must be true or false, got {values['drop_last']!r}")
        buckets = cls(values["resolution"], values["step"], float(ratio), values["drop_last"])
        if not buckets.sizes:
            raise ValueError(f"buckets: no size on the buckets.step grid ({buckets.step}) of area about "
                             f"{buckets.resolution}^2 is within buckets.max_ratio {buckets.max_ratio} (raise it, or "
                             f"lower step)")
        return buckets


class BucketSampler(ShardedResumableSampler):
    """Item indices of one rank in runs of `batch_size` from one bucket each: a DataLoader with that batch_size
    (and any drop_last, every run being full) makes each run one batch of equally sized items.

    Per epoch, every rank draws the same batches from (seed, epoch): each bucket's items are shuffled and cut into
    batches of `batch_size`; a bucket's incomplete last batch is dropped (`drop_last`) or filled up with the first
    items of that bucket's order; then the batches are shuffled. Rank r takes batches r, r + world_size, ... (the
    list is padded by wrapping so every rank gets as many), so ranks see disjoint batches. Without `shuffle`,
    buckets come in order with their items in index order.

    `begin_epoch(epoch, start)` and the (index, seed) pairs of `item_seeds` are the base sampler's: `start` counts
    items and must be a whole number of batches, as the training loop's batches_done * batch_size is.

    bucket_ids: per item of the dataset, the index of its bucket.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, item_seeds: bool = False, drop_last: bool = False):
        super().__init__(len(bucket_ids), shuffle, seed=seed, rank=rank, world_size=world_size, item_seeds=item_seeds)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.members: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_ids):
            self.members.setdefault(int(bucket), []).append(index)
        self.batch_count = sum(len(items) // batch_size if drop_last else math.ceil(len(items) / batch_size)
                               for items in self.members.values())
        if self.batch_count == 0:
            raise ValueError(f"buckets.drop_last: every bucket has fewer than batch_size ({batch_size}) items "
                             f"(sizes {sorted(len(items) for items in self.members.values())}), so there is no batch")

    def begin_epoch(self, epoch: int, start: int = 0) -> None:
        if start % self.batch_size:
            raise ValueError(f"BucketSampler: start {start} is not a whole number of batches of {self.batch_size}")
        super().begin_epoch(epoch, start)

    def epoch_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, in order, padded to a multiple of world_size."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch) if self.shuffle else None
        batches = []
        for bucket in sorted(self.members):
            items = self.members[bucket]
            if generator is not None:
                items = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
            if not self.drop_last:
                missing = -len(items) % self.batch_size
                items = items + (items * math.ceil(missing / len(items)))[:missing]
            batches += [items[i:i + self.batch_size] for i in range(0, len(items) - self.batch_size + 1,
                                                                    self.batch_size)]
        if generator is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        missing = -len(batches) % self.world_size
        return batches + (batches * math.ceil(missing / len(batches)))[:missing]

    def shard(self) -> list[int]:
        """This rank's item indices of the epoch, batch after batch."""
        return [index for batch in self.epoch_batches()[self.rank::self.world_size] for index in batch]

    def __len__(self) -> int:
        return max(0, math.ceil(self.batch_count / self.world_size) * self.batch_size - self.start)
