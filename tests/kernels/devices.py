"""Where the kernel tests run, and the channels-last inputs they share."""
import os

import pytest
import torch

# CUDA when present; CPU tensors through Triton's interpreter where it is on (tests/conftest.py turns it on without a
# GPU).
DEVICES = ["cuda"] if torch.cuda.is_available() else []
if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICES.append("cpu")
needs_a_triton_device = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")


def channels_last_randn(shape, dtype, device) -> torch.Tensor:
    """Normal samples of `shape` in `dtype`, stored with channels innermost (any rank)."""
    return torch.randn(shape, device=device).to(dtype).movedim(1, -1).contiguous().movedim(-1, 1)
