"""The trainer section is strict; configs merge in order with dotlist overrides last."""
import pytest
from omegaconf import OmegaConf

from ldm.cli import load_config, model_config_for
from ldm.engine.config import trainer_config_from
from ldm.util import ConfigError


def test_trainer_defaults_and_nested_checkpoint():
    cfg = trainer_config_from({"max_steps": 5, "checkpoint": {"keep_last_k": 1}})
    assert cfg.max_steps == 5 and cfg.checkpoint.keep_last_k == 1 and cfg.checkpoint.every_n_steps == 1000


@pytest.mark.parametrize("section, message", [
    ({"max_step": 5}, r"trainer: unknown key 'max_step'"),
    ({"max_steps": 5, "checkpoint": {"every": 1}}, r"trainer.checkpoint: unknown key 'every'"),
    ({"max_steps": "ten"}, r"trainer.max_steps: expected int, got 'ten'"),
    ({"max_steps": 5, "benchmark": 1}, r"trainer.benchmark: expected bool, got 1"),
    ({"max_steps": 5, "precision": "bf17"}, r"trainer.precision: 'bf17' is not one of"),
    ({"max_steps": 5, "logger": ["wandb"]}, r"trainer.logger: unknown logger"),
    ({}, r"trainer: set max_steps or max_epochs"),
])
def test_bad_trainer_sections_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        trainer_config_from(section)


def test_merge_order_and_dotlist_override(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model: {target: x.Y, params: {a: 1, b: 1}}\ndata: {target: x.D}\ntrainer: {max_steps: 3}\n")
    second.write_text("model: {params: {b: 2}}\n")
    config = load_config([str(first), str(second)], ["model.params.a=10", "trainer.max_steps=7"])
    assert OmegaConf.to_container(config.model.params) == {"a": 10, "b": 2}
    assert config.trainer.max_steps == 7


def test_load_config_errors_name_the_file_or_argument(tmp_path):
    with pytest.raises(ConfigError, match=r"--base .*missing.yaml: no such file"):
        load_config([str(tmp_path / "missing.yaml")], [])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: cannot parse YAML"):
        load_config([str(broken)], [])
    good = tmp_path / "good.yaml"
    good.write_text("model: {target: x.Y}\ndata: {target: x.D}\n")
    with pytest.raises(ConfigError, match=r"unrecognised argument\(s\) --bogus"):
        load_config([str(good)], ["--bogus"])
    extra = tmp_path / "extra.yaml"
    extra.write_text("model: {target: x.Y}\ndata: {target: x.D}\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"unknown top-level config section\(s\) modle"):
        load_config([str(extra)], [])


def test_original_lightning_section_is_ported(tmp_path):
    path = tmp_path / "orig.yaml"
    path.write_text(
        "model: {target: x.Y}\ndata: {target: x.D}\n"
        "lightning:\n  callbacks:\n    image_logger: {target: main.ImageLogger, params: {batch_frequency: 5}}\n"
        "  trainer: {max_steps: 9, accumulate_grad_batches: 2}\n")
    config = load_config([str(path)], [])
    assert "lightning" not in config
    assert config.trainer.max_steps == 9 and config.trainer.accumulate_grad_batches == 2
    assert config.trainer.callbacks.image_logger.target == "main.ImageLogger"


def test_model_targets_per_stage():
    model = OmegaConf.create({"target": "a.Plain", "train_target": "a.Train", "test_target": "a.Test",
                              "params": {"x": 1}, "test_only_params": {"out": "o"}, "base_learning_rate": 1.0})
    train = model_config_for(model, training=True)
    test = model_config_for(model, training=False)
    assert train.target == "a.Train" and OmegaConf.to_container(train.params) == {"x": 1}
    assert test.target == "a.Test" and OmegaConf.to_container(test.params) == {"x": 1, "out": "o"}
    with pytest.raises(ConfigError, match=r"model: unknown key\(s\) parms"):
        model_config_for(OmegaConf.create({"target": "a.B", "parms": {}}), training=True)


def test_fabric_run_flags_win_over_the_config(monkeypatch):
    from ldm.engine.config import fabric_kwargs
    cfg = trainer_config_from({"max_steps": 1, "devices": 1, "precision": "bf16-mixed"})
    assert fabric_kwargs(cfg)["devices"] == 1
    monkeypatch.setenv("LT_DEVICES", "2")
    kwargs = fabric_kwargs(cfg)
    assert "devices" not in kwargs and kwargs["precision"] == "bf16-mixed"


def test_original_optional_boolean_spellings():
    from ldm.cli import normalise_boolean_flags
    assert normalise_boolean_flags(["-t", "True", "--no-test", "false", "a=1"]) == ["-t", "a=1"]
    assert normalise_boolean_flags(["-t", "trainer.max_steps=3", "--scale_lr"]) == \
        ["-t", "trainer.max_steps=3", "--scale_lr", "true"]
    assert normalise_boolean_flags(["--scale_lr", "False", "-d"]) == ["--scale_lr", "False", "-d"]
