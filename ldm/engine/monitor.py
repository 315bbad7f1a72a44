"""The best checkpoint: which validation mean decides it, in which direction, and the best value seen so far.

The monitored key is the model's `monitor` attribute (CompVis configs set `model.params.monitor`, e.g. `val/loss`),
unless `trainer.checkpoint.monitor` names another; None keeps no best checkpoint. The record travels in every
checkpoint (`best` entry), so a resumed run compares against the best of the run it continues.
"""
from __future__ import annotations

import math

from ldm.util import ConfigError


class MonitorKeyError(ConfigError):
    """The monitored key is not among the validation scalars."""


def monitored_key(model, override: str | None) -> str | None:
    """`override` (trainer.checkpoint.monitor) if set, else the model's `monitor` attribute (None if it has none)."""
    key = override if override is not None else getattr(model, "monitor", None)
    if key is not None and not isinstance(key, str):
        raise ConfigError(f"model.params.monitor: expected a validation key such as 'val/loss' or null, got {key!r}")
    return key


class BestRecord:
    """Best value of `key` so far (lower for mode "min", higher for "max") and the global step it was reached at."""

    def __init__(self, key: str | None, mode: str = "min"):
        """mode: "min" or "max", as checked by `CheckpointConfig`."""
        self.key = key
        self.mode = mode
        self.value: float | None = None
        self.step: int | None = None

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def better(self, value: float, than: float | None) -> bool:
        """Whether finite `value` strictly improves on `than` (None: nothing yet). Non-finite is never better."""
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value < than if self.mode == "min" else value > than

    def update(self, means: dict[str, float], step: int) -> bool:
        """Record `means[key]` if it improves on the best so far; returns whether it did. The first validation
        without the key raises MonitorKeyError naming it and the keys there are."""
        if not self.enabled:
            return False
        if self.key not in means:
            raise MonitorKeyError(
                f"monitor {self.key!r}: not among the validation scalars ({', '.join(sorted(means)) or 'none'}); "
                f"set trainer.checkpoint.monitor to one of them, or model.params.monitor=null to keep no best.ckpt")
        value = float(means[self.key])
        if not self.better(value, self.value):
            return False
        self.value, self.step = value, step
        return True

    def state_dict(self) -> dict | None:
        """`{"monitor", "mode", "value", "step"}`, or None while nothing is monitored."""
        if not self.enabled:
            return None
        return {"monitor": self.key, "mode": self.mode, "value": self.value, "step": self.step}

    def load_state_dict(self, state: dict | None) -> str | None:
        """Continue from a saved record of the same key and mode (keeping the better of it and what is held now);
        returns a notice when the saved record is for another key or mode and is therefore not compared against."""
        if not self.enabled or state is None or state.get("value") is None:
            return None
        if (state.get("monitor"), state.get("mode")) != (self.key, self.mode):
            return (f"best checkpoint: the saved one was chosen by {state.get('monitor')} ({state.get('mode')}), "
                    f"this run monitors {self.key} ({self.mode}); the first validation replaces it")
        value = float(state["value"])
        if self.better(value, self.value):
            self.value, self.step = value, int(state["step"])
        return None
