"""benchmarks/bench_brats_pipeline.py --smoke: the BraTS command lines it times still run (tiny, on CPU)."""
import json

import pytest

from benchmarks.bench_brats_pipeline import bench_layout
from benchmarks.bench_brats_pipeline import main as bench_main


def test_smoke_chain_runs_every_stage_and_reports_it(tmp_path, capsys):
    variant = "channels_last+expandable+recompute+graph+copies"
    assert bench_main(["--smoke", "--layouts", variant, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_brats_pipeline.json").read_text())
    (result,) = report["results"]
    assert result["layout"] == variant and "error" not in result
    for stage in ("ae", "ae_gan", "ldm"):  # the GAN phase is timed after disc_start (half the AE steps)
        assert result[stage]["n"] >= 1 and result[stage]["step_ms"] > 0 and result[stage]["data_wait_ms"] >= 0
    assert len(result["sample"]["seconds"]) == 2 and "sample_0000.nii.gz" in result["sample"]["files"]
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert logs == {f"{stage}_{variant}.log" for stage in ("ae", "ldm", "sample")}
    # +graph reaches stage 2's command line: on the CPU, trainer.cuda_graph says it has no effect
    assert "trainer.cuda_graph: no effect on cpu" in (tmp_path / "logs" / f"ldm_{variant}.log").read_text()
    assert "--cuda_graph: cpu is not a CUDA device" in (tmp_path / "logs" / f"sample_{variant}.log").read_text()
    assert result["ae"]["first_step_s"] >= 0 and result["ldm"]["first_step_s"] >= 0  # the loop's own line
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-6].startswith("| variant | stage |")  # then the separator and one row per stage
    assert all(row.startswith(f"| {variant} | ") for row in table[-4:])


def test_ldm_only_runs_stage_two_on_an_untrained_autoencoder(tmp_path, capsys):
    assert bench_main(["--smoke", "--ldm-only", "--layouts", "channels_last", "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "bench_brats_pipeline.json").read_text())["results"]
    assert "ae" not in result and "ae_gan" not in result and result["ldm"]["n"] >= 1
    assert len(result["sample"]["seconds"]) == 2
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"ldm_channels_last.log", "sample_channels_last.log"}
    assert "restored" in (tmp_path / "logs" / "ldm_channels_last.log").read_text()  # the untrained checkpoint loaded
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| channels_last | ")]
    assert len(rows) == 2 and "LDM" in rows[0] and "DDIM" in rows[1]


def test_copies_need_graph(tmp_path):
    with pytest.raises(ValueError, match=r"\+copies \(with \+graph\)"):
        bench_layout("channels_last+copies", tmp_path, tmp_path, None, None, tmp_path)
