"""`BraTS2021_3D`: the BraTS 2021 layout, `root/BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ldm.data.nifti_folder import VolumeDataset

MODALITIES = ("t1", "t1ce", "t2", "flair")
#: Background, necrotic tumour core, peritumoral oedema, enhancing tumour: the one-hot channels, in this order.
SEG_LABELS = (0, 1, 2, 4)
MASK_MODES = ("onehot", "whole_tumour", "none")
SUBJECT_GLOB = "BraTS2021_*"


class BraTS2021_3D(VolumeDataset):
    """Multi-modal brain tumour MRI, one channel per entry of `modalities`, split at the subject level.

    `mask`: "onehot" (4 channels for labels 0, 1, 2, 4), "whole_tumour" (1 channel: label > 0) or "none".
    Subject names (for `split_file`) are the folder names. `spacing` resamples (the data are 1 mm already);
    `cache_rate` keeps the deterministic part of that fraction of subjects in memory (~140 MB each at 1 mm).
    The pipeline and the other arguments: see `ldm.data.nifti_folder`.

    Items: `image` (len(modalities), *crop_to) float32 in [-1, 1], `mask` (4 or 1, *crop_to) float32 in {0, 1}
    unless mask is "none", `path` (the subject folder).
    """

    def __init__(self, root: str, split: str = "train", crop_to: Sequence[int] = (128, 128, 128),
                 modalities: Sequence[str] = MODALITIES, mask: str = "onehot", spacing: Sequence[float] | None = None,
                 percentiles: Sequence[float] = (0.5, 99.5), split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0, split_file: str | None = None, small_volume: str = "error",
                 on_bad_file: str = "error", cache_rate: float = 0.0, cache_num_workers: int = 0):
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct entries of {list(MODALITIES)}, got {list(modalities)}")
        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"BraTS 2021 root {root} does not exist or is not a folder")
        subjects = {
            folder.name: {
                "image": [str(folder / f"{folder.name}_{modality}.nii.gz") for modality in modalities],
                "seg": str(folder / f"{folder.name}_seg.nii.gz"),
                "path": str(folder),
            }
            for folder in sorted(root_path.glob(SUBJECT_GLOB)) if folder.is_dir()
        }
        super().__init__(subjects, f"root {root}, pattern {SUBJECT_GLOB}/", split, crop_to,
                         None if mask == "none" else SEG_LABELS, mask == "whole_tumour", spacing, percentiles,
                         split_ratios, seed, split_file, small_volume, on_bad_file, cache_rate, cache_num_workers)
