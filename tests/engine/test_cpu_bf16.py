"""The CPU bf16 conv3d gradient check and the trainer's warning."""
import pytest
import torch
from torch import nn

from ldm.engine import cpu_bf16
from ldm.engine.config import trainer_config_from
from ldm.engine.loop import Trainer
from ldm.modules.nn_dims import conv_nd
from tests.engine.toy import ToyRegressor


def test_the_check_answers_once_per_process():
    cpu_bf16.conv3d_weight_gradients_sound.cache_clear()
    first = cpu_bf16.conv3d_weight_gradients_sound()
    assert isinstance(first, bool) and cpu_bf16.conv3d_weight_gradients_sound() is first
    assert cpu_bf16.conv3d_weight_gradients_sound.cache_info().hits == 1


def test_only_models_with_3d_convolutions_on_an_unsound_cpu_are_warned_about(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "conv3d_weight_gradients_sound", lambda: False)
    assert cpu_bf16.warn_if_unsound(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2))) is None
    warning = cpu_bf16.warn_if_unsound(nn.Sequential(conv_nd(3, 4, 32, 3)))
    assert warning.startswith("warning: this CPU's bf16 3D convolutions give wrong weight gradients")
    assert "trainer.precision=32" in warning
    monkeypatch.setattr(cpu_bf16, "conv3d_weight_gradients_sound", lambda: True)
    assert cpu_bf16.warn_if_unsound(nn.Sequential(conv_nd(3, 4, 32, 3))) is None


@pytest.mark.parametrize("precision,warned", [("bf16-mixed", True), ("16-mixed", True), ("32", False)])
def test_the_trainer_warns_for_reduced_precision_on_a_cpu(monkeypatch, capsys, precision, warned):
    monkeypatch.setattr(cpu_bf16, "warn_if_unsound", lambda model: "warning: stand-in")
    trainer = Trainer(trainer_config_from({"accelerator": "cpu", "max_steps": 1, "precision": precision}))
    trainer._setup(ToyRegressor())
    assert ("warning: stand-in" in capsys.readouterr().out) == warned
