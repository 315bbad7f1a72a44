"""MONAI `CacheDataset`s whose items follow the dataset contract: plain tensors, clear errors.

`SimpleDataset` builds its transforms from config; the volume datasets (BraTS, NIfTI folder) subclass
`CachedTransformDataset` with transforms they build themselves.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from monai.data import CacheDataset, MetaTensor
from monai.data.utils import set_rnd
from monai.transforms import Compose

from ldm.data.transforms import DataFileError
from ldm.util import instantiate_from_config


def plain_item(item: dict[str, Any]) -> dict[str, Any]:
    """MONAI's MetaTensors as plain tensors: they collate fast and carry no per-item metadata dicts. The `image`'s
    voxel-to-world matrix (after orientation, resampling and cropping) is kept as `affine`: (4, 4) float64, so
    volumes written from the batch land where the source scan was."""
    plain = {key: value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value
             for key, value in item.items()}
    image = item.get("image")
    if "affine" not in plain and isinstance(image, MetaTensor) and image.ndim == 4:
        plain["affine"] = image.affine.as_subclass(torch.Tensor).to(torch.float64).clone()
    return plain


class CachedTransformDataset(CacheDataset):
    """`CacheDataset` that caches the transforms before the first random one, runs the rest per access, seeds the
    random ones from `seed` (loader workers reseed them) and re-raises a `DataFileError` from inside MONAI's
    transform chain as itself."""

    def __init__(self, data: Sequence[dict], transforms: Sequence[Callable], cache_rate: float,
                 cache_num_workers: int, seed: int):
        if not 0 <= cache_rate <= 1:
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
        try:
            super().__init__(list(data), Compose(list(transforms)), cache_rate=cache_rate,
                             num_workers=cache_num_workers, progress=False)
        except RuntimeError as err:
            raise _data_file_error(err) or err
        set_rnd(self.transform, seed)

    def _transform(self, index: int) -> dict[str, Any]:
        try:
            item = super()._transform(index)
        except RuntimeError as err:
            raise _data_file_error(err) or err
        return plain_item(item)


def _data_file_error(err: BaseException) -> DataFileError | None:
    """The `DataFileError` that MONAI wrapped in `RuntimeError("applying transform ...")`, if any."""
    while err is not None:
        if isinstance(err, DataFileError):
            return err.with_traceback(None)
        err = err.__cause__
    return None


class SimpleDataset(CachedTransformDataset):
    """`data` (list of dicts of file paths / values) through `transform`, a list of `{target, params}` configs of
    MONAI (or any) dictionary transforms; `cache_rate` of the items keep their deterministic part cached.

    Items: whatever the transforms return, with MetaTensors turned into plain tensors.
    """

    def __init__(self, data: Sequence[dict], transform: Sequence[Any], cache_rate: float = 1.0,
                 cache_num_workers: int = 0, seed: int = 0):
        if not isinstance(data, Sequence) or not all(isinstance(item, dict) for item in data):
            raise ValueError("data must be a list of dicts (e.g. {image: path.nii.gz, label: 1})")
        built = [instantiate_from_config(config) for config in transform]
        super().__init__(data, built, cache_rate, cache_num_workers, seed)
