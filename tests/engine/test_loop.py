"""Training-loop behaviour: several optimizers, accumulation, NaN guard, crash saves, signals, 2-process DDP."""
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from ldm.data.base import ShardedResumableSampler
from ldm.engine.checkpoint import step_checkpoints
from ldm.engine.config import trainer_config_from
from ldm.cli import EXIT_NON_FINITE
from ldm.engine.loop import Trainer
from tests.engine.helpers import cli_command, load_last, only_run_dir, run_cli, subprocess_env
from tests.engine.toy import ToyRegressor


def test_each_optimizer_only_gets_its_own_gradients():
    trainer = Trainer(trainer_config_from({"accelerator": "cpu", "max_steps": 1}))
    model = ToyRegressor(two_optimizers=True)
    model.learning_rate = 0.1
    module, optimizers, _ = trainer._setup(model)
    batch = {"image": torch.randn(2, 1, 4, 4), "target": torch.randn(2, 1), "index": torch.tensor([0, 1])}
    with trainer._only_optimizing(optimizers, 0):
        assert not model.critic.weight.requires_grad and model.linear.weight.requires_grad
        loss = module.training_step(batch, 0, 0)[0] + model.critic(batch["image"].flatten(1)).sum()
        trainer.fabric.backward(loss)
    assert model.critic.weight.grad is None and model.linear.weight.grad is not None
    assert model.critic.weight.requires_grad  # restored


