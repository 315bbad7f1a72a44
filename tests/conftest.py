"""Fixtures shared across the test folders."""
import os

import torch

# Without a GPU, the Triton kernels in kernels/ are tested through Triton's interpreter on CPU tensors. Triton reads the
# variable when a kernel is decorated, so it is set here, before any test module imports kernels/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.triton_interpreter import skip_repatching_in_device_calls, skip_unasserted_overflow_checks

    skip_repatching_in_device_calls()  # one language patch per launch, not per helper call: 44% of a ResBlock test
    skip_unasserted_overflow_checks()  # checks whose result nothing asserts: a third of what was left

import pytest  # noqa: E402


@pytest.fixture
def single_thread():
    """Many steps on tiny tensors: extra threads only add synchronisation, and on a busy 2-core machine they make
    steps erratic. Opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
