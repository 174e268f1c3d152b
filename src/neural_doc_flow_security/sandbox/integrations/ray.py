"""Ray: a decorator that runs each call of a remote function in its own sandbox.

    @ray.remote
    @sandboxed(config=SandboxConfig(memory_limit_mb=256))
    def extract_text(blob): ...

    ray.get([extract_text.remote(b) for b in blobs])

Each Ray worker process gets one SandboxExecutor, started on its first sandboxed
call (its zygotes are started from the executor's own thread; a Ray worker runs
threads, so the "fork" start method, which would fork the worker, is refused)
and stopped when the process exits. A call that does not end ok raises
OutcomeError (outcome, error type, and the SandboxResult with the kernel's
usage), which Ray hands to the caller of ray.get (as the cause of its
RayTaskError) and counts for `retry_exceptions`. With `return_result=True` the
remote function returns the whole SandboxResult instead (value in `.output`,
usage in `.resource_usage`) and raises nothing for the outcome. Return values
travel as the sandbox's results do (msgpack types, never unpickled).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

from ..config import SandboxConfig
from ..executor import SandboxExecutor
from . import refuse_fork

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_executors: dict[str, SandboxExecutor] = {}  # this process's, by start method


def process_executor(start_method: Literal["zygote", "posix"] = "zygote") -> SandboxExecutor:
    """This process's SandboxExecutor for `start_method`, started on first use (it
    shuts down at interpreter exit, like every SandboxExecutor)."""
    refuse_fork(start_method, "Ray")
    with _lock:
        executor = _executors.get(start_method)
        if executor is None:
            executor = _executors[start_method] = SandboxExecutor(start_method=start_method, context=False)
        return executor


@overload
def sandboxed(fn: F, /, *, config: SandboxConfig | None = ..., return_result: bool = ...,
              start_method: Literal["zygote", "posix"] = ...) -> F: ...


@overload
def sandboxed(fn: None = None, /, *, config: SandboxConfig | None = ..., return_result: bool = ...,
              start_method: Literal["zygote", "posix"] = ...) -> Callable[[F], F]: ...


def sandboxed(fn: Callable[..., Any] | None = None, /, *, config: SandboxConfig | None = None,
              return_result: bool = False, start_method: Literal["zygote", "posix"] = "zygote") -> Any:
    """Run every call of `fn` in a fresh sandbox made from `config` (None:
    SandboxConfig()); use it under `@ray.remote` (or alone, in any process).
    The call returns fn's value, or raises OutcomeError when the sandbox did not
    end ok; `return_result`: return the SandboxResult instead."""
    if config is not None and not isinstance(config, SandboxConfig):
        raise TypeError(f"config: must be a SandboxConfig or None, got {config!r:.200}")
    refuse_fork(start_method, "Ray")

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(function, "__name__", "callable")

        @functools.wraps(function)
        def call_in_sandbox(*args: Any, **kwargs: Any) -> Any:
            future = process_executor(start_method).submit_with_options(
                function, args, kwargs, sandbox_config=config, plugin_id=name)
            result = future.result()
            return result if return_result else result.raise_for_outcome().output

        return call_in_sandbox

    return decorate if fn is None else decorate(fn)
