"""Two costs of Triton's interpreter (Triton 3.8) that the CPU suite does not need to pay.

1. It re-patches `triton.language` on every call of one @triton.jit function from another.

A launch in the interpreter (`GridExecutor.__call__`) swaps the language's builtins for interpreted ones, runs every
program, then restores them. A device-function call inside it (`InterpretedFunction.__call__`) calls the same
`_patch_lang` again, per call, per program: four `inspect.getmembers` over the language modules, ~3 ms each time,
which patch nothing new (the builtins are already swapped; Triton 3.8). Our GroupNorm kernels call ~20 helpers per
program, so this was 44% of a Triton ResBlock test's time under cProfile (83 of 187 s).
`skip_repatching_in_device_calls` keeps one patch per launch: a device function whose language modules the running
launch has already patched gets an empty patch scope; anything else (another language module, a call outside a
launch) is patched as before. What runs is unchanged: the same interpreted builtins, the same restore at the
launch's end.

2. It sanitizes every int32 add, subtract and multiply for overflow (`sanitize_overflow`: the operation done again
in int64, compared with int32's range) and hands the result to `device_assert`, which does nothing unless the options'
`debug` is set, and the interpreter's never is. In the same test, after the first fix, 36 of 104 s under cProfile
went into those unused checks; `skip_unasserted_overflow_checks` turns them off where nothing would assert them.
Compiled kernels skip them too unless TRITON_DEBUG is set.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect


def _language_modules(fn) -> frozenset:
    """The triton.language modules visible to fn, as `_patch_lang` picks them (as ids)."""
    # keyed on the globals' size too: interpreting a function can add names to its module (triton.language.standard
    # gains `tl`)
    return _modules_among(fn, len(fn.__globals__))


@functools.lru_cache(maxsize=None)
def _modules_among(fn, _size: int) -> frozenset:
    import triton.language as tl

    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def skip_repatching_in_device_calls() -> bool:
    """Installs the one-patch-per-launch shortcut; False (nothing changed) where the interpreter's internals are not
    the ones this was written against."""
    from triton.runtime import interpreter

    needed = ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction")
    if not all(hasattr(interpreter, name) for name in needed) or getattr(interpreter, "_ldm_one_patch", False):
        return False
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched: list[set] = []  # one set of patched language modules per running launch

    def one_patch_per_launch(fn):
        modules = _language_modules(fn)
        if patched and modules <= patched[-1]:
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if patched:
            patched[-1].update(modules)
        return scope

    @functools.wraps(launch)
    def tracked_launch(self, *args, **kwargs):
        patched.append(set())  # filled by the launch's own patch, the first `_patch_lang` inside it
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang = one_patch_per_launch
    interpreter.GridExecutor.__call__ = tracked_launch
    interpreter._ldm_one_patch = True
    return True


def skip_unasserted_overflow_checks() -> bool:
    """Drops the overflow checks whose assertions would not run (the interpreter's options have debug off); False
    where nothing changed."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not getattr(options, "sanitize_overflow", False) or getattr(options, "debug", True):
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True
