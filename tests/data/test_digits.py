import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from ldm.data.digits import Digits


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


@pytest.mark.parametrize("size", [16, 32])
def test_items_match_pillow_bilinear_upsampling_of_the_sklearn_digits(sklearn_digits, size):
    dataset = Digits("validation", size=size, seed=3)
    for index in (0, 7, len(dataset) - 1):
        item = dataset[index]
        source = int(dataset.indices[index])
        pixels = sklearn_digits.images[source].astype(np.float32) / 16 * 2 - 1
        expected = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
        assert item["image"].shape == (1, size, size) and item["image"].dtype == torch.float32
        np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
        assert item["class_label"].dtype == torch.int64 and item["class_label"].shape == ()
        assert int(item["class_label"]) == sklearn_digits.target[source]


def test_values_span_minus_one_to_one():
    images = torch.stack([item["image"] for item in Digits("test", size=16)])
    assert images.min() == -1 and images.max() == 1


def test_splits_are_disjoint_cover_everything_and_follow_the_ratios():
    parts = {split: Digits(split, size=16, seed=1, ratios=[0.6, 0.2, 0.2]).indices.tolist()
             for split in ("train", "validation", "test")}
    everything = sum(parts.values(), [])
    assert sorted(everything) == list(range(1797))
    assert [len(p) for p in parts.values()] == [1078, 360, 359]


def test_split_is_deterministic_by_seed():
    first, again, other = (Digits("train", size=16, seed=s).indices for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(Digits("val", size=16).indices, Digits("validation", size=16).indices)


def test_default_collate_batches():
    batch = next(iter(DataLoader(Digits("train", size=16), batch_size=5)))
    assert batch["image"].shape == (5, 1, 16, 16) and batch["class_label"].shape == (5,)


@pytest.mark.parametrize("arguments, message", [
    ({"split": "training"}, "split must be one of"),
    ({"size": 4}, "size must be an int >= 8"),
    ({"ratios": [1.0, 0.0]}, "ratios must be 3"),
    ({"split": "test", "ratios": [1.0, 0.0, 0.0]}, "the test split is empty"),
])
def test_bad_arguments_raise_a_clear_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        Digits(**arguments)
