"""`CaptionedImages`: image + caption pairs for text-to-image fine-tuning, with SDXL's size and crop conditioning.

Two layouts, as diffusers' training scripts read them: a folder of images each with a `.txt` caption of the same
stem beside it (`a/cat.png` + `a/cat.txt`), or a `metadata.jsonl` in `root` with one JSON object per line naming
`file_name` (relative to root) and its caption (`text`, or the column `caption_column` names).

Per item: read (as `ldm.data.image_folder`) -> resize, aspect kept, so the image just covers its target size ->
random or centre crop to it -> optional horizontal flip -> scale to [-1, 1]. The target size is `size`, or with
`buckets` (multi-aspect training, `ldm.data.buckets`) the bucket of nearest aspect ratio to the image's, chosen from
the file's header when the dataset is built; the data module then draws each batch from one bucket. SDXL's
micro-conditioning is filled from what was done: `original_size_as_tuple` the file's (H, W), `crop_coords_top_left`
the crop's (top, left) in the resized image (flipped with it: the crop of the mirrored image), `target_size_as_tuple`
the output (H, W).

Caption dropout for classifier-free guidance is not done here: the model's `ucg_rate` (LatentDiffusion: the text
encoder's empty-prompt features; a GeneralConditioner's embedder: zeros, as sgm) drops conditions per item.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ldm.data.buckets import Buckets, nearest_bucket
from ldm.data.image_folder import (CROP_MODES, IMAGE_EXTENSIONS, image_size, inspect_image, read_image,
                                   resize_to_cover)
from ldm.data.transforms import BAD_FILE_MODES, DataFileError, split_by_ratios, split_name

METADATA_FILE = "metadata.jsonl"
CAPTION_SOURCES = ("auto", "txt", "metadata")


def read_caption(path: Path) -> str:
    """The caption in text file `path`, stripped; a missing or undecodable file raises DataFileError naming it."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(f"cannot read caption file {path}: {type(err).__name__}: {err}") from None


