"""Reading what `evaluate.py` scores: folders of NIfTI / PNG images, masks, label tables, and the sample files a
diffusion run's test stage saved. The rules are stated in ldm/evaluate_cli.py's docstring."""
from __future__ import annotations

import csv
import glob
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".png")
INTENSITY_RULES = ("percentile", "minmax", "none")
# What the test stage (ldm.engine.loop.Trainer.test through save_images) names its samples: one PNG grid per batch
# and rank, and for 3D one NIfTI file per item.
TEST_SAMPLE_FILE = re.compile(r"^samples_b-(?P<batch>\d+)_r-(?P<rank>\d+)(?:_(?P<item>\d+))?\.(?P<kind>nii\.gz|png)$")
MANIFEST_LABEL = re.compile(r"^label (-?\d+)$")


class EvaluationInputError(ValueError):
    """Input that cannot be scored; the message names the file, folder or flag at fault."""


def file_stem(path: Path) -> str:
    """The file name without .nii.gz, .nii or .png."""
    name = path.name
    return next((name[: -len(suffix)] for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), name)


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def listed_files(source: str, flag: str) -> tuple[list[Path], Path]:
    """(image files, their folder) of a folder or glob pattern; a sample.py folder gives its manifest's samples."""
    path = Path(source)
    if path.is_dir():
        folder = path
        manifest = path / "manifest.json"
        if manifest.is_file():
            return manifest_files(manifest), folder
        candidates = sorted(path.iterdir())
    else:
        candidates = sorted(Path(p) for p in glob.glob(source))
        folder = path.parent
        if not candidates and not glob.has_magic(source):
            raise EvaluationInputError(f"{flag} {source}: no such folder")
    files = [p for p in candidates if p.is_file() and p.name.endswith(IMAGE_SUFFIXES)]
    if not files:
        raise EvaluationInputError(f"{flag} {source}: no .nii, .nii.gz or .png files there")
    return files, folder


def manifest_files(manifest: Path) -> list[Path]:
    """The samples a sample.py manifest lists: each one's NIfTI file if it has one, else its PNG."""
    entries = json.loads(manifest.read_text()).get("samples", [])
    files = []
    for entry in entries:
        names = entry.get("files", [])
        chosen = next((n for n in names if n.endswith(NIFTI_SUFFIXES)), next(iter(names), None))
        if chosen is not None:
            files.append(manifest.parent / chosen)
    if not files:
        raise EvaluationInputError(f"{manifest}: lists no sample files")
    return files


