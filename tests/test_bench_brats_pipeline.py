"""benchmarks/bench_brats_pipeline.py --smoke: the BraTS command lines it times still run (tiny, on CPU)."""
import json

from benchmarks.bench_brats_pipeline import main as bench_main


def test_smoke_chain_runs_every_stage_and_reports_it(tmp_path, capsys):
    assert bench_main(["--smoke", "--layouts", "channels_last+expandable+recompute", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_brats_pipeline.json").read_text())
    (result,) = report["results"]
    assert result["layout"] == "channels_last+expandable+recompute" and "error" not in result
    for stage in ("ae", "ae_gan", "ldm"):  # the GAN phase is timed after disc_start (half the AE steps)
        assert result[stage]["n"] >= 1 and result[stage]["step_ms"] > 0 and result[stage]["data_wait_ms"] >= 0
    assert len(result["sample"]["seconds"]) == 2 and "sample_0000.nii.gz" in result["sample"]["files"]
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert logs == {f"{stage}_channels_last+expandable+recompute.log" for stage in ("ae", "ldm", "sample")}
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-6].startswith("| variant | stage |")  # then the separator and one row per stage
    assert all(row.startswith("| channels_last+expandable+recompute | ") for row in table[-4:])
