"""`ImageFolder`: 2D images (PNG, JPEG) found by a recursive glob, optionally labelled by their class sub-folder.

Per item: read with Pillow (EXIF orientation applied) as grayscale or RGB in [0, 1] (16-bit grayscale PNGs keep
their 16 bits) -> optional resize (aspect kept) so the image just covers `size` -> pad or refuse an image still
smaller than `size` -> random or centre crop to `size` -> scale to [-1, 1].
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.transforms import BAD_FILE_MODES, SMALL_ITEM_MODES, DataFileError, split_by_ratios, split_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CROP_MODES = ("random", "center")
#: Pillow modes of 16-bit grayscale PNGs; every other mode is read through Pillow's 8-bit "L" or "RGB".
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: EXIF orientations that turn the image by 90 degrees, swapping its width and height.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a dataset's `size` parameter: one positive int for squares, or [height, width]."""
    sizes = [size, size] if isinstance(size, int) else size
    if isinstance(sizes, str) or len(sizes) != 2 or any(int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"size must be a positive int or [height, width], got {size!r}")
    return int(sizes[0]), int(sizes[1])


def inspect_image(path: str) -> tuple[str | None, tuple[int, int]]:
    """(problem or None, (height, width) as displayed) of an image file, from its header and Pillow's `verify`
    (which walks a PNG's chunks and checksums without decoding; a JPEG's data are only checked when decoded)."""
    try:
        with Image.open(path) as image:
            image.verify()  # must come first: it leaves the image unusable, so the header is read again below
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except Exception as err:  # Pillow raises many types for broken files; all mean "cannot use this file"
        return f"cannot read image file {path}: {type(err).__name__}: {err}", (0, 0)
    return None, (height, width)


def read_image(path: str, channels: int) -> torch.Tensor:
    """The image at `path` as (channels, H, W) float32 in [0, 1]; a file that cannot be decoded raises
    DataFileError naming it. 16-bit grayscale is divided by 65535, everything else goes through 8-bit L or RGB."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in SIXTEEN_BIT_MODES:
                pixels = np.clip(np.asarray(image, dtype=np.float32) / 65535, 0, 1)[None]
                pixels = np.repeat(pixels, channels, axis=0)
            else:
                pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
                pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    except Exception as err:
        raise DataFileError(f"cannot decode image file {path}: {type(err).__name__}: {err}") from None
    return torch.from_numpy(np.ascontiguousarray(pixels))


def resize_to_cover(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale image (C, H, W) with its aspect ratio kept so that it just covers `size` (H, W) on both axes.

    Antialiased bilinear: its weights are convex, so values stay in [0, 1]."""
    height, width = image.shape[1:]
    scale = max(size[0] / height, size[1] / width)
    target = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    if target == (height, width):
        return image
    return F.interpolate(image[None], size=target, mode="bilinear", antialias=True, align_corners=False)[0]


