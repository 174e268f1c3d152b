"""Dask (distributed): every task annotated `executor="sandbox"` runs in its own sandbox.

    client.register_plugin(SandboxPlugin(SandboxConfig(memory_limit_mb=256, timeout_seconds=30)))
    with dask.annotate(executor="sandbox"):
        texts = client.gather(client.map(extract_text, pdf_blobs))

A `WorkerPlugin` puts a `SandboxTaskExecutor` into `worker.executors[name]` on
every worker (Dask also sets the plugin up on workers that join later) and stops
it with the worker. Dask hands a named executor its own wrapper,
`_run_task_simple(task, data, delay)`; the executor runs only the task itself
(the application's function and its arguments, the values of its dependencies
filled in) in a fresh sandbox and builds the wrapper's report on the worker. A
task that does not end ok raises `OutcomeError` (outcome, the plugin's error
type, and the whole SandboxResult with the kernel's usage) in the client, so
`retries=` and Dask's error handling apply. Values a sandboxed task returns
travel as the sandbox's results do (msgpack types, never unpickled); its
arguments may be anything cloudpickle takes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Literal

from dask.sizeof import sizeof
from dask.utils import key_split
from distributed import WorkerPlugin
from distributed.core import error_message
from distributed.worker import _run_task_simple

from ..config import SandboxConfig
from ..errors import OutcomeError
from ..executor import SandboxExecutor, SandboxFuture
from ..result import ResourceUsage, SandboxResult
from . import refuse_fork

USAGE_HISTORY = 10_000
"""How many tasks' resource usage a worker keeps (the latest ones; see task_usage)."""
DASK_PRELOAD = ("dask._task_spec", "dask.bag.core")
"""Imported once by the zygotes, not by each sandbox: what a task node needs inside (~0.3 s of imports)."""


class SandboxPlugin(WorkerPlugin):  # type: ignore[misc,unused-ignore]  # Any when distributed is untyped
    """Adds a sandbox executor named `name` to every worker of the cluster.

    `config`: the sandbox of every task (None: SandboxConfig()). `executor_options`:
    `max_workers` (sandboxes alive at once per worker), `start_method` ("zygote" or
    "posix"; "fork" is refused: a Dask worker runs threads) and `preload` (modules
    every sandbox starts with, besides DASK_PRELOAD; see SandboxManager). Register
    it with `client.register_plugin(plugin)`; tasks then choose it with
    `dask.annotate(executor=name)`. The plugin is registered under `name`, so
    registering it again replaces it."""

    def __init__(self, config: SandboxConfig | None = None, name: str = "sandbox",
                 **executor_options: Any) -> None:
        if config is not None and not isinstance(config, SandboxConfig):
            raise TypeError(f"config: must be a SandboxConfig or None, got {config!r:.200}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: must be a non-empty string, got {name!r}")
        unknown = set(executor_options) - {"max_workers", "start_method", "preload"}
        if unknown:
            raise TypeError(f"SandboxPlugin: unknown executor option(s) {', '.join(sorted(unknown))} "
                            "(it takes max_workers, start_method and preload)")
        refuse_fork(executor_options.get("start_method"), "Dask")
        self.config = config
        self.name = name
        self.executor_options = executor_options
        self._replaced: Any = None
        self._worker: Any = None

    async def setup(self, worker: Any) -> None:
        """Start this worker's executor (off the worker's event loop: it starts a zygote)."""
        executor = await asyncio.to_thread(SandboxTaskExecutor, self.config, **self.executor_options)
        self._replaced = worker.executors.get(self.name)
        worker.executors[self.name] = executor
        self._worker = worker

    def transition(self, key: Hashable, start: str, finish: str, **kwargs: Any) -> None:
        """Fail closed on a coroutine task annotated for this executor: Dask runs
        coroutine functions on the worker's event loop, never on an executor, so it
        would run unsandboxed. Its run_spec is replaced, before it starts, by one that
        raises (called by the worker's state machine, ahead of the execution)."""
        if finish != "executing" or self._worker is None:
            return
        task = self._worker.state.tasks.get(key)
        if (task is None or (task.annotations or {}).get("executor") != self.name or task.run_spec is None
                or not task.run_spec.is_coro):
            return
        from dask._task_spec import Task

        name = getattr(getattr(task.run_spec, "func", None), "__qualname__", "the task's function")
        task.run_spec = Task(key, _refuse_coroutine, name, self.name)

    async def teardown(self, worker: Any) -> None:
        """Stop the executor: sandboxes still running are killed, then the zygote stops."""
        executor = worker.executors.get(self.name)
        if isinstance(executor, SandboxTaskExecutor):
            if self._replaced is not None:
                worker.executors[self.name] = self._replaced
            else:
                del worker.executors[self.name]
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)


