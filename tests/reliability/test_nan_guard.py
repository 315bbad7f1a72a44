"""The NaN/Inf guard in a real process: bad steps are skipped and counted, too many in a row stop the run with one
`error: ...` line naming the step and the loss terms (exit code 3, no traceback), and the last good checkpoint keeps
its bytes.

(tests/engine/test_loop.py covers non-finite gradients, several optimizers and accumulation in process.)
"""
import re
import shutil
from pathlib import Path

import torch

from ldm.cli import EXIT_NON_FINITE, main
from tests.reliability.processes import file_digests, last_checkpoint, only_run_dir, run_in_process


def test_isolated_nan_steps_are_skipped_and_a_nan_streak_stops_the_run(tmp_path, runs, single_thread):
    assert run_in_process(tmp_path, "-t", "--no_test", "trainer.max_steps=6") == 0
    run = only_run_dir(tmp_path)
    before = file_digests(run / "checkpoints")
    good = last_checkpoint(run)
    assert good["global_step"] == 6

    # steps 7 and 9: one bad step each, skipped; 11, 12, 13: three in a row, more than max_bad_steps=2
    process = runs.resume(run, "-t", "--no_test", "trainer.max_steps=30", "trainer.max_bad_steps=2",
                          "trainer.checkpoint.every_n_steps=100", "model.params.nan_at_steps=[7,9,11,12,13]")
    code, output = runs.finish(process)
    assert code == EXIT_NON_FINITE == 3, output
    assert "Traceback" not in output, output
    skipped = re.findall(r"skipping step: non-finite values at global step (\d+)", output)
    assert skipped == ["7", "9", "11", "12"], output
    last_line = output.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: non-finite values at global step 13: loss of optimizer 0 = nan \(terms: train/loss=nan, "
        r"train/mse=[0-9.e+-]+, train/weight_norm=[0-9.e+-]+\)\. 3 bad steps in a row \(trainer.max_bad_steps=2\); "
        rf"stopping, the last checkpoint is untouched; -r {re.escape(str(run))} resumes from "
        rf"{re.escape(str(run / 'checkpoints' / 'last.ckpt'))}", last_line), output
    # steps 7..12 trained or skipped, nothing saved (every_n_steps=100), and nothing saved on the way out
    assert file_digests(run / "checkpoints") == before
    assert last_checkpoint(run)["global_step"] == 6


def test_a_nan_streak_before_the_first_checkpoint_says_there_is_none(tmp_path, capsys, single_thread):
    logs = tmp_path / "logs"
    assert run_in_process(logs, "-t", "--no_test", "trainer.max_bad_steps=1",
                          "model.params.nan_at_steps=[1,2]") == EXIT_NON_FINITE
    run = only_run_dir(logs)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(
        r"error: non-finite values at global step 2: loss of optimizer 0 = nan \(terms: train/loss=nan, "
        r"train/mse=[0-9.e+-]+, train/weight_norm=[0-9.e+-]+\)\. 2 bad steps in a row \(trainer.max_bad_steps=1\); "
        rf"stopping, the last checkpoint is untouched; no checkpoint was saved in {re.escape(str(run))} yet",
        err.strip().splitlines()[-1]), err
    assert not list((run / "checkpoints").iterdir())


def test_a_step_that_writes_inf_weights_stops_the_run_before_they_are_saved(tmp_path, single_thread, capsys):
    """The learning rate spikes at step 7: the SGD update overflows, so the loss and gradients of that step are
    finite but the weights it writes are Inf. The run stops at once (exit code 3), the checkpoint of step 6 stays
    the last one and keeps finite weights, and the hint points at it."""
    logs = tmp_path / "logs"
    code = run_in_process(logs, "-t", "--no_test", "trainer.max_steps=12", "trainer.checkpoint.keep_last_k=1",
                          "model.params.sgd=true", "model.params.lr_spikes={7: 1e40}")
    assert code == EXIT_NON_FINITE, capsys.readouterr()
    run = only_run_dir(logs)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite weights after the optimizer step at global step 7 "), err
    assert err.endswith(f"-r {run} resumes from {run / 'checkpoints' / 'last.ckpt'}"), err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=6.ckpt"]
    saved = last_checkpoint(run)
    assert saved["global_step"] == 6
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values())


def test_rotation_keeps_the_last_good_checkpoint_through_a_streak_of_bad_steps(tmp_path, single_thread, capsys):
    """Steps 7.. are NaN; the checkpoint due at step 9 is saved inside the streak. With keep_last_k=1 it would
    rotate out step 6, the last checkpoint saved before the streak: it is kept, and the stop names it."""
    logs = tmp_path / "logs"
    code = run_in_process(logs, "-t", "--no_test", "trainer.max_steps=20", "trainer.checkpoint.keep_last_k=1",
                          "trainer.max_bad_steps=4", "model.params.nan_at_steps=[7,8,9,10,11,12]")
    assert code == EXIT_NON_FINITE
    run = only_run_dir(logs)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=6.ckpt", "step=9.ckpt"]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"-r {checkpoints / 'step=6.ckpt'} resumes from before the bad steps (last.ckpt was "
                        f"saved during them)"), err
    # as the hint says, into the same run folder (with the bad steps gone)
    assert main("test", ["-r", str(checkpoints / "step=6.ckpt"), "-t", "--no_test", "trainer.max_steps=7",
                         "model.params.nan_at_steps=[]"]) == 0
    assert only_run_dir(logs) == run and last_checkpoint(run)["global_step"] == 7
    # rotation counts the file just saved as the newest: step 9 of the abandoned streak goes, not step 7
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=7.ckpt"]


def test_resuming_from_a_checkpoint_with_inf_weights_is_refused(trained_run, tmp_path, capsys):
    run = Path(shutil.copytree(trained_run, tmp_path / "logs" / trained_run.name))
    checkpoint = last_checkpoint(run)
    checkpoint["state_dict"]["model.0.weight"][0, 0] = float("inf")
    (run / "checkpoints" / "last.ckpt").unlink()
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    before = file_digests(run)
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {run / 'checkpoints' / 'last.ckpt'} holds NaN/Inf weights (model.0.weight): resume from "
                   f"an earlier step=N.ckpt"), err
    assert file_digests(run) == before
