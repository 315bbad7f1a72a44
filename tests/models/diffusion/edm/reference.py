"""k-diffusion's `sampling` module as the reference implementation of the solvers and the Karras schedule.

k-diffusion's package `__init__` imports its training stack (accelerate, wandb, clean-fid, ...), which this project
does not install; its `sampling` module needs only torch, scipy, tqdm, torchsde and torchdiffeq. So the package is
installed without dependencies (`requirements-nodeps.txt`) and `sampling` is loaded under a bare package object.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import pytest
import torch


def k_sampling():
    """k_diffusion.sampling, or skip the test when k-diffusion is not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps -r requirements-nodeps.txt)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules.setdefault("k_diffusion", package)
    return importlib.import_module("k_diffusion.sampling")


@contextlib.contextmanager
def default_float64():
    """k-diffusion builds its tables in torch's default dtype: float64 inside this block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
