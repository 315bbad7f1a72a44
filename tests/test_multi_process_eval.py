"""Validation and test spread over ranks: two gloo CPU processes against one, on a split whose length does not divide.

7 items, batches of 2, 2 ranks: rank 0 holds items 0 2 | 4 6, rank 1 holds 1 3 | 5 and a repeat of item 0 (padding
so both ranks run as many batches). The repeat must count nowhere: the test evaluator sees each item once, and
val/loss (each item weighted once) equals the single process's, whose batches are 0 1 | 2 3 | 4 5 | 6.
"""
import csv
import json
import subprocess

import pytest
import torch
import torch.distributed as dist

from ldm.engine.evaluation import TEST_METRICS, padding_rows
from ldm.data.base import ShardedResumableSampler
from ldm.data.buckets import BucketSampler
from tests.engine.helpers import cli_command, load_last, only_run_dir, run_cli, subprocess_env
from tests.engine.toy import ToyRegressor

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ARGS = ["-t", "model.target=tests.test_multi_process_eval.ItemCountingToy", "model.base_learning_rate=0.0",
        "data.params.batch_size=2", "data.params.validation.params.length=7", "data.params.test.params.length=7",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.checkpoint.every_n_steps=2",
        "trainer.callbacks.image_logger.params.max_images=3"]


class ItemSums:
    """Evaluator: how many items, and the sums of their indices, squared indices and targets, over all ranks."""

    def __init__(self):
        self.sums = torch.zeros(4, dtype=torch.float64)

    def update(self, batch: dict, outputs: dict) -> None:
        index = batch["index"].double()
        self.sums += torch.stack([torch.tensor(float(len(index))), index.sum(), index.square().sum(),
                                  batch["target"].double().sum()])

    def compute(self) -> dict:
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        return dict(zip(["items", "index_sum", "index_square_sum", "target_sum"], sums.tolist()))


class ItemCountingToy(ToyRegressor):
    def test_evaluator(self):
        return ItemSums()


def val_losses(run) -> list[float]:
    with open(run / "metrics.csv") as handle:
        return [float(row["value"]) for row in csv.DictReader(handle) if row["name"] == "val/loss"]


def test_padding_rows_mark_the_repeated_items_of_the_last_rank():
    shards = [ShardedResumableSampler(7, shuffle=False, rank=rank, world_size=2) for rank in range(2)]
    assert [padding_rows(shard, 2, batch, 2) for shard in shards for batch in range(2)] == \
        [[False, False], [False, False], [False, False], [False, True]]
    assert list(shards[1]) == [1, 3, 5, 0]  # the sampler's own padding, which these rows describe
    # buckets pad with whole batches: [0 1] [2 0] [3 4] + [0 1] again, rank 1 holding [2 0] and the repeat
    buckets = [BucketSampler([0, 0, 0, 1, 1], 2, shuffle=False, rank=rank, world_size=2) for rank in range(2)]
    assert [padding_rows(shard, 2, batch, 2) for shard in buckets for batch in range(2)] == \
        [[False, False], [False, False], [False, False], [True, True]]
    assert list(buckets[1]) == [2, 0, 0, 1]


def test_two_ranks_validate_and_test_each_item_once_as_one_process_does(tmp_path, capsys):
    result = subprocess.run(cli_command(tmp_path / "two", *ARGS, "trainer.devices=2", "trainer.strategy=ddp"),
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert run_cli(tmp_path / "one", *ARGS) == 0
    two, one = only_run_dir(tmp_path / "two"), only_run_dir(tmp_path / "one")

    metrics = [json.loads((run / TEST_METRICS).read_text())["metrics"] for run in (two, one)]
    assert metrics[0]["items"] == 7 and metrics[0]["index_sum"] == 21 and metrics[0]["index_square_sum"] == 91
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-12)
    # each rank's two test batches, once each: 1 file per batch and key
    assert sorted(p.name for p in (two / "images" / "test").glob("*.png")) == \
        [f"inputs_b-000{batch}_r-{rank}.png" for batch in (0, 1) for rank in (0, 1)]
    losses = [val_losses(run) for run in (two, one)]
    assert len(losses[0]) == 1 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    # the validation images: 2 drawn on each rank, the first 3 of the 4 gathered ones in rank 0's grid
    assert (two / "images" / "val" / "inputs_gs-000002_e-000.png").is_file()

    # the two-process run resumes in one process (its saved config says devices: 2)
    assert run_cli(tmp_path, "-r", str(two), "-t", "--no_test", "trainer.max_steps=4", "trainer.devices=1",
                   "trainer.strategy=auto") == 0
    assert load_last(two)["global_step"] == 4 and len(load_last(two)["rng"]) == 1
    assert "holds RNG states of 2 rank(s), this run has 1; reseeding" in capsys.readouterr().out
