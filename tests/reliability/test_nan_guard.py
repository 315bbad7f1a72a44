"""The NaN/Inf guard in a real process: bad steps are skipped and counted, too many in a row stop the run with the
step and the loss terms named, and the last good checkpoint keeps its bytes.

(tests/engine/test_loop.py covers non-finite gradients, several optimizers and accumulation in process.)
"""
import re

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
    assert code == 1, output
    skipped = re.findall(r"skipping step: non-finite values at global step (\d+)", output)
    assert skipped == ["7", "9", "11", "12"], output
    assert re.search(r"NonFiniteLossError: non-finite values at global step 13: loss of optimizer 0 = nan \(terms: "
                     r"train/loss=nan, train/mse=[0-9.e+-]+, train/weight_norm=[0-9.e+-]+\)\. 3 bad steps in a row "
                     r"\(trainer.max_bad_steps=2\); stopping, the last checkpoint is untouched", output), output
    # steps 7..12 trained or skipped, nothing saved (every_n_steps=100), and nothing saved on the way out
    assert file_digests(run / "checkpoints") == before
    assert last_checkpoint(run)["global_step"] == 6
