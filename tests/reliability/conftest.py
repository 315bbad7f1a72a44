"""Fixtures of the reliability tests: process bookkeeping and one small trained run to load, break and export."""
import pytest
import torch

from tests.reliability.processes import Runs, only_run_dir, run_in_process


@pytest.fixture
def runs(tmp_path):
    """Starts training processes; whatever still runs at the end of the test is killed."""
    runs = Runs(tmp_path)
    yield runs
    runs.close()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 6-step EmaRegressor run (checkpoint with EMA, scale factor, optimizer, scheduler), trained in process on
    one thread. Tests that change files copy it first."""
    logdir = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_in_process(logdir, "-t", "--no_test", "trainer.max_steps=6") == 0
    finally:
        torch.set_num_threads(threads)
    return only_run_dir(logdir)
