"""Test-stage metrics: the model's test_evaluator() fills metrics/test.json and the test/ scalars."""
import json

import pytest
from omegaconf import OmegaConf

from ldm.cli import main
from ldm.engine.config import trainer_config_from
from ldm.engine.evaluation import TEST_METRICS, write_test_metrics
from ldm.engine.loop import Trainer
from ldm.util import instantiate_from_config
from tests.engine.helpers import TOY_CONFIG, only_run_dir, run_cli
from tests.engine.toy import RegressionData, ToyRegressor

EVALUATED = "model.target=tests.engine.toy_metrics.EvaluatedToy"


def strict_json(path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which strict JSON has not")
    return json.loads(path.read_text(), parse_constant=refuse)


def toy_test_targets(limit_items: int | None = None) -> list[float]:
    targets = RegressionData(length=8, seed=2).y.tolist()  # the toy config's test split
    return targets[:limit_items]


def test_metrics_of_the_trained_weights_are_written_and_logged(tmp_path):
    assert run_cli(tmp_path, "-t", EVALUATED) == 0
    run = only_run_dir(tmp_path)
    document = strict_json(run / TEST_METRICS)
    targets = toy_test_targets()
    assert document["global_step"] == 12
    assert document["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert document["metrics"] == {"items": len(targets), "mean_target": pytest.approx(sum(targets) / len(targets))}
    logged = {tuple(line.split(",")[:2]) for line in (run / "metrics.csv").read_text().splitlines()}
    assert {("12", "test/items"), ("12", "test/mean_target")} <= logged


def test_a_test_only_run_names_the_checkpoint_and_its_step(tmp_path):
    assert run_cli(tmp_path, "-t", "--no_test", EVALUATED, "trainer.max_steps=6") == 0
    run = only_run_dir(tmp_path)
    assert not (run / TEST_METRICS).exists()
    assert main("test", ["-r", str(run / "checkpoints" / "step=6.ckpt"), "trainer.limit_test_batches=1"]) == 0
    document = strict_json(run / TEST_METRICS)
    targets = toy_test_targets(limit_items=4)  # one batch of 4
    assert document["global_step"] == 6
    assert document["checkpoint"] == str(run / "checkpoints" / "step=6.ckpt")
    assert document["metrics"] == {"items": 4, "mean_target": pytest.approx(sum(targets) / 4)}


def toy_trainer_and_data(logdir):
    trainer = Trainer(trainer_config_from({"accelerator": "cpu", "max_steps": 1, "logger": ["csv"]}))
    trainer.attach(logdir, [], {})
    return trainer, instantiate_from_config(OmegaConf.load(TOY_CONFIG).data)


def test_the_evaluator_sees_every_batch_and_what_test_step_returned(tmp_path):
    from tests.engine.toy_metrics import EvaluatedToy

    trainer, datamodule = toy_trainer_and_data(tmp_path)
    model = EvaluatedToy()
    trainer.test(model, datamodule)
    assert model.evaluator.outputs_seen == ["inputs", "inputs"]  # 8 items, batches of 4
    document = strict_json(tmp_path / TEST_METRICS)
    assert (document["global_step"], document["checkpoint"]) == (0, None)  # untrained, never saved


def test_without_the_hook_no_metrics_file(tmp_path):
    trainer, datamodule = toy_trainer_and_data(tmp_path)
    trainer.test(ToyRegressor(), datamodule)
    assert not (tmp_path / TEST_METRICS).exists() and list((tmp_path / "images" / "test").glob("*.png"))


def test_an_evaluator_without_compute_is_named(tmp_path):
    class Broken(ToyRegressor):
        def test_evaluator(self):
            return object()

    trainer, datamodule = toy_trainer_and_data(tmp_path)
    with pytest.raises(TypeError, match=r"Broken.test_evaluator\(\) returned object"):
        trainer.test(Broken(), datamodule)


def test_non_finite_values_are_null_and_no_temporary_is_left(tmp_path):
    path = write_test_metrics(tmp_path / TEST_METRICS, {"psnr": 30.5, "fid": float("nan"), "kid": float("inf")}, 7,
                              "run/checkpoints/last.ckpt")
    assert strict_json(path) == {"global_step": 7, "checkpoint": "run/checkpoints/last.ckpt",
                                 "metrics": {"psnr": 30.5, "fid": None, "kid": None}}
    assert [p.name for p in path.parent.iterdir()] == ["test.json"]
