"""The NaN/Inf guard in a real process: bad steps are skipped and counted, too many in a row stop the run with one
`error: ...` line naming the step and the loss terms (exit code 3, no traceback), and the last good checkpoint keeps
its bytes.

(tests/engine/test_loop.py covers non-finite gradients, several optimizers and accumulation in process.)
"""
import re

from ldm.cli import EXIT_NON_FINITE
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
