"""The CLI end to end on the toy model: log dir layout, resume, scale_lr, debug dir, errors."""
import subprocess

import pytest
import torch

from ldm.cli import scaled_learning_rate
from tests.engine.helpers import cli_command, load_last, only_run_dir, run_cli, subprocess_env


def test_train_writes_the_run_folder(tmp_path):
    assert run_cli(tmp_path / "logs", "-t", "-n", "toy", "-p", "_v1") == 0
    run = only_run_dir(tmp_path / "logs")
    assert run.name.endswith("_toy_v1")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=12.ckpt", "step=8.ckpt"]  # keep_last_k: 2
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1
    assert len(list((run / "configs").glob("*-trainer.yaml"))) == 1
    for split in ("train", "val", "test"):
        assert list((run / "images" / split).glob("*.png")), split
    metrics = (run / "metrics.csv").read_text()
    assert "val/loss" in metrics and "lr/optimizer_0" in metrics and "train/loss" in metrics
    checkpoint = load_last(run)
    assert checkpoint["global_step"] == 12
    assert set(checkpoint) >= {"state_dict", "optimizer_states", "lr_schedulers", "epoch", "rng", "config"}
    assert checkpoint["config"]["trainer"]["max_steps"] == 12
    assert "linear.weight" in checkpoint["state_dict"]


def test_resume_from_logdir_matches_a_straight_run(tmp_path):
    # noise_std: the loss depends on the RNG, so the RNG state must be resumed too
    options = ("model.params.use_scheduler=true", "model.params.noise_std=0.5")
    straight = tmp_path / "straight"
    assert run_cli(straight, "-t", "--no_test", "trainer.max_steps=10", *options) == 0
    split = tmp_path / "split"
    assert run_cli(split, "-t", "--no_test", "trainer.max_steps=6", *options) == 0
    run = only_run_dir(split)
    assert load_last(run)["global_step"] == 6
    assert main_resume(run, "trainer.max_steps=10") == 0
    resumed, reference = load_last(run), load_last(only_run_dir(straight))
    assert resumed["global_step"] == reference["global_step"] == 10
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    exp_avg = lambda c: c["optimizer_states"][0]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg(resumed), exp_avg(reference))
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    assert len(list((run / "configs").glob("*-project.yaml"))) >= 1


def main_resume(run, *overrides):
    from ldm.cli import main
    return main("test", ["-r", str(run), "-t", "--no_test", *overrides])


def test_test_stage_only_loads_the_checkpoint(tmp_path):
    assert run_cli(tmp_path / "logs", "-t", "--no_test") == 0
    run = only_run_dir(tmp_path / "logs")
    from ldm.cli import main
    assert main("test", ["-r", str(run)]) == 0
    assert list((run / "images" / "test").glob("inputs_b-0000_r-0.png"))


def test_scale_lr_arithmetic_and_message():
    lr, line = scaled_learning_rate(1e-4, accumulate=2, devices=4, num_nodes=3, batch_size=5, scale=True)
    assert lr == pytest.approx(2 * 4 * 3 * 5 * 1e-4)
    assert "2 (accumulate_grad_batches) * 4 (devices) * 3 (num_nodes) * 5 (batch_size)" in line
    assert scaled_learning_rate(1e-4, 2, 4, 3, 5, scale=False)[0] == 1e-4


def test_scale_lr_reaches_the_model(tmp_path, capsys):
    assert run_cli(tmp_path / "a", "-t", "--no_test", "trainer.max_steps=1", "trainer.accumulate_grad_batches=2") == 0
    assert "learning rate 8.00e-02 = 2 (accumulate_grad_batches) * 1 (devices)" in capsys.readouterr().out
    assert run_cli(tmp_path / "b", "-t", "--no_test", "trainer.max_steps=1", "--scale_lr", "false") == 0
    assert "learning rate 1.00e-02 (base_learning_rate, not scaled)" in capsys.readouterr().out
    checkpoint = load_last(only_run_dir(tmp_path / "b"))
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01


def test_debug_runs_go_to_their_own_folder(tmp_path):
    # original main.py spellings: optional booleans and --no-test
    assert run_cli(tmp_path / "logs", "-t", "True", "--no-test", "-d", "-n", "dbg", "trainer.max_steps=1") == 0
    runs = list((tmp_path / "logs" / "debug_runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("_dbg")


@pytest.mark.parametrize("args, message", [
    (["-n", "x", "-r", "somewhere"], "-n/--name and -r/--resume of a run folder cannot be combined"),
    (["-r", "no/such/dir"], "-r no/such/dir: no such file or folder"),
    (["trainer.max_step=3"], "trainer: unknown key 'max_step'"),
    (["model.params.two_optimisers=true", "-t"], "model.params: unknown argument 'two_optimisers' for ToyRegressor"),
    (["data.params.train.target=ldm.data.nope.Data", "-t"],
     "data.params.train.target: cannot import 'ldm.data.nope.Data' (no module ldm.data.nope)"),
    (["data.params.train.params.length=0", "-t"],
     "data.params: DataModuleFromConfig: data.params.train: the train dataset (RegressionData) is empty"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, message):
    assert run_cli(tmp_path / "logs", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" or (err.startswith("error: ") and message in err), err


def test_resume_of_a_logdir_without_checkpoint(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    from ldm.cli import main
    assert main("test", ["-r", str(tmp_path / "run")]) == 2
    assert "has no checkpoints/last.ckpt" in capsys.readouterr().err


def test_help_documents_the_flags():
    result = subprocess.run(cli_command(__import__("pathlib").Path("."), "--help")[:2] + ["--help"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0
    for flag in ("--base", "--name", "--resume", "--train", "--no_test", "--debug", "--scale_lr", "--postfix",
                 "--seed", "--logdir", "dotlist"):
        assert flag in result.stdout, flag