def read_metadata(path: Path, caption_column: str) -> list[tuple[str, str]]:
    """(file_name, caption) per line of a diffusers `metadata.jsonl`; a malformed line raises DataFileError naming
    the file and line (the whole listing is unusable, whatever on_bad_file says)."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{number}: not a JSON object ({err})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not isinstance(
                entry.get(caption_column), str):
            raise DataFileError(f"{path}:{number}: needs string entries file_name and {caption_column} "
                                f"(caption_column names the caption's), got {line.strip()[:120]}")
        pairs.append((entry["file_name"], entry[caption_column].strip()))
    if not pairs:
        raise DataFileError(f"{path}: no entries")
    return pairs


class CaptionedImages(Dataset):
    """Images under `root` with their captions (module docstring), sorted by path.

    captions: `txt`, `metadata`, or `auto` (metadata when root holds metadata.jsonl, else txt). size: crop (H, W)
    or one int (default 512). buckets: instead of size, `{resolution, step, max_ratio, drop_last}` (see
    `ldm.data.buckets.Buckets`); `bucket_ids` then holds each item's index into `buckets.sizes`. crop: random or
    center (default: random for train, centre otherwise). flip: mirror left-right with probability 1/2. Random
    draws use torch's global generator (seeded per item by `ldm.data.base`'s loaders).
    `split` takes its part of a seeded permutation cut by `split_ratios`; null: every pair is in the split.

    A pair whose image fails Pillow's check or whose caption is missing or unreadable raises DataFileError naming
    the file, or with `on_bad_file: skip` is left out with one warning giving the count; an image found corrupt
    only when decoded raises DataFileError when read, which the loaders apply on_bad_file to as well.

    Items: `image` (3, H, W) float32 in [-1, 1], `txt` str, `path` str, `original_size_as_tuple`,
    `crop_coords_top_left`, `target_size_as_tuple` each (2,) int64.
    """

    def __init__(self, root: str, size: int | Sequence[int] | None = None, split: str = "train",
                 captions: str = "auto", caption_column: str = "text", crop: str | None = None, flip: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, split_ratios: Sequence[float] | None = None,
                 seed: int = 0, on_bad_file: str = "error", buckets: Mapping[str, Any] | None = None):
        self.split = split_name(split)
        if size is not None and buckets is not None:
            raise ValueError("size and buckets exclude each other: buckets choose each image's size")
        self.size = image_size(512 if size is None else size)
        self.buckets = None if buckets is None else Buckets.from_config(buckets)
        self.crop = crop or ("random" if self.split == "train" else "center")
        for name, value, modes in [("crop", self.crop, CROP_MODES), ("captions", captions, CAPTION_SOURCES),
                                   ("on_bad_file", on_bad_file, BAD_FILE_MODES)]:
            if value not in modes:
                raise ValueError(f"{name} must be one of {', '.join(modes)}, got {value!r}")
        self.flip = bool(flip)
        self.on_bad_file = on_bad_file  # also applies when an item is read (see ldm.data.base.ItemSeededDataset)
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"caption data root {root} does not exist or is not a folder")
        if captions == "auto":
            captions = "metadata" if (root_path / METADATA_FILE).is_file() else "txt"
        if captions == "metadata":
            if not (root_path / METADATA_FILE).is_file():
                raise FileNotFoundError(f"captions: metadata needs {root_path / METADATA_FILE}")
            pairs = sorted(read_metadata(root_path / METADATA_FILE, caption_column))
        else:
            suffixes = tuple(extension.lower() for extension in extensions)
            pairs = [(p.relative_to(root_path).as_posix(), None) for p in sorted(root_path.glob("**/*"))
                     if p.is_file() and p.suffix.lower() in suffixes]
        if not pairs:
            raise FileNotFoundError(f"no image files found under {root} (extensions {', '.join(extensions)})")
        if split_ratios is not None:
            pairs = [pairs[i] for i in sorted(split_by_ratios(len(pairs), split_ratios, seed, self.split))]
            if not pairs:
                raise ValueError(f"the {self.split} split of {root} is empty with split_ratios {list(split_ratios)}")
        self.files, self.captions, shapes = self._checked(root_path, pairs)
        self.bucket_ids = None if self.buckets is None else [nearest_bucket(*shape, self.buckets.sizes)
                                                             for shape in shapes]

    def _checked(self, root: Path, pairs: list[tuple[str, str | None]]
                 ) -> tuple[list[str], list[str], list[tuple[int, int]]]:
        """Files, captions and image (H, W) of the usable pairs."""
        files, captions, shapes, problems = [], [], [], []
        for name, caption in pairs:
            path = root / name
            problem, shape = inspect_image(str(path))
            if problem is None and caption is None:
                try:
                    caption = read_caption(path.with_suffix(".txt"))
                except DataFileError as err:
                    problem = str(err)
            if problem is not None and self.on_bad_file == "error":
                raise DataFileError(f"{problem} (on_bad_file: skip leaves such pairs out)")
            if problem is not None:
                problems.append(problem)
                continue
            files.append(str(path))
            captions.append(caption)
            shapes.append(shape)
        if problems:
            warnings.warn(f"skipped {len(problems)} of {len(pairs)} image-caption pairs for bad files "
                          f"({'; '.join(problems[:5])})", stacklevel=3)
        if not files:
            raise ValueError(f"the {self.split} split of {root}: every pair was skipped for bad files")
        return files, captions, shapes

    def __len__(self) -> int:
        return len(self.files)

    def target_size(self, index: int) -> tuple[int, int]:
        """(H, W) of item `index`: `size`, or its bucket's."""
        return self.size if self.bucket_ids is None else self.buckets.sizes[self.bucket_ids[index]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image = read_image(self.files[index], 3)
        original = image.shape[1:]
        size = self.target_size(index)
        image = resize_to_cover(image, size)
        height, width = image.shape[1:]
        if self.crop == "center":
            top, left = (height - size[0]) // 2, (width - size[1]) // 2
        else:
            top = int(torch.randint(0, height - size[0] + 1, ()))
            left = int(torch.randint(0, width - size[1] + 1, ()))
        image = image[:, top:top + size[0], left:left + size[1]]
        if self.flip and bool(torch.rand(()) < 0.5):
            image, left = image.flip(-1), width - left - size[1]
        return {"image": (image * 2 - 1).contiguous(), "txt": self.captions[index], "path": self.files[index],
                "original_size_as_tuple": torch.tensor(original, dtype=torch.int64),
                "crop_coords_top_left": torch.tensor((top, left), dtype=torch.int64),
                "target_size_as_tuple": torch.tensor(size, dtype=torch.int64)}
