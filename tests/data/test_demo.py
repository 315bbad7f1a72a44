import time

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.demo import TEMPLATE_FILES, MNI152Crops, load_template, template_dir

CROP = [24, 20, 16]


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Reference average pooling by reshaping into blocks."""
    shape = [s // factor for s in volume.shape]
    volume = volume[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return volume.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


@pytest.fixture(scope="module")
def raw_template():
    return {name: np.asarray(nib.load(str(template_dir() / file)).dataobj, dtype=np.float64)
            for name, file in TEMPLATE_FILES.items()}


def test_template_is_block_averaged_percentile_scaled_and_labelled_by_most_probable_tissue(raw_template):
    template = load_template(4, (0.5, 99.5))
    t1 = block_mean(raw_template["t1"], 4)
    low, high = np.percentile(t1, [0.5, 99.5])
    expected = np.clip((t1 - low) / (high - low) * 2 - 1, -1, 1)
    assert template.image.shape == (49, 58, 47)
    np.testing.assert_allclose(template.image.numpy(), expected, atol=1e-5)
    grey, white = block_mean(raw_template["grey_matter"], 4) / 255, block_mean(raw_template["white_matter"], 4) / 255
    probabilities = np.stack([np.clip(1 - grey - white, 0, None), grey, white])
    agree = (template.labels.numpy() == probabilities.argmax(0)).mean()
    assert agree > 0.999  # float32 vs float64 ties only
    brain = np.argwhere(t1 > 0)
    assert template.box_start == brain.min(0).tolist() and template.box_stop == (brain.max(0) + 1).tolist()


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_items_have_the_contract_shapes_and_ranges(split):
    dataset = MNI152Crops(split, crop_to=CROP, spacing_mm=4, length=6)
    assert len(dataset) == 6
    for item in dataset:
        assert set(item) == {"image", "mask", "affine"}
        assert item["affine"].shape == (4, 4) and item["affine"].dtype == torch.float64
        assert item["image"].shape == (1, *CROP) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["image"].max() > -1  # every crop touches the brain
        assert item["mask"].shape == (3, *CROP) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(item["mask"].sum(0), torch.ones(CROP))


def test_mask_none_gives_images_only():
    assert set(MNI152Crops("validation", crop_to=CROP, spacing_mm=4, mask="none")[0]) == {"image", "affine"}


def test_validation_and_test_crops_are_fixed_by_seed_and_index():
    first, again = (MNI152Crops("validation", crop_to=CROP, spacing_mm=4, seed=5) for _ in range(2))
    other_seed = MNI152Crops("validation", crop_to=CROP, spacing_mm=4, seed=6)
    test = MNI152Crops("test", crop_to=CROP, spacing_mm=4, seed=5)
    for index in range(4):
        assert torch.equal(first[index]["image"], again[index]["image"])
        assert torch.equal(first[index]["mask"], again[index]["mask"])
    starts = [first.crop_start(i) for i in range(len(first))]
    assert len({tuple(s) for s in starts}) > 1
    assert starts != [other_seed.crop_start(i) for i in range(len(first))]
    assert starts != [test.crop_start(i) for i in range(len(first))]


def test_validation_item_is_the_template_window_at_its_start():
    dataset = MNI152Crops("validation", crop_to=CROP, spacing_mm=4)
    start = dataset.crop_start(3)
    window = dataset.template.image[tuple(slice(s, s + c) for s, c in zip(start, CROP))]
    assert torch.equal(dataset[3]["image"][0], window)


def test_train_items_are_random_and_follow_torch_seed():
    dataset = MNI152Crops("train", crop_to=CROP, spacing_mm=4)
    torch.manual_seed(0)
    first = [dataset[0]["image"] for _ in range(4)]
    torch.manual_seed(0)
    again = [dataset[0]["image"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_train_flips_flip_mask_and_image_together():
    dataset = MNI152Crops("train", crop_to=CROP, spacing_mm=4, flip_axes=[0, 1, 2], intensity_jitter=0.0)
    start = dataset.crop_start(0)
    window = tuple(slice(s, s + c) for s, c in zip(start, CROP))
    image, labels = dataset.template.image[window], dataset.template.labels[window].long()
    flip_sets = [[d for d in range(3) if code >> d & 1] for code in range(8)]
    dataset.crop_start = lambda index: start
    torch.manual_seed(3)
    seen = set()
    for _ in range(24):
        item = dataset[0]
        matches = [dims for dims in flip_sets if torch.equal(item["image"][0], image.flip(dims))]
        assert len(matches) == 1
        seen.add(tuple(matches[0]))
        assert torch.equal(item["mask"].argmax(0), labels.flip(matches[0]))
    assert len(seen) > 4


def test_train_crops_cover_the_brain_box_and_stay_inside_it():
    dataset = MNI152Crops("train", crop_to=CROP, spacing_mm=4)
    torch.manual_seed(2)
    starts = np.array([dataset.crop_start(0) for _ in range(300)])
    box_start, box_stop = np.array(dataset.template.box_start), np.array(dataset.template.box_stop)
    upper = np.minimum(np.maximum(box_stop - CROP, box_start), np.array(dataset.template.image.shape) - CROP)
    assert (starts.min(0) == np.minimum(box_start, upper)).all() and (starts.max(0) == upper).all()


def test_default_collate_batches():
    batch = next(iter(DataLoader(MNI152Crops("train", crop_to=CROP, spacing_mm=4), batch_size=3)))
    assert batch["image"].shape == (3, 1, *CROP) and batch["mask"].shape == (3, 3, *CROP)


def test_crop_larger_than_volume_names_both_shapes():
    with pytest.raises(ValueError, match=r"crop_to \[64, 64, 64\] is larger than .* 4 mm of shape \[49, 58, 47\]"):
        MNI152Crops("train", crop_to=[64, 64, 64], spacing_mm=4)


@pytest.mark.parametrize("arguments, message", [
    ({"split": "training"}, "split must be one of"),
    ({"mask": "tumour"}, "mask must be one of"),
    ({"spacing_mm": 1.5}, "spacing_mm must be a positive int"),
    ({"crop_to": [16, 16]}, "crop_to must be 3 positive ints"),
    ({"flip_axes": [3]}, "flip_axes must hold spatial axes"),
    ({"length": 0}, "length must be >= 1"),
    ({"percentiles": [0.5]}, "percentiles must be"),
    ({"intensity_jitter": -0.1}, "intensity_jitter must be >= 0"),
])
def test_bad_arguments_raise_a_clear_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        MNI152Crops(**{"crop_to": CROP, "spacing_mm": 4, **arguments})


def test_an_item_takes_milliseconds_after_the_first_load():
    dataset = MNI152Crops("train", crop_to=[32, 32, 32], spacing_mm=2)
    dataset[0]
    begin = time.perf_counter()
    for index in range(20):
        dataset[index]
    assert (time.perf_counter() - begin) / 20 < 0.02


def test_loader_workers_draw_different_crops():
    dataset = MNI152Crops("train", crop_to=CROP, spacing_mm=4, length=4, intensity_jitter=0.0)
    first, second = DataLoader(dataset, batch_size=2, num_workers=2)  # one batch from each worker
    assert first["image"].shape == (2, 1, *CROP) and not torch.equal(first["image"][0], second["image"][0])


@pytest.mark.parametrize("split,spacing", [("validation", 2), ("train", 2), ("train", 1)])
def test_affine_maps_each_voxel_to_the_template_voxel_it_came_from(raw_template, split, spacing):
    """World position of a crop's voxel (through the item's affine) -> the 1 mm template's voxel index (through the
    file's affine) is where the block that voxel averages is centred: crop offset, pooling and flips are all in it."""
    torch.manual_seed(3)
    data = MNI152Crops(split, crop_to=CROP, spacing_mm=spacing, flip_axes=(0, 1, 2), intensity_jitter=0)
    file_affine = nib.load(str(template_dir() / TEMPLATE_FILES["t1"])).affine
    pooled = load_template(spacing, (0.5, 99.5)).image.numpy()
    for index in range(3):
        item = data[index]
        affine = item["affine"].numpy()
        voxels = np.stack(np.meshgrid(*[np.arange(c) for c in CROP], indexing="ij"), -1).reshape(-1, 3)
        one_mm = (np.linalg.inv(file_affine) @ affine @ np.c_[voxels, np.ones(len(voxels))].T)[:3].T
        source = np.rint((one_mm - (spacing - 1) / 2) / spacing).astype(int)
        assert np.allclose(one_mm, source * spacing + (spacing - 1) / 2, atol=1e-6)
        expected = pooled[tuple(source.T)].reshape(CROP)
        np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
