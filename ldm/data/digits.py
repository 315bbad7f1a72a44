"""`Digits`: scikit-learn's bundled 8 x 8 handwritten digits, upsampled: the offline, labelled 2D demo data."""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.transforms import split_by_ratios

NUM_CLASSES = 10


@functools.lru_cache(maxsize=2)
def load_digits_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits once per process: images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images.astype(np.float32))[:, None] / 16 * 2 - 1
    # bilinear weights are convex, so the range stays [-1, 1]
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp_(-1, 1), torch.from_numpy(digits.target.astype(np.int64))


class Digits(Dataset):
    """The digits in one split of a seeded permutation, cut by `ratios` (train, validation, test).

    Items: `image` (1, size, size) float32 in [-1, 1] (pixel values 0..16 scaled linearly, then bilinear
    upsampling), `class_label` int64 scalar in 0..9.
    """

    def __init__(self, split: str = "train", size: int = 32, seed: int = 0,
                 ratios: Sequence[float] = (0.8, 0.1, 0.1)):
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8 (the digits are 8 x 8), got {size!r}")
        images, labels = load_digits_images(size)
        self.indices = torch.from_numpy(split_by_ratios(len(labels), ratios, seed, split))
        if len(self.indices) == 0:
            raise ValueError(f"the {split} split is empty with ratios {list(ratios)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source = int(self.indices[index])
        return {"image": self.images[source].clone(), "class_label": self.labels[source].clone()}
