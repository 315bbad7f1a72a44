"""Safe loading: a checkpoint that would run code is refused, a checkpoint of another architecture is refused with
its keys listed (or loads partially through `ckpt_path` + `ignore_keys`), and neither changes the run folder.

(tests/engine/test_checkpoint.py: unit tests of `load_checkpoint`'s errors; test_safetensors_export.py here: the
safetensors route.)
"""
import re
import shutil
from pathlib import Path

import pytest
import torch

from ldm.cli import main
from ldm.engine.checkpoint import CheckpointError
from tests.engine.toy import ToyRegressor
from tests.reliability.processes import file_digests
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


def test_ckpt_path_loads_partially_with_ignore_keys(trained_run, capsys):
    last = str(trained_run / "checkpoints" / "last.ckpt")
    with pytest.raises(RuntimeError, match=r"size mismatch for model.0.weight"):
        EmaRegressor(hidden=12, ckpt_path=last)
    wider = EmaRegressor(hidden=12, ckpt_path=last, ignore_keys=["model.", "model_ema."])
    assert wider.scale_factor == torch.load(last, weights_only=True)["state_dict"]["scale_factor"]
    out = capsys.readouterr().out
    assert "EmaRegressor: restored from" in out and "(1 tensors, 10 ignored, 10 missing, 0 unexpected)" in out


def test_ckpt_path_of_another_model_lists_what_did_not_fit(tmp_path, capsys):
    toy = tmp_path / "toy.ckpt"
    torch.save({"state_dict": ToyRegressor().state_dict()}, toy)
    EmaRegressor(ckpt_path=str(toy))
    out = capsys.readouterr().out
    assert "(2 tensors, 0 ignored, 11 missing, 2 unexpected)" in out
    assert "missing keys: scale_factor, model.0.weight," in out and "unexpected keys: linear.weight, linear.bias" in out
