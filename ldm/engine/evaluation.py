"""Test-stage metrics: the model's optional `test_evaluator()` (`ldm.engine.interface.Evaluator`) and the
`metrics/test.json` file it fills.

The file, written atomically by rank 0:

    {"global_step": 12, "checkpoint": "logs/<run>/checkpoints/last.ckpt", "metrics": {"psnr": 31.2, "ssim": 0.94}}

`global_step` is the optimizer step of the tested weights, `checkpoint` the file they were saved in or loaded from
(null when unknown, e.g. weights from the model's own `ckpt_path`), `metrics` the evaluator's `compute()` with
non-finite values written as null (JSON has no NaN).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.engine.checkpoint import atomic_write
from ldm.engine.interface import optional_hook

TEST_METRICS = Path("metrics") / "test.json"


def padding_rows(sampler: Any, batch_size: int, batch_idx: int, rows: int) -> list[bool]:
    """Which of the `rows` rows of a rank's batch `batch_idx` (of a loader of `batch_size`) are padding: items its sampler repeats so that every
    rank gets as many batches (and so takes part in as many collectives), which another rank holds already.

    A `ShardedResumableSampler` gives rank r the items at positions r, r + W, r + 2W, ... of the padded epoch order
    (W ranks): its position p is global position p * W + r, padding from the dataset's length on. A `BucketSampler`
    pads with whole batches: global batch batch_idx * W + r, padding from its batch count on. Other samplers pad
    nothing known here."""
    from ldm.data.base import ShardedResumableSampler
    from ldm.data.buckets import BucketSampler

    if isinstance(sampler, BucketSampler):
        return [batch_idx * sampler.world_size + sampler.rank >= sampler.batch_count] * rows
    if isinstance(sampler, ShardedResumableSampler):
        first = sampler.start + batch_idx * batch_size
        return [(first + i) * sampler.world_size + sampler.rank >= sampler.length for i in range(rows)]
    return [False] * rows


def batch_size_of(batch: Any) -> int:
    """Rows of a batch dict: the first dimension of its first tensor (0 if it holds none)."""
    return next((len(value) for value in batch.values() if isinstance(value, torch.Tensor) and value.ndim), 0) \
        if isinstance(batch, dict) else 0


def kept_rows(batch: dict, keep: list[int]) -> dict:
    """The batch's rows `keep`: tensors and lists as long as the batch are indexed, other entries kept as they are."""
    rows = batch_size_of(batch)
    index = torch.tensor(keep, dtype=torch.long)
    return {key: value[index.to(value.device)] if isinstance(value, torch.Tensor) and value.ndim and len(value) == rows
            else [value[i] for i in keep] if isinstance(value, (list, tuple)) and len(value) == rows else value
            for key, value in batch.items()}


def rows_of_all_ranks(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-item tensors (N_r, ...) of every rank (CPU), as one set in the order of the items in the split: rank r's
    row p is global position p * W + r (see `padding_rows`; padding already dropped), so the ranks' rows interleave.
    A key missing on some rank contributes nothing from it. Every rank calls this; one process returns `rows`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            torch.distributed.get_world_size() == 1:
        return rows
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, {key: value.detach().cpu() for key, value in rows.items()})
    merged = {}
    for key in dict.fromkeys(key for part in gathered for key in part):
        parts = [part[key] for part in gathered if key in part]
        order = sorted((p, r) for r, part in enumerate(parts) for p in range(len(part)))
        merged[key] = torch.stack([parts[r][p] for p, r in order]) if order else parts[0]
    return merged


def test_evaluator_of(model) -> Any:
    """The model's `test_evaluator()` (None without the hook); an object without update/compute raises TypeError."""
    hook = optional_hook(model, "test_evaluator")
    evaluator = hook() if hook is not None else None
    if evaluator is not None and not (callable(getattr(evaluator, "update", None))
                                      and callable(getattr(evaluator, "compute", None))):
        raise TypeError(f"{type(model).__name__}.test_evaluator() returned {type(evaluator).__name__}, which lacks "
                        f"update(batch, outputs) or compute() (see ldm.engine.interface.Evaluator)")
    return evaluator


def computed_metrics(evaluator: Any) -> dict[str, float]:
    """`evaluator.compute()` as name -> Python float; a result that is not a mapping raises TypeError naming it."""
    computed = evaluator.compute()
    if not isinstance(computed, dict):
        raise TypeError(f"test_evaluator: {type(evaluator).__name__}.compute() must return a dict of metric name -> "
                        f"number, got {type(computed).__name__}")
    return {str(name): float(value) for name, value in computed.items()}


def log_name(name: str) -> str:
    """The logged name of a test metric: under `test/`."""
    return name if name.startswith("test/") else f"test/{name}"


def write_test_metrics(path: str | Path, metrics: dict[str, float], global_step: int,
                       checkpoint: str | Path | None) -> Path:
    """Write the `metrics/test.json` document (module docstring) to `path` atomically (tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"global_step": int(global_step), "checkpoint": None if checkpoint is None else str(checkpoint),
                "metrics": {name: value if math.isfinite(value) else None for name, value in metrics.items()}}
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path


def report_test_metrics(metrics: dict[str, float], path: Path, logger, global_step: int,
                        checkpoint: Path | None) -> None:
    """Rank 0's report: the file at `path`, `test/<name>` scalars at `global_step`, one printed line per metric."""
    write_test_metrics(path, metrics, global_step, checkpoint)
    logger.log_scalars({log_name(name): value for name, value in metrics.items()}, global_step)
    for name, value in metrics.items():
        tqdm.write(f"test @ step {global_step}: {log_name(name)} = {value:.6g}")
    tqdm.write(f"test: metrics written to {path}")
