"""One process at a time per run folder: a lock file naming its owner (pid and host), held with `flock`.

Two runs writing one folder would trample each other (one deletes the other's temporary checkpoint, an older state
overwrites `last.ckpt`). The kernel releases an `flock` when its holder dies, however it dies, so a lock file left
behind by a killed run is recognised as stale: the next run takes it over and says whose it was. The file is removed
on release.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusy(RuntimeError):
    """The run folder is locked by another living process."""


def owner_line() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}"


class RunLock:
    """`acquire()` the lock of `folder` (which must exist) or raise RunFolderBusy naming its holder; `release()`."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a notice when it took over a stale one (whose holder is gone), else None."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunFolderBusy(f"run folder {self.path.parent} is in use by {holder} (lock file {self.path}); "
                                    f"two runs writing one folder would overwrite each other's checkpoints") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # its holder released (removed) it between our open and flock
                os.close(fd)
                continue
            stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, (owner_line() + "\n").encode(), 0)
            self._fd = fd
            if not stale:
                return None
            return f"run folder {self.path.parent}: took over the stale lock of {stale} (not running)"

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before closing: a waiting process then sees a new file, not this one
        os.close(self._fd)
        self._fd = None
