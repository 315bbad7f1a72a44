"""benchmarks/bench_sd_unet.py --quick: a tiny SD-1.x-shaped UNet, ours converted from diffusers', trained a step each."""
import json

import pytest

from benchmarks.bench_sd_unet import main as bench_main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_times_both_on_the_same_weights(tmp_path, capsys):
    rows = bench_main(["--quick", "--batch", "1", "--steps", "1", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["diffusers", "ours"]
    assert rows[0]["params"] == rows[1]["params"]
    assert all(r["output_rel_error"] < 1e-5 and r["step_ms"] > 0 for r in rows)
    assert json.loads((tmp_path / "bench_sd_unet.json").read_text())["rows"] == rows
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| ours | ")
