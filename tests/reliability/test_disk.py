"""A full disk or an unusable log folder: one `error:` line naming the path and the OS error, no traceback, and the
last good checkpoint intact. (Unit tests of the atomic write under a failing disk: tests/engine/test_checkpoint.py.)"""
from pathlib import Path

from ldm.cli import EXIT_BAD_INPUT, EXIT_OS_ERROR, main
from tests.reliability.processes import file_digests, last_checkpoint, only_run_dir, run_in_process


def test_a_full_disk_fails_the_save_with_one_line_and_keeps_the_last_checkpoint(tmp_path, runs, single_thread):
    assert run_in_process(tmp_path, "-t", "--no_test", "trainer.max_steps=3") == 0
    run = only_run_dir(tmp_path)
    checkpoints = run / "checkpoints"
    before = file_digests(checkpoints)
    size = (checkpoints / "last.ckpt").stat().st_size
    # files may grow to 60% of a checkpoint: the logs and metrics.csv fit, the checkpoint of step 6 does not
    code, output = runs.finish(runs.resume(run, "-t", "--no_test", "trainer.max_steps=6",
                                           file_size_limit=int(0.6 * size)))
    assert code == EXIT_OS_ERROR == 4, output
    assert "Traceback" not in output, output
    assert output.strip().splitlines()[-1] == f"error: cannot write {checkpoints / 'step=6.ckpt'}: [Errno 27] File " \
                                              f"too large", output
    assert file_digests(checkpoints) == before  # last.ckpt (step 3) as it was, no temporary left behind
    assert last_checkpoint(run)["global_step"] == 3
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=6"]) == 0
    assert last_checkpoint(run)["global_step"] == 6


def test_a_log_folder_that_cannot_hold_run_folders_is_refused_before_anything_runs(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_in_process(blocker / "logs", "-t", "--no_test") == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: -l {blocker / 'logs'}: run folders cannot be made there ({blocker} is not a writable folder)")
    assert blocker.read_text() == "not a folder" and sorted(Path(tmp_path).iterdir()) == [blocker]
