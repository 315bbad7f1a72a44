"""Checkpoint files: atomic replace, rotation, safe loading with clear errors, RNG round trip."""
import errno
import os
import random

import numpy as np
import pytest
import torch

from ldm.engine import checkpoint as ckpt


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    ckpt.atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, path)
    ckpt.atomic_torch_save({"state_dict": {"w": torch.zeros(2)}}, path)
    assert torch.equal(ckpt.load_checkpoint(path)["state_dict"]["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    ckpt.atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):
        ckpt.atomic_torch_save({"state_dict": {"w": lambda: None}}, path)  # not picklable
    assert torch.equal(ckpt.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_rotation_keeps_the_newest_k(tmp_path):
    for step in (1, 2, 10, 11):
        ckpt.save_rotating({"state_dict": {}, "global_step": step}, tmp_path, step, keep_last_k=2)
    assert [p.name for p in ckpt.step_checkpoints(tmp_path)] == ["step=10.ckpt", "step=11.ckpt"]
    assert ckpt.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 11


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a zip file at all")
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt.ckpt cannot be read"):
        ckpt.load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": {}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="has no 'state_dict'"):
        ckpt.load_checkpoint(foreign)


def test_weights_only_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": ckpt.CheckpointError("x")}, path)
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(path)


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.atomic_torch_save({"state_dict": {}, "rng": ckpt.capture_rng_state()}, tmp_path / "r.ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "r.ckpt")["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_last_is_the_newest_step_file_and_survives_its_rotation(tmp_path):
    (tmp_path / ".last.ckpt.tmp-999999").write_bytes(b"torn")  # left by a killed writer
    ckpt.save_rotating({"state_dict": {}, "global_step": 1}, tmp_path, 1, keep_last_k=1)
    assert not list(tmp_path.glob(".*.tmp-*"))
    ckpt.save_rotating({"state_dict": {}, "global_step": 2}, tmp_path, 2, keep_last_k=1)
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "step=2.ckpt")
    ckpt.save_rotating({"state_dict": {}, "global_step": 3}, tmp_path, 3, keep_last_k=1)
    assert not (tmp_path / "step=2.ckpt").exists()
    assert ckpt.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3


def test_a_write_error_names_the_file_and_the_os_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch's zip writer turns the disk's error into 'unexpected pos ...'; the save reports the OSError itself."""
    path = tmp_path / "last.ckpt"
    ckpt.atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt, "_WriteRecorder", failing_after(1000, ckpt._WriteRecorder))
    with pytest.raises(ckpt.CheckpointWriteError) as raised:
        ckpt.atomic_torch_save({"state_dict": {"w": torch.zeros(10_000)}}, path)
    assert str(raised.value) == f"cannot write {path}: [Errno 28] No space left on device"
    assert isinstance(raised.value.__cause__, RuntimeError)  # what torch raised, kept as the cause
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def failing_after(limit: int, recorder_class):
    """A `_WriteRecorder` over a handle that fails with ENOSPC once `limit` bytes are written."""
    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    return lambda handle: recorder_class(Full(handle))


def test_link_and_write_temporaries_are_distinct(tmp_path):
    """A leftover write temporary of last.ckpt (same process id) must not turn the link into a copy."""
    step = tmp_path / "step=1.ckpt"
    ckpt.atomic_torch_save({"state_dict": {}}, step)
    (tmp_path / f".last.ckpt.tmp-{os.getpid()}").write_bytes(b"a write in progress")
    ckpt.atomic_link(step, tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").samefile(step)
    assert (tmp_path / f".last.ckpt.tmp-{os.getpid()}").read_bytes() == b"a write in progress"


def test_rotation_keeps_the_file_just_saved_over_higher_steps_of_an_abandoned_run(tmp_path):
    """Resumed from step 2 while step 3 exists (a later checkpoint of the run, left behind): the new step 2 is the
    newest state, so rotation deletes step 3, not it."""
    for step in (1, 2, 3):
        ckpt.save_rotating({"state_dict": {}, "global_step": step}, tmp_path, step, keep_last_k=1)
    ckpt.save_rotating({"state_dict": {}, "global_step": 2}, tmp_path, 2, keep_last_k=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=2.ckpt"]
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "step=2.ckpt")
