"""Aspect-ratio buckets: sizes against a brute-force enumeration, assignment, crops and size conditioning worked out
by hand, the sampler's batches per bucket, epoch, rank and resume, and a loader's batch through SDXL's size
conditioning (against diffusers' add_time_proj)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.base import DataModuleFromConfig
from ldm.data.buckets import Buckets, BucketSampler, make_buckets, nearest_bucket
from ldm.data.captions import CaptionedImages
from ldm.util import ConfigError, instantiate_from_config

SDXL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sgm" / "sdxl_base.yaml"
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
SMALL = {"resolution": 64, "step": 16, "max_ratio": 2.0}  # buckets (48, 80), (64, 64), (80, 48)
LANDSCAPE = [(20, 38), (24, 44), (18, 36), (30, 52), (22, 40), (26, 50)]
SQUARE = [(16, 16), (20, 22), (24, 24), (30, 28), (18, 18), (40, 41)]
PORTRAIT = [(38, 20), (44, 24), (36, 18), (52, 30)]


def brute_force_buckets(resolution, step, max_ratio):
    """Every (h, w) on the step grid with h <= w whose area fits resolution^2 but not with one step more width,
    within max_ratio, and the transposes."""
    area, grid = resolution ** 2, range(step, 8 * resolution + 1, step)
    found = {(h, w) for h in grid for w in grid if h <= w and h * w <= area < h * (w + step) and w <= max_ratio * h}
    return found | {(w, h) for h, w in found}


@pytest.mark.parametrize("resolution, step, max_ratio", [(1024, 64, 2.0), (512, 32, 4.0), (1000, 64, 1.5),
                                                         (64, 16, 2.0), (256, 64, 1.0)])
def test_bucket_sizes_are_the_largest_of_the_area_on_the_step_grid(resolution, step, max_ratio):
    sizes = make_buckets(resolution, step, max_ratio)
    assert set(sizes) == brute_force_buckets(resolution, step, max_ratio) and len(set(sizes)) == len(sizes)
    area = resolution ** 2
    for height, width in sizes:
        assert height % step == 0 and width % step == 0
        assert area - step * resolution < height * width <= area
        assert 1 / max_ratio <= height / width <= max_ratio
    ratios = [h / w for h, w in sizes]
    assert ratios == sorted(ratios)


def test_sdxl_resolution_gives_the_near_square_sizes_of_sdxls_bucket_table():
    assert make_buckets(1024, 64, 2.0) == [(768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
                                          (1088, 960), (1152, 896), (1216, 832), (1344, 768)]
    assert Buckets.from_config({}).sizes == tuple(make_buckets(1024, 64, 2.0))


def test_nearest_bucket_by_aspect_ratio():
    sizes = make_buckets(1024, 64, 2.0)
    assert sizes[nearest_bucket(1080, 1920, sizes)] == (768, 1344)   # 16:9 -> 7:4
    assert sizes[nearest_bucket(3000, 1000, sizes)] == (1344, 768)   # beyond max_ratio: the tallest
    assert sizes[nearest_bucket(500, 510, sizes)] == (1024, 1024)
    assert sizes[nearest_bucket(900, 1000, sizes)] == (960, 1088)    # 0.9: |log 0.9/0.882| < |log 0.9/1|
    small = make_buckets(**SMALL)  # ratios 0.6, 1, 1.67
    assert small[nearest_bucket(79, 100, small)] == (64, 64)  # 0.79: nearer 1 than 0.6 in log-ratio, not linearly
    assert small[nearest_bucket(77, 100, small)] == (48, 80)
    generator = np.random.default_rng(0)
    for height, width in generator.integers(50, 4000, size=(300, 2)):
        chosen = sizes[nearest_bucket(height, width, sizes)]
        # nearest in log-ratio = smallest ratio of ratios >= 1
        factor = [max(h * width / (w * height), w * height / (h * width)) for h, w in sizes]
        assert max(chosen[0] * width / (chosen[1] * height), chosen[1] * height / (chosen[0] * width)) == min(factor)


@pytest.mark.parametrize("config, message", [
    ({"resolution": 0}, "buckets.resolution must be a positive int"),
    ({"step": 2.5}, "buckets.step must be a positive int"),
    ({"resolution": 64, "step": 128}, "buckets.step .128. must not exceed buckets.resolution"),
    ({"max_ratio": 0.5}, "buckets.max_ratio must be a number >= 1"),
    ({"max_ratio": "wide"}, "buckets.max_ratio must be a number >= 1"),
    ({"drop_last": "yes"}, "buckets.drop_last must be true or false"),
    ({"resolutoin": 512}, "buckets: unknown keys resolutoin"),
    ({"resolution": 100, "step": 64, "max_ratio": 1.5}, "no size on the buckets.step grid .64. of area about 100"),
    ([1024, 64], "buckets must be a mapping")])
def test_bad_bucket_options_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        Buckets.from_config(config)


def write_image(path: Path, height: int, width: int, caption: str) -> None:
    """An RGB PNG of smooth gradients (so bilinear resizing is well defined) and its caption beside it."""
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([cols * 255 // max(width - 1, 1), rows * 255 // max(height - 1, 1),
                       (rows + cols) * 255 // (height + width)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    path.with_suffix(".txt").write_text(caption)


@pytest.fixture
def folder(tmp_path):
    for kind, shapes in [("landscape", LANDSCAPE), ("square", SQUARE), ("portrait", PORTRAIT)]:
        for number, (height, width) in enumerate(shapes):
            write_image(tmp_path / f"{kind}{number}.png", height, width, f"{kind} {number}")
    return tmp_path


def test_bucket_resize_crop_and_size_conditioning_by_hand(tmp_path):
    write_image(tmp_path / "a.png", 30, 60, "wide")    # ratio 2 -> (48, 80); covers it at x1.6: 48 x 96
    write_image(tmp_path / "b.png", 60, 30, "tall")    # -> (80, 48); x1.6: 96 x 48
    write_image(tmp_path / "c.png", 20, 20, "square")  # -> (64, 64); x3.2: 64 x 64
    dataset = CaptionedImages(str(tmp_path), buckets=SMALL, crop="center")
    assert dataset.buckets.sizes == ((48, 80), (64, 64), (80, 48)) and dataset.bucket_ids == [0, 2, 1]
    expected = [((30, 60), (0, 8), (48, 80)), ((60, 30), (8, 0), (80, 48)), ((20, 20), (0, 0), (64, 64))]
    for index, (original, crop, target) in enumerate(expected):
        item = dataset[index]
        assert [tuple(item[key].tolist()) for key in SIZE_KEYS] == [original, crop, target]
        assert item["image"].shape == (3, *target)
        resized = Image.open(dataset.files[index]).resize((target[1] + 2 * crop[1], target[0] + 2 * crop[0]),
                                                          Image.BILINEAR)
        reference = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255 * 2 - 1).permute(2, 0, 1)
        reference = reference[:, crop[0]:crop[0] + target[0], crop[1]:crop[1] + target[1]]
        torch.testing.assert_close(item["image"], reference, atol=2.5 / 255, rtol=0)

    random_crops = CaptionedImages(str(tmp_path), buckets=SMALL, crop="random")
    full = CaptionedImages(str(tmp_path), buckets={"resolution": 64, "step": 16, "max_ratio": 2.0}, crop="center")
    torch.manual_seed(0)
    lefts = set()
    for _ in range(20):
        item = random_crops[0]
        top, left = item["crop_coords_top_left"].tolist()
        assert top == 0 and 0 <= left <= 96 - 80
        lefts.add(left)
        centre = full[0]  # the same resized 48 x 96 image, cut at 8: compare where the two crops overlap
        overlap = slice(max(left, 8), min(left, 8) + 80)
        torch.testing.assert_close(item["image"][..., overlap.start - left:overlap.stop - left],
                                   centre["image"][..., overlap.start - 8:overlap.stop - 8])
    assert len(lefts) > 5


def test_size_and_buckets_exclude_each_other_and_bad_values_name_the_key(folder):
    with pytest.raises(ValueError, match="size and buckets exclude each other"):
        CaptionedImages(str(folder), size=64, buckets=SMALL)
    config = OmegaConf.create({"data": {"params": {"train": {
        "target": "ldm.data.captions.CaptionedImages",
        "params": {"root": str(folder), "buckets": {**SMALL, "max_ratio": 0.5}}}}}})
    with pytest.raises(ConfigError, match=r"^data\.params\.train\.params: CaptionedImages: buckets\.max_ratio must"):
        DataModuleFromConfig(batch_size=2, train=config.data.params.train, num_workers=0)


def run_batches(sampler):
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % sampler.batch_size == 0
    return [order[i:i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


BUCKET_IDS = [2, 0, 1, 0, 1, 1, 0, 2, 1, 0, 2, 0, 2, 0, 1, 1]  # 6 of bucket 0, 6 of 1, 4 of 2


def test_sampler_batches_are_single_bucket_and_see_every_item_once_per_epoch():
    sampler = BucketSampler(BUCKET_IDS, batch_size=2, shuffle=True, seed=5)
    epochs = []
    for epoch in (0, 1):
        sampler.begin_epoch(epoch)
        batches = run_batches(sampler)
        assert all(len({BUCKET_IDS[i] for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKET_IDS)))
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    again = BucketSampler(BUCKET_IDS, batch_size=2, shuffle=True, seed=5)
    again.begin_epoch(1)
    assert run_batches(again) == epochs[1]
    again.begin_epoch(1, start=3 * 2)  # resumed after 3 batches: the rest of the same epoch
    assert run_batches(again) == epochs[1][3:]
    with pytest.raises(ValueError, match="not a whole number of batches"):
        again.begin_epoch(1, start=3)
    in_order = BucketSampler(BUCKET_IDS, batch_size=2, shuffle=False)
    assert run_batches(in_order)[:3] == [[1, 3], [6, 9], [11, 13]]


def test_two_ranks_get_disjoint_batches_that_together_cover_the_epoch():
    ranks = [BucketSampler(BUCKET_IDS, batch_size=2, shuffle=True, seed=5, rank=r, world_size=2) for r in (0, 1)]
    single = BucketSampler(BUCKET_IDS, batch_size=2, shuffle=True, seed=5)
    for sampler in (*ranks, single):
        sampler.begin_epoch(3)
    shards = [run_batches(sampler) for sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == 4
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(len(BUCKET_IDS)))
    assert [b for pair in zip(*shards) for b in pair] == run_batches(single)  # the one-rank epoch, dealt out


def test_incomplete_batches_are_filled_from_their_bucket_or_dropped():
    bucket_ids = [0] * 5 + [1] * 3 + [2]
    filled = BucketSampler(bucket_ids, batch_size=2, shuffle=True, seed=1)
    batches = run_batches(filled)
    assert len(batches) == 3 + 2 + 1 and all(len({bucket_ids[i] for i in b}) == 1 for b in batches)
    seen = Counter(i for b in batches for i in b)
    assert set(seen) == set(range(9)) and sorted(seen.values()) == [1] * 6 + [2] * 3  # one repeat per bucket
    assert [8, 8] in batches
    dropped = BucketSampler(bucket_ids, batch_size=2, shuffle=True, seed=1, drop_last=True)
    seen = Counter(i for b in run_batches(dropped) for i in b)
    assert len(seen) == 6 and set(seen.values()) == {1} and 8 not in seen
    assert sum(1 for i in seen if i < 5) == 4 and sum(1 for i in seen if 5 <= i < 8) == 2
    ranks = [BucketSampler(bucket_ids, batch_size=2, shuffle=True, seed=1, rank=r, world_size=4) for r in range(4)]
    shards = [run_batches(sampler) for sampler in ranks]  # 6 batches padded to 8, wrapping
    assert [len(shard) for shard in shards] == [2] * 4
    assert [b for pair in zip(*shards) for b in pair] == batches + batches[:2]
    assert run_batches(BucketSampler([0, 1, 1], batch_size=4, shuffle=True)) in ([[0] * 4, [1, 2, 1, 2]],
                                                                                  [[0] * 4, [2, 1, 2, 1]],
                                                                                  [[1, 2, 1, 2], [0] * 4],
                                                                                  [[2, 1, 2, 1], [0] * 4])
    with pytest.raises(ValueError, match=r"buckets.drop_last: every bucket has fewer than batch_size \(8\)"):
        BucketSampler(bucket_ids, batch_size=8, shuffle=True, drop_last=True)


def data_module(folder, wrap=False, **bucket_options):
    train = {"target": "ldm.data.captions.CaptionedImages",
             "params": {"root": str(folder), "buckets": {**SMALL, **bucket_options}, "flip": True}}
    return DataModuleFromConfig(batch_size=2, train=train, num_workers=0, pin_memory=False, wrap=wrap)


def epoch_of(loader, epoch, start_batch=0):
    loader.sampler.begin_epoch(epoch, start=start_batch * loader.batch_size)
    return list(loader)


@pytest.mark.parametrize("wrap", [False, True])
def test_loaders_of_two_ranks_give_single_bucket_batches_and_resume(folder, wrap):
    data = data_module(folder, wrap=wrap)
    shards = []
    for rank in (0, 1):
        batches = epoch_of(data.dataloader("train", rank, 2, seed=3), epoch=1)
        for batch in batches:
            targets = batch["target_size_as_tuple"]
            assert (targets == targets[0]).all() and batch["image"].shape == (2, 3, *targets[0].tolist())
        shards.append([path for batch in batches for path in batch["path"]])
    assert len(shards[0]) == len(shards[1]) == 8 and not set(shards[0]) & set(shards[1])
    dataset = data.datasets["train"]
    assert sorted(shards[0] + shards[1]) == sorted((dataset.data if wrap else dataset).files)
    straight = epoch_of(data.dataloader("train", 1, 2, seed=3), epoch=1)
    resumed = epoch_of(data.dataloader("train", 1, 2, seed=3), epoch=1, start_batch=2)
    for one, other in zip(straight[2:], resumed, strict=True):  # same items, same random crops and flips
        assert one["path"] == other["path"] and torch.equal(one["image"], other["image"])
        assert torch.equal(one["crop_coords_top_left"], other["crop_coords_top_left"])


def test_a_file_skipped_when_read_is_replaced_from_its_own_bucket(folder, capsys):
    train = {"target": "ldm.data.captions.CaptionedImages",
             "params": {"root": str(folder), "buckets": SMALL, "on_bad_file": "skip"}}
    data = DataModuleFromConfig(batch_size=2, train=train, num_workers=0, pin_memory=False)
    for name in ("landscape5.png", "square5.png"):  # broken after the dataset was built: found when read
        (folder / name).write_bytes(b"not a png")
    batches = epoch_of(data.dataloader("train", seed=0), epoch=0)
    assert sum(int(batch["skipped_reads"].sum()) for batch in batches) == 2
    for batch in batches:
        assert (batch["target_size_as_tuple"] == batch["target_size_as_tuple"][0]).all()
    assert capsys.readouterr().err.count("on_bad_file: skip") == 2


def test_a_collated_batch_feeds_sdxls_size_conditioning(folder):
    batch = epoch_of(data_module(folder).dataloader("train", seed=0), epoch=0)[0]
    assert isinstance(batch["txt"], list) and len(batch["txt"]) == 2 and batch["image"].dtype == torch.float32
    for key in SIZE_KEYS:
        assert batch[key].shape == (2, 2) and batch[key].dtype == torch.int64
    models = OmegaConf.load(SDXL_CONFIG).model.params.conditioner_config.params.emb_models
    size_models = [model for model in models if model.input_key in SIZE_KEYS]
    assert [model.input_key for model in size_models] == list(SIZE_KEYS)
    conditioner = instantiate_from_config({"target": "ldm.modules.conditioner.GeneralConditioner",
                                           "params": {"emb_models": size_models}})
    vector = conditioner(batch)["vector"]
    assert vector.shape == (2, 3 * 2 * 256)
    from diffusers.models.embeddings import Timesteps  # SDXL's add_time_proj over its add_time_ids
    time_ids = torch.cat([batch[key] for key in SIZE_KEYS], dim=1).float()
    reference = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(time_ids.flatten()).reshape(2, -1)
    torch.testing.assert_close(vector, reference, rtol=1e-5, atol=1e-5)
