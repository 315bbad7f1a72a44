"""Preemption: SIGUSR1 saves at the next step boundary and training goes on; SIGTERM saves at the next step boundary
and exits 0; `-r` then finishes the run as if nothing happened, loader workers with random augmentation included.

(tests/engine/test_loop.py checks the two signals on the plain toy model; this adds the exact continuation.)
"""
import os
import signal
import socket
import subprocess
import sys

from ldm.cli import main
from ldm.engine.checkpoint import load_checkpoint, step_checkpoints
from tests.reliability.processes import (REPO, assert_same_training_state, file_digests, last_checkpoint,
                                        logged_steps, only_run_dir, run_in_process)

# Two loader workers drawing random augmentation; checkpoints only when signalled (and at the end).
OPTIONS = ["-t", "--no_test", "-s", "11", "data.params.num_workers=2", "trainer.checkpoint.every_n_steps=1000"]
BATCHES_PER_EPOCH = 5  # 20 items, batch size 4


def test_sigusr1_then_sigterm_then_resume_matches_a_straight_run(tmp_path, runs, single_thread):
    """Bitwise (see test_kill.py for why). The augmentation of every item is seeded from (seed, epoch, rank,
    position in the epoch) by `ldm.data.base.ItemSeededDataset`, so the resumed run's fresh workers, which start
    mid-epoch, draw what the straight run's long-lived workers drew at the same position."""
    preempted = runs.train(tmp_path / "preempted", *OPTIONS, "model.params.sleep_s=0.1")
    assert run_in_process(tmp_path / "straight", *OPTIONS) == 0
    logdir = tmp_path / "preempted"
    runs.wait_for(lambda: logdir.is_dir() and any(logdir.iterdir()) and logged_steps(only_run_dir(logdir)) >= 3,
                  preempted, "step 3")
    run = only_run_dir(logdir)
    checkpoints = run / "checkpoints"

    preempted.send_signal(signal.SIGUSR1)
    runs.wait_for(lambda: bool(step_checkpoints(checkpoints)), preempted, "the SIGUSR1 checkpoint")
    usr1_step = int(step_checkpoints(checkpoints)[0].stem.split("=")[1])
    runs.wait_for(lambda: logged_steps(run) >= usr1_step + 2, preempted, "training to go on after SIGUSR1")

    preempted.send_signal(signal.SIGTERM)
    code, output = runs.finish(preempted)
    assert code == 0, output
    term = last_checkpoint(run)
    term_step = term["global_step"]
    assert f"SIGTERM: checkpoint saved at step {term_step}, exiting" in output
    assert 3 <= usr1_step < usr1_step + 2 <= term_step < 24
    for checkpoint in (load_checkpoint(checkpoints / f"step={usr1_step}.ckpt"), term):
        # saved between two steps: the optimizer has taken exactly global_step steps, and the data position agrees
        step = checkpoint["global_step"]
        assert checkpoint["optimizer_states"][0]["state"][0]["step"] == step
        assert checkpoint["epoch"] * BATCHES_PER_EPOCH + checkpoint["batch_in_epoch"] == step

    code, output = runs.finish(runs.resume(run, "-t", "--no_test"))
    assert code == 0, output
    assert_same_training_state(last_checkpoint(run), last_checkpoint(only_run_dir(tmp_path / "straight")))


def killpg(process, signum) -> None:
    """Signal the process's whole group, as SLURM does at the time limit: the loader workers get it too."""
    os.killpg(process.pid, signum)


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_0(tmp_path, runs):
    logdir = tmp_path / "logs"
    process = runs.train(logdir, *OPTIONS, "model.params.sleep_s=0.1")
    runs.wait_for(lambda: logdir.is_dir() and any(logdir.iterdir()) and logged_steps(only_run_dir(logdir)) >= 3,
                  process, "step 3")
    killpg(process, signal.SIGTERM)
    code, output = runs.finish(process)
    assert code == 0 and "Traceback" not in output, output
    run = only_run_dir(logdir)
    step = last_checkpoint(run)["global_step"]
    assert f"SIGTERM: checkpoint saved at step {step}, exiting" in output, output
    assert 3 <= step < 24


