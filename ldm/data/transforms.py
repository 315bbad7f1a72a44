"""Helpers shared by the datasets: percentile scaling, crop placement and checks, seeded splits, the data error.

Torch and numpy only: the MONAI transforms of the volume pipeline live in `ldm.data.nifti_folder`."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation"}


# What a dataset does with a file it cannot read, and with an item smaller than its crop (params on_bad_file,
# small_volume / small_image).
BAD_FILE_MODES = ("error", "skip")
SMALL_ITEM_MODES = ("error", "pad")


class DataFileError(ValueError):
    """A data file that cannot be used (unreadable, mismatched, unexpected labels, too small); names the file."""


def scale_percentiles(volume: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Map the `lower`..`upper` percentiles of `volume` linearly to -1..1 and clip.

    volume: any shape, float. A constant volume maps to -1 everywhere (there is no contrast to keep).
    """
    low, high = np.percentile(volume.numpy(), [lower, upper])
    if high <= low:
        return torch.full_like(volume, -1.0)
    return ((volume - low) / (high - low) * 2 - 1).clamp_(-1, 1)


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
    """`percentiles` as (lower, upper) after checking 0 <= lower < upper <= 100."""
    if isinstance(percentiles, str) or len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError(f"percentiles must be [lower, upper] with 0 <= lower < upper <= 100, got {percentiles!r}")
    return float(percentiles[0]), float(percentiles[1])


def check_crop_fits(crop_to: Sequence[int], shape: Sequence[int], what: str) -> tuple[int, ...]:
    """`crop_to` as a tuple of ints after checking that it has one positive size per axis of `shape` and fits."""
    crop = check_crop_size(crop_to, len(shape))
    if any(c > s for c, s in zip(crop, shape)):
        raise ValueError(f"crop_to {list(crop)} is larger than {what} of shape {list(shape)}")
    return crop


def check_crop_size(crop_to: Sequence[int], dims: int) -> tuple[int, ...]:
    """`crop_to` as a tuple of `dims` positive ints, or a ValueError."""
    if isinstance(crop_to, (str, int)) or len(crop_to) != dims or any(int(c) != c or c < 1 for c in crop_to):
        raise ValueError(f"crop_to must be {dims} positive ints (one per spatial axis), got {crop_to!r}")
    return tuple(int(c) for c in crop_to)


def crop_start_bounds(box_start: int, box_stop: int, crop: int, size: int) -> tuple[int, int]:
    """Inclusive range of crop starts along one axis that keep the crop inside `size` and on the box `[start, stop)`.

    A crop smaller than the box stays inside it; a larger one covers it whole; both clipped to the volume.
    """
    low = min(box_start, box_stop - crop)
    high = max(box_start, box_stop - crop)
    return min(max(low, 0), size - crop), min(max(high, 0), size - crop)


def nonzero_box(volume: torch.Tensor) -> tuple[list[int], list[int]]:
    """Bounding box `[start, stop)` per axis of the non-zero voxels of `volume` (the whole volume when all zero)."""
    coords = volume.nonzero()
    if coords.numel() == 0:
        return [0] * volume.dim(), list(volume.shape)
    return coords.min(0).values.tolist(), (coords.max(0).values + 1).tolist()


def split_name(split: str) -> str:
    """`split` as one of SPLITS (`val` is accepted for `validation`)."""
    name = SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (or val), got {split!r}")
    return name


def split_by_ratios(count: int, ratios: Sequence[float], seed: int, split: str) -> np.ndarray:
    """Indices of `split` in a seeded permutation of range(count) cut by `ratios` (train, validation, test).

    Sizes are the rounded cumulative ratios, so the three splits are disjoint and cover everything."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be 3 non-negative numbers (train, validation, test), got {list(ratios)}")
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.round(np.cumsum([0, *ratios]) / sum(ratios) * count).astype(int)
    part = SPLITS.index(split_name(split))
    return order[bounds[part]:bounds[part + 1]]
