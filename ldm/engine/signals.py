"""Preemption signals: SIGUSR1 asks for a checkpoint, SIGTERM for a checkpoint and a clean exit.

Handlers only set flags; the loop acts on them at the next optimizer-step boundary, where the state is consistent.
"""
from __future__ import annotations

import signal
import threading


class PreemptionFlags:
    def __init__(self) -> None:
        self.save_requested = False
        self.exit_requested = False
        self._previous: dict[int, object] = {}

    def _on_usr1(self, signum, frame) -> None:
        self.save_requested = True

    def _on_term(self, signum, frame) -> None:
        self.save_requested = True
        self.exit_requested = True

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
