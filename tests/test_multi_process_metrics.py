"""The test stage's metrics (ldm/models/test_metrics.py) over two gloo CPU ranks equal one process's on the same items."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.metrics import MetricSuite
from ldm.models import test_metrics
from tests.test_multi_process_checkpoint import free_port

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

METRICS = ["psnr", "diversity_ssim"]


def items() -> dict:
    """7 items as a test split: real images, slightly different fakes, (7, 1, 16, 16) in [-1, 1]."""
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(7, 1, 16, 16, generator=generator) * 2 - 1
    return {"image": real, "fake": (real + 0.1 * torch.randn(7, 1, 16, 16, generator=generator)).clamp(-1, 1)}


def evaluate(rows: list[int], batch_size: int) -> dict:
    evaluator = test_metrics.TestMetrics(MetricSuite(METRICS, diversity_max_pairs=5, seed=1), real_key="image", output_key="fake")
    data = items()
    for start in range(0, len(rows), batch_size):
        index = torch.tensor(rows[start:start + batch_size])
        evaluator.update({"image": data["image"][index]}, {"fake": data["fake"][index]})
    return evaluator.compute()


def evaluate_on_rank(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:  # the rows a rank keeps of a ShardedResumableSampler's shard (padding dropped): r, r + W, ...
        results[rank] = evaluate(list(range(rank, 7, world_size)), batch_size=2)
    finally:
        dist.destroy_process_group()


def test_two_ranks_metrics_equal_one_process():
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(evaluate_on_rank, args=(2, free_port(), results), nprocs=2, start_method="spawn")
    alone = evaluate(list(range(7)), batch_size=3)
    assert set(alone) == {"psnr", "diversity_ssim", "diversity_ssim_real"}
    assert results[0] == pytest.approx(alone, rel=1e-6) and results[1] == results[0]
