"""`train_ae.py` for the reliability tests: the same CLI, on one thread, optionally with slow checkpoint writes.

    python tests/reliability/train.py -b tests/reliability/toy_ema.yaml -t ...

With `RELIABILITY_SLOW_SAVE_S=<s1>,<s2>,...` and `RELIABILITY_MARKERS=<folder>`, every checkpoint file is written
in two halves: the first half is flushed and fsynced, an empty file `save-<n>` (n = 1, 2, ...) appears in the
markers folder, and the writer pauses s_n seconds (the last value for all later saves) before the second half. A
test that waits for a marker and then sends SIGKILL therefore kills the process while a checkpoint is torn on disk.
Only the bytes' timing changes: the checkpoint code under test (`ldm.engine.checkpoint`: temporary file, fsync,
rename, hard link) runs unmodified.

With `RELIABILITY_FILE_SIZE_LIMIT=<bytes>`, writing any file past that size fails with EFBIG ("File too large"), the
way a full disk fails a write: the kernel's RLIMIT_FSIZE, with SIGXFSZ ignored so that the write returns the error.
"""
from __future__ import annotations

import io
import itertools
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ldm.cli import main  # noqa: E402

_torch_save = torch.save
_save_count = itertools.count(1)


def slow_torch_save(obj, handle, *args, **kwargs) -> None:
    """`torch.save` into `handle` in two halves with a marker file and a pause in between."""
    buffer = io.BytesIO()
    _torch_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    half = len(data) // 2
    handle.write(data[:half])
    handle.flush()
    os.fsync(handle.fileno())
    markers = Path(os.environ["RELIABILITY_MARKERS"])
    count = next(_save_count)
    (markers / f"save-{count}").touch()
    pauses = [float(value) for value in os.environ["RELIABILITY_SLOW_SAVE_S"].split(",")]
    time.sleep(pauses[min(count, len(pauses)) - 1])
    handle.write(data[half:])


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same kernels in every process of a test: bitwise comparable runs
    if os.environ.get("RELIABILITY_SLOW_SAVE_S"):
        torch.save = slow_torch_save
    if os.environ.get("RELIABILITY_FILE_SIZE_LIMIT"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(os.environ["RELIABILITY_FILE_SIZE_LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(main("reliability-test training run"))
