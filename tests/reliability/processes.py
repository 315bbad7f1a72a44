"""Training runs as real processes (tests/reliability/train.py on toy_ema.yaml), and comparisons of their results.

Every wait has a deadline, so a hung run fails its test instead of blocking CI; `Runs` kills what is left at the end.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ldm.cli import main

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("train.py")
CONFIG = Path(__file__).with_name("toy_ema.yaml")
TIMEOUT_S = 60.0


def training_args(logdir: Path, *args: str) -> list[str]:
    return ["-b", str(CONFIG), "-l", str(logdir), *args]


def run_in_process(logdir: Path, *args: str) -> int:
    """The CLI in this process (quick: no interpreter start); returns its exit code."""
    return main("reliability test", training_args(logdir, *args))


class Runs:
    """Starts CLI processes with their output in files, each leading its own process group (as a SLURM job step
    does, so that a test can signal the group); `close()` SIGKILLs any still running."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], slow_saves: str = "", markers: Path | None = None,
              file_size_limit: int = 0) -> subprocess.Popen:
        """`slow_saves`: pauses in seconds mid-write of the 1st, 2nd, ... checkpoint ("0,30": the second one hangs
        half written for 30 s), with a marker file per save in `markers`; `file_size_limit`: bytes beyond which
        writing a file fails like a full disk (see train.py)."""
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        if slow_saves:
            markers.mkdir(parents=True, exist_ok=True)
            env |= {"RELIABILITY_SLOW_SAVE_S": slow_saves, "RELIABILITY_MARKERS": str(markers)}
        if file_size_limit:
            env["RELIABILITY_FILE_SIZE_LIMIT"] = str(file_size_limit)
        log = self.workdir / f"process-{len(self.processes)}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen([sys.executable, str(DRIVER), *args], env=env, stdout=handle,
                                       stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        self.processes.append((process, log))
        return process

    def train(self, logdir: Path, *args: str, **kwargs) -> subprocess.Popen:
        return self.start(training_args(logdir, *args), **kwargs)

    def resume(self, run: Path, *args: str, **kwargs) -> subprocess.Popen:
        """`-r run`: the run's own saved configs, no `-b`, `-l` or `-s` (the seed comes from the checkpoint)."""
        return self.start(["-r", str(run), *args], **kwargs)

    def output(self, process: subprocess.Popen) -> str:
        return next(log for p, log in self.processes if p is process).read_text()

    def finish(self, process: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str]:
        """Wait for the process to end by itself; (exit code, output)."""
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"run did not finish within {timeout} s:\n{self.output(process)[-3000:]}")
        return code, self.output(process)

    def wait_for(self, predicate: Callable[[], bool], process: subprocess.Popen, what: str,
                 timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if process.poll() is not None:
                raise AssertionError(f"run ended (code {process.returncode}) before {what}:\n"
                                     f"{self.output(process)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.output(process)[-3000:]}")
            time.sleep(0.02)

    def close(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def only_run_dir(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def last_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def logged_steps(run: Path) -> int:
    """The highest step with a train/loss row in metrics.csv (0 before any)."""
    path = run / "metrics.csv"
    if not path.exists():
        return 0
    steps = [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:] if ",train/loss," in line]
    return max(steps, default=0)


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: compare before and after to prove nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_training_state(resumed: dict, reference: dict) -> None:
    """Bitwise equality of everything a resumed run must reproduce: weights and buffers (EMA, scale factor),
    optimizer and LR scheduler states, global step, epoch and position in the epoch."""
    for key in ("global_step", "epoch", "batch_in_epoch"):
        assert resumed[key] == reference[key], (key, resumed[key], reference[key])
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), f"state_dict[{key!r}] differs"
    for index, (mine, theirs) in enumerate(zip(resumed["optimizer_states"], reference["optimizer_states"],
                                               strict=True)):
        assert mine["param_groups"] == theirs["param_groups"], f"optimizer {index} param_groups differ"
        for param, state in theirs["state"].items():
            for name, value in state.items():
                assert torch.equal(mine["state"][param][name], value), f"optimizer {index} state {param}.{name}"
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
