"""Toy models for the best checkpoint (a validation score that follows a script) and the test evaluator."""
from __future__ import annotations

import torch

from tests.engine.toy import ToyRegressor


class ScriptedScore(ToyRegressor):
    """ToyRegressor whose i-th validation in this process reports `val/score` = scores[i]; `monitor` as a model
    config sets it."""

    def __init__(self, scores: list, monitor: str | None = "val/score", **kwargs):
        super().__init__(**kwargs)
        self.scores = [float(score) for score in scores]
        self.monitor = monitor
        self.validations = 0

    def validation_step(self, batch, batch_idx: int):
        if batch_idx == 0:
            self.validations += 1
        return {"loss": self._loss(batch), "val/score": torch.tensor(self.scores[self.validations - 1])}


class TargetStatistics:
    """Evaluator: number of test items and the mean of their targets, summed over the batches it is shown."""

    def __init__(self):
        self.count = 0
        self.target_sum = 0.0
        self.outputs_seen: list[str] = []

    def update(self, batch: dict, outputs: dict) -> None:
        self.count += len(batch["target"])
        self.target_sum += float(batch["target"].sum())
        self.outputs_seen += sorted(outputs)

    def compute(self) -> dict:
        return {"items": self.count, "mean_target": torch.tensor(self.target_sum / self.count)}


class EvaluatedToy(ToyRegressor):
    """ToyRegressor with a `test_evaluator()`; the last evaluator it made is kept for inspection."""

    def test_evaluator(self):
        self.evaluator = TargetStatistics()
        return self.evaluator


class ScriptedAndEvaluated(ScriptedScore, EvaluatedToy):
    """Both: a scripted `val/score` and a `test_evaluator()`."""
