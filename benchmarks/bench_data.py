"""Loader throughput of the 3D data pipeline, with and without MONAI caching.

Writes a synthetic tree of gzipped NIfTI volumes (`HeadPhantom` renders as int16, stored LPS so that the
orientation step has work to do) to a temporary folder, then times `--epochs` epochs of each pipeline through a
DataLoader with `--workers` workers (batch size 1, persistent workers, so only the first epoch pays for starting
them):

- SimpleDataset: MONAI transforms from config, load -> RAS orientation -> percentile scaling -> random crop,
  with cache_rate 0 (every epoch reads and scales every file) and 1 (the part before the random crop is cached);
- NiftiFolder: the repo's volume pipeline (adds header checks, foreground crop and padding), cache_rate 0 and 1;
- HeadPhantom: volumes rendered on the fly, no files and nothing to cache.

The table comes last: volumes/s is the median over epochs; `first epoch` includes starting the workers; `build` is
constructing the dataset, which for cache 1 includes filling the cache (in the main process).

    python benchmarks/bench_data.py            # 16 volumes of 128^3, random crops of 96^3, 3 epochs, 2 workers
    python benchmarks/bench_data.py --quick    # 4 volumes of 32^3, crops of 24^3, 2 epochs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.base import seed_worker  # noqa: E402
from ldm.data.nifti_folder import NiftiFolder  # noqa: E402
from ldm.data.phantom import HeadPhantom  # noqa: E402
from ldm.data.simple import SimpleDataset  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.size, args.crop, args.epochs = 4, 32, 24, 2
    if args.crop > args.size:
        parser.error(f"--crop {args.crop} is larger than --size {args.size}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as folder:
        start = time.perf_counter()
        paths = write_volumes(Path(folder), args.volumes, args.size)
        print(f"wrote {args.volumes} volumes of {args.size}^3 (int16, .nii.gz) in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}", flush=True)
        crop = [args.crop] * 3
        pipelines: list[tuple[str, str, Callable[[], Dataset]]] = [
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
            rows.append({"dataset": name, "cache": cache, "workers": args.workers, "volumes": len(dataset),
                         "volumes_per_s": statistics.median(len(dataset) / s for s in seconds),
                         "first_epoch_s": seconds[0], "build_s": build_seconds})
            print(f"  {name} cache {cache}: epochs {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)

    print(f"\n{args.volumes} volumes of {args.size}^3 -> random crops of {args.crop}^3 (HeadPhantom renders "
          f"{args.crop}^3 directly), {args.epochs} epochs, batch size 1; load average now {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'dataset':<14} {'cache':>5} {'workers':>7} {'volumes/s':>10} {'first epoch s':>14} {'build s':>8}")
    for row in rows:
        print(f"{row['dataset']:<14} {row['cache']:>5} {row['workers']:>7} {row['volumes_per_s']:>10.1f} "
              f"{row['first_epoch_s']:>14.2f} {row['build_s']:>8.2f}")
    return rows


if __name__ == "__main__":
    main()