async def _refuse_coroutine(name: str, executor: str) -> None:
    raise RuntimeError(f"{name} is a coroutine function: Dask runs those on the worker itself, never on the "
                       f"{executor!r} executor, so it cannot run in a sandbox (make it a plain function)")


class SandboxTask:
    """A task function with sandbox options of its own (see sandbox_task)."""

    def __init__(self, function: Callable[..., Any], config: SandboxConfig | None, return_result: bool) -> None:
        self.function = function
        self.config = config
        self.return_result = return_result
        self.__name__ = getattr(function, "__name__", "task")
        self.__qualname__ = getattr(function, "__qualname__", self.__name__)
        self.__module__ = getattr(function, "__module__", __name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _in_sandbox:  # fail closed: never run it on a worker's ordinary executor
            raise RuntimeError(f"{self.__qualname__} is a sandbox task: run it on a sandbox executor "
                               "(dask.annotate(executor=...) with the SandboxPlugin's name)")
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"sandbox_task({self.function!r})"


def sandbox_task(function: Callable[..., Any], *, config: SandboxConfig | None = None,
                 return_result: bool = False) -> SandboxTask:
    """`function` as a task with its own sandbox options: `config` replaces the
    plugin's for its sandboxes, and with `return_result` the task's value is the
    whole SandboxResult (output, outcome, usage, isolation) and a failed run is a
    value, not an error. Such a task refuses to run outside a sandbox executor.

        with dask.annotate(executor="sandbox"):
            future = client.submit(sandbox_task(parse, config=big_pdf_config), blob)"""
    if config is not None and not isinstance(config, SandboxConfig):
        raise TypeError(f"config: must be a SandboxConfig or None, got {config!r:.200}")
    return SandboxTask(function, config, return_result)


_in_sandbox = False  # set in a sandbox's process by run_task_node


class _TaskFuture(concurrent.futures.Future[dict[str, Any]]):
    """The worker's view of one sandboxed task: cancelling it kills the sandbox."""

    def __init__(self) -> None:
        super().__init__()
        self.sandbox: SandboxFuture[SandboxResult] | None = None

    def cancel(self) -> bool:
        if self.sandbox is not None:
            self.sandbox.cancel()
        return super().cancel()


class SandboxTaskExecutor(concurrent.futures.Executor):
    """The executor a SandboxPlugin installs: it accepts only the Dask worker's own
    task wrapper and runs each task in a fresh sandbox (a SandboxExecutor's).
    `usage` maps the keys of the latest tasks (at most USAGE_HISTORY) to their
    ResourceUsage, as measured by the kernel."""

    def __init__(self, config: SandboxConfig | None = None, *, max_workers: int | None = None,
                 start_method: Literal["zygote", "posix"] = "zygote", preload: Iterable[str] = ()) -> None:
        refuse_fork(start_method, "Dask")
        modules = (*DASK_PRELOAD, *(name for name in preload if name not in DASK_PRELOAD))
        self._sandboxes = SandboxExecutor(config, max_workers=max_workers, start_method=start_method,
                                          context=False, preload=modules)
        self._lock = threading.Lock()
        self._running: set[_TaskFuture] = set()
        self.usage: collections.OrderedDict[Hashable, ResourceUsage] = collections.OrderedDict()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Called by the worker as submit(_run_task_simple, task, data, delay)."""
        if fn is not _run_task_simple or kwargs or len(args) != 3:
            raise TypeError(f"a sandbox executor runs Dask tasks only (the worker's {_run_task_simple.__name__}), "
                            f"got {getattr(fn, '__qualname__', fn)!r}")
        task, data, delay = args
        function, call_args, call_kwargs = task_call(task, data)
        options = getattr(task, "func", None)
        options = options if isinstance(options, SandboxTask) else None
        future = _TaskFuture()
        started = time.time()
        with self._lock:
            future.sandbox = self._sandboxes.submit_with_options(
                function, call_args, call_kwargs, sandbox_config=options.config if options else None,
                plugin_id=str(key_split(task.key)))
            self._running.add(future)
        return_result = options is not None and options.return_result
        future.sandbox.add_done_callback(
            lambda done: self._finished(future, done, task.key, started, delay, return_result))
        return future

    def _finished(self, future: _TaskFuture, done: concurrent.futures.Future[SandboxResult], key: Hashable,
                  started: float, delay: float, return_result: bool) -> None:
        with self._lock:
            self._running.discard(future)
        if done.cancelled():
            future.cancel()
            return
        error = done.exception()
        if error is None:
            result = done.result()
            with self._lock:
                self.usage[key] = result.resource_usage
                self.usage.move_to_end(key)
                while len(self.usage) > USAGE_HISTORY:
                    self.usage.popitem(last=False)
            message = task_report(result, return_result)
        else:  # the sandbox could not be started: the task fails with that error
            message = _failure(error)
        message.update(start=started + delay, stop=time.time() + delay, thread=threading.get_ident())
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
            future.set_result(message)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop: with `cancel_futures`, running tasks are cancelled too (their
        sandboxes killed); the zygote stops once nothing runs."""
        if cancel_futures:
            with self._lock:
                running = list(self._running)
            for future in running:
                future.cancel()
        self._sandboxes.shutdown(wait=wait, cancel_futures=cancel_futures)


def task_call(task: Any, data: dict[Hashable, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """What runs in the sandbox for a Dask task: the task's own function and
    arguments when they are plain (client.submit/map, most delayed calls), with
    the dependencies' values filled in as Task.__call__ does; otherwise the task
    node itself (a bag partition, a fused subgraph, nested tasks), evaluated
    inside the sandbox, so no part of the application's code runs on the worker."""
    from dask._task_spec import Alias, DataNode, GraphNode, Task, TaskRef

    def plain(value: Any) -> bool:
        return not isinstance(value, GraphNode) or isinstance(value, (DataNode, Alias))

    def resolve(value: Any) -> Any:
        if isinstance(value, TaskRef):
            return data[value.key]
        if isinstance(value, Alias):  # another task's value (a scattered or computed one)
            return data[value.target]
        return value.value if isinstance(value, DataNode) else value

    if type(task) is Task and all(plain(v) for v in (*task.args, *task.kwargs.values())):
        function = task.func.function if isinstance(task.func, SandboxTask) else task.func
        return function, tuple(map(resolve, task.args)), {k: resolve(v) for k, v in task.kwargs.items()}
    return run_task_node, (task, {key: data[key] for key in task.dependencies}), {}


def run_task_node(task: Any, values: dict[Hashable, Any]) -> Any:
    """Evaluate a Dask task node (inside the sandbox) on its dependencies' values."""
    global _in_sandbox
    _in_sandbox = True  # this process is the sandbox's, used once
    return task(values)


def task_report(result: SandboxResult, return_result: bool = False) -> dict[str, Any]:
    """The report the worker's _run_task_simple would make for this task (less
    the times): its value (the whole result with `return_result`), or the
    OutcomeError as the task's exception."""
    if result.ok or return_result:
        value = result if return_result else result.output
        return {"op": "task-finished", "status": "OK", "result": value, "nbytes": sizeof(value),
                "type": type(value) if value is not None else None}
    try:
        result.raise_for_outcome()
    except OutcomeError as error:
        return _failure(error)
    raise AssertionError("unreachable: the result is not ok")


def _failure(error: BaseException) -> dict[str, Any]:
    message: dict[str, Any] = dict(error_message(error))
    message.update(op="task-erred", actual_exception=error)
    return message


def _worker_usage(name: str, dask_worker: Any) -> dict[Hashable, ResourceUsage]:
    executor = dask_worker.executors.get(name)
    return dict(executor.usage) if isinstance(executor, SandboxTaskExecutor) else {}


def task_usage(client: Any, name: str = "sandbox") -> dict[Hashable, ResourceUsage]:
    """The kernel's resource usage of the latest sandboxed tasks of every worker,
    by task key (`client`: a distributed.Client; `name`: the plugin's). A failed
    task's usage is also in its OutcomeError (`error.result.resource_usage`)."""
    merged: dict[Hashable, ResourceUsage] = {}
    for usage in client.run(_worker_usage, name).values():
        merged.update(usage)
    return merged
