"""`Digits`: scikit-learn's bundled 8 x 8 handwritten digits, upsampled: the offline, labelled 2D demo data, with a
caption naming each item's class on request ("a handwritten seven") for the text-to-image demo."""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.transforms import split_by_ratios

NUM_CLASSES = 10
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Caption templates of the text-to-image demo (configs/demo/text_2d.yaml).
CAPTION_TEMPLATES = ("a handwritten {word}", "the digit {digit}", "{word}")


@functools.lru_cache(maxsize=2)
def load_digits_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits once per process: images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images.astype(np.float32))[:, None] / 16 * 2 - 1
    # bilinear weights are convex, so the range stays [-1, 1]
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp_(-1, 1), torch.from_numpy(digits.target.astype(np.int64))


def digit_caption(template: str, label: int) -> str:
    """`template` filled for class `label`: {word} its English name ("seven"), {digit} its numeral ("7")."""
    return template.format(word=NUMBER_WORDS[label], digit=label)


def check_caption_templates(templates: Sequence[str] | str) -> list[str]:
    """The templates as a list; each must be a format string over {word} and {digit} only."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("caption_templates: give at least one template, e.g. 'a handwritten {word}'")
    for template in templates:
        try:
            digit_caption(template, 0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"caption_templates: {template!r} is not a format string over {{word}} and {{digit}} "
                             f"({type(err).__name__}: {err})") from None
    return templates


class Digits(Dataset):
    """The digits in one split of a seeded permutation, cut by `ratios` (train, validation, test).

    Items: `image` (1, size, size) float32 in [-1, 1] (pixel values 0..16 scaled linearly, then bilinear
    upsampling), `class_label` int64 scalar in 0..9; with `caption_templates` also `caption`, a str: one of the
    templates (format strings over {word} and {digit}, see `digit_caption`) filled for the item's class. With
    `random_caption` the template is drawn at each read (training: every class under every phrasing), else item i
    takes template i % len(caption_templates) (fixed captions, for evaluation).
    """

    def __init__(self, split: str = "train", size: int = 32, seed: int = 0,
                 ratios: Sequence[float] = (0.8, 0.1, 0.1), caption_templates: Sequence[str] | None = None,
                 random_caption: bool = False):
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8 (the digits are 8 x 8), got {size!r}")
        if random_caption and caption_templates is None:
            raise ValueError("random_caption: needs caption_templates to draw from")
        images, labels = load_digits_images(size)
        self.indices = torch.from_numpy(split_by_ratios(len(labels), ratios, seed, split))
        if len(self.indices) == 0:
            raise ValueError(f"the {split} split is empty with ratios {list(ratios)}")
        self.images, self.labels = images, labels
        self.caption_templates = None if caption_templates is None else check_caption_templates(caption_templates)
        self.random_caption = random_caption

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        source = int(self.indices[index])
        item = {"image": self.images[source].clone(), "class_label": self.labels[source].clone()}
        if self.caption_templates is not None:
            if self.random_caption:  # the loader seeds each worker's torch generator
                choice = int(torch.randint(len(self.caption_templates), ()))
            else:
                choice = index % len(self.caption_templates)
            item["caption"] = digit_caption(self.caption_templates[choice], int(item["class_label"]))
        return item
