"""NIfTI volumes through one MONAI pipeline: `VolumeDataset` (shared with BraTS) and `NiftiFolder` (glob + masks).

Pipeline per subject: read (errors name the file) -> RAS orientation -> optional resampling to `spacing` ->
size check against `crop_to` -> foreground crop -> pad to `crop_to` with background -> per-channel percentile
scaling to [-1, 1] -> label map to mask -> random crop (train) or centre crop (validation, test).
Everything before the crop is deterministic, so `cache_rate` of the subjects keep it cached.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (CenterSpatialCropd, CropForegroundd, LoadImage, MapTransform, Orientationd,
                              RandSpatialCropd, ScaleIntensityRangePercentilesd, Spacingd, SpatialPadd)

from ldm.data.simple import CachedTransformDataset
from ldm.data.transforms import (BAD_FILE_MODES, SMALL_ITEM_MODES, DataFileError, check_crop_size, check_percentiles,
                                 split_by_ratios, split_name)


def source_file(volume: torch.Tensor) -> str:
    """File a MONAI MetaTensor was read from ('?' for plain tensors)."""
    return str(getattr(volume, "meta", {}).get("filename_or_obj", "?"))


class LoadVolumesd(MapTransform):
    """Read the NIfTI file (or list of files) of each key into a (C, X, Y, Z) MetaTensor, one channel per file
    (a 4D file gives its own channels). An unreadable file raises DataFileError naming it."""

    def __init__(self, keys: Sequence[str]):
        super().__init__(keys)
        self.reader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)

    def read(self, file: str) -> torch.Tensor:
        try:
            return self.reader(file)
        except Exception as err:
            raise DataFileError(f"cannot read NIfTI file {file}: {type(err).__name__}: {err}") from None

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        for key in self.key_iterator(item):
            files = [item[key]] if isinstance(item[key], str) else list(item[key])
            volumes = [self.read(file) for file in files]
            item[key] = torch.cat(volumes) if len(volumes) > 1 else volumes[0]
        return item


class CheckCropFitsd(MapTransform):
    """Raise DataFileError when the volume under `key` (C, X, Y, Z) is smaller than `crop_to` on some axis."""

    def __init__(self, key: str, crop_to: Sequence[int]):
        super().__init__([key])
        self.key, self.crop_to = key, list(crop_to)

    def __call__(self, data: dict) -> dict:
        shape = list(data[self.key].shape[1:])
        if any(c > s for c, s in zip(self.crop_to, shape)):
            raise DataFileError(f"{source_file(data[self.key])}: crop_to {self.crop_to} is larger than the volume of "
                                f"shape {shape} (after orientation and resampling; small_volume: pad pads it)")
        return data


class LabelsToMaskd(MapTransform):
    """Turn the label map under `key` (1, X, Y, Z) into `mask` float32 in {0, 1} and drop `key`.

    `merged=False`: one channel per entry of `labels`, in that order (K, X, Y, Z); `merged=True`: one channel,
    1 where the label differs from `labels[0]` (the background). A label not in `labels` raises DataFileError.
    """

    def __init__(self, key: str, labels: Sequence[int], merged: bool):
        super().__init__([key])
        self.key, self.labels, self.merged = key, [int(label) for label in labels], merged

    def __call__(self, data: dict) -> dict:
        item = dict(data)
        label_map = item.pop(self.key)
        labels = label_map.as_subclass(torch.Tensor)[0]
        unexpected = sorted(set(torch.unique(labels).tolist()) - set(self.labels))
        if unexpected:
            raise DataFileError(f"{source_file(label_map)}: unexpected label values "
                                f"{[round(v, 3) for v in unexpected[:8]]} (expected {self.labels})")
        if self.merged:
            item["mask"] = (labels != self.labels[0])[None].float()
        else:
            item["mask"] = torch.stack([labels == label for label in self.labels]).float()
        return item


def header_problem(files: Sequence[str]) -> str | None:
    """What is wrong with one subject's files, read from their headers only (cheap), or None."""
    reference = None
    for file in files:
        if not Path(file).is_file():
            return f"missing file {file}"
        try:
            image = nib.load(file)
        except Exception as err:
            return f"cannot read NIfTI file {file}: {type(err).__name__}: {err}"
        if len(image.shape) not in (3, 4):
            return f"{file} has shape {list(image.shape)}, expected a 3D volume (or 4D with channels last)"
        shape, affine = list(image.shape[:3]), image.affine
        if reference is None:
            reference = (file, shape, affine)
        elif shape != reference[1]:
            return f"{file} has shape {shape} but {reference[0]} has {reference[1]}"
        elif not np.allclose(affine, reference[2], atol=1e-3):
            return f"{file} and {reference[0]} have different affines (not in the same voxel grid)"
    return None