def load_nifti(path: Path, reorient: bool = True):
    """The nibabel image at `path`, reoriented to RAS when it has 3 or more axes and `reorient`."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        return nib.as_closest_canonical(image) if reorient and len(image.shape) >= 3 else image
    except Exception as err:  # nibabel raises many types for broken files
        raise EvaluationInputError(f"cannot read NIfTI file {path}: {type(err).__name__}: {err}") from None


def channels_first(array: np.ndarray, path: Path) -> np.ndarray:
    """(X, Y) -> (1, X, Y); (X, Y, Z) -> (1, X, Y, Z); (X, Y, Z, C) -> (C, X, Y, Z)."""
    if array.ndim in (2, 3):
        return array[None]
    if array.ndim == 4:
        return np.moveaxis(array, -1, 0)
    raise EvaluationInputError(f"{path}: NIfTI of shape {list(array.shape)}, expected 2D, 3D or 3D with channels")


def nifti_shape(path: Path) -> tuple[int, ...]:
    """(C, *spatial) of a NIfTI image as `read_nifti` gives it, from its header."""
    shape = tuple(int(s) for s in load_nifti(path).shape)
    return channels_first(np.empty(shape, dtype=np.uint8), path).shape


def read_nifti(path: Path) -> np.ndarray:
    """(C, *spatial) float32, RAS for 3D."""
    return channels_first(np.asarray(load_nifti(path).dataobj, dtype=np.float32), path)


def to_unit_range(image: np.ndarray, rule: str, percentiles: tuple[float, float]) -> np.ndarray:
    """image (C, *spatial) -> float32 in [-1, 1] per channel by `rule` (module docstring)."""
    if rule == "none":
        return image.astype(np.float32)
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    if rule == "minmax":
        low, high = flat.min(axis=1), flat.max(axis=1)
    else:
        low, high = np.percentile(flat, percentiles, axis=1)
    span = np.where(high > low, high - low, 1.0)[:, None]
    scaled = np.where((high > low)[:, None], (flat - low[:, None]) / span * 2 - 1, -1.0)
    return np.clip(scaled, -1, 1).reshape(image.shape).astype(np.float32)


def read_png_folder(files: Sequence[Path]) -> list[np.ndarray]:
    """Each PNG (C, H, W) float32 in [-1, 1]: C = 1 when every image is grey, else 3."""
    from ldm.data.image_folder import read_image
    from ldm.data.transforms import DataFileError

    try:
        images = [read_image(str(path), 3).numpy() for path in files]
    except DataFileError as err:
        raise EvaluationInputError(str(err)) from None
    grey = all(np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2]) for image in images)
    return [(image[:1] if grey else image) * 2 - 1 for image in images]


class ImageSet:
    """The images of a folder (or glob pattern): one kind (NIfTI or PNG), one shape (C, *spatial), in [-1, 1].

    NIfTI volumes are read batch by batch (shapes from the headers first); PNG images all at once."""

    def __init__(self, source: str, flag: str, intensity: str, percentiles: tuple[float, float]):
        self.source, self.flag = source, flag
        self.files, self.folder = listed_files(source, flag)
        kinds = {is_nifti(path): path for path in self.files}
        if len(kinds) > 1:
            raise EvaluationInputError(f"{flag} {source}: holds NIfTI ({kinds[True].name}) and PNG "
                                       f"({kinds[False].name}) files; pick one kind with a glob pattern, e.g. "
                                       f"'{Path(source) / '*.nii.gz'}'")
        self.kind = "nifti" if is_nifti(self.files[0]) else "png"
        self.intensity, self.percentiles = intensity, percentiles
        self.png = read_png_folder(self.files) if self.kind == "png" else None
        shapes = [image.shape for image in self.png] if self.png is not None else [nifti_shape(p) for p in self.files]
        odd = next((index for index, shape in enumerate(shapes) if shape != shapes[0]), None)
        if odd is not None:
            raise EvaluationInputError(f"{flag} {source}: images of different shapes: {self.files[0].name} "
                                       f"{list(shapes[0])}, {self.files[odd].name} {list(shapes[odd])} "
                                       f"(shapes as (C, *spatial))")
        self.shape = tuple(shapes[0])

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> torch.Tensor:
        """Image `index`: (C, *spatial) float32 in [-1, 1]."""
        if self.png is not None:
            return torch.from_numpy(self.png[index])
        return torch.from_numpy(to_unit_range(read_nifti(self.files[index]), self.intensity, self.percentiles))

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(indices, images (B, C, *spatial)) in file order."""
        for start in range(0, len(self), batch_size):
            indices = list(range(start, min(start + batch_size, len(self))))
            yield indices, torch.stack([self.image(index) for index in indices])

    def check_matches(self, other: ImageSet) -> None:
        if other.shape != self.shape:
            raise EvaluationInputError(f"{self.flag} and {other.flag} differ in shape: {self.files[0]} "
                                       f"{list(self.shape)}, {other.files[0]} {list(other.shape)} "
                                       f"(shapes as (C, *spatial))")

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "count": len(self), "shape": list(self.shape),
                "first": self.files[0].name, "last": self.files[-1].name}


# ------------------------------------------------------------------------------------------------ masks, labels
def parse_integers(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EvaluationInputError(f"{flag} {text}: expected comma-separated integers") from None


def read_mask(path: Path, spatial: tuple[int, ...], mask_labels: Sequence[int] | None) -> torch.Tensor:
    """A mask file for images of `spatial` shape -> one-hot (K, *spatial) or class indices (1, *spatial) float32."""
    if is_nifti(path):
        data = np.asarray(load_nifti(path, reorient=len(spatial) == 3).dataobj, dtype=np.float32)
    else:
        from PIL import Image

        with Image.open(path) as image:
            data = np.asarray(image, dtype=np.float32)
    if data.ndim == len(spatial) + 1:
        mask = np.moveaxis(data, -1, 0)
    elif data.ndim == len(spatial):
        rounded = np.rint(data)
        if not np.allclose(rounded, data, atol=1e-3):
            raise EvaluationInputError(f"mask {path}: a label map must hold integer labels, found fractional values")
        values = sorted(np.unique(rounded).astype(int).tolist())
        if mask_labels is not None:
            unexpected = sorted(set(values) - set(mask_labels))
            if unexpected:
                raise EvaluationInputError(f"mask {path}: label values {unexpected[:8]} not in --mask_labels "
                                           f"{list(mask_labels)}")
            classes = np.zeros_like(rounded)
            for index, label in enumerate(mask_labels):
                classes[rounded == label] = index
            rounded = classes
        elif values[0] < 0:
            raise EvaluationInputError(f"mask {path}: negative label {values[0]}; list the labels with --mask_labels")
        mask = rounded[None]
    else:
        raise EvaluationInputError(f"mask {path}: shape {list(data.shape)}, expected a label map of the images' "
                                   f"spatial shape {list(spatial)} or that with channels along a last axis")
    if tuple(mask.shape[1:]) != tuple(spatial):
        raise EvaluationInputError(f"mask {path}: spatial shape {list(mask.shape[1:])}, the images' is "
                                   f"{list(spatial)}")
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))


