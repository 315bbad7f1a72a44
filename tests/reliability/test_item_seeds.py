"""Augmentation is a function of position: `ldm.data.base` seeds each item from (seed, epoch, rank, position), so a
loader started mid-epoch (a resumed run's) draws what an uninterrupted one draws, whatever `num_workers` is."""
import numpy as np
import torch

from ldm.data.base import DataModuleFromConfig, ItemSeededDataset, ShardedResumableSampler, find_randomizables
from ldm.data.simple import SimpleDataset
from tests.reliability.toy_ema import AugmentedRegressionData

AUGMENTED = {"target": "tests.reliability.toy_ema.AugmentedRegressionData", "params": {"length": 12}}


def batches(loader, sampler, epoch: int, start_batch: int = 0) -> list[torch.Tensor]:
    sampler.begin_epoch(epoch, start=start_batch * loader.batch_size)
    return [batch["image"] for batch in loader]


def test_a_loader_started_mid_epoch_with_workers_draws_the_same_augmentation(single_thread):
    straight = DataModuleFromConfig(batch_size=2, train=AUGMENTED, num_workers=0).dataloader("train", seed=3)
    resumed = DataModuleFromConfig(batch_size=2, train=AUGMENTED, num_workers=2).dataloader("train", seed=3)
    expected = batches(straight, straight.sampler, epoch=0) + batches(straight, straight.sampler, epoch=1)
    got = batches(resumed, resumed.sampler, epoch=0, start_batch=4) + batches(resumed, resumed.sampler, epoch=1)
    assert len(got) == 2 + 6
    for mine, theirs in zip(got, expected[4:], strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(expected[0], expected[6])  # epochs differ (order and augmentation)


def test_item_seeds_follow_the_position_and_loading_leaves_the_global_generators_alone():
    full = ShardedResumableSampler(10, shuffle=True, seed=5, rank=1, world_size=2, item_seeds=True)
    tail = ShardedResumableSampler(10, shuffle=True, seed=5, rank=1, world_size=2, item_seeds=True)
    full.begin_epoch(3)
    tail.begin_epoch(3, start=2)
    assert list(tail) == list(full)[2:]
    other_rank = ShardedResumableSampler(10, shuffle=True, seed=5, rank=0, world_size=2, item_seeds=True)
    other_rank.begin_epoch(3)
    assert not {seed for _, seed in full} & {seed for _, seed in other_rank}

    dataset = ItemSeededDataset(AugmentedRegressionData(length=4))
    torch.manual_seed(0), np.random.seed(0)
    expected = torch.rand(1), np.random.rand()
    torch.manual_seed(0), np.random.seed(0)
    first = dataset[(1, 1234)]["image"]
    assert (torch.rand(1), np.random.rand()) == expected  # the training process's noise is untouched
    assert torch.equal(dataset[(1, 1234)]["image"], first) and not torch.equal(dataset[(1, 99)]["image"], first)


def test_monai_random_transforms_are_seeded_per_item():
    dataset = SimpleDataset([{"image": np.zeros((1, 4, 4), np.float32)} for _ in range(3)],
                            [{"target": "monai.transforms.RandGaussianNoised", "params": {"keys": ["image"],
                                                                                         "prob": 1.0}}])
    assert [type(found).__name__ for found in find_randomizables(dataset)] == ["Compose"]
    seeded = ItemSeededDataset(dataset)
    first = seeded[(0, 7)]["image"]
    seeded[(1, 8)], seeded[(2, 9)]  # other items in between: no influence
    assert torch.equal(seeded[(0, 7)]["image"], first) and not torch.equal(seeded[(0, 8)]["image"], first)
