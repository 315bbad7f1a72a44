import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.simple import SimpleDataset
from ldm.util import ConfigError, instantiate_from_config

LOAD = {"target": "monai.transforms.LoadImaged", "params": {"keys": ["image"], "ensure_channel_first": True}}
SCALE = {"target": "monai.transforms.ScaleIntensityd", "params": {"keys": ["image"], "minv": -1.0, "maxv": 1.0}}
CROP = {"target": "monai.transforms.RandSpatialCropd",
        "params": {"keys": ["image"], "roi_size": [6, 6, 6], "random_size": False}}


@pytest.fixture
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"volume_{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.uniform(0, 100, (10, 10, 10)).astype(np.float32), np.eye(4)), str(path))
        paths.append(str(path))
    return paths


def test_items_are_plain_tensors_scaled_and_cropped(volumes):
    dataset = SimpleDataset([{"image": p, "label": i} for i, p in enumerate(volumes)], [LOAD, SCALE, CROP])
    item = dataset[1]
    assert type(item["image"]) is torch.Tensor and item["image"].shape == (1, 6, 6, 6)
    assert item["label"] == 1
    full = torch.from_numpy(np.asarray(nib.load(volumes[1]).dataobj))
    expected = (full - full.min()) / (full.max() - full.min()) * 2 - 1
    # the crop is one window of the scaled volume
    windows = expected.unfold(0, 6, 1).unfold(1, 6, 1).unfold(2, 6, 1).reshape(-1, 6, 6, 6)
    assert (windows - item["image"][0]).abs().amax((1, 2, 3)).min() < 1e-5


def test_deterministic_part_is_cached_and_random_part_runs_per_access(volumes, tmp_path):
    dataset = SimpleDataset([{"image": p} for p in volumes], [LOAD, SCALE, CROP], cache_rate=1.0)
    for path in volumes:
        (tmp_path / path.split("/")[-1]).unlink()
    first, second = dataset[0]["image"], dataset[0]["image"]  # served from the cache: the files are gone
    assert not torch.equal(first, second)


def test_uncached_items_read_their_files_on_access(volumes, tmp_path):
    dataset = SimpleDataset([{"image": p} for p in volumes], [LOAD, SCALE, CROP], cache_rate=0.0)
    (tmp_path / "volume_0.nii.gz").unlink()
    with pytest.raises(RuntimeError):
        dataset[0]


def test_random_transforms_follow_the_seed(volumes):
    draws = [[SimpleDataset([{"image": volumes[0]}], [LOAD, CROP], seed=seed)[0]["image"] for _ in range(2)]
             for seed in (4, 4, 5)]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
    assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[2]))


def test_builds_from_a_yaml_config_and_names_a_misspelt_transform_argument(volumes):
    config = OmegaConf.create({"target": "ldm.data.simple.SimpleDataset",
                               "params": {"data": [{"image": volumes[0]}], "transform": [LOAD, SCALE]}})
    assert instantiate_from_config(config)[0]["image"].shape == (1, 10, 10, 10)
    config.params.transform[1].params["maxx"] = 1.0
    with pytest.raises(ConfigError, match="maxx"):
        instantiate_from_config(config)


def test_data_must_be_a_list_of_dicts(volumes):
    with pytest.raises(ValueError, match="data must be a list of dicts"):
        SimpleDataset(volumes, [LOAD])
