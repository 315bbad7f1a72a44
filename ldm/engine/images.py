"""Turn model images into files a person can open: PNG grids (3D as orthogonal mid-slices) and NIfTI volumes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F


def mid_slices(volume: torch.Tensor) -> torch.Tensor:
    """volume: (C, D, H, W) -> (C, S, 3*S): the mid-slices across D, H and W side by side, each padded to S x S."""
    c, d, h, w = volume.shape
    views = [volume[:, d // 2], volume[:, :, h // 2], volume[:, :, :, w // 2]]  # (C,H,W), (C,D,W), (C,D,H)
    side = max(d, h, w)
    pad_value = float(volume.min()) if volume.numel() else 0.0
    padded = [F.pad(v, (0, side - v.shape[-1], 0, side - v.shape[-2]), value=pad_value) for v in views]
    return torch.cat(padded, dim=-1)


def to_grid(images: torch.Tensor, clamp: bool = True) -> np.ndarray:
    """images: (B, C, H, W) or (B, C, D, H, W) in [-1, 1] -> uint8 (rows, cols, 3), one sample per row.

    One channel is grey, three are RGB, any other count shows each channel as its own grey tile.
    """
    images = images.detach().float().cpu()
    if clamp:
        images = images.clamp(-1.0, 1.0)
    if images.ndim == 5:
        images = torch.stack([mid_slices(v) for v in images])
    if images.ndim != 4:
        raise ValueError(f"to_grid: expected (B, C, H, W) or (B, C, D, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if c != 3:  # tiles: (B, C, H, W) -> (B, 1, H, C*W)
        images = images.permute(0, 2, 1, 3).reshape(b, 1, h, c * w)
    rows = torch.cat(list(images), dim=-2)  # (C', B*H, W')
    rows = ((rows + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if rows.shape[0] == 1:
        rows = rows.expand(3, -1, -1)
    return rows.permute(1, 2, 0).numpy()


def save_png(grid: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def save_nifti(volume: torch.Tensor, path: str | Path, affine: np.ndarray | None = None) -> None:
    """volume: (C, D, H, W) -> a float32 NIfTI of shape (D, H, W) for one channel, else (D, H, W, C).

    The axes keep the order the dataset read them in, so the source file's `affine` (identity if None) places the
    volume where the source was.
    """
    import nibabel as nib

    array = volume.detach().float().cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4) if affine is None else affine), str(path))


def batch_affines(batch: Any) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """The batch's per-item voxel-to-world matrices (B, 4, 4) and the spatial shape they belong to (its `image`'s),
    or (None, None) when the dataset gives none."""
    if not isinstance(batch, dict) or not all(torch.is_tensor(batch.get(key)) for key in ("affine", "image")):
        return None, None
    return batch["affine"], tuple(batch["image"].shape[2:])


def save_images(images: dict[str, torch.Tensor], directory: str | Path, stem: str, clamp: bool = True,
                nifti: bool = False, affines: torch.Tensor | None = None,
                affine_shape: tuple[int, ...] | None = None) -> list[Path]:
    """Save each entry as `<directory>/<name>_<stem>.png`; 3D entries also as one NIfTI per sample when `nifti`.

    affines: (B, 4, 4) voxel-to-world matrices of the batch's images (see `batch_affines`); written into the NIfTI
    files of entries whose spatial shape is `affine_shape` (inputs, reconstructions, samples at image size), identity
    elsewhere (e.g. latents)."""
    directory = Path(directory)
    written = []
    for name, batch in images.items():
        png = directory / f"{name}_{stem}.png"
        save_png(to_grid(batch, clamp=clamp), png)
        written.append(png)
        if nifti and batch.ndim == 5:
            placed = affines is not None and tuple(batch.shape[2:]) == affine_shape
            for index, volume in enumerate(batch):
                nii = directory / f"{name}_{stem}_{index:02d}.nii.gz"
                affine = affines[index].detach().cpu().double().numpy() if placed and index < len(affines) else None
                save_nifti(volume, nii, affine)
                written.append(nii)
    return written
