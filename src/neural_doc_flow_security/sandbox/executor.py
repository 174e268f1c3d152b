"""`SandboxExecutor`: a concurrent.futures.Executor over SandboxManager, for
synchronous code and frameworks that accept an executor.

    with SandboxExecutor(config) as executor:
        future = executor.submit(parse, document)   # runs in a fresh sandbox
        text = future.result()                      # its value, or the exception it raised

The manager runs on an event loop in a background thread owned by the executor.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .api import SandboxManager
from .config import SandboxConfig
from .remote_errors import plugin_exception
from .result import SandboxResult

if TYPE_CHECKING:
    from .workers import WorkerPool

T = TypeVar("T")

_CANCEL_WAIT_SECONDS = 60.0  # a cancelled call's tree is killed in milliseconds; this only bounds a wedged loop


class SandboxFuture(concurrent.futures.Future[T]):
    """The future of one sandboxed call. Unlike a process pool's, a call that is
    already running can be cancelled: cancel() kills its sandbox tree, waits until
    it is gone and returns True (the standard Future returns False and lets it run).
    `running()` is true from the moment the call got a sandbox slot."""

    def __init__(self, executor: SandboxExecutor) -> None:
        super().__init__()
        self._executor = executor
        self._started = False
        self._stopped = threading.Event()  # set once nothing of the call runs any more
        self._task: asyncio.Task[Any] | None = None

    def running(self) -> bool:
        """True while the call runs in its sandbox."""
        return self._started and not self.done()

    def cancel(self) -> bool:
        """Cancel the call; a running one is killed (its whole tree) before this returns.
        False only when it has already finished."""
        if not super().cancel():
            return False
        self._executor._stop_call(self)
        if threading.current_thread() is not self._executor._thread:
            self._stopped.wait(_CANCEL_WAIT_SECONDS)
        return True


class SandboxExecutor(concurrent.futures.Executor):
    """Each submit() runs the callable in its own fresh sandbox; the future's value
    is the callable's return value (`submit_for_result` gives the whole SandboxResult).

    It keeps the `concurrent.futures.Executor` contract (tested against
    ProcessPoolExecutor in tests/test_executor_contract.py): `with` and
    shutdown(wait=True) wait for every submitted call, shutdown(wait=False) lets
    them finish in the background, shutdown(cancel_futures=True) cancels those not
    started, submit after shutdown raises RuntimeError, and result() re-raises the
    callable's exception. Where a sandbox differs from a process pool:

    - cancel() of a running call kills its sandbox and returns True (see
      SandboxFuture); so `map(..., timeout=...)` leaves no sandbox running when it
      raises TimeoutError.
    - An exception is rebuilt on the host from its class name and message, never
      unpickled: it has the original class when that class is already imported on
      the host and takes a message (see remote_errors.plugin_exception), else it
      is an OutcomeError with `error_type`; `__cause__` holds the sandbox's
      traceback text and `sandbox_result` the whole result (stdout, stderr...).
    - A run that did not end by returning or raising (timeout, out of memory,
      killed, protocol violation, a protection that could not be applied) is an
      OutcomeError whose `outcome` says which; a process pool would report a
      BrokenProcessPool or never return.
    - Return values must be msgpack types (see README), not anything picklable.
    - `max_workers` bounds the sandboxes alive at once (default: CPUs x 4).
    - `context`: whether the callable gets a PluginContext as first argument
      (None: the deprecated detection by a first parameter named `ctx`).
    - `preload`: modules every sandbox starts with imported (see SandboxManager).

    `max_tasks_per_child` (like ProcessPoolExecutor's): 1, the default, runs
    each call in a fresh sandbox. K > 1 (or None: no limit) runs calls in up to
    `max_workers` long-lived sandboxed workers, each serving up to K calls of
    one function (by module and qualified name, or the `plugin_id` given),
    config and reuse key (`with_reuse_key()`), then replaced; `reset_tmp`
    empties a worker's /tmp after each call. Each call keeps its wall timeout
    and every limit holds per worker; a call that does not end ok ends its
    worker. What a call leaves in its worker (globals, files, threads, memory)
    is there for the next call of the same key: see workers.WorkerPool and the
    README.
    """

    def __init__(self, config: SandboxConfig | None = None, *, max_workers: int | None = None,
                 start_method: Literal["zygote", "fork", "posix"] = "zygote",
                 context: bool | None = None, preload: Iterable[str] = (),
                 max_tasks_per_child: int | None = 1, reset_tmp: bool = False) -> None:
        from .workers import check_max_tasks_per_child

        check_max_tasks_per_child(max_tasks_per_child)
        if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                        or max_workers <= 0):
            raise ValueError(f"max_workers: must be a whole number > 0, got {max_workers!r}")
        self._manager = SandboxManager(config, start_method=start_method, max_concurrent=max_workers,
                                       status_interval=None, preload=preload)
        self._context = context
        self._max_workers = self._manager._max_concurrent
        self._max_tasks_per_child = max_tasks_per_child
        self._reset_tmp = reset_tmp
        self._workers: WorkerPool | None = None  # max_tasks_per_child != 1
        self._lock = threading.Lock()
        self._shutdown = False
        self._calls: dict[asyncio.Task[None], SandboxFuture[Any]] = {}  # used on the loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="ndf-sandbox-executor",
                                        daemon=True)
        self._thread.start()
        ready.result()
        _live_executors.add(self)

    # -- submitting -----------------------------------------------------------

    def submit_for_result(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
                          ) -> SandboxFuture[SandboxResult]:
        """Run fn(*args, **kwargs) in a sandbox; the future holds the SandboxResult
        (whatever the outcome)."""
        return self._submit(fn, args, kwargs, unwrap=False)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> SandboxFuture[T]:
        """Run fn(*args, **kwargs) in a sandbox; the future holds its return value or
        raises its exception (an OutcomeError for a timeout, OOM, kill...)."""
        return self._submit(fn, args, kwargs, unwrap=True)

    def submit_with_options(self, fn: Callable[..., Any], args: tuple[Any, ...] = (),
                            kwargs: dict[str, Any] | None = None, *, sandbox_config: SandboxConfig | None = None,
                            plugin_id: str | None = None) -> SandboxFuture[SandboxResult]:
        """Run fn(*args, **kwargs) in a sandbox made from `sandbox_config` (None: the
        executor's config), named `plugin_id` (None: fn's name); the future holds the
        SandboxResult. For integrations that share one executor between configs."""
        return self._submit(fn, args, dict(kwargs or {}), unwrap=False, config=sandbox_config, plugin_id=plugin_id)

    def with_reuse_key(self, reuse_key: Hashable) -> KeyedSubmitter:
        """submit() and submit_for_result() whose calls share workers only with calls
        of the same key (e.g. a tenant's id); with max_tasks_per_child=1 every call
        has a sandbox of its own anyway."""
        hash(reuse_key)  # a TypeError here, not in the loop thread
        return KeyedSubmitter(self, reuse_key)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                unwrap: bool, config: SandboxConfig | None = None, plugin_id: str | None = None,
                reuse_key: Hashable = None) -> SandboxFuture[Any]:
        context = self._manager._context_flag(fn, self._context, stacklevel=3)
        name = plugin_id if plugin_id is not None else getattr(fn, "__name__", "callable")
        if plugin_id is None and self._max_tasks_per_child != 1:  # a worker serves one function
            name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', name)}"
        future: SandboxFuture[Any] = SandboxFuture(self)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            assert self._loop is not None
            # Under the lock: every call is on the loop's queue before shutdown's closing step.
            self._loop.call_soon_threadsafe(self._start_call, future, (name, fn, args, kwargs, config, reuse_key),
                                            context, unwrap)
        return future

    def _start_call(self, future: SandboxFuture[Any], call: tuple[Any, ...], context: bool, unwrap: bool) -> None:
        task = asyncio.ensure_future(self._run_call(future, call, context, unwrap))
        future._task = task
        self._calls[task] = future
        task.add_done_callback(self._call_ended)
        if future.cancelled():
            task.cancel()

    async def _run_call(self, future: SandboxFuture[Any], call: tuple[Any, ...], context: bool,
                        unwrap: bool) -> None:
        name, fn, args, kwargs, config, reuse_key = call
        assert self._slots is not None
        async with self._slots:
            if future.cancelled():
                return
            future._started = True
            if self._workers is None:
                result = await self._manager._execute(name, fn, args, kwargs, config, context)
            else:
                result = await self._workers._execute(name, fn, args, kwargs, reuse_key, context, config)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
            if not unwrap:
                future.set_result(result)
            elif result.ok:
                future.set_result(result.output)
            else:
                future.set_exception(plugin_exception(result))

    def _call_ended(self, task: asyncio.Task[Any]) -> None:
        future = self._calls.pop(task)
        if not task.cancelled() and task.exception() is not None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(task.exception())  # e.g. SandboxError: the launch failed
        if future.cancelled():
            # Wakes wait() and as_completed() (Future.cancel() alone does not); called once.
            future.set_running_or_notify_cancel()
        elif not future.done():  # the task was cancelled by the loop's end, not by the caller
            future.set_exception(RuntimeError("the executor stopped before the call ended"))
        future._stopped.set()

    def _stop_call(self, future: SandboxFuture[Any]) -> None:
        """Future.cancel() succeeded: cancel the call's task, which kills its tree."""
        def stop() -> None:
            if future._task is not None:
                future._task.cancel()
            # else _start_call has not run yet, and will see the future cancelled

        loop = self._loop
        if threading.current_thread() is self._thread:
            stop()
            return
        try:
            assert loop is not None
            loop.call_soon_threadsafe(stop)
        except RuntimeError:  # the loop is closed: nothing of the call runs
            future._stopped.set()

    # -- the loop thread ------------------------------------------------------

    def _run_loop(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:  # noqa: BLE001 - reported to __init__
            if not ready.done():
                ready.set_exception(exc)
            else:
                raise

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._slots = asyncio.Semaphore(self._max_workers)
        await self._manager.start()
        if self._max_tasks_per_child != 1:
            self._workers = self._manager.worker_pool(max_workers=self._max_workers,
                                                      max_tasks_per_child=self._max_tasks_per_child,
                                                      reset_tmp=self._reset_tmp)
        ready.set_result(None)
        try:
            await self._closing.wait()
            while self._calls:
                await asyncio.wait(list(self._calls))
        finally:
            await self._manager.shutdown()

    def _cancel_not_started(self) -> None:
        for future in list(self._calls.values()):
            if not future._started:
                future.cancel()

    # -- shutting down --------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with `cancel_futures`, cancel the calls not started yet.
        The others run to the end; then the manager and the loop thread stop.
        `wait`: return only once all of that is done (else it happens in the background)."""
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            loop, closing = self._loop, self._closing
            assert loop is not None and closing is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: everything has ended
                if cancel_futures:
                    loop.call_soon_threadsafe(self._cancel_not_started)
                if first:
                    loop.call_soon_threadsafe(closing.set)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()


class KeyedSubmitter:
    """SandboxExecutor submits under one reuse key (from with_reuse_key())."""

    def __init__(self, executor: SandboxExecutor, reuse_key: Hashable) -> None:
        self.executor = executor
        self.reuse_key = reuse_key

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> SandboxFuture[T]:
        """SandboxExecutor.submit under this key."""
        return self.executor._submit(fn, args, kwargs, unwrap=True, reuse_key=self.reuse_key)

    def submit_for_result(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
                          ) -> SandboxFuture[SandboxResult]:
        """SandboxExecutor.submit_for_result under this key."""
        return self.executor._submit(fn, args, kwargs, unwrap=False, reuse_key=self.reuse_key)


_live_executors: weakref.WeakSet[SandboxExecutor] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    """Like the standard executors: at interpreter exit, calls still running finish
    (and the sandboxes and zygotes are cleaned up) before the process ends."""
    for executor in list(_live_executors):
        executor.shutdown(wait=True)
