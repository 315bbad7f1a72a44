"""instantiate_from_config: builds objects and names the config path and cause of every failure."""
import re

import pytest
from omegaconf import OmegaConf

from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config


class Widget:
    def __init__(self, size: int, colour: str = "red"):
        self.size, self.colour = size, colour


class Holder:
    def __init__(self, inner_config, scale: float = 1.0):
        self.inner = instantiate_from_config(inner_config)
        self.scale = scale


def build(yaml: str):
    config = OmegaConf.create(yaml)
    return instantiate_from_config(config.model)


def test_builds_target_with_params():
    widget = build("model: {target: tests.test_util.Widget, params: {size: 3}}")
    assert (widget.size, widget.colour) == (3, "red")


def test_lists_arrive_as_plain_python():
    widget = build("model: {target: tests.test_util.Widget, params: {size: [1, 2]}}")
    assert widget.size == [1, 2] and type(widget.size) is list


def test_sentinels_return_none():
    assert instantiate_from_config("__is_unconditional__") is None
    assert instantiate_from_config("__is_first_stage__") is None


def test_nested_error_names_the_full_path_and_missing_module():
    yaml = """
    model:
      target: tests.test_util.Holder
      params:
        inner_config: {target: ldm.modules.foo.Bar}
    """
    with pytest.raises(ConfigError) as info:
        build(yaml)
    assert str(info.value) == ("model.params.inner_config.target: cannot import 'ldm.modules.foo.Bar' "
                               "(no module ldm.modules.foo)")


def test_missing_attribute_is_named():
    with pytest.raises(ConfigError, match=r"model.target: cannot import 'ldm.util.Nope' \(module ldm.util has no attribute 'Nope'\)"):
        build("model: {target: ldm.util.Nope}")


def test_unknown_argument_names_argument_and_class():
    with pytest.raises(ConfigError, match=r"model.params: unknown argument 'sise' for Widget \(accepted: size, colour\)"):
        build("model: {target: tests.test_util.Widget, params: {sise: 3}}")


def test_missing_argument_names_argument_and_class():
    with pytest.raises(ConfigError, match=r"model.params: missing required argument 'size' for Widget"):
        build("model: {target: tests.test_util.Widget, params: {colour: blue}}")


def test_missing_target_and_stray_keys():
    with pytest.raises(ConfigError, match=r"model: missing 'target' \(keys given: params\)"):
        build("model: {params: {size: 1}}")
    with pytest.raises(ConfigError, match=r"model: unknown keys 'size' next to 'target'"):
        build("model: {target: tests.test_util.Widget, size: 1}")


def test_not_a_mapping_and_not_a_dotted_path():
    with pytest.raises(ConfigError, match="expected a mapping"):
        instantiate_from_config(OmegaConf.create({"model": [1, 2]}).model)
    with pytest.raises(ConfigError, match="not a dotted import path"):
        build("model: {target: Widget}")


def test_original_main_targets_are_aliased():
    from ldm.data.base import DataModuleFromConfig
    from ldm.util import get_obj_from_str
    from ldm.models.diffusion.lr_schedules import LambdaLinearScheduler
    assert get_obj_from_str("main.DataModuleFromConfig") is DataModuleFromConfig
    assert get_obj_from_str("ldm.lr_scheduler.LambdaLinearScheduler") is LambdaLinearScheduler
    from ldm.data.simple import SimpleDataset
    assert get_obj_from_str("ldm.data.base.SimpleDataset") is SimpleDataset


class Picky:
    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")


def test_a_constructor_refusing_a_value_names_the_config():
    with pytest.raises(ConfigError, match=r"^model.params: Picky: size must be >= 1, got 0$"):
        build("model: {target: tests.test_util.Picky, params: {size: 0}}")


@pytest.mark.parametrize("name", ["ldm.engine.callbacks.ImageLogger", "kernels.attention.KernelConfig",
                                  "main.ImageLogger", "sgm.modules.GeneralConditioner",
                                  "sgm.models.diffusion.DiffusionEngine", "torch.nn.Identity", "torch.optim.AdamW",
                                  "monai.networks.nets.SegResNet", "tests.engine.toy.RegressionData"])
def test_targets_of_this_repo_torch_nn_monai_and_the_aliases_are_allowed(name, monkeypatch):
    monkeypatch.setenv("LDM_TRUST_CONFIG", "0")
    assert get_obj_from_str(name) is not None


@pytest.mark.parametrize("name, why", [("os.system", "outside"), ("builtins.eval", "outside"),
                                       ("subprocess.Popen", "outside"),
                                       ("ldm.util.importlib", "found under ldm. but defined in importlib"),
                                       ("ldm.engine.checkpoint.shutil", "a module re-exported")])
def test_other_targets_are_refused_unless_the_config_is_trusted(name, why, monkeypatch):
    monkeypatch.setenv("LDM_TRUST_CONFIG", "0")
    with pytest.raises(ConfigError, match=rf"^x.target: '{re.escape(name)}' is outside the modules a config may name "
                                          r"\(ldm\.\*, kernels\.\*, tests\.\*, torch\.nn\.\*, torch\.optim\.\*, "
                                          r"monai\.\* and the aliases of ldm.util\): configs run the code they name, "
                                          r"so other targets need --trust-config \(or LDM_TRUST_CONFIG=1\)"):
        get_obj_from_str(name, where="x.target")
    monkeypatch.setenv("LDM_TRUST_CONFIG", "1")
    assert get_obj_from_str(name) is not None
