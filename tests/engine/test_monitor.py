"""best.ckpt: kept by the monitored validation key, in either direction, across resumes and rotation."""
import json
import subprocess

import pytest
import torch

from ldm.cli import EXIT_BAD_INPUT, main
from ldm.engine.checkpoint import step_checkpoints
from ldm.engine.config import trainer_config_from
from ldm.engine.monitor import BestRecord, MonitorKeyError
from ldm.util import ConfigError
from tests.engine.helpers import cli_command, only_run_dir, run_cli, subprocess_env

SCRIPTED = ("model.target=tests.engine.toy_metrics.ScriptedScore", "--no_test", "trainer.val_check_interval=2")


def scores_override(scores) -> str:
    """`model.params.scores=[...]` as YAML (`.nan`, `-.inf` for non-finite values)."""
    return f"model.params.scores=[{', '.join(map(str, scores))}]"


def scripted_run(logdir, scores, *overrides) -> int:
    return run_cli(logdir, "-t", *SCRIPTED, scores_override(scores), *overrides)


def resume(path, scores, *overrides) -> int:
    return main("test", ["-r", str(path), "-t", "--no_test", scores_override(scores), *overrides])


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def best_of(run) -> dict:
    return load(run / "checkpoints" / "best.ckpt")


def test_best_record_compares_strictly_and_never_keeps_a_non_finite_value():
    lowest = BestRecord("val/loss", "min")
    steps = {1: 3.0, 2: float("nan"), 3: 2.0, 4: 2.0, 5: float("-inf"), 6: 2.5}
    improved = [step for step, value in steps.items() if lowest.update({"val/loss": value}, step)]
    assert improved == [1, 3] and (lowest.value, lowest.step) == (2.0, 3)
    highest = BestRecord("val/psnr", "max")
    improved = [step for step, value in {1: 20.0, 2: 25.0, 3: float("inf"), 4: 24.0}.items()
                if highest.update({"val/psnr": value}, step)]
    assert improved == [1, 2] and highest.value == 25.0


def test_a_saved_record_continues_only_for_the_same_key_and_mode():
    record = BestRecord("val/loss", "min")
    assert record.load_state_dict({"monitor": "val/loss", "mode": "min", "value": 0.5, "step": 7}) is None
    assert not record.update({"val/loss": 0.6}, 9) and record.update({"val/loss": 0.4}, 9)
    other = BestRecord("val/loss", "max")
    notice = other.load_state_dict({"monitor": "val/loss", "mode": "min", "value": 0.5, "step": 7})
    assert "min" in notice and other.value is None


def test_an_absent_key_names_itself_and_the_keys_there_are():
    with pytest.raises(MonitorKeyError, match=r"'val/nope'.*val/loss, val/score"):
        BestRecord("val/nope").update({"val/score": 1.0, "val/loss": 2.0}, 1)
    assert not BestRecord(None).update({"val/loss": 1.0}, 1)  # nothing monitored: nothing to find


def test_mode_must_be_min_or_max():
    with pytest.raises(ConfigError, match="trainer.checkpoint.mode: 'median'"):
        trainer_config_from({"max_steps": 1, "checkpoint": {"mode": "median"}})
    with pytest.raises(ConfigError, match="trainer.checkpoint.monitor"):
        trainer_config_from({"max_steps": 1, "checkpoint": {"monitor": 3}})


@pytest.mark.parametrize("every_n_steps", [2, 1000])  # best.ckpt linked to a step file / saved on its own
def test_best_is_the_lowest_validation_not_the_last(tmp_path, every_n_steps):
    # validations at steps 2, 4, 6, 8: down, then up
    assert scripted_run(tmp_path, [3.0, 1.0, 2.0, 5.0], "trainer.max_steps=8",
                        f"trainer.checkpoint.every_n_steps={every_n_steps}", "trainer.checkpoint.keep_last_k=0") == 0
    run = only_run_dir(tmp_path)
    best, last = best_of(run), load(run / "checkpoints" / "last.ckpt")
    assert best["global_step"] == 4 and last["global_step"] == 8
    assert best["best"] == {"monitor": "val/score", "mode": "min", "value": 1.0, "step": 4}
    assert last["best"] == best["best"]
    if every_n_steps == 2:
        step_4 = load(run / "checkpoints" / "step=4.ckpt")
        for key, value in step_4["state_dict"].items():
            assert torch.equal(best["state_dict"][key], value), key
    assert not torch.equal(best["state_dict"]["linear.weight"], last["state_dict"]["linear.weight"])
    logged = (run / "metrics.csv").read_text().splitlines()
    assert [line for line in logged if line.startswith(("2,best/", "4,best/", "6,best/", "8,best/"))] == \
        ["2,best/val/score,3.0", "4,best/val/score,1.0"]


def test_mode_max_and_the_override_of_the_models_key(tmp_path):
    # the model monitors val/loss; the trainer section picks val/score, highest first
    assert scripted_run(tmp_path, [1.0, 4.0, 2.0, 3.0], "trainer.max_steps=8", "model.params.monitor=val/loss",
                        "trainer.checkpoint.monitor=val/score", "trainer.checkpoint.mode=max") == 0
    best = best_of(only_run_dir(tmp_path))
    assert best["global_step"] == 4 and best["best"]["value"] == 4.0 and best["best"]["mode"] == "max"


