"""`GeneratedPairs`: the image-mask pairs of a `sample.py` folder as a dataset, to train a segmentation network on
generated volumes and test it on real ones ("train on synthetic, test on real").

`sample.py --cond split:train` (or a mask folder) writes each mask-conditioned 3D sample as `sample_XXXX.nii.gz`
beside its mask `sample_XXXX_mask.nii.gz` and lists both in `manifest.json`. Both are read as written, in the axis
order of the dataset that produced them (no reorientation), so they stay aligned with each other.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.transforms import DataFileError


def read_channels_first(file: Path, dims: int = 3) -> torch.Tensor:
    """A NIfTI file as written by `ldm.engine.images.save_nifti`: (D, H, W) -> (1, D, H, W), (D, H, W, C) ->
    (C, D, H, W), float32."""
    try:
        data = np.asarray(nib.load(str(file)).dataobj, dtype=np.float32)
    except Exception as err:
        raise DataFileError(f"cannot read NIfTI file {file}: {type(err).__name__}: {err}") from None
    if data.ndim == dims:
        data = data[None]
    elif data.ndim == dims + 1:
        data = np.moveaxis(data, -1, 0)
    else:
        raise DataFileError(f"{file}: shape {list(data.shape)}, expected {dims} axes or {dims} plus channels")
    return torch.from_numpy(np.ascontiguousarray(data))


class GeneratedPairs(Dataset):
    """Mask-conditioned samples of a `sample.py` folder with the masks they were generated for.

    Items: `image` (C, D, H, W) float32 as sampled (in [-1, 1]), `mask` (K, D, H, W) float32 (one-hot, or one binary
    channel), `affine` (4, 4) float64 from the sample's file. `limit` keeps the first that many samples. Training
    draws random flips along `flip_axes` (image and mask together), as the real crops' datasets do; `length` items
    per epoch cycle through the samples (default: each once).
    """

    def __init__(self, folder: str, limit: int | None = None, flip_axes: Sequence[int] = (), length: int | None = None):
        root = Path(folder)
        manifest = root / "manifest.json"
        if not manifest.is_file():
            raise DataFileError(f"GeneratedPairs: {manifest} not found (a folder written by sample.py)")
        try:
            entries = json.loads(manifest.read_text())["samples"]
        except (ValueError, KeyError) as err:
            raise DataFileError(f"GeneratedPairs: {manifest} is not a sample.py manifest ({err})") from None
        pairs = [(root / next(f for f in entry["files"] if f.endswith(".nii.gz")), root / entry["mask"])
                 for entry in entries if entry.get("mask")]
        if not pairs:
            raise DataFileError(f"GeneratedPairs: {manifest} lists no samples with a mask (draw them with a mask "
                                f"condition: sample.py --cond split:<name> or --cond <mask folder>)")
        missing = [str(f) for pair in pairs for f in pair if not f.is_file()]
        if missing:
            raise DataFileError(f"GeneratedPairs: {len(missing)} listed file(s) missing, e.g. {missing[0]}")
        if any(axis not in (0, 1, 2) for axis in flip_axes):
            raise ValueError(f"GeneratedPairs: flip_axes must hold spatial axes 0, 1 or 2, got {list(flip_axes)}")
        self.pairs = pairs[:limit] if limit is not None else pairs
        self.flip_dims = [1 + axis for axis in flip_axes]
        self.length = len(self.pairs) if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"GeneratedPairs: length must be >= 1, got {length}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        image_file, mask_file = self.pairs[index % len(self.pairs)]
        image, mask = read_channels_first(image_file), read_channels_first(mask_file)
        if image.shape[1:] != mask.shape[1:]:
            raise DataFileError(f"{mask_file}: spatial shape {list(mask.shape[1:])} differs from its sample's "
                                f"{list(image.shape[1:])} ({image_file})")
        affine = torch.from_numpy(np.asarray(nib.load(str(image_file)).affine, dtype=np.float64))
        flips = [dim for dim in self.flip_dims if torch.rand(()) < 0.5]
        if flips:
            image, mask = image.flip(flips), mask.flip(flips)
            for axis in (dim - 1 for dim in flips):  # voxel i of the flipped volume is voxel size - 1 - i
                affine[:3, 3] += affine[:3, axis] * (image.shape[1 + axis] - 1)
                affine[:3, axis] *= -1
        return {"image": image, "mask": mask, "affine": affine}


def config_training_on(config_path: str, folder: str, out_path: str, flip_axes: Sequence[int] = (0,),
                       length: int = 1024) -> None:
    """Writes `config_path` (a judge's config, e.g. configs/eval/seg_mni152.yaml) to `out_path` with its training
    split replaced by the samples of `folder`: the "train on synthetic" half of train-on-synthetic, test-on-real.
    (A command-line override cannot do this: it would merge into the old split's parameters.)"""
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path)
    config.data.params.train = {"target": "ldm.data.generated.GeneratedPairs",
                                "params": {"folder": folder, "flip_axes": list(flip_axes), "length": length}}
    OmegaConf.save(config, out_path)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4:
        sys.exit("usage: python -m ldm.data.generated JUDGE_CONFIG SAMPLE_FOLDER OUT_CONFIG")
    config_training_on(*sys.argv[1:])
