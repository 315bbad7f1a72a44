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


def test_ldm_only_runs_stage_two_on_an_untrained_autoencoder_and_again_on_cached_latents(tmp_path, capsys):
    variant = "channels_last+cache"
    assert bench_main(["--smoke", "--ldm-only", "--layouts", variant, "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "bench_brats_pipeline.json").read_text())["results"]
    assert "ae" not in result and "ae_gan" not in result and result["ldm"]["n"] >= 1
    assert len(result["sample"]["seconds"]) == 2
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {f"ldm_{variant}.log", f"ldm_{variant}_cached.log",
                                                                f"sample_{variant}.log"}
    uncached_log = (tmp_path / "logs" / f"ldm_{variant}.log").read_text()
    cached_log = (tmp_path / "logs" / f"ldm_{variant}_cached.log").read_text()
    assert "restored" in uncached_log  # the untrained checkpoint loaded
    assert "latent cache" not in uncached_log and "latent cache" in cached_log  # only the +cache run encodes
    cached = result["ldm_cached"]
    assert cached["n"] == result["ldm"]["n"] and cached["step_ms"] > 0 and cached["copies"] == 1
    assert cached["vs_uncached"] == pytest.approx(cached["step_ms"] / result["ldm"]["step_ms"])
    assert 0 < cached["encode_s"] < 120  # a few tiny crops, from the log's notice to the index written
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {variant} | ")]
    assert len(rows) == 3 and "LDM: encoder" in rows[0] and "DDIM" in rows[2]
    assert f"{cached['vs_uncached']:.2f}x the uncached step" in rows[1] and "cached latents (copies 1)" in rows[1]


def test_copies_need_graph(tmp_path):
    with pytest.raises(ValueError, match=r"\+copies \(with \+graph\)"):
        bench_layout("channels_last+copies", tmp_path, tmp_path, None, None, tmp_path)
    with pytest.raises(ValueError, match=r"unknown variant 'contiguous\+cached'"):
        bench_layout("contiguous+cached", tmp_path, tmp_path, None, None, tmp_path)
