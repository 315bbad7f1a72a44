"""benchmarks/trace_summary.py on a hand-made trace whose busy time, gaps and launches are known."""
import gzip
import json

import pytest

from benchmarks.trace_summary import launches, main, timeline


def x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}


# CPU: an op with input shapes from 0 to 40 that launches two kernels (correlations 1, 2), then a bare launch (3).
# GPU: kernel 10-20, memset 23-24, kernel 30-35 overlapping kernel 32-40, kernel 50-51.
EVENTS = [
    x("cpu_op", "gn_op", 0, 40, **{"Input Dims": [[4, 8, 2, 2, 2], []]}),
    x("cuda_runtime", "cudaLaunchKernel", 2, 1, correlation=1),
    x("cuda_runtime", "cudaLaunchKernel", 5, 1, correlation=2),
    x("cuda_runtime", "cudaLaunchKernel", 45, 1, correlation=3),
    x("kernel", "gn_forward_kernel", 10, 10, correlation=1, grid=[4, 1, 1]),
    x("gpu_memset", "Memset (Device)", 23, 1),
    x("kernel", "gn_forward_kernel", 30, 5, correlation=2, grid=[4, 1, 1]),
    x("kernel", "conv", 32, 8),
    x("kernel", "gn_backward_kernel", 50, 1, correlation=3, grid=[2, 1, 1]),
]


def test_timeline_splits_idle_time():
    t = timeline(EVENTS)
    assert t["span"] == 41 and t["busy"] == 10 + 1 + 10 + 1  # 30-40 counted once
    assert t["wait_before_first"] == 10 and t["activities"] == 5
    assert [(gap, between) for gap, between, _, _ in t["gaps"]] == [
        (10, "kernel -> kernel"), (6, "memset -> kernel"), (3, "kernel -> memset")]


def test_launches_grouped_by_shape_and_place_in_op():
    found = launches(EVENTS, ("gn_",))
    assert found == {("gn_forward_kernel", (4, 1, 1), (4, 8, 2, 2, 2), 1): [10],
                     ("gn_forward_kernel", (4, 1, 1), (4, 8, 2, 2, 2), 2): [5],
                     ("gn_backward_kernel", (2, 1, 1), None, 1): [1]}


def test_command_line_reads_gzipped_trace(tmp_path, capsys):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    main([str(path), "--kernels", "gn_"])
    out = capsys.readouterr().out
    assert "GPU busy 0.022 of 0.041 ms" in out and "waited 0.010 ms for the host" in out
    assert "| memset -> kernel | 0.006 | 1 |" in out
    assert "| gn_forward_kernel | (4, 1, 1) | (4, 8, 2, 2, 2) | 2 | 1 | 5.0 | 0.005 |" in out


def test_trace_without_gpu_activity_is_named(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": EVENTS[:4]}))
    with pytest.raises(SystemExit, match="no GPU kernels"):
        main([str(path)])
