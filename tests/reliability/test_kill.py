"""SIGKILL at any moment, a checkpoint half written included, leaves a loadable `last.ckpt`; `-r` then resumes
exactly. (Unit tests of the atomic write and of rotation: tests/engine/test_checkpoint.py.)"""
import random
import signal
import time

import pytest
import torch

from ldm.engine.checkpoint import load_checkpoint, step_checkpoints
from tests.reliability.processes import (assert_same_training_state, last_checkpoint, only_run_dir,
                                        run_in_process)

OPTIONS = ["-t", "--no_test", "-s", "5"]


def assert_only_complete_checkpoints(checkpoints) -> int:
    """Every file taken as a checkpoint (`last.ckpt`, `step=N.ckpt`) loads; returns last.ckpt's global step."""
    for path in step_checkpoints(checkpoints):
        assert load_checkpoint(path)["global_step"] == int(path.stem.split("=")[1]), path
    return load_checkpoint(checkpoints / "last.ckpt")["global_step"]


def test_sigkill_mid_save_and_at_a_random_moment_then_resume_matches_a_straight_run(tmp_path, runs, single_thread):
    """Bitwise equal, not merely within 1e-6: on CPU, with one thread in every process, each kernel computes the
    same sums in the same order, and the resumed run restarts from exactly the state the straight run had at that
    step (weights, EMA, scale factor, AdamW, LambdaLR, RNG states, data position). Nothing is non-deterministic
    here, so any difference at all is a resume bug. (The uninterrupted run runs in the test's process, also on one
    thread, while the first training process starts.) The resumed runs are not given `-s`: the seed that orders the
    data comes from the checkpoint."""
    logdir = tmp_path / "killed"

    # 1. Killed while the second checkpoint (step 6) is half written: step 3 stays the last one.
    first = runs.train(logdir, *OPTIONS, "model.params.sleep_s=0.01", slow_saves="0,30", markers=tmp_path / "m1")
    assert run_in_process(tmp_path / "straight", *OPTIONS) == 0
    runs.wait_for(lambda: (tmp_path / "m1" / "save-2").exists(), first, "the second checkpoint's write")
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    checkpoints = only_run_dir(logdir) / "checkpoints"
    torn = list(checkpoints.glob(".*.tmp-*"))
    assert len(torn) == 1 and torn[0].name.startswith(".step=6.ckpt.tmp-"), torn
    with pytest.raises(Exception):
        torch.load(torn[0], weights_only=True)  # really torn
    assert [p.name for p in step_checkpoints(checkpoints)] == ["step=3.ckpt"]  # the torn file is not one of them
    assert assert_only_complete_checkpoints(checkpoints) == 3

    # 2. Resumed, then killed at a random moment: in a save (each takes 0.3 s), between saves, or in the link.
    delay = random.Random().uniform(0.0, 1.2)
    second = runs.resume(checkpoints.parent, "-t", "--no_test", "model.params.sleep_s=0.01", slow_saves="0.3",
                         markers=tmp_path / "m2")
    runs.wait_for(lambda: (tmp_path / "m2" / "save-1").exists(), second, "the resumed run's first save")
    time.sleep(delay)
    assert second.poll() is None, "the resumed run ended before it could be killed"
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=10)
    step = assert_only_complete_checkpoints(checkpoints)
    assert 3 <= step < 24, (step, delay)

    # 3. Resumed to the end: the same state as the run that was never interrupted.
    code, output = runs.finish(runs.resume(checkpoints.parent, "-t", "--no_test"))
    assert code == 0, output
    assert "resume: using the checkpoint's seed 5 (not 23)" in output
    assert not list(checkpoints.glob(".*.tmp-*"))  # the torn temporary was cleared by the next save
    resumed, reference = last_checkpoint(checkpoints.parent), last_checkpoint(only_run_dir(tmp_path / "straight"))
    assert reference["global_step"] == 24
    assert_same_training_state(resumed, reference)
