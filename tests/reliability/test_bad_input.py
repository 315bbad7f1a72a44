"""Bad input: one clear error (`error: ...`, exit code 2, no traceback) and nothing written, neither into the run
given to `-r` nor as a new run folder.

Unit tests of the same messages: tests/engine/test_config.py (trainer section), tests/engine/test_cli.py,
tests/engine/test_checkpoint.py, tests/data/test_nifti_folder.py and test_brats2021.py (mismatched files).
"""
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import main
from ldm.util import instantiate_from_config
from tests.data.brats_tree import head_and_tumour
from tests.reliability.processes import CONFIG, file_digests, last_checkpoint, only_run_dir, run_in_process


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the trained run, alone in its log folder `tmp_path / "logs"`."""
    return Path(shutil.copytree(trained_run, tmp_path / "logs" / trained_run.name))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_checkpoints(path: Path) -> None:
    shutil.rmtree(path.parent)


@pytest.mark.parametrize("args, damage, message", [
    (["trainer.max_step=30"], None, "trainer: unknown key 'max_step' (known: accelerator,"),
    (["trainer.checkpoint.every=3"], None,
     "trainer.checkpoint: unknown key 'every' (known: every_n_steps, keep_last_k, monitor, mode)"),
    (["model.params.hiden=12"], None, "model.params: unknown argument 'hiden' for EmaRegressor (accepted: hidden,"),
    (["trainer.max_steps=ten"], None, "trainer.max_steps: expected int, got 'ten'"),
    (["trainer.gradient_clip_val=[1]"], None, "trainer.gradient_clip_val: expected float, got [1]"),
    (["model.params.ckpt_path=/no/such/model.ckpt"], None, "checkpoint /no/such/model.ckpt does not exist"),
    (["data.params.train.params.length=0"], None,
     "data.params: DataModuleFromConfig: data.params.train: the train dataset (AugmentedRegressionData) is empty"),
    ([], truncate, "checkpoints/last.ckpt cannot be read (OSError: [Errno 22] Invalid argument): truncated or "
                   "corrupt (no zip directory at its end)"),
    ([], remove_checkpoints, "the log dir has no checkpoints/last.ckpt to resume from"),
], ids=["unknown-key", "unknown-nested-key", "unknown-model-argument", "wrong-type", "wrong-type-list",
        "missing-ckpt_path", "empty-dataset", "corrupt-checkpoint", "no-checkpoint"])
def test_bad_input_on_resume_changes_nothing(run, capsys, args, damage, message):
    if damage is not None:
        damage(run / "checkpoints" / "last.ckpt")
    before = file_digests(run.parent)
    assert main("test", ["-r", str(run), "-t", "--no_test", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err, err
    assert file_digests(run.parent) == before


def mismatched_mask_tree(root: Path) -> None:
    """images/case_{a,b}.nii.gz with labels/case_{a,b}.nii.gz, case_b's label map one voxel short on the last axis."""
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True)
    for seed, case in enumerate(("case_a", "case_b")):
        channels, seg = head_and_tumour((20, 20, 20), seed)
        nib.save(nib.Nifti1Image(channels["t1"].astype(np.float32), np.eye(4)), str(root / "images" / f"{case}.nii.gz"))
        seg = seg[:, :, :19] if case == "case_b" else seg
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(root / "labels" / f"{case}.nii.gz"))


