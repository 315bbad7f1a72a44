"""benchmarks/test_bench_cpu.py: `pytest benchmarks --benchmark-only` checks each variant against the other and prints
pytest-benchmark's table (one round each here)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_micro_benchmarks_print_a_table():
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_cpu.py", "--benchmark-only", "-q",
                          "--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "benchmark: 6 tests" in run.stdout and "Name (time in" in run.stdout
    for name in ("test_ema_update[LitEma]", "test_ema_update[per_parameter]", "test_decode[slabs_of_4]",
                 "test_attention[dispatcher]"):
        assert name in run.stdout
