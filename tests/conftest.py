"""Fixtures shared across the test folders."""
import pytest
import torch


@pytest.fixture
def single_thread():
    """Many steps on tiny tensors: extra threads only add synchronisation, and on a busy 2-core machine they make
    steps erratic. Opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
