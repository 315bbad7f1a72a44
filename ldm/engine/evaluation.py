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

from tqdm.auto import tqdm

from ldm.engine.checkpoint import atomic_write
from ldm.engine.interface import optional_hook

TEST_METRICS = Path("metrics") / "test.json"


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
