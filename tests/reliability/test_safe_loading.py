"""Safe loading: a checkpoint that would run code is refused, a checkpoint of another architecture is refused with
its keys listed, whether given to `-r` or as a model's `ckpt_path`; `ckpt_path` loads partially only when
`ignore_keys` covers the differences or `strict: false` says so. Every refusal is one `error: ...` line with exit
code 2, and nothing is written: no new run folder, no change to a resumed one.

(tests/engine/test_checkpoint.py: unit tests of `load_checkpoint`'s errors; tests/models/test_strict_loading.py: the
real models' `ckpt_path`; test_safetensors_export.py here: the safetensors route.)
"""
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import main
from ldm.engine.checkpoint import CheckpointError
from tests.engine.toy import ToyRegressor
from tests.reliability.processes import file_digests, run_in_process
from tests.reliability.toy_ema import EmaRegressor


class TouchOnLoad:
    """Unpickling this calls `Path.touch(path)`: the harmless stand-in for any code a downloaded file could run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the trained run that the test may break."""
    return Path(shutil.copytree(trained_run, tmp_path / trained_run.name))


def booby_trapped_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"state_dict": EmaRegressor().state_dict(), "global_step": 1, "extra": TouchOnLoad(marker)}, path)


def test_the_payload_is_real(tmp_path):
    """Loading without weights_only runs it: the tests below would otherwise prove nothing."""
    booby_trapped_checkpoint(tmp_path / "evil.ckpt", tmp_path / "ran")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_a_checkpoint_that_would_run_code_is_refused(run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    booby_trapped_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    before = file_digests(run)
    assert main("test", ["-r", str(run), "-t", "--no_test"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"error: checkpoint {run / 'checkpoints' / 'last.ckpt'} cannot be read (UnpicklingError: "
                     f"Unsupported global: GLOBAL getattr): it holds Python objects beyond tensors and plain "
                     f"containers, which could run code when unpickled, so it is refused (weights_only loading)")
    with pytest.raises(CheckpointError, match="cannot be read"):  # the models' ckpt_path goes through it too
        EmaRegressor(ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    assert not marker.exists()
    assert file_digests(run) == before


@pytest.mark.parametrize("override, message", [
    ("model.target=tests.engine.toy.ToyRegressor",
     r"does not fit ToyRegressor \(another architecture or config\?\): 2 missing keys: linear.bias, linear.weight; "
     r"11 unexpected keys: model.0.bias, model.0.weight, .*, scale_factor$"),
    ("model.params.hidden=12",
     r"does not fit EmaRegressor \(another architecture or config\?\): 6 shape mismatches: model.0.bias \(8,\) "
     r"\(model: \(12,\)\), .*model_ema.2weight \(1, 8\) \(model: \(1, 12\)\)$"),
])
@pytest.mark.parametrize("train", [True, False])
def test_another_architecture_is_refused_with_its_keys_listed(run, capsys, override, message, train):
    before = file_digests(run)
    assert main("test", ["-r", str(run), *(["-t", "--no_test"] if train else []), override]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {run / 'checkpoints' / 'last.ckpt'} does not fit"), error
    assert re.search(message, error), error
    assert file_digests(run) == before  # no config saved that would break the next resume


def without_ema(trained_run: Path, path: Path) -> Path:
    """The trained run's weights without `model_ema.*`: what a model trained with use_ema: false would have saved."""
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("model_ema.")}}, path)
    return path


def toy_checkpoint(trained_run: Path, path: Path) -> Path:
    torch.save({"state_dict": ToyRegressor().state_dict()}, path)
    return path


def trained_last(trained_run: Path, path: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


EMA_KEYS = "model_ema.0bias, model_ema.0weight, model_ema.2bias, model_ema.2weight, model_ema.decay"


@pytest.mark.parametrize("make, args, message", [
    (toy_checkpoint, [], r"none of its 2 tensors \(linear\.\* 2\) is a key of the model \(model\.\* 4, "
                         r"model_ema\.\* 6, scale_factor 1\); not even strict: false would load anything from it"),
    (toy_checkpoint, ["model.params.strict=false"], r"none of its 2 tensors \(linear\.\* 2\) is a key of the model"),
    (trained_last, ["model.params.hidden=12", "model.params.strict=false"],
     r"6 shape mismatches: model\.0\.bias \(8,\) \(model: \(12,\)\), model\.0\.weight \(8, 16\) \(model: \(12, 16\)\), "
     r".* \(1 more\) \(a different architecture or config\? ignore_keys can leave them out\)"),
    (without_ema, [], rf"\(a different architecture or config\?\): 6 missing keys \(model_ema\.\* 6\): "
                      rf"{re.escape(EMA_KEYS)} \.\.\. \(1 more\)\. To load only what matches, skip these keys with "
                      r"ignore_keys \(here: \[model_ema\.\]\) or set strict: false next to ckpt_path"),
], ids=["another-model", "another-model-strict-false", "wider-strict-false", "no-ema"])
def test_a_ckpt_path_that_does_not_fit_is_one_error_line(trained_run, tmp_path, capsys, make, args, message):
    path = make(trained_run, tmp_path / "weights.ckpt")
    logs = tmp_path / "logs"
    assert run_in_process(logs, "-t", f"model.params.ckpt_path={path}", *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: checkpoint {re.escape(str(path))} does not fit EmaRegressor.*", last_line), err
    assert re.search(message, last_line), last_line
    assert not logs.exists()


@pytest.mark.parametrize("escape, printed", [
    ("model.params.ignore_keys=[model_ema.]", "EmaRegressor: restored 5 tensors from {path}; ignore_keys "
                                              "[model_ema.]: 0 checkpoint entries skipped, 6 model entries left as "
                                              "initialised"),
    ("model.params.strict=false", "EmaRegressor: restored 5 tensors from {path}\n  strict: false: 6 missing keys, "
                                  "left as initialised (model_ema.* 6): " + EMA_KEYS + ", model_ema.num_updates\n"),
], ids=["ignore_keys", "strict-false"])
def test_ignore_keys_or_strict_false_let_a_partial_checkpoint_load(trained_run, tmp_path, capsys, escape, printed):
    path = without_ema(trained_run, tmp_path / "no-ema.ckpt")
    logs = tmp_path / "logs"
    assert run_in_process(logs, f"model.params.ckpt_path={path}", escape) == 0  # no -t: build, load, test stage
    assert printed.format(path=path) in capsys.readouterr().out
    assert not logs.exists()  # no training and no test split: nothing ran, so no run folder was made


def test_ckpt_path_loads_exactly_what_ignore_keys_or_strict_false_leave(trained_run, tmp_path, capsys):
    last = trained_run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["state_dict"]
    with pytest.raises(CheckpointError, match=r"6 shape mismatches: model\.0\.bias \(8,\) \(model: \(12,\)\)"):
        EmaRegressor(hidden=12, ckpt_path=str(last))
    wider = EmaRegressor(hidden=12, ckpt_path=str(last), ignore_keys=["model.", "model_ema."])
    assert torch.equal(wider.scale_factor, saved["scale_factor"])
    assert f"EmaRegressor: restored 1 tensors from {last}; ignore_keys [model., model_ema.]: 10 checkpoint entries " \
           f"skipped, 10 model entries left as initialised" in capsys.readouterr().out

    torch.manual_seed(0)
    fresh_ema = EmaRegressor().model_ema.state_dict()
    torch.manual_seed(0)
    lenient = EmaRegressor(ckpt_path=str(without_ema(trained_run, tmp_path / "no-ema.ckpt")), strict=False)
    for key, value in lenient.state_dict().items():  # the network and scale factor from the file, the EMA as built
        expected = fresh_ema[key.removeprefix("model_ema.")] if key.startswith("model_ema.") else saved[key]
        assert torch.equal(value, expected), key


def test_a_run_folder_naming_code_outside_the_allow_list_runs_nothing_unless_trusted(trained_run, tmp_path,
                                                                                     monkeypatch, capsys):
    """Run folders are configs, and configs name code: a downloaded run's `target: os.system` is refused before it
    is imported, with one error line and nothing changed; `--trust-config` lifts the allow-list."""
    monkeypatch.setenv("LDM_TRUST_CONFIG", "0")
    run = Path(shutil.copytree(trained_run, tmp_path / "downloaded" / trained_run.name))
    marker = tmp_path / "ran"
    (project,) = (run / "configs").glob("*-project.yaml")
    config = OmegaConf.load(project)
    config.data.params.validation = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    OmegaConf.save(config, project)
    before = file_digests(run)
    assert main("test", ["-r", str(run), "-t", "--no_test", "trainer.max_steps=7"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data.params.validation.target: 'os.system' is outside the modules a config may name (ldm.*, "
        "kernels.*, tests.*, torch.nn.*, torch.optim.*, monai.* and the aliases of ldm.util): configs run the code "
        "they name, so other targets need --trust-config (or LDM_TRUST_CONFIG=1) for a config you trust")
    assert not marker.exists() and file_digests(run) == before

    harmless = ["-t", "--no_test", "trainer.max_steps=1",
                "trainer.callbacks={extra: {target: collections.OrderedDict}}"]
    assert run_in_process(tmp_path / "logs", *harmless) == 2
    assert "'collections.OrderedDict' is outside the modules a config may name" in capsys.readouterr().err
    assert run_in_process(tmp_path / "logs", "--trust-config", *harmless) == 0