def test_signals_during_start_up_and_the_test_stage_end_the_run_with_one_line(tmp_path, runs):
    """No checkpoint to save there: SIGUSR1 says so, SIGTERM exits 0 with one line, and start-up writes nothing."""
    logdir = tmp_path / "start-up"
    process = runs.train(logdir, *OPTIONS, "model.params.build_sleep_s=60")
    runs.wait_for(lambda: "data: DataModuleFromConfig" in runs.output(process), process, "the model build")
    killpg(process, signal.SIGUSR1)
    runs.wait_for(lambda: "SIGUSR1 during start-up" in runs.output(process), process, "the SIGUSR1 notice")
    killpg(process, signal.SIGTERM)
    code, output = runs.finish(process)
    assert code == 0 and "Traceback" not in output, output
    assert "SIGUSR1 during start-up: a checkpoint is saved after the first training step" in output
    assert output.strip().splitlines()[-1] == "SIGTERM during start-up: exiting", output
    assert not logdir.exists()

    logdir = tmp_path / "test-stage"
    test_split = "data.params.test={target: tests.engine.toy.RegressionData, params: {length: 40}}"
    process = runs.train(logdir, "-t", "trainer.max_steps=2", "model.params.sleep_s=0.5", test_split)
    runs.wait_for(lambda: logdir.is_dir() and (only_run_dir(logdir) / "images" / "test").is_dir(), process,
                  "the test stage's first images")
    killpg(process, signal.SIGUSR1)
    runs.wait_for(lambda: "SIGUSR1 during the test stage" in runs.output(process), process, "the SIGUSR1 notice")
    killpg(process, signal.SIGTERM)
    code, output = runs.finish(process)
    assert code == 0 and "Traceback" not in output, output
    assert "SIGUSR1 during the test stage: no training runs, nothing to save" in output
    assert "SIGTERM during the test stage: exiting" in output, output
    assert last_checkpoint(only_run_dir(logdir))["global_step"] == 2


def test_a_second_process_resuming_a_running_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, runs,
                                                                                                   capsys):
    """Two processes on one run folder would trample each other's checkpoints: the second gets one error line
    naming the first (pid and host), exit code 2, and changes nothing. The first is then killed with its lock file
    left behind: the next resume sees that the lock is stale, takes it over and finishes the run."""
    assert run_in_process(tmp_path, "-t", "--no_test", "trainer.max_steps=3") == 0
    run = only_run_dir(tmp_path)
    # the first resume hangs halfway through writing its checkpoint of step 6, holding the lock
    first = runs.resume(run, "-t", "--no_test", "trainer.max_steps=6", slow_saves="60", markers=tmp_path / "m")
    runs.wait_for(lambda: (tmp_path / "m" / "save-1").exists(), first, "the first resume's checkpoint write")
    owner = f"pid {first.pid} on host {socket.gethostname()}"
    before = file_digests(run)
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=24"]) == 2  # here, in this process
    output = capsys.readouterr().err
    assert output.strip().splitlines()[-1] == (
        f"error: run folder {run} is in use by {owner} (lock file {run / '.lock'}); two runs writing one folder "
        f"would overwrite each other's checkpoints"), output
    assert file_digests(run) == before

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert (run / ".lock").read_text().strip() == owner
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=6"]) == 0
    assert f"run folder {run}: took over the stale lock of {owner} (not running)" in capsys.readouterr().out
    assert last_checkpoint(run)["global_step"] == 6 and not (run / ".lock").exists()


def test_a_loader_left_running_at_exit_does_not_hang_the_process(tmp_path):
    """Workers ignore SIGTERM from outside but obey their parent's: at interpreter exit multiprocessing ends daemon
    workers with SIGTERM and then waits for them without a deadline (a worker ignoring every SIGTERM hung here)."""
    script = tmp_path / "leave_loader.py"
    script.write_text(
        "from ldm.data.base import DataModuleFromConfig\n"
        "data = DataModuleFromConfig(batch_size=2, num_workers=1,\n"
        "                            train={'target': 'tests.engine.toy.RegressionData', 'params': {'length': 8}})\n"
        "batches = iter(data.dataloader('train'))  # still referenced, with its worker, when the interpreter exits\n"
        "next(batches)\n"
        "print('read a batch', flush=True)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "read a batch\n", result.stderr
