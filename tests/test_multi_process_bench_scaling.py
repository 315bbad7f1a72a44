"""benchmarks/bench_scaling.py --quick: tiny cases trained by 1 and 2 gloo CPU processes through Fabric, rows and
efficiency as documented; FSDP rows say why they are skipped without CUDA."""
import argparse
import json

import pytest
import torch.distributed as dist

from benchmarks.bench_models import QUICK_CASES
from benchmarks.bench_scaling import main as bench_main
from benchmarks.bench_scaling import run

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def test_quick_run_reports_samples_per_second_and_efficiency(tmp_path, capsys):
    # the autoencoder: its loss calls encode and decode, which the strategy wrapper must see (TrainingLoss)
    rows = bench_main(["--quick", "--cases", "ae96", "--strategies", "ddp", "--steps", "2", "--warmup", "1",
                       "--out", str(tmp_path)])
    assert [(r["case"], r["processes"]) for r in rows] == [("ae-quick", 1), ("ae-quick", 2)]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["samples_per_s"] == pytest.approx(row["processes"] * 1 * 2 / row["seconds"])  # batch 1, 2 steps
        one = next(r for r in rows if (r["case"], r["processes"]) == (row["case"], 1))
        assert row["efficiency"] == pytest.approx(row["samples_per_s"] / (row["processes"] * one["samples_per_s"]))
    assert json.loads((tmp_path / "bench_scaling.json").read_text())["rows"] == rows
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| ae-quick | 1x1x16x16x16 | ddp | 2 | ")


def test_fsdp_rows_without_cuda_say_why():
    args = argparse.Namespace(activation_checkpointing=True, steps=1, warmup=0)
    row = run(QUICK_CASES["unet"], "fsdp", 2, args, accelerator="cpu")
    assert row["status"] == "skipped: FSDP needs CUDA" and "samples_per_s" not in row