def subjects_of_split(names: Sequence[str], split: str, ratios: Sequence[float], seed: int,
                      split_file: str | None) -> list[str]:
    """Names of `split`: from the JSON `split_file` ({"train": [names], "validation": [...], "test": [...]}), else
    from a seeded permutation of the sorted names cut by `ratios`."""
    names = sorted(names)
    if split_file is None:
        return [names[i] for i in sorted(split_by_ratios(len(names), ratios, seed, split))]
    try:
        listed = {split_name(key): value for key, value in json.loads(Path(split_file).read_text()).items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"split_file {split_file}: expected JSON like {{\"train\": [names], \"validation\": [...], "
                         f"\"test\": [...]}} ({type(err).__name__}: {err})") from None
    chosen = listed.get(split_name(split), [])
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"split_file {split_file}: {len(unknown)} {split} subjects not found, e.g. {unknown[:3]}")
    return list(chosen)


class VolumeDataset(CachedTransformDataset):
    """Subjects' NIfTI volumes through the pipeline of this module (see its docstring).

    `subjects`: name -> {"image": [files, one channel each], "seg": label file or None, "path": str}. Only the
    subjects of `split` are kept; their headers are checked at construction (missing, unreadable, mismatched shape
    or affine) and a bad subject raises DataFileError, or with `on_bad_file="skip"` is left out with one warning
    giving the count. A file whose data is corrupt beyond its header raises DataFileError when read, which the
    loaders of `ldm.data.base` apply `on_bad_file` to as well.

    Items: `image` (C, *crop_to) float32 in [-1, 1], `mask` (K, *crop_to) float32 in {0, 1} when `labels` is given,
    `path` str. `source` says where the subjects came from, for error messages.
    """

    def __init__(self, subjects: dict[str, dict], source: str, split: str, crop_to: Sequence[int],
                 labels: Sequence[int] | None, merge_labels: bool, spacing: Sequence[float] | None,
                 percentiles: Sequence[float], split_ratios: Sequence[float], seed: int, split_file: str | None,
                 small_volume: str, on_bad_file: str, cache_rate: float, cache_num_workers: int):
        self.split = split_name(split)
        crop_to = check_crop_size(crop_to, 3)
        if small_volume not in SMALL_ITEM_MODES:
            raise ValueError(f"small_volume must be one of {', '.join(SMALL_ITEM_MODES)}, got {small_volume!r}")
        if on_bad_file not in BAD_FILE_MODES:
            raise ValueError(f"on_bad_file must be one of {', '.join(BAD_FILE_MODES)}, got {on_bad_file!r}")
        self.on_bad_file = on_bad_file  # also applies when an item is read (see ldm.data.base.ItemSeededDataset)
        if spacing is not None and (len(spacing) != 3 or any(s <= 0 for s in spacing)):
            raise ValueError(f"spacing must be 3 positive numbers in mm (or null to keep the files' grid), "
                             f"got {spacing!r}")
        percentiles = check_percentiles(percentiles)
        if not subjects:
            raise FileNotFoundError(f"no subjects found: {source}")
        names = subjects_of_split(list(subjects), self.split, split_ratios, seed, split_file)
        if not names:
            raise ValueError(f"the {self.split} split of {source} is empty ({len(subjects)} subjects in all)")
        keys = ["image", "seg"] if labels is not None else ["image"]
        chosen = self._check_headers({name: subjects[name] for name in names}, keys, on_bad_file)
        if not chosen:
            raise ValueError(f"the {self.split} split of {source}: every subject was skipped for bad files")
        self.subject_names = list(chosen)
        data = [{key: chosen[name][key] for key in [*keys, "path"]} for name in chosen]
        transforms = self._transforms(keys, crop_to, labels, merge_labels, spacing, percentiles, small_volume)
        super().__init__(data, transforms, cache_rate, cache_num_workers, seed)

    @staticmethod
    def _check_headers(subjects: dict[str, dict], keys: list[str], on_bad_file: str) -> dict[str, dict]:
        problems = {}
        for name, subject in subjects.items():
            if "seg" in keys and subject["seg"] is None:
                problem = "no label map file found for it"
            else:
                problem = header_problem([*subject["image"], *([subject["seg"]] if "seg" in keys else [])])
            if problem is not None and on_bad_file == "error":
                raise DataFileError(f"subject {name}: {problem} (on_bad_file: skip leaves such subjects out)")
            if problem is not None:
                problems[name] = problem
        if problems:
            listed = "; ".join(f"{name}: {problem}" for name, problem in list(problems.items())[:5])
            warnings.warn(f"skipped {len(problems)} of {len(subjects)} subjects for bad files ({listed})", stacklevel=3)
        return {name: subject for name, subject in subjects.items() if name not in problems}

    def _transforms(self, keys: list[str], crop_to: tuple[int, ...], labels: Sequence[int] | None, merge_labels: bool,
                    spacing: Sequence[float] | None, percentiles: Sequence[float], small_volume: str) -> list:
        transforms = [LoadVolumesd(keys), Orientationd(keys, axcodes="RAS", labels=None)]
        if spacing is not None:
            transforms.append(Spacingd(keys, pixdim=list(spacing), mode=["bilinear", "nearest"][:len(keys)],
                                       dtype=np.float32))
        if small_volume == "error":
            transforms.append(CheckCropFitsd("image", crop_to))
        # the foreground crop only drops background, so padding back to crop_to with background (0) loses nothing
        transforms += [
            CropForegroundd(keys, source_key="image", allow_smaller=True, start_coord_key=None, end_coord_key=None),
            SpatialPadd(keys, spatial_size=crop_to),
            ScaleIntensityRangePercentilesd("image", lower=percentiles[0], upper=percentiles[1], b_min=-1.0,
                                            b_max=1.0, clip=True, channel_wise=True),
        ]
        if labels is not None:
            transforms.append(LabelsToMaskd("seg", labels, merge_labels))
        crop_keys = ["image", "mask"] if labels is not None else ["image"]
        if self.split == "train":
            transforms.append(RandSpatialCropd(crop_keys, roi_size=crop_to, random_size=False))
        else:
            transforms.append(CenterSpatialCropd(crop_keys, roi_size=crop_to))
        return transforms


