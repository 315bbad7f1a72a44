"""Preemption signals: SIGUSR1 asks for a checkpoint, SIGTERM for a checkpoint and a clean exit.

In training, handlers only set flags; the loop acts on them at the next optimizer-step boundary, where the state is
consistent. Outside it (`stage`: start-up, the test stage) there is nothing to save: SIGTERM raises `Preempted`,
which the command line turns into one line and exit code 0, and SIGUSR1 says what it will do. Loader workers ignore
both unless their parent sends them (`ignore_in_worker`): SLURM signals the whole process group, and a worker killed
first would end the run with a loader error instead of a checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

TRAINING = "training"


class Preempted(BaseException):
    """SIGTERM outside the training loop. A BaseException, so that `except Exception` in loading code lets it by."""


class PreemptionFlags:
    def __init__(self, stage: str = TRAINING) -> None:
        self.save_requested = False
        self.exit_requested = False
        self.stage = stage
        self._previous: dict[int, object] = {}

    def _on_usr1(self, signum, frame) -> None:
        self.save_requested = True
        if self.stage != TRAINING:
            print(f"SIGUSR1 during {self.stage}: " + ("a checkpoint is saved after the first training step"
                                                      if self.stage == "start-up" else "no training runs, nothing to "
                                                                                       "save"), file=sys.stderr)

    def _on_term(self, signum, frame) -> None:
        self.save_requested = True
        self.exit_requested = True
        if self.stage != TRAINING:
            raise Preempted(f"SIGTERM during {self.stage}: exiting")

    def install(self) -> "PreemptionFlags":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for signum, handler in ((signal.SIGUSR1, self._on_usr1), (signal.SIGTERM, self._on_term)):
                self._previous[signum] = signal.signal(signum, handler)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def clear_save(self) -> None:
        self.save_requested = False


def ignore_in_worker() -> None:
    """In a loader worker: ignore SIGUSR1, and SIGTERM unless its parent sends it (the main process handles both;
    the parent's SIGTERM is how it ends a worker at exit, which must still work).

    A signal handler cannot tell who sent the signal, so SIGTERM is blocked in this thread (threads started from it
    inherit that) and a daemon thread takes it with `sigwaitinfo`, which names the sender."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)