def paired_files(samples: Sequence[Path], others: Sequence[Path], flag: str) -> tuple[list[Path], str]:
    """The file of `others` for each sample: of the same name when every sample has one, else by sorted order."""
    by_name = {file_stem(path): path for path in others}
    if all(file_stem(path) in by_name for path in samples):
        return [by_name[file_stem(path)] for path in samples], "name"
    if len(others) == len(samples):
        return list(others), "order"
    missing = next(path for path in samples if file_stem(path) not in by_name)
    raise EvaluationInputError(f"{flag}: {len(others)} files for {len(samples)} samples, and none is named like "
                               f"{missing.name}; give one per sample (paired by name, else by sorted order)")


def read_label_table(path: Path) -> dict[str, int]:
    """A CSV (name,class rows; a header row allowed) or JSON ({name: class}) file -> {name: class}."""
    if not path.is_file():
        raise EvaluationInputError(f"--labels {path}: no such file")
    try:
        if path.suffix.lower() == ".json":
            rows = list(json.loads(path.read_text()).items())
        else:
            rows = [row for row in csv.reader(path.read_text().splitlines()) if row]
    except (json.JSONDecodeError, AttributeError, csv.Error) as err:
        raise EvaluationInputError(f"--labels {path}: expected a JSON object or name,class CSV rows ({err})") from None
    table = {}
    for position, row in enumerate(rows):
        try:
            name, label = row[0], int(row[1])
        except (ValueError, IndexError, TypeError):
            if position == 0 and path.suffix.lower() != ".json":
                continue  # a CSV header
            raise EvaluationInputError(f"--labels {path}: entry {list(row)} is not name,<integer class>") from None
        table[str(name)] = label
    return table


def labels_of(files: Sequence[Path], table: dict[str, int]) -> torch.Tensor | None:
    """(N,) int64 classes of `files` looked up by name or stem; None when one is missing."""
    labels = [table.get(path.name, table.get(file_stem(path))) for path in files]
    return None if any(label is None for label in labels) else torch.tensor(labels, dtype=torch.int64)


def manifest_labels(samples: ImageSet) -> dict[str, int]:
    """{file name: class} from a sample.py manifest's "label k" conditions ({} without them)."""
    manifest = samples.folder / "manifest.json"
    if not (Path(samples.source).is_dir() and manifest.is_file()):
        return {}
    table = {}
    for entry in json.loads(manifest.read_text()).get("samples", []):
        match = MANIFEST_LABEL.match(str(entry.get("condition")))
        if match:
            table.update({name: int(match.group(1)) for name in entry.get("files", [])})
    return table


# ------------------------------------------------------------------------------------------------ test-stage files
def saved_test_samples(folder: Path, since: float | None) -> dict[int, dict[int, dict]]:
    """{rank: {batch: {"png": path, "nifti": {item: path}}}} of the test stage's sample files (modified at or after
    `since`, a time.time(), when given)."""
    found: dict[int, dict[int, dict]] = {}
    for path in sorted(folder.glob("samples_b-*")) if folder.is_dir() else ():
        match = TEST_SAMPLE_FILE.match(path.name)
        if match is None or (since is not None and path.stat().st_mtime < since):
            continue
        entry = found.setdefault(int(match["rank"]), {}).setdefault(int(match["batch"]), {"png": None, "nifti": {}})
        if match["kind"] == "png":
            entry["png"] = path
        elif match["item"] is not None:
            entry["nifti"][int(match["item"])] = path
    return found


def read_test_batch(entry: dict, like: torch.Tensor) -> tuple[torch.Tensor, list[Path]]:
    """One batch's samples (B, C, *spatial) shaped like the batch's real images `like`, and their files: the NIfTI
    volumes for 3D, the PNG grid (one item per row, channels as to_grid lays them out) for 2D."""
    count, channels, spatial = like.shape[0], like.shape[1], tuple(like.shape[2:])
    if len(spatial) == 3:
        files = [entry["nifti"].get(index) for index in range(count)]
        if None in files:
            raise EvaluationInputError(f"{next(iter(entry['nifti'].values()), entry['png'])}: the test stage saved "
                                       f"{len(entry['nifti'])} sample volume(s) for a batch of {count}")
        volumes = [torch.from_numpy(read_nifti(path)) for path in files]
        for path, volume in zip(files, volumes):
            if tuple(volume.shape) != tuple(like.shape[1:]):
                raise EvaluationInputError(f"{path}: shape {list(volume.shape)}, the test split's images are "
                                           f"{list(like.shape[1:])} (shapes as (C, *spatial))")
        return torch.stack(volumes), files
    from PIL import Image

    path = entry["png"]
    with Image.open(path) as image:
        grid = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    height, width = spatial
    columns = width * (1 if channels in (1, 3) else channels)
    if tuple(grid.shape[1:]) != (count * height, columns):
        raise EvaluationInputError(f"{path}: a {grid.shape[1]} x {grid.shape[2]} grid, expected {count} rows of "
                                   f"{height} x {columns} for the test batch of shape {list(like.shape)}")
    rows = grid.reshape(3, count, height, columns).transpose(0, 1)  # (B, 3, H, W')
    if channels == 3:
        return rows, [path]
    return rows[:, 0].reshape(count, height, channels, width).transpose(1, 2), [path]
