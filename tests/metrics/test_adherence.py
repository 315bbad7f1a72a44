import math

import pytest
import torch

from ldm.metrics.adherence import as_one_hot, correct_predictions, dice_per_class, mean_dice


def label_map(rows):
    """(1, 1, H, W) label map from a list of rows."""
    return torch.tensor(rows).view(1, 1, len(rows), len(rows[0]))


def test_identical_masks_give_one_and_disjoint_give_zero():
    mask = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    mask[:, :, :2] = 1
    mask[:, :, 3:] = 2
    torch.testing.assert_close(dice_per_class(mask, mask, num_classes=3), torch.ones(2, 2))
    moved = torch.zeros_like(mask)
    moved[:, :, 2] = 1  # class 1 where neither 1 nor 2 was, class 2 nowhere
    moved_dice = dice_per_class(moved, mask, num_classes=3)
    torch.testing.assert_close(moved_dice, torch.zeros(2, 2))


def test_partial_overlap_matches_hand_computed_dice():
    condition = label_map([[1, 1, 1, 1], [0, 0, 2, 2], [0, 0, 0, 0]])
    prediction = label_map([[1, 1, 0, 0], [0, 0, 2, 0], [0, 2, 0, 0]])
    # class 1: |A| = 4, |B| = 2, overlap 2 -> 2*2/6; class 2: |A| = 2, |B| = 2, overlap 1 -> 2*1/4
    expected = torch.tensor([[4 / 6, 2 / 4]])
    torch.testing.assert_close(dice_per_class(prediction, condition, num_classes=3), expected)
    with_background = dice_per_class(prediction, condition, num_classes=3, include_background=True)
    # background: |A| = 6, |B| = 8, overlap 5 -> 10/14
    torch.testing.assert_close(with_background[:, 0], torch.tensor([10 / 14]))
    one_hot = as_one_hot(prediction, 3)
    torch.testing.assert_close(dice_per_class(one_hot, condition, num_classes=3), expected)


def test_classes_absent_from_the_condition_follow_ignore_empty():
    condition = label_map([[1, 1], [0, 0]])
    clean = label_map([[1, 1], [0, 0]])
    spurious = label_map([[1, 1], [2, 0]])
    assert dice_per_class(clean, condition, 3)[0, 1] == 1  # absent from both
    assert dice_per_class(spurious, condition, 3)[0, 1] == 0  # predicted but not asked for
    ignored = dice_per_class(spurious, condition, 3, ignore_empty=True)
    assert math.isnan(ignored[0, 1]) and mean_dice(ignored) == 1


def test_bad_masks_name_the_shape():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        dice_per_class(label_map([[0, 2]]), label_map([[0, 1]]), num_classes=2)
    with pytest.raises(ValueError, match=r"expected 3 channels.*\(1, 2, 2, 2\)"):
        dice_per_class(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2), num_classes=3)


def test_accuracy_from_labels_or_logits():
    labels = torch.tensor([0, 1, 2, 1])
    assert correct_predictions(torch.tensor([0, 1, 1, 1]), labels).float().mean() == 0.75
    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 0]), 3).float()
    assert correct_predictions(logits, labels).tolist() == [True, False, True, False]
