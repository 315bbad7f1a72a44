"""Side-by-side figure of the 3D demo's test stage: per test item, its tissue mask, the generated T1 crop and the real
T1 crop of that mask, each as axial / coronal / sagittal mid-slices.

    python scripts/demo_figure.py logs/demo/<time>_demo_ldm [out.png]

Reads the run's `images/test/{conditioning,samples}_b-XXXX_r-0_YY.nii.gz` (as the test stage writes them) and the
real crops from the run's test split (ldm.data.demo.MNI152Crops, items in batch order). Default output:
`<run>/images/test/comparison.png`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.util import instantiate_from_config  # noqa: E402

#: RGB of background / grey matter / white matter in the mask column.
TISSUE_COLOURS = np.array([[0, 0, 0], [230, 120, 40], [250, 240, 200]], dtype=np.uint8)


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """volume: (X, Y, Z) RAS -> [axial, coronal, sagittal] mid-slices, each turned so that up is superior/anterior."""
    x, y, z = (size // 2 for size in volume.shape)
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def grey(volume: np.ndarray) -> list[np.ndarray]:
    """Intensities in [-1, 1] -> RGB uint8 mid-slices."""
    return [np.repeat(((s.clip(-1, 1) + 1) * 127.5).astype(np.uint8)[..., None], 3, -1) for s in mid_slices(volume)]


def coloured(mask: np.ndarray) -> list[np.ndarray]:
    """One-hot mask (K, X, Y, Z) -> RGB uint8 mid-slices of its labels."""
    return [TISSUE_COLOURS[s] for s in mid_slices(mask.argmax(0))]


def main(run: Path, out: Path | None) -> Path:
    test_dir = run / "images" / "test"
    samples = sorted(test_dir.glob("samples_b-*_r-0_*.nii.gz"))
    if not samples:
        raise SystemExit(f"error: {test_dir} has no samples_*.nii.gz (run the test stage: train_ldm.py -r {run})")
    config = OmegaConf.merge(*[OmegaConf.load(p) for p in sorted((run / "configs").glob("*.yaml"))])
    real = instantiate_from_config(config.data.params.test)
    rows = []
    for index, sample_path in enumerate(samples[:len(real)]):
        mask = nib.load(str(sample_path).replace("samples_", "conditioning_")).get_fdata()
        mask = np.moveaxis(mask, -1, 0) if mask.ndim == 4 else mask[None]
        sample = nib.load(sample_path).get_fdata()
        crop = real[index]["image"][0].numpy()
        gap = np.full((crop.shape[1], 4, 3), 255, dtype=np.uint8)
        tiles = coloured(mask) + [gap] + grey(sample) + [gap] + grey(crop)
        height = max(t.shape[0] for t in tiles)
        rows.append(np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    figure = np.concatenate(rows[:-1])
    out = out or test_dir / "comparison.png"
    Image.fromarray(figure).resize((figure.shape[1] * 3, figure.shape[0] * 3), Image.NEAREST).save(out)
    print(f"wrote {out}: per row the mask, the sample and the real crop (axial, coronal, sagittal mid-slices)")
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else None)
