"""Channels-last storage for a model and its batches (`trainer.channels_last`).

cuDNN's 3D convolutions on tensor cores work in NDHWC; given NCDHW tensors they transpose every input, output and
gradient around each call. Stored channels-last end to end (weights, inputs, every activation, since convolutions,
the GroupNorm kernel and elementwise ops keep their input's layout), those transposes disappear.
Rank-5 tensors take `torch.channels_last_3d` (N, C, D, H, W stored as N, D, H, W, C), rank-4 tensors
`torch.channels_last`; other ranks are left alone, so a 3D model with a 2D perceptual network (LPIPS) converts
both.
"""
from __future__ import annotations

from typing import Any

import torch

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` stored channels-last when it is rank 4 or 5 (a no-op view when it already is), else unchanged.

    A one-channel tensor (a single MRI modality) holds the same memory in both layouts, and `contiguous` leaves its
    NCDHW strides, from which convolutions infer NCDHW: a channels-last network's first convolution would then output
    NCDHW, and every layer after it would mix layouts (copies forward and backward). It is re-viewed with the
    channels-last strides instead (no copy)."""
    memory_format = _FORMATS.get(tensor.dim())
    if memory_format is None:
        return tensor
    if tensor.shape[1] == 1 and tensor.is_contiguous():
        return tensor.squeeze(1).unsqueeze(-1).movedim(-1, 1)
    return tensor.contiguous(memory_format=memory_format)


def model_to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Re-store every rank-4/5 parameter and buffer of `model` channels-last, in place (the same Parameter objects,
    so optimizers built before or after see them); returns `model`."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.dim() in _FORMATS:
            tensor.data = channels_last(tensor.data)
    return model


def batch_to_channels_last(batch: Any) -> Any:
    """The batch with every floating rank-4/5 tensor channels-last; dicts, lists and tuples are walked, integer
    tensors (labels, masks stored as ints) and everything else returned as is."""
    if isinstance(batch, torch.Tensor):
        return channels_last(batch) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {key: batch_to_channels_last(value) for key, value in batch.items()}
    if isinstance(batch, list):
        return [batch_to_channels_last(value) for value in batch]
    if isinstance(batch, tuple):
        values = [batch_to_channels_last(value) for value in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else tuple(values)
    return batch