def wildcard_parts(pattern: str, relative_path: str) -> tuple[str, ...] | None:
    """The strings that the wildcards (`**/`, `*`, `?`, `[...]`) of glob `pattern` match in `relative_path`."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "((?:[^/]*/)*)", i + 3
        elif pattern[i] == "*":
            regex, i = regex + "([^/]*)", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "([^/])", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            inner = pattern[i + 1:end]
            regex, i = regex + "([" + ("^" + inner[1:] if inner.startswith("!") else inner) + "])", end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    match = re.fullmatch(regex, relative_path)
    return match.groups() if match else None


class NiftiFolder(VolumeDataset):
    """Volumes under `root` matching `image_glob` (one subject per file; a 4D file gives several channels), with
    optional label maps matching `mask_glob`, paired with the image whose glob wildcards match the same strings
    (`images/*.nii.gz` with `labels/*.nii.gz`, or `*/*_t1.nii.gz` with `*/*_seg.nii.gz`).

    `mask_encoding`: "binary" (one channel: label != labels[0]) or "onehot" (one channel per entry of `labels`).
    Subject names, for `split_file`, are the image paths relative to `root`. Other arguments: see VolumeDataset.
    Items: `image` (C, *crop_to), `mask` (K, *crop_to) with `mask_glob`, `path` (the image file).
    """

    def __init__(self, root: str, split: str = "train", crop_to: Sequence[int] = (64, 64, 64),
                 image_glob: str = "*.nii.gz", mask_glob: str | None = None, mask_encoding: str = "binary",
                 labels: Sequence[int] = (0, 1), spacing: Sequence[float] | None = None,
                 percentiles: Sequence[float] = (0.5, 99.5), split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0, split_file: str | None = None, small_volume: str = "error",
                 on_bad_file: str = "error", cache_rate: float = 0.0, cache_num_workers: int = 0):
        if mask_encoding not in ("binary", "onehot"):
            raise ValueError(f"mask_encoding must be binary or onehot, got {mask_encoding!r}")
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"NIfTI folder root {root} does not exist or is not a folder")
        subjects = {}
        for file in sorted(p for p in root_path.glob(image_glob) if p.is_file()):
            name = file.relative_to(root_path).as_posix()
            subjects[name] = {"image": [str(file)], "path": str(file)}
        if mask_glob is not None:
            masks = {}
            for file in (p for p in root_path.glob(mask_glob) if p.is_file()):
                masks[wildcard_parts(mask_glob, file.relative_to(root_path).as_posix())] = str(file)
            for name, subject in subjects.items():
                subject["seg"] = masks.get(wildcard_parts(image_glob, name))
        super().__init__(subjects, f"root {root}, pattern {image_glob}", split, crop_to,
                         list(labels) if mask_glob is not None else None, mask_encoding == "binary", spacing,
                         percentiles, split_ratios, seed, split_file, small_volume, on_bad_file, cache_rate,
                         cache_num_workers)