def pad_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad image (C, H, W) with zeros (black), evenly on both sides, to at least `size` (H, W)."""
    missing = [max(0, target - have) for target, have in zip(size, image.shape[1:])]
    return F.pad(image, (missing[1] // 2, missing[1] - missing[1] // 2, missing[0] // 2, missing[0] - missing[0] // 2))


class ImageFolder(Dataset):
    """Files under `root` matching `image_glob` whose suffix is in `extensions` (case-insensitive), sorted by path.

    `split` takes its part of a seeded permutation cut by `split_ratios` (train, validation, test); with
    `split_ratios: null` every file belongs to the split (for folders that are split already). `class_from_folder`
    labels each image by the first folder of its path under `root`, indexed in sorted order of all class folders
    found (or in the order of `classes`, when given), so every split shares one index.

    `channels`: 1 (grayscale) or 3 (RGB). `size`: crop (H, W) or one int for a square. `resize`: scale each image,
    aspect kept, to just cover `size` before cropping; without it an image smaller than `size` is padded with black
    (`small_image: pad`) or refused (`small_image: error`, checked from the headers when the dataset is built).
    `crop`: "random" or "center" (default: random for train, centre otherwise; random crops draw from torch's
    global generator, which PyTorch seeds per loader worker).

    Files are checked at construction (unreadable, not an image, a PNG failing its checksums): a bad file raises
    DataFileError naming it, or with `on_bad_file: skip` is left out with one warning giving the count. Data that
    are corrupt beyond what the check sees (a truncated JPEG) raise DataFileError when the item is read, which the
    loaders of `ldm.data.base` apply `on_bad_file` to as well.

    Items: `image` (channels, H, W) float32 in [-1, 1], `path` str, and with `class_from_folder` a
    `class_label` int64 scalar.
    """

    def __init__(self, root: str, size: int | Sequence[int] = 64, split: str = "train", image_glob: str = "**/*",
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, channels: int = 3, resize: bool = True,
                 crop: str | None = None, small_image: str = "error", class_from_folder: bool = False,
                 classes: Sequence[str] | None = None, split_ratios: Sequence[float] | None = (0.8, 0.1, 0.1),
                 seed: int = 0, on_bad_file: str = "error"):
        self.split = split_name(split)
        self.size = image_size(size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.crop = crop or ("random" if self.split == "train" else "center")
        for name, value, modes in [("crop", self.crop, CROP_MODES), ("small_image", small_image, SMALL_ITEM_MODES),
                                   ("on_bad_file", on_bad_file, BAD_FILE_MODES)]:
            if value not in modes:
                raise ValueError(f"{name} must be one of {', '.join(modes)}, got {value!r}")
        if classes is not None and not class_from_folder:
            raise ValueError("classes is given but class_from_folder is false: set class_from_folder: true")
        self.channels, self.resize, self.small_image = channels, resize, small_image
        self.on_bad_file = on_bad_file  # also applies when an item is read (see ldm.data.base.ItemSeededDataset)

        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"image folder root {root} does not exist or is not a folder")
        suffixes = tuple(extension.lower() for extension in extensions)
        names = sorted(p.relative_to(root_path).as_posix() for p in root_path.glob(image_glob)
                       if p.is_file() and p.suffix.lower() in suffixes)
        if not names:
            raise FileNotFoundError(f"no image files found: root {root}, pattern {image_glob}, "
                                    f"extensions {', '.join(suffixes)}")
        self.classes = self._class_index(names, classes) if class_from_folder else None
        if split_ratios is not None:
            names = [names[i] for i in sorted(split_by_ratios(len(names), split_ratios, seed, self.split))]
            if not names:
                raise ValueError(f"the {self.split} split of root {root} (pattern {image_glob}) is empty with "
                                 f"split_ratios {list(split_ratios)}")
        names = self._check_files(root_path, names, on_bad_file)
        self.files = [str(root_path / name) for name in names]
        self.class_labels = [self.classes.index(name.split("/")[0]) for name in names] if self.classes else None

    @staticmethod
    def _class_index(names: list[str], classes: Sequence[str] | None) -> list[str]:
        """Class names in index order: `classes` as given, or the sorted first folders of `names`."""
        unfiled = [name for name in names if "/" not in name]
        if unfiled:
            raise ValueError(f"class_from_folder: {len(unfiled)} images lie directly in root, not in a class "
                             f"folder (e.g. {unfiled[0]})")
        found = sorted({name.split("/")[0] for name in names})
        if classes is None:
            return found
        unknown = [folder for folder in found if folder not in classes]
        if unknown:
            raise ValueError(f"class folders {unknown} are not in classes {list(classes)}")
        return list(classes)

    def _check_files(self, root: Path, names: list[str], on_bad_file: str) -> list[str]:
        problems = {}
        for name in names:
            problem, shape = inspect_image(str(root / name))
            if problem is None and not self.resize and self.small_image == "error" and (
                    shape[0] < self.size[0] or shape[1] < self.size[1]):
                raise DataFileError(f"{root / name}: image of {shape[0]} x {shape[1]} pixels is smaller than size "
                                    f"{list(self.size)} (small_image: pad pads it, resize: true scales it)")
            if problem is not None and on_bad_file == "error":
                raise DataFileError(f"{problem} (on_bad_file: skip leaves such files out)")
            if problem is not None:
                problems[name] = problem
        if problems:
            listed = "; ".join(list(problems.values())[:5])
            warnings.warn(f"skipped {len(problems)} of {len(names)} images for bad files ({listed})", stacklevel=3)
        kept = [name for name in names if name not in problems]
        if not kept:
            raise ValueError(f"the {self.split} split of root {root}: every image was skipped for bad files")
        return kept

    def __len__(self) -> int:
        return len(self.files)

    def crop_start(self, shape: Sequence[int]) -> list[int]:
        """Top-left corner (row, column) of the `size` crop of an image of spatial `shape` (H, W)."""
        if self.crop == "center":
            return [(have - want) // 2 for have, want in zip(shape, self.size)]
        return [int(torch.randint(0, have - want + 1, ())) for have, want in zip(shape, self.size)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        path = self.files[index]
        image = read_image(path, self.channels)
        image = resize_to_cover(image, self.size) if self.resize else pad_to(image, self.size)
        top, left = self.crop_start(image.shape[1:])
        image = image[:, top:top + self.size[0], left:left + self.size[1]]
        item = {"image": (image * 2 - 1).contiguous(), "path": path}
        if self.class_labels is not None:
            item["class_label"] = torch.tensor(self.class_labels[index], dtype=torch.int64)
        return item