def test_new_runs_with_bad_data_leave_no_run_folder(tmp_path, capsys):
    mismatched_mask_tree(tmp_path / "tree")
    config = OmegaConf.load(CONFIG)
    config.data.params.train = {"target": "ldm.data.nifti_folder.NiftiFolder", "params": {
        "root": str(tmp_path / "tree"), "image_glob": "images/*.nii.gz", "mask_glob": "labels/*.nii.gz",
        "crop_to": [16, 16, 16], "split_ratios": [1, 0, 0]}}
    OmegaConf.save(config, tmp_path / "nifti.yaml")
    logs = tmp_path / "logs"
    assert main("test", ["-b", str(tmp_path / "nifti.yaml"), "-l", str(logs), "-t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: data.params.train.params: NiftiFolder: subject images/case_b.nii.gz: ") and \
        err.endswith(f"{tmp_path}/tree/labels/case_b.nii.gz has shape [20, 20, 19] but {tmp_path}/tree/images/"
                     f"case_b.nii.gz has [20, 20, 20] (on_bad_file: skip leaves such subjects out)"), err
    assert run_in_process(logs, "-t", "data.params.train.params.length=0") == 2
    assert run_in_process(logs, "-t", "model.params.ckpt_path=/no/such/model.ckpt") == 2
    assert not logs.exists()


def test_a_failed_resume_does_not_break_the_next_one(run, runs):
    """In a real process: the bad override is reported, and the run resumes normally afterwards (before the fix in
    ldm/cli.py, the override was saved into the run's configs/ and every later `-r` failed the same way)."""
    before = file_digests(run.parent)
    code, output = runs.finish(runs.resume(run, "-t", "--no_test", "data.params.train.params.length=0"))
    assert code == 2, output
    assert output.strip().splitlines()[-1] == ("error: data.params: DataModuleFromConfig: data.params.train: the "
                                               "train dataset (AugmentedRegressionData) is empty")
    assert "Traceback" not in output
    assert file_digests(run.parent) == before
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=7"]) == 0
    assert last_checkpoint(only_run_dir(run.parent))["global_step"] == 7


def test_an_override_that_fails_in_the_first_step_leaves_the_run_folder_as_it_was(run, runs):
    """The override builds but breaks the first training step: neither it (in configs/) nor a checkpoint of the
    unchanged state is written, so the next plain `-r` goes on."""
    before = file_digests(run.parent)
    code, output = runs.finish(runs.resume(run, "-t", "--no_test", "trainer.max_steps=8",
                                                "model.params.fail_at_steps=[6]"))
    assert code == 1 and "RuntimeError: EmaRegressor: fail_at_steps has global step 6" in output, output
    assert file_digests(run.parent) == before
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=7"]) == 0
    assert last_checkpoint(run)["global_step"] == 7


DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"
TINY_3D = ["data.params.num_workers=0", "data.params.batch_size=2", "model.params.image_size=4",
           "model.params.unet_config.params.image_size=4",
           "model.params.first_stage_config.params.ddconfig.resolution=16",
           *[f"data.params.{split}.params.crop_to=[16,16,16]" for split in ("train", "validation", "test")]]
LDM = "model.params"


@pytest.mark.parametrize("config, args, message", [
    ("ldm_2d.yaml", [f"{LDM}.channels=3"],
     f"{LDM}.channels=3 but {LDM}.first_stage_config.params.embed_dim=4: the diffusion runs on the first stage's "
     f"latents, so the two must be equal"),
    ("ldm_2d.yaml", [f"{LDM}.unet_config.params.in_channels=5"],
     f"{LDM}.unet_config.params.in_channels=5 but {LDM}.channels=4 = 4 channels reach the network"),
    ("ldm_2d.yaml", [f"{LDM}.unet_config.params.out_channels=3"],
     f"{LDM}.unet_config.params.out_channels=3 but {LDM}.channels=4: the network predicts a latent-shaped target"),
    ("ldm_2d.yaml", [f"{LDM}.image_size=16", f"{LDM}.unet_config.params.image_size=16"],
     f"{LDM}.image_size=[16, 16] but data.params.train items['image'] of spatial size [32, 32] become latents of "
     f"[8, 8] ({LDM}.first_stage_config.params.ddconfig.ch_mult downsamples by 4)"),
    ("ldm_3d.yaml", [*TINY_3D, f"{LDM}.unet_config.params.in_channels=5"],
     f"{LDM}.unet_config.params.in_channels=5 but {LDM}.channels=4 + 3 channels of the concat conditioning "
     f"({LDM}.cond_stage_config) = 7 channels reach the network"),
], ids=["channels-vs-embed_dim", "in_channels", "out_channels", "image_size-vs-downsampling", "concat-in_channels"])
def test_mismatched_latent_diffusion_configs_fail_when_built(tmp_path, capsys, config, args, message):
    logs = tmp_path / "logs"
    assert main("test", ["-b", str(DEMO / config), "-l", str(logs), "-t", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: {message}", err
    assert not logs.exists()


def test_a_checkpoint_outside_a_run_folder_continues_in_a_new_one(trained_run, tmp_path, capsys):
    """`-r downloads/weights/model.ckpt`: `downloads` is no run folder (no checkpoints/ holding the file), so
    nothing is created, merged or rotated there; the state continues in a new run folder under -l."""
    downloads = tmp_path / "downloads"
    (downloads / "weights").mkdir(parents=True)
    (downloads / "configs").mkdir()
    (downloads / "configs" / "other.yaml").write_text("model: {base_learning_rate: 1.0}\n")
    shutil.copyfile(trained_run / "checkpoints" / "last.ckpt", downloads / "weights" / "model.ckpt")
    for step in (1, 2, 3):  # files rotation would delete if `weights` were taken for checkpoints/
        shutil.copyfile(trained_run / "checkpoints" / "last.ckpt", downloads / "weights" / f"step={step}.ckpt")
    before = file_digests(downloads)
    model = downloads / "weights" / "model.ckpt"
    logs = tmp_path / "logs"

    assert main("test", ["-r", str(model), "-l", str(logs), "-t", "--no_test"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: no config given: -r {model} is not inside a run folder (with configs/ and checkpoints/), so its "
        f"configs are unknown; pass --base config.yaml")
    assert main("test", ["-r", str(model), "-b", str(CONFIG), "-l", str(logs), "-n", "fine-tune", "-t", "--no_test",
                         "trainer.max_steps=9"]) == 0
    assert file_digests(downloads) == before
    run = only_run_dir(logs)
    assert run.name.endswith("_fine-tune") and last_checkpoint(run)["global_step"] == 9
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=9.ckpt"]


TINY_2D = ["data.params.batch_size=2", "data.params.num_workers=0", "trainer.max_steps=1", "trainer.callbacks={}",
           "trainer.logger=[csv]", "--no_test"]


def test_training_a_latent_diffusion_model_on_an_untrained_first_stage_warns(tmp_path, capsys):
    """The demo configs leave the autoencoder's ckpt_path null for the command line: forgetting it trains on the
    latents of a random network, which must not pass in silence."""
    key = "model.params.first_stage_config.params.ckpt_path"
    assert main("test", ["-b", str(DEMO / "ldm_2d.yaml"), "-l", str(tmp_path / "logs"), "-t", *TINY_2D]) == 0
    assert (f"WARNING: {key} is null: the first stage is an untrained autoencoder with random weights, so this model "
            f"learns the latents of noise and its samples will be noise. Set {key}=logs/<autoencoder run>/checkpoints/"
            f"last.ckpt") in capsys.readouterr().err

    first_stage = OmegaConf.load(DEMO / "ldm_2d.yaml").model.params.first_stage_config
    autoencoder = tmp_path / "ae.ckpt"
    torch.save({"state_dict": instantiate_from_config(first_stage).state_dict()}, autoencoder)
    assert main("test", ["-b", str(DEMO / "ldm_2d.yaml"), "-l", str(tmp_path / "logs"), "-t", *TINY_2D,
                         f"{key}={autoencoder}"]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_a_resumed_run_prints_the_learning_rate_it_uses(run, capsys):
    """On resume the optimizer's saved state sets the learning rate, whatever base_learning_rate now says."""
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=7", "model.base_learning_rate=1.0"]) == 0
    out = capsys.readouterr().out
    assert "learning rate 4.00e+00 = 1 (accumulate_grad_batches) * 1 (devices) * 1 (num_nodes) * 4 (batch_size) * " \
           "1.00e+00 (base_learning_rate); unused when resuming (the optimizer state saved in the checkpoint sets it)" \
           in out, out
    assert "resume: learning rate 2.00e-02 (restored with the optimizer and scheduler states)" in out, out
    assert last_checkpoint(run)["optimizer_states"][0]["param_groups"][0]["lr"] == 2e-2


def volumes_with_one_corrupt_past_its_header(root: Path) -> Path:
    """root/s{0..3}.nii.gz, 8^3 each; s1's data is cut in half (its header still reads). Returns s1."""
    root.mkdir(parents=True)
    for index in range(4):
        volume = np.random.default_rng(index).random((8, 8, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / f"s{index}.nii.gz"))
    truncate(root / "s1.nii.gz")
    return root / "s1.nii.gz"


@pytest.mark.parametrize("on_bad_file", ["skip", "error"])
def test_a_file_corrupt_past_its_header_is_skipped_or_stops_the_run_with_one_line(tmp_path, capfd, on_bad_file):
    """The header check at build time passes; reading the data fails in a loader worker, mid-run (whose output
    capfd sees)."""
    corrupt = volumes_with_one_corrupt_past_its_header(tmp_path / "volumes")
    config = OmegaConf.load(CONFIG)
    config.data.params.num_workers = 1
    config.data.params.train = {"target": "ldm.data.nifti_folder.NiftiFolder", "params": {
        "root": str(tmp_path / "volumes"), "crop_to": [4, 4, 1], "split_ratios": [1, 0, 0], "percentiles": [0, 100],
        "on_bad_file": on_bad_file}}  # items (1, 4, 4, 1): the toy's 16 inputs
    OmegaConf.save(config, tmp_path / "volumes.yaml")
    logs = tmp_path / "logs"
    code = main("test", ["-b", str(tmp_path / "volumes.yaml"), "-l", str(logs), "-t", "--no_test",
                         "trainer.max_steps=3"])
    err = capfd.readouterr().err
    if on_bad_file == "skip":
        assert code == 0, err
        assert f"on_bad_file: skip: cannot read NIfTI file {corrupt}: EOFError" in err
        rows = [line.split(",") for line in (only_run_dir(logs) / "metrics.csv").read_text().splitlines()]
        skipped = [float(value) for step, name, value in rows if name == "data/skipped_reads"]
        assert skipped == [1.0, 2.0, 3.0]  # one batch of the 4 subjects per step, each with s1 in it
    else:
        assert code == 2
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot read NIfTI file {corrupt}: EOFError: ") and \
            last.endswith("(on_bad_file: skip would skip it)"), err
