"""Run the CLI on the toy config, in this process or in a subprocess."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ldm.cli import main

REPO = Path(__file__).resolve().parents[2]
TOY_CONFIG = Path(__file__).with_name("toy.yaml")


def run_cli(logdir: Path, *args: str, script_doc: str = "test") -> int:
    return main(script_doc, ["-b", str(TOY_CONFIG), "-l", str(logdir), *args])


def only_run_dir(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def load_last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def cli_command(logdir: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "train_ae.py"), "-b", str(TOY_CONFIG), "-l", str(logdir), *args]
