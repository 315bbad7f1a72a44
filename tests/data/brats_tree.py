"""Tiny BraTS 2021 trees of NIfTI files for the volume dataset tests."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")


def head_and_tumour(shape: tuple[int, int, int], seed: int, tumour_centre: tuple[int, int, int] | None = None):
    """A noisy ellipsoid 'head' (0 outside) and a tumour label map with labels 1 (core), 4 (rim), 2 (oedema)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))
    radii = np.array(shape)[:, None, None, None] * 0.4
    head = ((grid / radii) ** 2).sum(0) <= 1
    centre = np.array(tumour_centre if tumour_centre is not None else [s // 2 + 2 for s in shape])
    distance = np.sqrt(((np.stack(np.indices(shape)) - centre[:, None, None, None]) ** 2).sum(0))
    seg = np.select([distance <= 1.5, distance <= 2.5, distance <= 4], [1, 4, 2], 0).astype(np.uint8)
    seg[~head] = 0
    channels = {m: np.where(head, 100 + 50 * i + 20 * rng.standard_normal(shape) + 80 * (seg > 0), 0)
                for i, m in enumerate(MODALITIES)}
    return channels, seg


def write_subject(root: Path, name: str, shape=(24, 24, 24), seed: int = 0, affine=None, tumour_centre=None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    channels, seg = head_and_tumour(shape, seed, tumour_centre)
    for modality, volume in channels.items():
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(folder / f"{name}_{modality}.nii.gz"))
    nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{name}_seg.nii.gz"))
    return folder


def write_tree(root: Path, count: int = 5, shape=(24, 24, 24)) -> list[str]:
    names = [f"BraTS2021_{i:05d}" for i in range(count)]
    for i, name in enumerate(names):
        write_subject(root, name, shape, seed=i)
    return names
