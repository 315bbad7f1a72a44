"""benchmarks/bench_master_adamw.py on a few small tensors on CPU (Triton's interpreter): every step is checked
against fused AdamW and timed, and the launches are parsed."""
import json

import pytest
import torch

from benchmarks import bench_master_adamw


def test_small_run_checks_and_times_every_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_master_adamw, "copied_weights", lambda quick, device: [
        torch.randn(16, 8, 3, 3, 3).to(memory_format=torch.channels_last_3d), torch.randn(300, 7), torch.randn(5)])
    result = bench_master_adamw.main(["--repeats", "1", "--launches", "1024x1w4,256x2w4", "--device", "cpu",
                                      "--out", str(tmp_path)])
    assert result["parameters"] == 16 * 8 * 27 + 2100 + 5 and result["tensors"] == 3
    steps = [row["step"] for row in result["rows"]]
    assert steps == ["fused AdamW", "casts + fused AdamW", "master_adamw 1024x1w4", "master_adamw 256x2w4"]
    for row in result["rows"][2:]:
        assert row["max_abs_difference"] < 1e-6 and row["copies_exact"]
    assert all(row["ms"] > 0 for row in result["rows"])
    assert json.loads((tmp_path / "bench_master_adamw.json").read_text())["tensors"] == 3
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| master_adamw 256x2w4 | 28 |")


def test_launches_are_parsed_or_named():
    launch = bench_master_adamw.parse_launch("2048x2w8")
    assert (launch.block, launch.blocks_per_program, launch.num_warps) == (2048, 2, 8)
    with pytest.raises(SystemExit, match="'2048-2' is not BLOCKxPROGRAMSwWARPS"):
        bench_master_adamw.parse_launch("2048-2")
