"""tests/triton_interpreter.py: one language patch per interpreted launch, no unasserted overflow checks."""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton's interpreter only (CPU runs)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


@triton.jit
def _twice_plus_one(x):
    return x * 2 + 1


@triton.jit
def _helpers_kernel(x_ptr, y_ptr, n, CALLS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    for _ in tl.static_range(CALLS):
        x = _twice_plus_one(x)
    tl.store(y_ptr + offsets, tl.sigmoid(x), mask=mask)


def _scans(calls: int, monkeypatch) -> int:
    """How many times the language modules were scanned for builtins in one launch (its output checked)."""
    scans = []
    real_scan = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: scans.append(1) or real_scan(*a))
    x = torch.linspace(-1, 1, 40) / 8
    y = torch.empty_like(x)
    _helpers_kernel[(3,)](x, y, x.numel(), CALLS=calls, BLOCK=16)
    monkeypatch.undo()
    expected = x
    for _ in range(calls):
        expected = expected * 2 + 1
    torch.testing.assert_close(y, torch.sigmoid(expected))
    return len(scans)


def test_the_shortcut_is_installed_by_the_test_configuration():
    assert getattr(interpreter, "_ldm_one_patch", False)


def test_helper_calls_add_no_language_scans_and_the_builtins_are_restored(monkeypatch):
    """3 programs x 1 or 4 helper calls: the same scans as the launch's own patch; afterwards tl.load and tl.exp are the
    compiler's builtins again (the launch restored what it patched). After one launch first: interpreting
    triton.language's own helpers (tl.sigmoid) adds names to their module, which changes what a later launch patches."""
    _scans(1, monkeypatch)
    one_call = _scans(1, monkeypatch)
    four_calls = _scans(4, monkeypatch)
    assert one_call == four_calls > 0
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.exp)


@triton.jit
def _square_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    tl.store(y_ptr + offsets, x * x)


def test_overflow_checks_are_off_where_nothing_would_assert_them():
    """The interpreter never asserts them (its options' debug is off), so the CPU suite does not compute them; an
    int32 product that overflows wraps, as it does with the checks on and in a compiled kernel."""
    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow
    x = torch.tensor([3, 65536], dtype=torch.int32)
    y = torch.empty_like(x)
    _square_kernel[(1,)](x, y, BLOCK=2)
    assert y.tolist() == [9, 0]
