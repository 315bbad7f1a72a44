"""Condition adherence: does a sample show what it was conditioned on?

- Masks: Dice between the conditioning mask and a segmentation of the sample (by a segmenter trained on real data).
- Labels: accuracy of a classifier's predicted class against the conditioning class.

Empty classes follow MONAI's `ignore_empty`: with the default False, a class absent from both masks scores 1 and a
class absent from the conditioning mask but predicted scores 0; with True both give nan, left out of the means.
"""
from __future__ import annotations

import torch
from monai.metrics import compute_dice


def as_one_hot(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A mask as one-hot float (B, K, *spatial): a label map (B, 1, *spatial) of ints in [0, K) is expanded, a
    one-hot mask (B, K, *spatial) passes."""
    if mask.ndim not in (4, 5):
        raise ValueError(f"mask: expected (B, K or 1, H, W) or (B, K or 1, D, H, W), got shape {tuple(mask.shape)}")
    if mask.shape[1] == 1 and num_classes > 1:
        labels = mask[:, 0].long()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"mask: labels must lie in [0, {num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float()
    if mask.shape[1] != num_classes:
        raise ValueError(f"mask: expected {num_classes} channels (one per class) or 1 (labels), got shape "
                         f"{tuple(mask.shape)}")
    return mask.float()


def dice_per_class(prediction: torch.Tensor, condition: torch.Tensor, num_classes: int,
                   include_background: bool = False, ignore_empty: bool = False) -> torch.Tensor:
    """Dice of each class between a predicted segmentation and the conditioning mask (MONAI's compute_dice), each
    one-hot (B, K, *spatial) or a label map (B, 1, *spatial) -> (B, K), or (B, K - 1) without the background
    (class 0). Empty classes: see the module docstring."""
    prediction, condition = as_one_hot(prediction, num_classes), as_one_hot(condition, num_classes)
    if prediction.shape != condition.shape:
        raise ValueError(f"dice: prediction {tuple(prediction.shape)} and condition {tuple(condition.shape)} differ")
    return compute_dice(prediction, condition, include_background=include_background, ignore_empty=ignore_empty)


def mean_dice(per_class: torch.Tensor) -> float:
    """Mean over items and classes of (B, K) Dice values, nan entries (ignored empty classes) left out."""
    return float(per_class.nanmean())


def correct_predictions(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each predicted class matches its label: predicted (N,) ints or logits (N, K), labels (N,) -> (N,)
    bool. Accuracy is the mean."""
    if predicted.ndim == 2:
        predicted = predicted.argmax(dim=1)
    if predicted.shape != labels.shape:
        raise ValueError(f"accuracy: predictions {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ")
    return predicted.long() == labels.long()
