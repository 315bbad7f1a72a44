"""Scalar and image logging to TensorBoard and CSV (rank zero only)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


class RunLogger:
    """Writes scalars to `<logdir>/metrics.csv` (step, name, value rows) and/or TensorBoard under `<logdir>/tensorboard`."""

    def __init__(self, logdir: str | Path, backends: list[str], enabled: bool = True):
        self.enabled = enabled
        self._csv_file = None
        self._csv = None
        self._tensorboard = None
        if not enabled:
            return
        logdir = Path(logdir)
        if "csv" in backends:
            path = logdir / "metrics.csv"
            new = not path.exists()
            self._csv_file = open(path, "a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "name", "value"])
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(logdir / "tensorboard"))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            value = float(value)
            if self._csv is not None:
                self._csv.writerow([step, name, value if math.isfinite(value) else repr(value)])
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(name, value, step)
        if self._csv_file is not None:
            self._csv_file.flush()

    def log_image(self, name: str, grid: np.ndarray, step: int) -> None:
        """grid: uint8 (H, W, 3)."""
        if self.enabled and self._tensorboard is not None:
            self._tensorboard.add_image(name, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self._csv_file is not None:
            self._csv_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
