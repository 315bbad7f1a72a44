"""The demo configs build and run end to end (few steps): AE training, LDM training on its checkpoint, test stage."""
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
from omegaconf import OmegaConf

from ldm.cli import main
from tests.engine.helpers import only_run_dir, subprocess_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"
TSTR = Path(__file__).resolve().parents[1] / "benchmarks" / "tstr.sh"
FAST = ["trainer.max_steps=2", "trainer.logger=[csv]", "data.params.num_workers=0"]


def test_demo_script_runs(tmp_path):
    """scripts/demo.sh (what `make demo` runs) end to end with 2 steps per stage: AE, judge, LDM, scored samples."""
    env = {**subprocess_env(), "PY": sys.executable, "LOGS": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT), "trainer.max_steps=2", "trainer.logger=[csv]",
                             "data.params.num_workers=0"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "samples follow their masks: Dice" in result.stdout
    ldm_run = next(tmp_path.glob("*_demo_ldm"))
    samples = sorted((ldm_run / "images" / "test").glob("samples_*.nii.gz"))
    assert len(samples) == 8
    assert nib.load(samples[0]).shape == (32, 32, 32)
    metrics = json.loads((ldm_run / "metrics" / "test.json").read_text())["metrics"]
    assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["dice_real"] <= 1.0
    ae_metrics = json.loads((next(tmp_path.glob("*_demo_ae")) / "metrics" / "test.json").read_text())["metrics"]
    assert math.isfinite(ae_metrics["psnr"])

    # Train on synthetic, test on real, on the demo's runs: a judge trained on samples for the training masks only.
    tstr = subprocess.run(["bash", str(TSTR), str(ldm_run), str(next(tmp_path.glob("*_demo_seg"))),
                           str(tmp_path / "tstr"), "trainer.max_steps=2", "trainer.logger=[csv]",
                           "data.params.num_workers=0"], capture_output=True, text=True, timeout=600,
                          env={**env, "N": "2", "STEPS": "2", "BATCH": "2"})
    assert tstr.returncode == 0, tstr.stderr[-2000:]
    assert "train on synthetic, test on real: Dice" in tstr.stdout
    tstr_run = next((tmp_path / "tstr").glob("*_tstr_seg"))
    saved = OmegaConf.merge(*[OmegaConf.load(f) for f in sorted((tstr_run / "configs").glob("*.yaml"))])
    assert saved.data.params.train.target == "ldm.data.generated.GeneratedPairs"  # the real crops replaced
    assert "dice" in json.loads((tstr_run / "metrics" / "test.json").read_text())["metrics"]
    manifest = json.loads((tmp_path / "tstr" / "samples" / "manifest.json").read_text())
    assert [entry["mask"] for entry in manifest["samples"]] == ["sample_0000_mask.nii.gz", "sample_0001_mask.nii.gz"]


def test_2d_demo_test_stage_writes_metrics(tmp_path):
    """AE, classifier and class-conditional LDM of the 2D demo (few steps each); the LDM's test stage scores its samples
    with the classifier (agreement with the requested class, FID/KID on its features, diversity) into test.json."""
    fast = [*FAST, "trainer.limit_test_batches=1", "data.params.batch_size=8"]
    assert main("ae", ["-b", str(CONFIGS / "ae_2d.yaml"), "-t", "--no_test", "-l", str(tmp_path / "ae"), *fast]) == 0
    assert main("eval", ["-b", str(CONFIGS.parent / "eval" / "cls_digits.yaml"), "-t", "--no_test",
                         "-l", str(tmp_path / "cls"), *fast]) == 0
    ae_run, cls_run = only_run_dir(tmp_path / "ae"), only_run_dir(tmp_path / "cls")
    assert main("ldm", ["-b", str(CONFIGS / "ldm_2d.yaml"), "-t", "-l", str(tmp_path / "ldm"), *fast,
                        f"model.params.first_stage_config.params.ckpt_path={ae_run / 'checkpoints' / 'last.ckpt'}",
                        "model.params.sampler_steps=2", "model.params.log_sampler_steps=2",
                        f"model.params.test_metrics={{metrics: [accuracy, fid, kid, diversity_ms_ssim], "
                        f"classifier: '{cls_run}', feature_extractor: classifier, kid_subset_size: 4}}"]) == 0
    report = json.loads((only_run_dir(tmp_path / "ldm") / "metrics" / "test.json").read_text())
    metrics = report["metrics"]
    assert report["global_step"] == 2
    for key in ("accuracy", "accuracy_real", "fid", "kid_mean", "diversity_ms_ssim", "diversity_ms_ssim_real"):
        assert key in metrics and metrics[key] is not None and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["fid"] >= 0.0


def test_unknown_test_metric_is_one_line_error(tmp_path, capsys):
    code = main("ae", ["-b", str(CONFIGS / "ae_2d.yaml"), "-t", "-l", str(tmp_path), *FAST,
                       "model.params.test_metrics={metrics: [psnr, fidd]}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fidd" in err[0] and "psnr" in err[0]
    assert not list(tmp_path.glob("*/checkpoints/*.ckpt"))
