"""test_metrics' accuracy on a text-conditioned model: the labels come from `label_key`, not from the captions."""
import pytest
import torch

from ldm.metrics import MetricSuite
from ldm.models.test_metrics import TestMetrics, check_test_metrics
from ldm.util import ConfigError


def brightest_channel(images: torch.Tensor) -> torch.Tensor:
    """A stand-in classifier: the label is the channel with the largest mean, images (B, C, H, W) -> (B,)."""
    return images.mean(dim=(2, 3)).argmax(1)


def batch_and_samples():
    labels = torch.tensor([0, 2, 1, 2])
    real = torch.nn.functional.one_hot(labels, 3).float()[:, :, None, None].expand(4, 3, 4, 4)
    fake = real.clone()
    fake[3] = torch.tensor([1.0, 0, 0])[:, None, None]  # one sample of the wrong class
    batch = {"image": real, "caption": ["zero", "two", "one", "two"], "class_label": labels}
    return batch, {"samples": fake}


def test_accuracy_reads_labels_from_label_key():
    batch, outputs = batch_and_samples()
    evaluator = TestMetrics(MetricSuite(["accuracy"], classifier=brightest_channel), "image", "samples",
                            condition_key="caption", label_key="class_label")
    evaluator.update(batch, outputs)
    result = evaluator.compute()
    assert result["accuracy"] == 0.75 and result["accuracy_real"] == 1.0


def test_text_condition_without_label_key_and_a_missing_label_key_are_named():
    batch, outputs = batch_and_samples()
    evaluator = TestMetrics(MetricSuite(["accuracy"], classifier=brightest_channel), "image", "samples", "caption")
    with pytest.raises(ConfigError, match=r"batch\['caption'\] is text.*test_metrics.label_key"):
        evaluator.update(batch, outputs)
    evaluator = TestMetrics(MetricSuite(["accuracy"], classifier=brightest_channel), "image", "samples", "caption",
                            label_key="label")
    with pytest.raises(ConfigError, match="test_metrics.label_key: the test batches have no 'label' entry"):
        evaluator.update(batch, outputs)
    assert check_test_metrics({"metrics": ["accuracy"], "label_key": "class_label"})["label_key"] == "class_label"
