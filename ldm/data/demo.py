"""`MNI152Crops`: 3D crops of the MNI ICBM152 2009a T1 brain template, the offline demo data.

The template and its grey/white-matter probability maps ship inside the nilearn wheel (1 mm, 197 x 233 x 189, RAS);
they are read with nibabel, without importing nilearn's modules.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
University. Permission to use, copy, modify, and distribute this software and its documentation for any purpose and
without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors and McGill
University make no representations about the suitability of this software for any purpose. It is provided "as is"
without express or implied warranty.
"""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.transforms import (SPLITS, check_crop_fits, check_percentiles, crop_start_bounds, nonzero_box,
                                 scale_percentiles, split_name)

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "grey_matter": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "white_matter": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: Channel order of the one-hot `mask`; background includes CSF.
TISSUES = ("background", "grey_matter", "white_matter")
DEFAULT_LENGTH = {"train": 512, "validation": 16, "test": 16}
MASK_MODES = ("tissue", "none")


def template_dir() -> Path:
    """Folder of the template files inside the installed nilearn package."""
    return Path(str(importlib.resources.files("nilearn") / "datasets" / "data"))


class Template(NamedTuple):
    """The resampled template: `image` (D, H, W) float32 in [-1, 1], `labels` (D, H, W) uint8 indices into
    TISSUES, the brain's bounding box `[box_start, box_stop)` per axis, and the voxel-to-world `affine` (4, 4)."""
    image: torch.Tensor
    labels: torch.Tensor
    box_start: list[int]
    box_stop: list[int]
    affine: np.ndarray


def _read(name: str) -> torch.Tensor:
    path = template_dir() / TEMPLATE_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"MNI152 template file {path} not found: is nilearn installed (pip install nilearn)?")
    return torch.from_numpy(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))


@functools.lru_cache(maxsize=4)
def load_template(spacing_mm: int, percentiles: tuple[float, float]) -> Template:
    """Read the 1 mm template once per process and average-pool it by `spacing_mm` (a 2 mm voxel is the mean of
    2^3 voxels; trailing voxels that do not fill a block are dropped: they are background)."""
    pool = functools.partial(F.avg_pool3d, kernel_size=spacing_mm, stride=spacing_mm)
    volumes = torch.stack([_read(name) for name in TEMPLATE_FILES])
    t1, grey, white = pool(volumes[:, None])[:, 0]
    grey, white = grey / 255, white / 255
    labels = torch.stack([(1 - grey - white).clamp(min=0), grey, white]).argmax(0).to(torch.uint8)
    box_start, box_stop = nonzero_box(t1 > 0)
    # a pooled voxel i covers 1 mm voxels spacing*i ... spacing*i + spacing - 1: its centre is spacing*i + (spacing-1)/2
    pooling = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    pooling[:3, 3] = (spacing_mm - 1) / 2
    affine = nib.load(str(template_dir() / TEMPLATE_FILES["t1"])).affine @ pooling
    return Template(scale_percentiles(t1, *percentiles), labels, box_start, box_stop, affine)


class MNI152Crops(Dataset):
    """Crops of the MNI152 template with optional one-hot tissue masks.

    There is one subject, so the splits differ only in how crops are drawn: `train` draws a random crop on the
    brain's bounding box with random flips along `flip_axes` and a random gamma in [exp(-jitter), exp(jitter)]
    (from torch's global generator, which PyTorch seeds per loader worker); `validation` and `test` draw fixed crops
    from (`seed`, split, index), unflipped and unjittered.

    Items: `image` (1, D, H, W) float32 in [-1, 1] (the volume's `percentiles` map to -1 and 1), `affine` (4, 4)
    float64 (the crop's voxel-to-world matrix in MNI space, flips included), and with `mask="tissue"` a `mask`
    (3, D, H, W) float32 one-hot over TISSUES, each voxel labelled with its most probable class. `spacing_mm` average-pools the 1 mm template by that integer factor (2: 98 x 116 x 94, 4: 49 x 58 x 47).
    `length` is the number of items per epoch (default 512 for train, 16 otherwise).
    """

    def __init__(self, split: str = "train", crop_to: Sequence[int] = (32, 32, 32), spacing_mm: int = 2,
                 length: int | None = None, mask: str = "tissue", seed: int = 0, flip_axes: Sequence[int] = (0,),
                 intensity_jitter: float = 0.1, percentiles: Sequence[float] = (0.5, 99.5)):
        split = split_name(split)
        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
        if not isinstance(spacing_mm, int) or spacing_mm < 1:
            raise ValueError(f"spacing_mm must be a positive int (an average-pooling factor of the 1 mm template), "
                             f"got {spacing_mm!r}")
        if any(axis not in (0, 1, 2) for axis in flip_axes):
            raise ValueError(f"flip_axes must hold spatial axes 0, 1 or 2, got {list(flip_axes)}")
        if intensity_jitter < 0:
            raise ValueError(f"intensity_jitter must be >= 0, got {intensity_jitter}")
        self.length = DEFAULT_LENGTH[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split, self.mask, self.seed = split, mask, seed
        self.flip_dims = [1 + axis for axis in flip_axes]
        self.intensity_jitter = float(intensity_jitter)
        self.template = load_template(spacing_mm, check_percentiles(percentiles))
        shape = self.template.image.shape
        self.crop_to = check_crop_fits(crop_to, shape, f"the MNI152 template at {spacing_mm} mm")
        self.start_bounds = [crop_start_bounds(start, stop, crop, size) for start, stop, crop, size in
                             zip(self.template.box_start, self.template.box_stop, self.crop_to, shape)]

    def __len__(self) -> int:
        return self.length

    def crop_start(self, index: int) -> list[int]:
        """Corner of the crop of item `index`: random for train, fixed by (seed, split, index) otherwise."""
        if self.split == "train":
            return [int(torch.randint(low, high + 1, ())) for low, high in self.start_bounds]
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        return [int(rng.integers(low, high + 1)) for low, high in self.start_bounds]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        start = self.crop_start(index)
        window = tuple(slice(s, s + c) for s, c in zip(start, self.crop_to))
        affine = self.template.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.asarray(start, dtype=np.float64)
        # clone: a view would carry the whole cached volume through the loader's shared memory
        image = self.template.image[window][None].clone()
        labels = self.template.labels[window][None]
        if self.split == "train":
            flips = [dim for dim in self.flip_dims if torch.rand(()) < 0.5]
            if flips:
                image, labels = image.flip(flips), labels.flip(flips)
                for axis in (dim - 1 for dim in flips):  # voxel i of the flipped crop is voxel size - 1 - i
                    affine[:3, 3] += affine[:3, axis] * (self.crop_to[axis] - 1)
                    affine[:3, axis] *= -1
            if self.intensity_jitter > 0:
                gamma = torch.empty(()).uniform_(-self.intensity_jitter, self.intensity_jitter).exp()
                image = ((image + 1) / 2).pow(gamma) * 2 - 1
        item = {"image": image, "affine": torch.from_numpy(affine)}
        if self.mask == "tissue":
            item["mask"] = (labels == torch.arange(len(TISSUES)).view(-1, 1, 1, 1)).float()
        return item
