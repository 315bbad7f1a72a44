"""Renaming a state dict between our module names and another layout's, in both directions, exactly.

A layout is a list of `Mapped` modules: one of ours and the module(s) of the other layout holding the same tensors.
Converting checks the whole key set at once: every missing key and every key the layout does not know is reported
in one error, never loaded partially.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from ldm.convert.weights_io import ConversionError


@dataclass(frozen=True)
class Mapped:
    """Our module `ours` and its counterpart(s) `theirs` (several: their tensors are concatenated along dim 0, e.g.
    separate q, k, v into one qkv projection). `linear`: their weights are (out, in) matrices where ours are 1x1
    convolutions (out, in, 1, ...). `params`: the tensors of the module."""

    ours: str
    theirs: tuple[str, ...]
    linear: bool = False
    params: tuple[str, ...] = ("weight", "bias")


def mapped(ours: str, *theirs: str, linear: bool = False, params: Sequence[str] = ("weight", "bias")) -> Mapped:
    return Mapped(ours, tuple(theirs) or (ours,), linear, tuple(params))


def _listed(keys: Sequence[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def their_keys(layout: Iterable[Mapped], prefix: str = "") -> list[str]:
    """Every tensor name of the other layout, with `prefix`."""
    return [f"{prefix}{module}.{param}" for entry in layout for param in entry.params for module in entry.theirs]


def check_keys(layout: Sequence[Mapped], state: Mapping[str, torch.Tensor], prefix: str, source: str,
               what: str) -> None:
    """Raise ConversionError listing all keys of `state` under `prefix` that `layout` lacks and all it expects that
    `state` lacks (a checkpoint of another architecture, or a config inferred wrongly)."""
    expected = set(their_keys(layout, prefix))
    present = {key for key in state if key.startswith(prefix)}
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing or unknown:
        parts = [f"{len(keys)} {kind} key{'s' if len(keys) > 1 else ''}: {_listed(keys)}"
                 for kind, keys in (("missing", missing), ("unknown", unknown)) if keys]
        raise ConversionError(f"{source}: does not fit {what} ({'; '.join(parts)})")


def to_ours(layout: Sequence[Mapped], state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
            prefix: str, source: str, what: str) -> dict[str, torch.Tensor]:
    """Their tensors under `prefix` -> our state dict, shaped as `shapes` (our model's state dict shapes)."""
    check_keys(layout, state, prefix, source, what)
    ours: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for entry in layout:
        for param in entry.params:
            parts = [state[f"{prefix}{module}.{param}"] for module in entry.theirs]
            tensor = parts[0] if len(parts) == 1 else torch.cat([p.reshape(p.shape[0], -1) for p in parts])
            name = f"{entry.ours}.{param}"
            if name not in shapes or tensor.numel() != shapes[name].numel():
                got = " + ".join(str(tuple(p.shape)) for p in parts)
                bad.append(f"{prefix}{entry.theirs[0]}.{param} {got} (ours {name}: "
                           f"{tuple(shapes[name]) if name in shapes else 'absent'})")
                continue
            ours[name] = tensor.reshape(shapes[name])
    if bad:
        raise ConversionError(f"{source}: does not fit {what} ({len(bad)} shape mismatches: {_listed(bad, 5)})")
    unfilled = sorted(set(shapes) - set(ours))
    if unfilled:
        raise ConversionError(f"{source}: the layout leaves {len(unfilled)} tensors of {what} unset: "
                              f"{_listed(unfilled)}")
    return ours


def from_ours(layout: Sequence[Mapped], state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our state dict -> their tensor names (with `prefix`); every tensor of `state` must be in the layout."""
    covered = {f"{entry.ours}.{param}" for entry in layout for param in entry.params}
    left = sorted(set(state) - covered)
    if left:
        raise ConversionError(f"cannot export: {len(left)} tensors have no place in the layout: {_listed(left)}")
    theirs: dict[str, torch.Tensor] = {}
    for entry in layout:
        for param in entry.params:
            tensor = state[f"{entry.ours}.{param}"]
            for module, part in zip(entry.theirs, tensor.chunk(len(entry.theirs), dim=0)):
                if entry.linear and part.ndim > 2:
                    part = part.flatten(1)
                theirs[f"{prefix}{module}.{param}"] = part
    return theirs