def test_a_non_finite_score_is_never_best(tmp_path):
    assert scripted_run(tmp_path, [".nan", 2.0, "-.inf", 3.0], "trainer.max_steps=8") == 0
    best = best_of(only_run_dir(tmp_path))
    assert best["global_step"] == 4 and best["best"]["value"] == 2.0


def test_validation_at_epoch_ends_keeps_a_resumable_best(tmp_path):
    assert scripted_run(tmp_path, [1.0, 3.0, 2.0], "trainer.max_steps=-1", "trainer.max_epochs=3",
                        "trainer.limit_train_batches=2", "trainer.val_check_interval=0",
                        "trainer.checkpoint.mode=max") == 0
    best = best_of(only_run_dir(tmp_path))
    assert (best["global_step"], best["epoch"], best["batch_in_epoch"]) == (4, 2, 0)  # saved as the next epoch's start


def test_a_resumed_run_keeps_comparing_against_the_old_best(tmp_path):
    assert scripted_run(tmp_path, [3.0, 1.0], "trainer.max_steps=4") == 0
    run = only_run_dir(tmp_path)
    assert resume(run, [2.0, 1.5], "trainer.max_steps=8") == 0  # neither beats 1.0 from step 4
    assert best_of(run)["global_step"] == 4
    assert load(run / "checkpoints" / "last.ckpt")["best"]["value"] == 1.0
    assert resume(run, [0.5], "trainer.max_steps=10") == 0
    assert best_of(run)["global_step"] == 10 and best_of(run)["best"]["value"] == 0.5


def test_resuming_an_older_checkpoint_does_not_overwrite_a_better_best(tmp_path):
    """Killed after best.ckpt (step 4) but before the next step file: step=2.ckpt's record is older than best.ckpt."""
    assert scripted_run(tmp_path, [3.0, 1.0], "trainer.max_steps=4", "trainer.checkpoint.every_n_steps=2",
                        "trainer.checkpoint.keep_last_k=0") == 0
    run = only_run_dir(tmp_path)
    assert load(run / "checkpoints" / "step=2.ckpt")["best"]["value"] == 3.0
    assert resume(run / "checkpoints" / "step=2.ckpt", [2.5, 2.0], "trainer.max_steps=6") == 0
    best = best_of(run)
    assert best["global_step"] == 4 and best["best"]["value"] == 1.0


def test_a_resume_from_best_ckpt_continues_from_its_weights(tmp_path):
    assert scripted_run(tmp_path, [3.0, 1.0, 2.0], "trainer.max_steps=6") == 0
    run = only_run_dir(tmp_path)
    assert resume(run / "checkpoints" / "best.ckpt", [2.0], "trainer.max_steps=6") == 0
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert best_of(run)["global_step"] == 4


def test_rotation_never_deletes_best(tmp_path):
    assert scripted_run(tmp_path, [1.0, 2.0, 3.0, 4.0], "trainer.max_steps=8", "trainer.checkpoint.every_n_steps=2",
                        "trainer.checkpoint.keep_last_k=1") == 0
    checkpoints = only_run_dir(tmp_path) / "checkpoints"
    assert [p.name for p in step_checkpoints(checkpoints)] == ["step=8.ckpt"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt", "step=8.ckpt"]
    assert load(checkpoints / "best.ckpt")["global_step"] == 2


@pytest.mark.parametrize("override, key", [("trainer.checkpoint.monitor=val/nope", "val/nope"),
                                           ("model.params.monitor=val/rec_loss", "val/rec_loss")])
def test_a_monitor_absent_from_validation_is_one_clear_error(tmp_path, capsys, override, key):
    assert scripted_run(tmp_path, [1.0] * 4, "trainer.max_steps=8", override) == EXIT_BAD_INPUT
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"'{key}'" in errors[0] and "val/loss, val/score" in errors[0]
    assert not (only_run_dir(tmp_path) / "checkpoints" / "best.ckpt").exists()


def test_no_monitor_keeps_no_best(tmp_path):
    assert scripted_run(tmp_path, [1.0] * 4, "trainer.max_steps=8", "model.params.monitor=null") == 0
    assert not (only_run_dir(tmp_path) / "checkpoints" / "best.ckpt").exists()
    assert load(only_run_dir(tmp_path) / "checkpoints" / "last.ckpt")["best"] is None


def test_two_processes_agree_on_the_best_and_rank_0_writes_the_test_metrics(tmp_path):
    command = cli_command(tmp_path, "-t", "model.target=tests.engine.toy_metrics.ScriptedAndEvaluated",
                          scores_override([3.0, 1.0, 2.0, 5.0]), "trainer.val_check_interval=2", "trainer.max_steps=8",
                          "trainer.devices=2", "trainer.strategy=ddp")
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = only_run_dir(tmp_path)
    assert best_of(run)["global_step"] == 4
    document = json.loads((run / "metrics" / "test.json").read_text())
    assert document["global_step"] == 8 and set(document["metrics"]) == {"items", "mean_target"}
