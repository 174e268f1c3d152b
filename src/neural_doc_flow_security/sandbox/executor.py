"""`SandboxExecutor`: a concurrent.futures.Executor over SandboxManager, for
synchronous code and frameworks that accept an executor.

    with SandboxExecutor(config) as executor:
        future = executor.submit(parse, document)   # runs in a fresh sandbox
        text = future.result()                      # raises OutcomeError unless ok

The manager runs on an event loop in a background thread owned by the executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from .api import SandboxManager
from .config import SandboxConfig
from .result import SandboxResult

T = TypeVar("T")


class SandboxExecutor(concurrent.futures.Executor):
    """Each submit() runs the callable in its own fresh sandbox; the future's
    value is the callable's return value (`submit_for_result` gives the whole
    SandboxResult)."""

    def __init__(self, config: SandboxConfig | None = None, *, max_workers: int | None = None,
                 start_method: Literal["zygote", "fork", "posix"] = "zygote") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ndf-sandbox-executor", daemon=True)
        self._thread.start()
        self._manager = SandboxManager(config, start_method=start_method, max_concurrent=max_workers,
                                       status_interval=None)
        self._shutdown = False
        self._lock = threading.Lock()
        asyncio.run_coroutine_threadsafe(self._manager.start(), self._loop).result()

    def submit_for_result(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
                          ) -> concurrent.futures.Future[SandboxResult]:
        """Run fn(*args, **kwargs) in a sandbox; the future holds the SandboxResult."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            name = getattr(fn, "__name__", "callable")
            return asyncio.run_coroutine_threadsafe(
                self._manager.execute_sandboxed(name, fn, *args, **kwargs), self._loop)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Run fn(*args, **kwargs) in a sandbox; the future holds its return value or
        raises OutcomeError (error, timeout, oom, killed...)."""
        inner = self.submit_for_result(fn, *args, **kwargs)
        outer: concurrent.futures.Future[T] = concurrent.futures.Future()

        def unwrap(done: concurrent.futures.Future[SandboxResult]) -> None:
            if done.cancelled():
                outer.cancel()
                return
            try:
                outer.set_result(done.result().raise_for_outcome().output)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outer.set_exception(exc)

        inner.add_done_callback(unwrap)
        return outer

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the manager (killing sandboxes still running) and the loop thread."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        future = asyncio.run_coroutine_threadsafe(self._manager.shutdown(), self._loop)
        if wait:
            future.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if wait:
            self._thread.join()
            self._loop.close()
