"""scripts/slurm_train.sbatch: its shell parses, the command it starts is one the CLI accepts (arguments and config
only, nothing launched), a requeued job resumes its run folder, and the time-limit signal ends the tasks with SIGTERM
and requeues the job."""
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ldm.cli import build_parser, load_config, normalise_boolean_flags
from ldm.engine.config import trainer_config_from
from tests.engine.helpers import REPO

SCRIPT = REPO / "scripts" / "slurm_train.sbatch"
CONFIG = "configs/demo/ldm_3d.yaml"

pytestmark = pytest.mark.skipif(subprocess.run(["bash", "--version"], capture_output=True).returncode != 0,
                                reason="needs bash")


def sbatch_env(tmp_path: Path, **extra: str) -> dict:
    return dict(os.environ, SLURM_JOB_ID="7", SLURM_NTASKS_PER_NODE="8", SLURM_NNODES="1", RUNS=str(tmp_path / "runs"),
                **extra)


def started_command(tmp_path: Path, *args: str) -> list[str]:
    """The command the script starts, printed by `echo` in srun's place."""
    result = subprocess.run(["bash", str(SCRIPT), CONFIG, *args], cwd=REPO, env=sbatch_env(tmp_path, LAUNCH="echo"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1])


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text


def test_the_started_command_is_one_the_cli_accepts(tmp_path):
    command = started_command(tmp_path, "trainer.strategy=fsdp", "trainer.timeout_s=600")
    assert command[:2] == ["python", "train_ldm.py"]
    opt, dotlist = build_parser("train").parse_known_args(normalise_boolean_flags(command[2:]))
    assert opt.train and opt.base == [CONFIG] and opt.logdir == str(tmp_path / "runs") and not opt.resume
    config = load_config([str(REPO / CONFIG)], dotlist)
    trainer = trainer_config_from(config.trainer)
    assert (trainer.accelerator, trainer.devices, trainer.num_nodes) == ("cuda", 8, 1)
    assert trainer.strategy == "fsdp" and trainer.timeout_s == 600


def test_a_requeued_job_resumes_its_run_folder(tmp_path):
    run = tmp_path / "runs" / "2026-01-01T00-00-00_ldm_3d"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    command = started_command(tmp_path, "trainer.max_steps=10")
    opt, dotlist = build_parser("train").parse_known_args(normalise_boolean_flags(command[2:]))
    assert opt.resume == str(run) and opt.train and not opt.base and "trainer.max_steps=10" in dotlist


def test_the_time_limit_signal_stops_the_tasks_then_requeues(tmp_path):
    tasks = tmp_path / "tasks.sh"  # stands in for srun: exits 0 on SIGTERM, as the trainer does after saving
    tasks.write_text("#!/bin/bash\ntrap 'echo saved; exit 0' TERM\necho started\nwhile true; do sleep 0.05; done\n")
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    for path in (tasks, scontrol):
        path.chmod(0o755)
    env = sbatch_env(tmp_path, LAUNCH=str(tasks), PATH=f"{scontrol.parent}:{os.environ['PATH']}")
    process = subprocess.Popen(["bash", str(SCRIPT), CONFIG], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "started"
        process.send_signal(signal.SIGUSR1)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "saved" in output
    deadline = time.time() + 5
    while not (tmp_path / "scontrol.args").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "7"]
