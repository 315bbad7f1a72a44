"""The example `data` sections in configs/data/ build their datasets and loaders."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.base import DataModuleFromConfig
from ldm.util import ConfigError, instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def data_module(name: str, **overrides) -> DataModuleFromConfig:
    config = OmegaConf.load(CONFIGS / name)
    for key, value in {"data.params.num_workers": 0, **overrides}.items():
        OmegaConf.update(config, key, value)
    return instantiate_from_config(config.data)


def test_phantom_3d_builds_every_split_and_batches_images_with_masks():
    data = data_module("phantom_3d.yaml")
    assert [len(data.datasets[split]) for split in ("train", "validation", "test")] == [512, 8, 8]
    for split in ("validation", "test"):
        batch = next(iter(data.dataloader(split)))
        assert batch["image"].shape == (2, 1, 64, 64, 64) and batch["mask"].shape == (2, 1, 64, 64, 64)
        assert batch["mask"].sum() > 0
    assert not torch.equal(data.datasets["validation"][0]["image"], data.datasets["test"][0]["image"])


def test_image_folder_2d_follows_the_train_root_and_labels_by_folder(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(20):
        path = tmp_path / ("benign" if index % 2 else "malignant") / f"scan_{index:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(path)
    data = data_module("image_folder_2d.yaml", **{"data.params.train.params.root": str(tmp_path)})
    assert [len(data.datasets[split]) for split in ("train", "validation", "test")] == [16, 2, 2]
    files = [set(data.datasets[split].files) for split in ("train", "validation", "test")]
    assert len(set.union(*files)) == 20
    batch = next(iter(data.dataloader("train")))
    assert batch["image"].shape == (16, 1, 64, 64) and batch["class_label"].dtype == torch.int64
    assert data.datasets["test"].classes == ["benign", "malignant"]


def test_image_folder_2d_names_the_missing_default_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's root is relative: data/images
    with pytest.raises(ConfigError, match=r"data.params.train.params: ImageFolder: image folder root data/images does "
                                          r"not exist"):
        data_module("image_folder_2d.yaml")


def test_a_misspelt_dataset_argument_names_its_config_path():
    with pytest.raises(ConfigError, match=r"data.params.validation.params: unknown argument 'tumor_radius'"):
        data_module("phantom_3d.yaml", **{"data.params.validation.params.tumor_radius": [0.1, 0.2]})
