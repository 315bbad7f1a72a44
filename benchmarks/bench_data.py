"""Loader throughput of the 3D data pipeline, with and without MONAI caching.

Writes a synthetic tree of gzipped NIfTI volumes (`HeadPhantom` renders as int16, stored LPS so that the
orientation step has work to do) to a temporary folder, then times `--epochs` epochs of each pipeline through a
DataLoader with `--workers` workers (batch size 1, persistent workers, so only the first epoch pays for starting
them):

- SimpleDataset: MONAI transforms from config, load -> RAS orientation -> percentile scaling -> random crop,
  with cache_rate 0 (every epoch reads and scales every file) and 1 (the part before the random crop is cached);
- NiftiFolder: the repo's volume pipeline (adds header checks, foreground crop and padding), cache_rate 0 and 1;
- HeadPhantom: volumes rendered on the fly, no files and nothing to cache.

With `--brats`, the tree is BraTS 2021's instead (`--volumes` subjects of 4 float32 modalities + seg at
240 x 240 x 155, the noisy head with a labelled tumour of tests/data/brats_tree.py) and the pipelines are the
project's `BraTS2021_3D` (one-hot mask, random crops of `--crop`^3) three ways:

- cache 0: every read loads, reorients, crops to the foreground, pads and scales all five files;
- cache 1: the project's `cache_rate: 1`, MONAI `CacheDataset` semantics: the part before the random crop is kept in
  the main process's memory, filled while building (`build`), shared with the workers;
- persistent: MONAI `PersistentDataset` over the same data and transforms, the part before the random crop pickled
  to a cache folder on disk by whichever worker reads a subject first (the first epoch) and read back afterwards.

The table comes last: volumes/s is the median over epochs and `per worker` that divided by `--workers`; `first epoch`
includes starting the workers; `build` is constructing the dataset, which for cache 1 includes filling the cache (in
the main process).

    python benchmarks/bench_data.py            # 16 volumes of 128^3, random crops of 96^3, 3 epochs, 2 workers
    python benchmarks/bench_data.py --quick    # 4 volumes of 32^3, crops of 24^3, 2 epochs
    python benchmarks/bench_data.py --brats --volumes 8 --crop 128    # BraTS-size subjects
    python benchmarks/bench_data.py --brats --quick                   # 4 subjects of 40 x 40 x 32, crops of 24^3
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch
from monai.data import PersistentDataset
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.base import seed_worker  # noqa: E402
from ldm.data.brats2021 import BraTS2021_3D  # noqa: E402
from ldm.data.nifti_folder import NiftiFolder  # noqa: E402
from ldm.data.phantom import HeadPhantom  # noqa: E402
from ldm.data.simple import SimpleDataset, plain_item  # noqa: E402
from tests.data.brats_tree import write_subject  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
BRATS_SHAPE = (240, 240, 155)
QUICK_BRATS_SHAPE = (40, 40, 32)


def write_volumes(folder: Path, count: int, size: int) -> list[str]:
    """`count` phantom volumes of `size`^3 as int16 NIfTI in LPS orientation (intensities 0..1000)."""
    phantoms = HeadPhantom("train", size=size, length=count, mask="none", seed=0)
    paths = []
    for index in range(count):
        image = phantoms.render(index).image
        # the phantom's axes are RAS: flipping the first two and saying so in the affine keeps the anatomy in place
        voxels = np.ascontiguousarray(((image + 1) * 500).round().astype(np.int16)[::-1, ::-1])
        path = folder / f"volume_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(voxels, LPS), str(path))
        paths.append(str(path))
    return paths


def simple_dataset(paths: list[str], crop: int, cache_rate: float) -> SimpleDataset:
    """load -> orientation -> intensity scaling -> random crop, as a config would give it."""
    keys = ["image"]
    transform = [
        {"target": "monai.transforms.LoadImaged", "params": {"keys": keys, "ensure_channel_first": True,
                                                             "image_only": True}},
        {"target": "monai.transforms.Orientationd", "params": {"keys": keys, "axcodes": "RAS", "labels": None}},
        {"target": "monai.transforms.ScaleIntensityRangePercentilesd",
         "params": {"keys": keys, "lower": 0.5, "upper": 99.5, "b_min": -1.0, "b_max": 1.0, "clip": True}},
        {"target": "monai.transforms.RandSpatialCropd",
         "params": {"keys": keys, "roi_size": [crop] * 3, "random_size": False}},
    ]
    return SimpleDataset([{"image": path} for path in paths], transform, cache_rate=cache_rate)


def write_brats_tree(root: Path, count: int, shape: tuple[int, int, int]) -> None:
    """`count` BraTS-2021-layout subjects of `shape` (4 float32 modalities + a uint8 seg each), written in parallel."""
    names = [f"BraTS2021_{index:05d}" for index in range(count)]
    with ProcessPoolExecutor(max_workers=min(count, os.cpu_count() or 1)) as pool:
        list(pool.map(write_subject, [root] * count, names, [shape] * count, range(count)))


class PersistentVolumes(PersistentDataset):
    """MONAI's `PersistentDataset` over a `CachedTransformDataset`'s data and transforms, its items made plain
    tensors as that dataset's are (so both pay the same collation)."""

    def __init__(self, like: Dataset, cache_dir: Path):
        super().__init__(like.data, like.transform, cache_dir=cache_dir)

    def _transform(self, index: int) -> dict:
        return plain_item(super()._transform(index))


