"""The `test_metrics:` option of the generative models: what their test stage scores, as the loop's test evaluator.

    test_metrics:
      metrics: [dice, diversity_ms_ssim]       # names of ldm.metrics.METRICS
      segmenter: logs/<time>_seg_mni152        # a train_eval.py run (Segmenter): for "dice"
      classifier: null                         # a train_eval.py run (Classifier): for "accuracy"
      feature_extractor: segmenter             # for fid / kid: segmenter, classifier, or a name of ldm.metrics.features
      feature_options: {}                      # keyword arguments of that feature extractor
      label_key: null                          # the batch entry of class labels for "accuracy" (default: the condition)
      kid_subset_size: 50                      # any further key is a keyword argument of ldm.metrics.MetricSuite

The model's test step returns its generated images (samples, reconstructions); each batch's real images, and its
condition when the model has one, come from the batch. A spatial condition of the images' rank is the mask that
"dice" compares with; any other condition is taken as class labels for "accuracy", unless `label_key` names the batch
entry that holds them (a text-conditioned model's condition is its captions, e.g. label_key: class_label).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.engine.evaluation import rows_of_all_ranks
from ldm.metrics import METRICS, MetricSuite
from ldm.util import ConfigError

#: Keys of `test_metrics:` read here; the rest go to MetricSuite.
OWN_KEYS = ("metrics", "segmenter", "classifier", "feature_extractor", "feature_options", "label_key")
EVALUATOR_FEATURES = ("segmenter", "classifier")


def on_device_of_input(network: nn.Module, method: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """network.<method> as a function that first moves the network to its input's device."""
    def call(images: torch.Tensor) -> torch.Tensor:
        network.to(images.device)
        return getattr(network, method)(images)
    return call


def load_scorer(path: Any, role: str) -> nn.Module:
    from ldm.models.evaluators import load_evaluator  # heavy (builds from a run's config); only when asked for

    try:
        return load_evaluator(str(path))
    except (FileNotFoundError, TypeError) as err:
        raise ConfigError(f"test_metrics.{role}: {err}") from None


class TestMetrics:
    """The loop's test evaluator: `update(batch, outputs)` after each test step, `compute()` at the end.

    real_key: the batch's real images (B, C, *S); output_key: the test step's generated images (B, C, *S);
    condition_key: the batch's condition, a mask (B, K, *S) or labels (B,), or None; label_key: the batch's class
    labels (B,) when they are not the condition.
    """

    def __init__(self, suite: MetricSuite, real_key: str, output_key: str, condition_key: str | None = None,
                 label_key: str | None = None):
        self.suite, self.real_key, self.output_key, self.condition_key = suite, real_key, output_key, condition_key
        self.label_key = label_key

    def update(self, batch: Mapping[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
        if self.output_key not in outputs:
            raise KeyError(f"test_metrics: the test step returned no {self.output_key!r} images "
                           f"(returned: {', '.join(outputs)})")
        fake = outputs[self.output_key].float()
        real = batch[self.real_key].float() if self.real_key in batch else None
        condition = labels = None
        if self.condition_key is not None and self.condition_key in batch:
            value = batch[self.condition_key]
            if isinstance(value, torch.Tensor) and value.ndim == fake.ndim:
                condition = value
            elif self.label_key is None:
                if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
                    raise ConfigError(f"test_metrics: the condition batch[{self.condition_key!r}] is text, not class "
                                      f"labels; name the batch entry of the labels with test_metrics.label_key "
                                      f"(e.g. class_label)")
                labels = torch.as_tensor(value)
        if self.label_key is not None:
            if self.label_key not in batch:
                raise ConfigError(f"test_metrics.label_key: the test batches have no {self.label_key!r} entry "
                                  f"(keys: {', '.join(batch)})")
            labels = torch.as_tensor(batch[self.label_key])
        self.suite.update(real=real, fake=fake, condition=condition, labels=labels)

    def compute(self) -> dict[str, float]:
        """The metrics over every rank's items: each rank's kept per-item values are gathered first, in the split's
        order (subset draws, e.g. KID's and diversity's, then match one process's)."""
        state = {key: torch.cat(values) for key, values in self.suite.state.items()}
        self.suite.state = {key: [values] for key, values in rows_of_all_ranks(state).items()}
        return self.suite.compute()


def check_test_metrics(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A `test_metrics:` config as a plain dict, checked without loading anything: known keys and metric names,
    evaluator run folders that exist (so that a typo fails when the model is built, not after training)."""
    if config is None:
        return None
    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    suite_keys = set(inspect.signature(MetricSuite).parameters) - set(OWN_KEYS)
    unknown = sorted(set(config) - set(OWN_KEYS) - suite_keys)
    if unknown:
        raise ConfigError(f"test_metrics: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(OWN_KEYS + tuple(sorted(suite_keys)))})")
    metrics = list(config.get("metrics") or [])
    if not metrics:
        raise ConfigError("test_metrics.metrics: name at least one metric (see ldm.metrics.METRICS)")
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ConfigError(f"test_metrics.metrics: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    for role in EVALUATOR_FEATURES:
        if config.get(role) is not None and (not str(config[role]) or not Path(str(config[role])).exists()):
            raise ConfigError(f"test_metrics.{role}: {config[role]} does not exist (a run folder of train_eval.py)")
    config["metrics"] = metrics
    return config


def build_test_metrics(config: Mapping[str, Any] | None, real_key: str, output_key: str,
                       condition_key: str | None = None) -> TestMetrics | None:
    """The evaluator for a model's `test_metrics:` config (None: no metrics); loads the evaluator networks."""
    config = check_test_metrics(config)
    if config is None:
        return None
    metrics = config.pop("metrics")
    label_key = config.pop("label_key", None)
    networks = {role: load_scorer(config.pop(role), role) if config.get(role) is not None else config.pop(role, None)
                for role in EVALUATOR_FEATURES}
    features = config.pop("feature_extractor", None)
    if features in EVALUATOR_FEATURES:
        if networks[features] is None:
            raise ConfigError(f"test_metrics.feature_extractor: {features!r} needs test_metrics.{features} (a run "
                              f"folder of train_eval.py)")
        features = networks[features]
    segmenter, classifier = networks["segmenter"], networks["classifier"]
    try:
        suite = MetricSuite(list(metrics), feature_extractor=features,
                            feature_options=config.pop("feature_options", None),
                            segmenter=None if segmenter is None else on_device_of_input(segmenter, "segment"),
                            classifier=None if classifier is None else on_device_of_input(classifier, "predict"),
                            **config)
    except ValueError as err:
        raise ConfigError(f"test_metrics: {err}") from None
    return TestMetrics(suite, real_key, output_key, condition_key, label_key)
