"""The demo configs build and run end to end (few steps): AE training, LDM training on its checkpoint, test stage."""
from pathlib import Path

import nibabel as nib

from ldm.cli import main
from tests.engine.helpers import load_last, only_run_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
FAST = ["trainer.max_steps=2", "trainer.logger=[csv]", "data.params.num_workers=0"]


def test_demo_pipeline_runs(tmp_path):
    assert main("ae", ["-b", str(CONFIGS / "ae_3d.yaml"), "-t", "--no_test", "-l", str(tmp_path / "ae"), *FAST]) == 0
    ae_run = only_run_dir(tmp_path / "ae")
    assert load_last(ae_run)["global_step"] == 2
    assert main("ldm", ["-b", str(CONFIGS / "ldm_3d.yaml"), "-t", "--no_test", "-l", str(tmp_path / "ldm"), *FAST,
                        f"model.params.first_stage_config.params.ckpt_path={ae_run / 'checkpoints' / 'last.ckpt'}",
                        "model.params.sampler_steps=2", "model.params.log_sampler_steps=2"]) == 0
    ldm_run = only_run_dir(tmp_path / "ldm")
    assert main("ldm", ["-r", str(ldm_run)]) == 0  # test stage: generate for the test split's masks
    samples = sorted((ldm_run / "images" / "test").glob("samples_*.nii.gz"))
    assert len(samples) == 4
    assert nib.load(samples[0]).shape == (32, 32, 32)
