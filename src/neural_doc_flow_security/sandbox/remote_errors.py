"""Re-raising a plugin's exception on the host without trusting the sandbox.

The sandbox reports an exception as text: its class name ("ValueError",
"pypdf.errors.PdfStreamError"), its message and its formatted traceback. Like
ProcessPoolExecutor, the host re-raises an exception of the original class,
but it never unpickles and never imports anything a sandbox names:

- the class is looked up only in modules the host has already imported
  (`sys.modules`), through the modules' and classes' own `__dict__` (no module
  `__getattr__`, no descriptor runs);
- it must be an `Exception` subclass (never SystemExit, KeyboardInterrupt...),
  and not one of the sandbox's own errors (a plugin must not pass for the host);
- it is built from the message alone, and only when its `__new__`, `__init__`
  and `__setattr__` are the built-in ones: no host code runs on the sandbox's text.

Anything else becomes an OutcomeError with `error_type`. Either way the
sandbox's traceback text is the exception's `__cause__` (a RemoteTraceback) and
the whole SandboxResult is its `sandbox_result` attribute.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import sys
import types
from collections.abc import Mapping
from typing import Any

from .errors import OutcomeError, RemoteTraceback, SandboxError
from .result import Outcome, SandboxResult


def resolve_exception_class(name: str) -> type[Exception] | None:
    """The host's exception class called `name` ("module.qualname", or a builtin's
    bare name), if it is already imported and may be rebuilt; else None."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    candidates = [("builtins", parts)] if len(parts) == 1 else [
        (".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    for module_name, path in candidates:
        found: object = sys.modules.get(module_name)
        for attribute in path:
            if found is None:
                break
            found = _namespace(found).get(attribute)
        if isinstance(found, type) and _rebuildable(found):
            return found
    return None


def _namespace(obj: object) -> Mapping[str, object]:
    """A module's or class's own attributes, read by the C descriptors (no hook of
    the object or of its metaclass runs); empty for anything else."""
    if isinstance(obj, types.ModuleType):
        return _MODULE_DICT.__get__(obj)  # type: ignore[no-any-return]
    if isinstance(obj, type):
        return _TYPE_DICT.__get__(obj)  # type: ignore[no-any-return]
    return {}


_MODULE_DICT: Any = vars(types.ModuleType)["__dict__"]
_TYPE_DICT: Any = vars(type)["__dict__"]


# Exceptions that steer the caller's control flow (a host loop calling .result() in
# __next__, a caller waiting with a timeout): a sandbox must not be able to raise them.
_CONTROL_FLOW: tuple[type[BaseException], ...] = (
    StopIteration, StopAsyncIteration, TimeoutError, concurrent.futures.CancelledError)
# What a built-in (C) slot looks like; anything else (a Python function, a Cython
# cyfunction, a caching wrapper) may run code of the host's on the sandbox's text.
_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.WrapperDescriptorType, types.BuiltinMethodType,
                      types.MethodWrapperType)


def _rebuildable(cls: type) -> bool:
    if not issubclass(cls, Exception) or issubclass(cls, (SandboxError, *_CONTROL_FLOW)):
        return False
    if type(cls) is not type:
        return False  # a metaclass's __call__ would run on the sandbox's text
    for hook in ("__new__", "__init__", "__setattr__"):
        implementation = inspect.getattr_static(cls, hook)
        if isinstance(implementation, (staticmethod, classmethod)):
            implementation = implementation.__func__
        if not isinstance(implementation, _BUILTIN_CALLABLES):
            return False  # not a built-in slot: it would run on the sandbox's text
    return True


def plugin_exception(result: SandboxResult) -> Exception:
    """The exception that stands for a result that is not ok: the plugin's own
    exception class when it can be rebuilt safely (see the module docstring),
    else the OutcomeError raise_for_outcome() raises."""
    try:
        result.raise_for_outcome()
    except OutcomeError as error:
        fallback = error
    else:
        raise ValueError("plugin_exception: the result is ok")
    cls = (resolve_exception_class(result.error_type)
           if result.outcome is Outcome.ERROR and result.error_type else None)
    if cls is None:
        return fallback
    try:
        rebuilt = cls(result.error_message or "")
    except Exception:  # noqa: BLE001 - it needs other arguments: keep the OutcomeError
        return fallback
    rebuilt.__cause__ = RemoteTraceback(result.traceback or "")
    with contextlib.suppress(AttributeError, TypeError):  # a class with __slots__
        rebuilt.sandbox_result = result  # type: ignore[attr-defined]
    return rebuilt
