"""benchmarks/bench_ema.py on a narrow UNet on CPU: both updates agree and both are timed."""
import json

import pytest

from benchmarks.bench_ema import main as bench_main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_narrow_run_checks_and_times_both_updates(tmp_path, capsys):
    result = bench_main(["--width", "32", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert result["tensors"] > 200 and result["max_abs_difference"] < 1e-6
    assert [r["update"] for r in result["rows"]] == ["per-parameter loop (replaced)", "LitEma (foreach lerp)"]
    assert all(r["total_ms"] >= r["host_ms"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "bench_ema.json").read_text())["width"] == 32
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| LitEma (foreach lerp) |")