def test_values_read_from_the_device_come_back_as_floats_in_order():
    from ldm.engine.loop import _read_together

    assert _read_together([torch.tensor(1.5), None, 2, torch.tensor([float("nan")]), torch.tensor(3)])[::2] == \
        [1.5, 2.0, 3.0]
    assert _read_together([None, 4]) == [None, 4.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_step_waits_for_the_gpu_once(clip):
    """Losses, gradient norm and logged scalars come back in one read: one synchronisation per optimizer step."""
    trainer = Trainer(trainer_config_from({"accelerator": "cuda", "devices": 1, "max_steps": 1,
                                           "gradient_clip_val": clip}))
    model = ToyRegressor(two_optimizers=True)
    module, optimizers, schedulers = trainer._setup(model)
    trainer.pending = [[], []]
    batch = {"image": torch.randn(2, 1, 4, 4, device="cuda"), "target": torch.randn(2, 1, device="cuda"),
             "index": torch.tensor([0, 1])}
    model.seen_indices = []
    trainer._micro_step(module, optimizers, schedulers, batch, 0, 1, True)  # warm-up: lazy state, first launches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logged = trainer._micro_step(module, optimizers, schedulers, batch, 1, 1, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == len(optimizers), syncs
    assert set(logged) >= {"train/loss", "train/critic_loss", "train/grad_norm_0", "train/grad_norm_1"}


def test_gan_shaped_model_steps_both_optimizers(tmp_path):
    assert run_cli(tmp_path, "-t", "--no_test", "model.params.two_optimizers=true", "trainer.max_steps=3") == 0
    checkpoint = load_last(only_run_dir(tmp_path))
    assert len(checkpoint["optimizer_states"]) == 2
    assert all(state["state"][0]["step"] == 3 for state in checkpoint["optimizer_states"])


@pytest.mark.parametrize("clip", [0.0, 1e6])
def test_gradient_norms_and_step_timing_are_logged(tmp_path, clip):
    """Each optimizer's gradient norm is logged with or without clipping, beside the step rate and loader wait."""
    assert run_cli(tmp_path, "-t", "--no_test", "model.params.two_optimizers=true", "trainer.max_steps=2",
                   "trainer.log_every_n_steps=1", "trainer.logger=[csv]", f"trainer.gradient_clip_val={clip}") == 0
    rows = (only_run_dir(tmp_path) / "metrics.csv").read_text().splitlines()[1:]
    logged = {}
    for row in rows:
        step, name, value = row.split(",")
        logged.setdefault(name, {})[int(step)] = float(value)
    for name in ("train/grad_norm_0", "train/grad_norm_1"):
        assert set(logged[name]) == {1, 2} and all(v > 0 for v in logged[name].values())
    assert all(v >= 0 for v in logged["perf/data_wait_s"].values()) and set(logged["perf/steps_per_s"]) == {1, 2}


def test_accumulation_equals_a_larger_batch(tmp_path):
    assert run_cli(tmp_path / "big", "-t", "--no_test", "trainer.max_steps=4", "data.params.batch_size=4") == 0
    assert run_cli(tmp_path / "acc", "-t", "--no_test", "trainer.max_steps=4", "data.params.batch_size=2",
                   "trainer.accumulate_grad_batches=2") == 0
    big, acc = load_last(only_run_dir(tmp_path / "big")), load_last(only_run_dir(tmp_path / "acc"))
    assert acc["global_step"] == big["global_step"] == 4
    for key in big["state_dict"]:
        torch.testing.assert_close(acc["state_dict"][key], big["state_dict"][key], rtol=1e-5, atol=1e-6)


def stopped_by_guard(capsys, logdir: Path, *args: str) -> tuple[str, str]:
    """Run the CLI, expect the NaN guard to stop it; (its stdout, its one `error: ...` line)."""
    assert run_cli(logdir, *args) == EXIT_NON_FINITE
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("error: non-finite values at global step ") and "Traceback" not in captured.err, error
    return captured.out, error


def test_nan_loss_skips_then_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out, error = stopped_by_guard(capsys, tmp_path, "-t", "--no_test", "model.params.nan_from_step=4",
                                  "trainer.max_bad_steps=2", "trainer.checkpoint.every_n_steps=4",
                                  "trainer.max_steps=20")
    assert error.startswith("error: non-finite values at global step 6: loss of optimizer 0 = nan "
                            "(terms: train/loss=nan)"), error
    run = only_run_dir(tmp_path)
    checkpoint = load_last(run)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert out.count("skipping step") == 2
    assert len(re.findall(r"^first step: [0-9.]+ s \(the later ones: perf/steps_per_s\)$", out, re.M)) == 1


def test_under_a_grad_scaler_gradients_are_unscaled_only_on_a_good_step(monkeypatch):
    """With fp16's grad scaler (CUDA only, so stood in for here) clipping unscales the gradients, which the scaler
    allows once per step: a step whose loss is NaN is skipped before clipping, a good one clips and steps."""
    trainer = Trainer(trainer_config_from({"accelerator": "cpu", "max_steps": 2, "gradient_clip_val": 1.0}))
    model = ToyRegressor(nan_from_step=1)
    model.learning_rate = 0.1
    module, optimizers, schedulers = trainer._setup(model)
    trainer.pending = [[]]
    monkeypatch.setattr(Trainer, "_scaler", object())
    clipped = []
    real_clip = trainer.fabric.clip_gradients
    monkeypatch.setattr(trainer.fabric, "clip_gradients", lambda *a, **k: clipped.append(1) or real_clip(*a, **k))
    batch = {"image": torch.randn(4, 1, 4, 4), "target": torch.randn(4, 1), "index": torch.arange(4)}
    before = model.linear.weight.detach().clone()
    logged = trainer._micro_step(module, optimizers, schedulers, batch, 0, 1, True)  # global step 0: good
    assert clipped == [1] and logged["train/grad_norm_0"] > 0 and not torch.equal(model.linear.weight, before)
    trainer.global_step = 1
    stepped = model.linear.weight.detach().clone()
    trainer._micro_step(module, optimizers, schedulers, batch, 1, 1, True)  # NaN loss: skipped, not clipped
    assert clipped == [1] and torch.equal(model.linear.weight, stepped)
    assert trainer.guard.bad_in_a_row == 1


def test_nan_guard_counts_steps_not_losses_with_two_optimizers(tmp_path, capsys):
    _, error = stopped_by_guard(capsys, tmp_path, "-t", "--no_test", "model.params.two_optimizers=true",
                                "model.params.nan_from_step=4", "trainer.max_bad_steps=2", "trainer.max_steps=20")
    assert "3 bad steps in a row" in error


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_infinite_gradients_are_skipped_not_stepped(tmp_path, capsys, clip):
    _, error = stopped_by_guard(capsys, tmp_path, "-t", "--no_test", "model.params.inf_grad_from_step=3",
                                "trainer.max_bad_steps=2", f"trainer.gradient_clip_val={clip}",
                                "trainer.checkpoint.every_n_steps=1", "trainer.max_steps=20")
    assert re.search(r"gradient norm of optimizer 0 = (inf|nan)", error), error
    run = only_run_dir(tmp_path)
    for path in run.glob("checkpoints/*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path
    assert load_last(run)["global_step"] == 5  # steps 3 and 4 skipped (and saved unchanged), step 5 stops


def test_a_bad_micro_batch_skips_the_whole_accumulated_step(tmp_path):
    # The second of four micro-batches is NaN: the step is skipped entirely, not taken on the other three.
    second_item = torch.randperm(32, generator=torch.Generator().manual_seed(23)).tolist()[1]  # sampler order
    assert run_cli(tmp_path, "-t", "--no_test", "trainer.max_steps=2", "trainer.accumulate_grad_batches=4",
                   "data.params.batch_size=1", f"model.params.nan_item={second_item}") == 0
    checkpoint = load_last(only_run_dir(tmp_path))
    assert checkpoint["optimizer_states"][0]["state"][0]["step"] == 1  # 2 global steps, 1 optimizer step


def test_an_exception_saves_the_last_consistent_state(tmp_path):
    with pytest.raises(RuntimeError, match="toy failure at step 5"):
        run_cli(tmp_path, "-t", "--no_test", "model.params.raise_at_step=5", "trainer.checkpoint.every_n_steps=100")
    assert load_last(only_run_dir(tmp_path))["global_step"] == 5


def test_sampler_shards_are_disjoint_and_resumable():
    shards = [ShardedResumableSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.begin_epoch(2)
    items = [list(s) for s in shards]
    assert all(len(i) == 4 for i in items)
    assert set(sum(items, [])) == set(range(10))  # all items covered (two repeated as padding)
    resumed = ShardedResumableSampler(10, shuffle=True, seed=3, rank=1, world_size=3)
    resumed.begin_epoch(2, start=3)
    assert list(resumed) == items[1][3:] and len(resumed) == 1
    other_epoch = ShardedResumableSampler(10, shuffle=True, seed=3)
    other_epoch.begin_epoch(3)
    first = ShardedResumableSampler(10, shuffle=True, seed=3)
    first.begin_epoch(2)
    assert list(other_epoch) != list(first)


def _wait_for(predicate, process, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_sigusr1_saves_and_continues_then_sigterm_saves_and_exits(tmp_path):
    process = subprocess.Popen(
        cli_command(tmp_path, "-t", "--no_test", "model.params.sleep_s=0.05", "trainer.max_steps=100000",
                    "trainer.checkpoint.every_n_steps=100000"),
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = lambda: next(tmp_path.glob("*/metrics.csv"), None)
        _wait_for(lambda: metrics() is not None and metrics().read_text().count("lr/optimizer_0") >= 3, process)
        process.send_signal(signal.SIGUSR1)
        _wait_for(lambda: any(tmp_path.glob("*/checkpoints/step=*.ckpt")), process)
        time.sleep(0.5)
        assert process.poll() is None  # still training
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    run = only_run_dir(tmp_path)
    usr1_step = int(step_checkpoints(run / "checkpoints")[0].stem.split("=")[1])
    final = load_last(run)["global_step"]
    assert 3 <= usr1_step < final < 100000
    assert f"SIGTERM: checkpoint saved at step {final}, exiting" in output


@pytest.mark.parametrize("launcher", ["fabric.launch", "fabric run"])
def test_two_process_cpu_ddp_run(tmp_path, launcher):
    args = ["-t", "trainer.max_steps=4", "model.params.two_optimizers=true"]
    if launcher == "fabric run":
        command = cli_command(tmp_path, *args)
        command = [str(Path(sys.executable).with_name("fabric")), "run", "--accelerator", "cpu", "--devices", "2",
                   *command[1:]]
    else:
        command = cli_command(tmp_path, *args, "trainer.devices=2", "trainer.strategy=ddp")
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = only_run_dir(tmp_path)
    checkpoint = load_last(run)
    assert checkpoint["global_step"] == 4
    assert "learning rate 8.00e-02 = 1 (accumulate_grad_batches) * 2 (devices)" in result.stdout
    # each rank wrote its own test images into rank 0's folder
    assert {p.name.split("_r-")[1] for p in (run / "images" / "test").glob("*.png")} == {"0.png", "1.png"}
