"""benchmarks/bench_sampling.py --quick samples a narrow BraTS LDM on CPU through sample.py's draw_batch."""
import json

import pytest

from benchmarks.bench_sampling import main as bench_main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_times_eager_sampling_on_cpu(tmp_path, capsys):
    result = bench_main(["--quick", "--device", "cpu", "--scale", "2.0", "--samples", "3", "--edm", "--monai",
                         "--out", str(tmp_path)])
    assert (result["image"], result["latent"]) == ([32, 32, 32], [4, 8, 8, 8])
    row, monai, edm = result["rows"]  # no CUDA graph variant on a CPU
    assert row["variant"] == "eager" and len(row["batches"]) == 3 and row["seconds_per_sample"] > 0
    assert edm["variant"] == "EDM Heun 2 steps (3 network calls)" and len(edm["batches"]) == 3
    assert monai["variant"] == "MONAI LatentDiffusionInferer" and len(monai["batches"]) == 3
    # the same UNet; MONAI's decoder has one ResBlock less per level than CompVis' (ours)
    assert 0.8 < monai["params"] / row["params"] < 1.0
    assert json.loads((tmp_path / "bench_sampling.json").read_text())["scale"] == 2.0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| EDM Heun 2 steps")
