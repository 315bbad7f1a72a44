"""benchmarks/bench_decode.py --quick decodes plainly and in slabs on CPU and reports both."""
import json

import pytest

from benchmarks.bench_decode import main as bench_main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_compares_slabs_with_the_plain_decode(tmp_path, capsys):
    rows = bench_main(["--quick", "--slabs", "8,5", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["plain", "slabs of 8", "slabs of 5"]
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows)
    assert rows[0]["output"] == [32, 32, 32]
    assert all(r["max_abs_diff"] < 1e-4 * r["output_abs_max"] for r in rows[1:])
    assert len(json.loads((tmp_path / "bench_decode.json").read_text())["rows"]) == 3
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| 8x8x8 -> 32x32x32 | fp32 | slabs of 5")
