"""`ldm.engine.export`: checkpoint weights (raw or EMA) to `.safetensors` and back, and its errors."""
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.engine.checkpoint import CheckpointError, load_checkpoint
from ldm.engine.export import export_safetensors, load_safetensors, main, read_safetensors
from tests.engine.toy import ToyRegressor
from tests.reliability.processes import REPO, file_digests
from tests.reliability.toy_ema import EmaRegressor


@pytest.fixture(scope="module")
def last(trained_run):
    return trained_run / "checkpoints" / "last.ckpt"


def test_raw_round_trip_is_exact(last, tmp_path):
    out = tmp_path / "raw.safetensors"
    export_safetensors(last, out)
    model = EmaRegressor()
    assert load_safetensors(model, out) == ([], [])
    expected = load_checkpoint(last)["state_dict"]
    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]) and value.dtype == expected[key].dtype, key
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "source": "last.ckpt", "weights": "raw", "global_step": "6"}


def test_ema_export_holds_the_averages_as_the_network(last, tmp_path):
    out = tmp_path / "ema.safetensors"
    export_safetensors(last, out, ema=True)
    trained = EmaRegressor()
    trained.load_state_dict(load_checkpoint(last)["state_dict"])
    tensors = read_safetensors(out)
    assert not [key for key in tensors if key.startswith("model_ema.")]
    assert torch.equal(tensors["model.0.weight"], getattr(trained.model_ema, "0weight"))
    assert not torch.equal(tensors["model.0.weight"], trained.model[0].weight)  # 6 steps: averages lag behind

    with pytest.raises(CheckpointError, match=r"ema.safetensors does not fit EmaRegressor .*6 missing keys "
                                              r"\(model_ema.\* 6\): model_ema.0bias, .*use_ema: false, or load with "
                                              r"strict=False"):
        load_safetensors(EmaRegressor(), out)
    exported = EmaRegressor()
    missing, unexpected = load_safetensors(exported, out, strict=False)
    assert unexpected == [] and missing and all(key.startswith("model_ema.") for key in missing)
    x = torch.randn(3, 16)
    with torch.no_grad(), trained.model_ema.average_parameters(trained.model):
        assert torch.equal(exported.model(x), trained.model(x))


def test_other_architectures_fail_with_the_keys_listed_or_load_partially(last, tmp_path):
    out = tmp_path / "raw.safetensors"
    export_safetensors(last, out)
    toy = ToyRegressor()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not fit ToyRegressor: none of its 11 tensors \(model.\* 4, "
                                              r"model_ema.\* 6, scale_factor 1\) is a key of the model \(linear.\* 2\)"):
        load_safetensors(toy, out)
    with pytest.raises(CheckpointError, match="not even strict: false would load anything"):
        load_safetensors(toy, out, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in toy.state_dict().items())  # untouched
    with pytest.raises(CheckpointError, match=r"shape mismatches: model.0.bias \(8,\) \(model: \(12,\)\), "
                                              r"model.0.weight \(8, 16\) \(model: \(12, 16\)\)"):
        load_safetensors(EmaRegressor(hidden=12), out)
    wider = EmaRegressor(hidden=12)
    initial = wider.model[0].weight.clone()
    # ignore_keys skips those keys on both sides, so strict loading takes the rest
    assert load_safetensors(wider, out, ignore_keys=["model.", "model_ema."]) == ([], [])
    assert torch.equal(wider.model[0].weight, initial)
    assert wider.scale_factor == load_checkpoint(last)["state_dict"]["scale_factor"]


def test_export_errors_write_nothing(last, tmp_path):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="w.safetensors exists; pass --overwrite"):
        export_safetensors(last, out)
    assert out.read_bytes() == b"keep me"
    export_safetensors(last, out, overwrite=True)
    assert set(read_safetensors(out)) == set(load_checkpoint(last)["state_dict"])
    with pytest.raises(CheckpointError, match=r"output .*w.ckpt: the name must end in .safetensors"):
        export_safetensors(last, tmp_path / "w.ckpt")
    with pytest.raises(CheckpointError, match=r"checkpoint .*nothing.ckpt does not exist"):
        export_safetensors(tmp_path / "nothing.ckpt", tmp_path / "n.safetensors")
    toy_checkpoint = tmp_path / "toy.ckpt"
    torch.save({"state_dict": ToyRegressor().state_dict()}, toy_checkpoint)
    with pytest.raises(CheckpointError, match=r"toy.ckpt has no EMA weights \(model_ema.\* entries\)"):
        export_safetensors(toy_checkpoint, tmp_path / "t.safetensors", ema=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.ckpt", "w.safetensors"]  # no temporaries left


def test_unreadable_safetensors_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"safetensors file .*none.safetensors does not exist"):
        load_safetensors(EmaRegressor(), tmp_path / "none.safetensors")
    full, truncated = tmp_path / "full.safetensors", tmp_path / "truncated.safetensors"
    save_file(EmaRegressor().state_dict(), str(full))
    truncated.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated.safetensors cannot be read \(SafetensorError"):
        load_safetensors(EmaRegressor(), truncated)


def test_command_line(last, tmp_path, capsys):
    out = tmp_path / "ema.safetensors"
    assert main([str(last), str(out), "--ema"]) == 0
    assert "EMA weights of" in capsys.readouterr().out
    digests = file_digests(tmp_path)
    assert main([str(last), str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert file_digests(tmp_path) == digests
    # the module entry point, as documented
    result = subprocess.run([sys.executable, "-m", "ldm.engine.export", str(last), str(tmp_path / "cli.safetensors")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert set(read_safetensors(tmp_path / "cli.safetensors")) == set(load_checkpoint(last)["state_dict"])
