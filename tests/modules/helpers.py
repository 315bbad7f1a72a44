"""Shared by the model tests."""
import torch
from torch import nn


def randomize_zero_parameters(module: nn.Module) -> nn.Module:
    """The zero-initialised layers make every output zero at init; give them values so tests see the network."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return module