def brats_pipelines(root: Path, crop: int, cache_dir: Path) -> list[tuple[str, str, Callable[[], Dataset]]]:
    """The `BraTS2021_3D` train split of `root` (every subject) uncached, cached in memory and cached on disk."""
    def brats(cache_rate: float) -> BraTS2021_3D:
        return BraTS2021_3D(str(root), "train", [crop] * 3, split_ratios=[1, 0, 0], cache_rate=cache_rate)

    return [("BraTS2021_3D", "0", lambda: brats(0.0)), ("BraTS2021_3D", "1", lambda: brats(1.0)),
            ("BraTS2021_3D", "persistent", lambda: PersistentVolumes(brats(0.0), cache_dir))]


def time_epochs(dataset: Dataset, workers: int, epochs: int) -> list[float]:
    """Seconds per epoch of one pass over `dataset` (batch size 1) through a loader with `workers` workers."""
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in loader:
            assert torch.isfinite(batch["image"]).all()
        seconds.append(time.perf_counter() - start)
    del loader  # stops the persistent workers before the next dataset starts its own
    return seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=16, help="number of NIfTI volumes (and phantoms) per epoch")
    parser.add_argument("--size", type=int, default=128, help="edge of the cubic volumes written")
    parser.add_argument("--crop", type=int, default=96, help="edge of the random crop")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--quick", action="store_true", help="4 volumes of 32^3, crops of 24^3, 2 epochs")
    parser.add_argument("--brats", action="store_true",
                        help=f"BraTS-layout subjects of {' x '.join(map(str, BRATS_SHAPE))} (--size unused; with "
                             f"--quick {' x '.join(map(str, QUICK_BRATS_SHAPE))}) through BraTS2021_3D uncached, "
                             f"cached in memory (cache_rate 1) and MONAI's PersistentDataset")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.size, args.crop, args.epochs = 4, 32, 24, 2
    shape = (QUICK_BRATS_SHAPE if args.quick else BRATS_SHAPE) if args.brats else (args.size,) * 3
    if args.crop > min(shape):
        parser.error(f"--crop {args.crop} is larger than the volumes ({' x '.join(map(str, shape))})")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as folder:
        start = time.perf_counter()
        if args.brats:
            write_brats_tree(Path(folder) / "brats", args.volumes, shape)
            written = "BraTS subjects of 4 x " + " x ".join(map(str, shape)) + " (float32) + seg"
        else:
            paths = write_volumes(Path(folder), args.volumes, args.size)
            written = f"volumes of {args.size}^3 (int16)"
        print(f"wrote {args.volumes} {written}, .nii.gz, in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}", flush=True)
        crop = [args.crop] * 3
        pipelines: list[tuple[str, str, Callable[[], Dataset]]] = brats_pipelines(
            Path(folder) / "brats", args.crop, Path(folder) / "persistent") if args.brats else [
            ("SimpleDataset", "0", lambda: simple_dataset(paths, args.crop, 0.0)),
            ("SimpleDataset", "1", lambda: simple_dataset(paths, args.crop, 1.0)),
            ("NiftiFolder", "0", lambda: NiftiFolder(folder, "train", crop, split_ratios=[1, 0, 0], cache_rate=0.0)),
            ("NiftiFolder", "1", lambda: NiftiFolder(folder, "train", crop, split_ratios=[1, 0, 0], cache_rate=1.0)),
            ("HeadPhantom", "-", lambda: HeadPhantom("train", size=args.crop, length=args.volumes)),
        ]
        for name, cache, build in pipelines:
            start = time.perf_counter()
            dataset = build()
            build_seconds = time.perf_counter() - start
            seconds = time_epochs(dataset, args.workers, args.epochs)
            rate = statistics.median(len(dataset) / s for s in seconds)
            rows.append({"dataset": name, "cache": cache, "workers": args.workers, "volumes": len(dataset),
                         "volumes_per_s": rate, "volumes_per_s_per_worker": rate / max(args.workers, 1),
                         "first_epoch_s": seconds[0], "build_s": build_seconds})
            if cache == "persistent":  # what the workers wrote: one file per subject
                rows[-1]["files_on_disk"] = len(list((Path(folder) / "persistent").glob("*.pt")))
            print(f"  {name} cache {cache}: epochs {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)

    source = (f"BraTS subjects of 4 x {' x '.join(map(str, shape))}" if args.brats else
              f"volumes of {args.size}^3")
    print(f"\n{args.volumes} {source} -> random crops of {args.crop}^3{'' if args.brats else ' (HeadPhantom renders '}"
          f"{'' if args.brats else f'{args.crop}^3 directly)'}, {args.epochs} epochs, batch size 1; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'dataset':<14} {'cache':>10} {'workers':>7} {'volumes/s':>10} {'per worker':>10} {'first epoch s':>14} "
          f"{'build s':>8}")
    for row in rows:
        print(f"{row['dataset']:<14} {row['cache']:>10} {row['workers']:>7} {row['volumes_per_s']:>10.1f} "
              f"{row['volumes_per_s_per_worker']:>10.2f} {row['first_epoch_s']:>14.2f} {row['build_s']:>8.2f}")
    return rows


if __name__ == "__main__":
    main()
