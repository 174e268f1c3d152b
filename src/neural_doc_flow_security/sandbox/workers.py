"""Sandboxed workers that serve many calls: `WorkerPool` (max_tasks_per_child).

    async with manager.worker_pool(max_workers=2, max_tasks_per_child=100) as pool:
        result = await pool.execute_sandboxed("parse", parse, document)
        result = await pool.with_reuse_key("tenant-a").execute_sandboxed("parse", parse, document)

A worker is one sandbox, set up like any other (every protection and limit of
the pool's config in force: namespaces, seccomp, cgroup memory, processes, CPU,
open files), whose payload loop (launch/python_worker.py, `serve`) runs one call
after another sent on its channel. It serves at most `max_tasks_per_child`
calls, then is killed and the next call gets a fresh one (None: it lives until
the pool closes). A call that does not end ok (it raised, timed out, ran out of
memory, was killed, broke the protocol, was cancelled) ends its worker too.
With max_tasks_per_child=1 (the default) there are no workers: each call runs
in a fresh sandbox exactly as SandboxManager.execute_sandboxed does.

A worker serves one reuse key only: the plugin id, the config (the pool's,
or the call's own through SandboxExecutor.submit_with_options) and the
caller's optional `reuse_key` (e.g. a tenant). Calls of different keys never
share a process.

What a call leaves in its worker is there for the next call of the same key:
module globals and caches, imported modules, threads and processes it left
running, files in /tmp (unless `reset_tmp=True`), memory it keeps (counted
against the worker's memory limit) and CPU time (counted against its quota).
Reusing a worker is the caller's decision: use it where the calls of one key
may see each other's leftovers (one tenant's documents through one parser),
never to share a worker between parties that must not see each other.

The wall timeout (config.timeout_seconds) applies to each call, from the
moment the call is sent: the manager kills the worker when a call runs over
it (the call's outcome is `timeout`). A worker's life has no wall limit.

Halfway through a worker's calls its replacement is started, warmed up (with
the module of the call's function imported) and kept waiting, not counted
against max_workers, until the worker ends: it takes the worker's place at
once. So up to 2 x max_workers sandboxes exist, the waiting ones idle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from .config import SandboxConfig
from .errors import ConfigError, ProtocolViolation, SandboxError
from .ipc.channel import AsyncChannel
from .ipc.messages import IpcMessage, MessageKind
from .launch.python_worker import PythonWorkerPayload, import_modules
from .result import IsolationReport, Outcome, ResourceUsage, SandboxResult

if TYPE_CHECKING:
    from .api import SandboxHandle, SandboxManager

_Key = tuple[str, SandboxConfig, Hashable]  # (plugin id, config, reuse_key)
RETIRE_GRACE = 5.0  # seconds a worker let go between calls has to exit before it is killed


def check_max_tasks_per_child(value: object) -> int | None:
    """max_tasks_per_child as given, checked: a whole number > 0, or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"max_tasks_per_child: must be a whole number > 0 or None, got {value!r}")
    return value


@dataclass(eq=False)
class _Worker:
    key: _Key
    handle: SandboxHandle
    isolation: dict[str, Any]  # its IsolationReport's fields, worker_id included
    calls: int = 0
    counted: bool = True  # counts against max_workers (a replacement waiting to take its place does not)
    replacing: bool = False  # its replacement has been started
    successor: _Worker | None = None  # its replacement, ready: it takes this worker's place when it ends
    place_passed: bool = False  # it ended while its replacement was starting: the place is kept for that
    retired: bool = False  # it is being ended
    usage: ResourceUsage | None = None  # its cgroup's counters after its last call


class WorkerPool:
    """Up to `max_workers` sandboxed workers, each serving up to
    `max_tasks_per_child` calls of one reuse key (see the module docstring for
    what a reused worker may leak between calls of its key).

    A result says which worker ran the call and how many calls it had served:
    `result.isolation.worker_id` (the worker's sandbox id, as in
    manager.list_sandboxes()) and `result.isolation.worker_call` (1 for its
    first call). Its `resource_usage` is the worker's cgroup counters over the
    call: CPU and I/O are the increase since the worker's previous call ended
    (so they include what a previous call left running), `memory_peak_bytes`
    and `processes_peak` are the worker's peaks since it started (the kernel
    keeps no per-call peak), `wall_seconds` is the call's. A call that ended
    its worker reports the worker's whole life, as a single-use sandbox does.
    """

    def __init__(self, manager: SandboxManager, config: SandboxConfig, *, max_workers: int,
                 max_tasks_per_child: int | None, reset_tmp: bool, context: bool | None) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers <= 0:
            raise ValueError(f"max_workers: must be a whole number > 0, got {max_workers!r}")
        if not isinstance(config, SandboxConfig):
            raise ConfigError("sandbox_config", f"must be a SandboxConfig, got {config!r:.200}")
        self._manager = manager
        self.config = dataclasses.replace(config)  # checked again, like every call's config
        self.max_workers = max_workers
        self.max_tasks_per_child = check_max_tasks_per_child(max_tasks_per_child)
        self.reset_tmp = bool(reset_tmp)
        self._context = context
        self._limits = dataclasses.asdict(manager._decode_limits)
        self._fresh = asyncio.Semaphore(max_workers)  # max_tasks_per_child=1: sandboxes at once
        self._idle: dict[_Key, list[_Worker]] = {}
        self._alive = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()  # workers started ahead, workers being killed
        self._closed = False

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- calling ----------------------------------------------------------------

    async def execute_sandboxed(self, plugin_id: str, function: Callable[..., Any], /, *args: Any,
                                **kwargs: Any) -> SandboxResult:
        """Run `function(*args, **kwargs)` in a worker of (plugin_id, no reuse key);
        like SandboxManager.execute_sandboxed otherwise."""
        context = self._manager._context_flag(function, self._context, stacklevel=2)
        return await self._execute(plugin_id, function, args, kwargs, None, context)

    def with_reuse_key(self, reuse_key: Hashable) -> KeyedWorkerCalls:
        """Calls whose workers serve this key only (e.g. a tenant's id)."""
        hash(reuse_key)  # a TypeError here, not at the first call
        return KeyedWorkerCalls(self, reuse_key)

    async def execute_command(self, *_: Any, **__: Any) -> NoReturn:
        """Refused: a program runs once and exits; it cannot serve calls in a worker."""
        raise SandboxError("execute_command cannot reuse a sandbox: a program runs once and exits; "
                           "use SandboxManager.execute_command (a fresh sandbox per run)")

    async def _execute(self, plugin_id: str, function: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any], reuse_key: Hashable, context: bool,
                       config: SandboxConfig | None = None) -> SandboxResult:
        """A call; `config` (None: the pool's) is part of its key."""
        manager = self._manager
        if self._closed:
            raise SandboxError("this worker pool is closed")
        if config is None:
            config = self.config
        elif not isinstance(config, SandboxConfig):
            raise ConfigError("sandbox_config", f"must be a SandboxConfig, got {config!r:.200}")
        elif config is not self.config:
            dataclasses.replace(config)  # checked again: one changed after it was built raises ConfigError
        if self.max_tasks_per_child == 1:  # today's behaviour: a fresh sandbox per call
            async with self._fresh:
                return await manager._execute(plugin_id, function, args, kwargs, config, context)
        if not manager._started or manager._closed:
            raise SandboxError("the SandboxManager is not running (use `async with SandboxManager()`)")
        manager._check_loop()
        from .api import _pickle_call

        call = _pickle_call((function, args, kwargs, context, self._limits))
        module = getattr(function, "__module__", None)
        return await manager._count(self._call((plugin_id, config, reuse_key), call, module))

    async def _call(self, key: _Key, call: bytes, module: str | None) -> SandboxResult:
        worker = await self._acquire(key, module)
        try:
            result = await self._run(worker, call)
        except BaseException:
            # Cancelled (or failed) in the middle of a call: its worker is gone before this returns.
            await asyncio.shield(self._retire(worker, graceful=False))
            raise
        self._release(worker, result.ok)
        return result

    async def _run(self, worker: _Worker, call: bytes) -> SandboxResult:
        handle = worker.handle
        channel = handle._channel
        assert channel is not None
        worker.calls += 1
        handle._worker_call = worker.calls
        timeout = worker.key[1].timeout_seconds
        timer = (asyncio.get_running_loop().call_later(timeout, self._time_out, worker)
                 if timeout is not None else None)
        started = time.monotonic()
        reply = None
        try:
            channel.next_call()
            await channel.send(IpcMessage.call(call))
            if handle._reader is not None and not handle._reader.done():
                await asyncio.shield(handle._reader)  # a new worker's heartbeat: then the channel is ours
            reply = await _answer(channel)
        except ProtocolViolation as violation:
            if handle._violation is None:
                handle._violation = violation.with_traceback(None)
        except OSError:
            pass  # it died before reading its call: its result says how
        finally:
            if timer is not None:
                timer.cancel()
        if reply is None:
            return await self._ended(worker)
        return self._answered(worker, reply, time.monotonic() - started)

    def _answered(self, worker: _Worker, reply: IpcMessage, wall: float) -> SandboxResult:
        handle = worker.handle
        stdout, stdout_truncated = handle._outputs[0].take()
        stderr, stderr_truncated = handle._outputs[1].take()
        common: dict[str, Any] = {"stdout": stdout, "stderr": stderr, "resource_usage": self._usage(worker, wall),
                                  "isolation": self._isolation(worker), "stdout_truncated": stdout_truncated,
                                  "stderr_truncated": stderr_truncated}
        if reply.kind is MessageKind.RESULT:
            return SandboxResult(Outcome.OK, output=reply.value, **common)
        return SandboxResult(Outcome.ERROR, error=f"{reply.error_type}: {reply.message}\n{reply.traceback}".rstrip(),
                             error_type=reply.error_type, error_message=reply.message, traceback=reply.traceback,
                             **common)

    async def _ended(self, worker: _Worker) -> SandboxResult:
        """The worker ended (or broke the protocol) during its call: the call's result
        is the sandbox's, as for a single-use sandbox."""
        handle = worker.handle
        if handle._violation is not None:
            await handle.kill()
        result = await handle.wait()
        return dataclasses.replace(result, isolation=self._isolation(worker))

    def _isolation(self, worker: _Worker) -> IsolationReport:
        return IsolationReport(**worker.isolation, worker_call=worker.calls)  # dataclasses.replace: 10x slower

    def _usage(self, worker: _Worker, wall: float) -> ResourceUsage:
        counters = worker.handle._counters
        try:
            now = counters.read(wall) if counters is not None else None
        except OSError:
            now = None
        if now is None:
            return ResourceUsage(wall_seconds=wall)
        before, worker.usage = worker.usage or ResourceUsage(), now
        return ResourceUsage(wall_seconds=wall, cpu_user_seconds=now.cpu_user_seconds - before.cpu_user_seconds,
                             cpu_system_seconds=now.cpu_system_seconds - before.cpu_system_seconds,
                             memory_peak_bytes=now.memory_peak_bytes, processes_peak=now.processes_peak,
                             io_read_bytes=now.io_read_bytes - before.io_read_bytes,
                             io_write_bytes=now.io_write_bytes - before.io_write_bytes)

    def _time_out(self, worker: _Worker) -> None:
        worker.handle._call_timed_out = (f"wall timeout of {worker.key[1].timeout_seconds}s "
                                         "(per call, on a reused worker)")
        self._retire(worker, graceful=False)

    # -- the workers --------------------------------------------------------------

    async def _acquire(self, key: _Key, module: str | None) -> _Worker:
        """An idle worker of `key`, else a new one (an idle worker of another key is
        ended to make room), else wait for one of those."""
        while True:
            if self._closed:
                raise SandboxError("this worker pool is closed")
            idle = self._idle.get(key)
            if idle:
                worker = idle.pop()
                if not idle:
                    del self._idle[key]
                if not worker.handle._exit.done():
                    return self._taken(worker, module)
                self._forget(worker)  # it ended while idle (its exit callback has not run yet)
                continue
            if self._alive < self.max_workers:
                self._alive += 1
                return self._taken(await self._start(key), module)
            victim = next((workers[0] for workers in self._idle.values()), None)
            if victim is not None:
                self._retire(victim)
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was this caller's turn: pass it on
                raise

    def _taken(self, worker: _Worker, module: str | None) -> _Worker:
        """A worker taken for a call. Halfway through its calls its replacement is
        started, warmed up and given the call's module; it waits (not counted against
        max_workers) until this worker ends, and takes its place at once: no call of the
        key waits for a sandbox to start."""
        limit = self.max_tasks_per_child
        if limit is not None and not worker.replacing and worker.calls + 1 >= limit - limit // 2:
            worker.replacing = True
            self._background(self._start_ahead(worker, module))
        return worker

    async def _start_ahead(self, predecessor: _Worker, module: str | None) -> None:
        try:
            worker = await self._start(predecessor.key, counted=False)
        except BaseException:
            self._free_passed_place(predecessor)
            raise
        await asyncio.wait([worker.handle._prepared])
        if module and module != "__main__" and not self._closed:
            await self._import(worker, module)
        if predecessor.counted:
            predecessor.successor = worker  # it takes the place when the predecessor ends (_forget)
        elif predecessor.place_passed and not self._closed and not worker.handle._exit.done():
            worker.counted = True  # the predecessor has ended meanwhile and kept its place for this one
            self._idle.setdefault(worker.key, []).append(worker)
            self._wake()
        else:
            self._free_passed_place(predecessor)
            self._retire(worker)

    def _free_passed_place(self, predecessor: _Worker) -> None:
        if predecessor.place_passed:
            predecessor.place_passed = False
            self._alive -= 1
            self._wake()

    async def _import(self, worker: _Worker, module: str) -> None:
        """Import `module` in the worker (not a call of its key: not counted, its usage
        not reported; a module the sandbox cannot import is left to the call)."""
        from .api import _pickle_call

        handle = worker.handle
        channel = handle._channel
        assert channel is not None
        try:
            channel.next_call()
            await channel.send(IpcMessage.call(_pickle_call((import_modules, (module,), {}, False, self._limits))))
            await _answer(channel)  # its reader stopped at the heartbeat: the channel is ours
        except (OSError, ProtocolViolation):
            return  # it ended: its exit says how
        for output in handle._outputs:
            output.take()
        self._usage(worker, 0.0)

    async def _start(self, key: _Key, *, counted: bool = True) -> _Worker:
        """Start a worker; a `counted` one the caller has counted in _alive already."""
        # pooled: it warms up its call path before it says it is ready.
        payload = PythonWorkerPayload(pooled=True, serve=True, reset_tmp=self.reset_tmp)
        try:
            # pooled: no wall clock on the sandbox itself (the manager times each call),
            # always a cgroup, its usage counters open, its reader stops at its heartbeat.
            handle = await self._manager._create(key[0], payload, key[1], keep_messages=False,
                                                 with_channel=True, stdin=None, pooled=True)
        except BaseException:
            if counted:
                self._alive -= 1
                self._wake()
            raise
        handle._worker_call = 0  # its audit events say which call it serves (_run counts)
        handle._audit_start()  # one sandbox_start and one sandbox_end per worker, not per call
        report = self._manager._starter.isolation.get(handle.sandbox_id) or IsolationReport()
        isolation = {f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "worker_call"}
        isolation["worker_id"] = handle.sandbox_id
        worker = _Worker(key, handle, isolation, counted=counted)
        handle._exit.add_done_callback(lambda _: self._gone(worker))
        self._usage(worker, 0.0)  # the counters as it starts: the first call's usage is the increase
        return worker

    def _release(self, worker: _Worker, ok: bool) -> None:
        if worker.retired:
            return  # its call timed out: it is being killed
        limit = self.max_tasks_per_child
        if ok and (limit is None or worker.calls < limit) and not self._closed and not worker.handle._exit.done():
            self._idle.setdefault(worker.key, []).append(worker)
            self._wake()
        else:
            self._retire(worker, graceful=ok)

    def _retire(self, worker: _Worker, *, graceful: bool = True) -> asyncio.Task[Any]:
        """End the worker in the background (the task is returned): `graceful`, between
        calls, by closing its channel (its payload exits; killed if it has not within
        RETIRE_GRACE seconds), else by killing it (its call did not end ok)."""
        worker.retired = True
        self._forget(worker)
        return self._background(_end(worker.handle, graceful))

    def _background(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return task

    def _gone(self, worker: _Worker) -> None:
        """The worker's sandbox ended (killed by us, or by itself while idle)."""
        self._forget(worker)

    def _forget(self, worker: _Worker) -> None:
        idle = self._idle.get(worker.key)
        if idle is not None and worker in idle:
            idle.remove(worker)
            if not idle:
                del self._idle[worker.key]
        successor, worker.successor = worker.successor, None
        if worker.counted:
            worker.counted = False
            if successor is not None and not self._closed and not successor.handle._exit.done():
                successor.counted = True  # it takes the place: _alive stays
                self._idle.setdefault(successor.key, []).append(successor)
                successor = None
            elif successor is None and worker.replacing and not self._closed:
                worker.place_passed = True  # its replacement is starting: the place waits for it
                return
            else:
                self._alive -= 1
            self._wake()
        if successor is not None:
            self._retire(successor)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Kill the idle workers and refuse new calls; a call still running ends
        its worker when it returns. The manager's shutdown() closes its pools."""
        self._closed = True
        for workers in list(self._idle.values()):
            for worker in list(workers):
                self._retire(worker)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # it raises "closed"
        self._waiters.clear()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._manager._worker_pools.discard(self)


class KeyedWorkerCalls:
    """WorkerPool calls under one reuse key (from WorkerPool.with_reuse_key())."""

    def __init__(self, pool: WorkerPool, reuse_key: Hashable) -> None:
        self.pool = pool
        self.reuse_key = reuse_key

    async def execute_sandboxed(self, plugin_id: str, function: Callable[..., Any], /, *args: Any,
                                **kwargs: Any) -> SandboxResult:
        """WorkerPool.execute_sandboxed, in a worker of (plugin_id, this key)."""
        pool = self.pool
        context = pool._manager._context_flag(function, pool._context, stacklevel=2)
        return await pool._execute(plugin_id, function, args, kwargs, self.reuse_key, context)


async def _end(handle: SandboxHandle, graceful: bool) -> None:
    if graceful and handle._channel is not None and not handle._exit.done():
        handle._let_go = True
        handle._channel.close()  # the payload's next receive sees the end and it exits
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(handle._exit), RETIRE_GRACE)
    await handle.kill()  # only what has not ended by itself: no audit event otherwise


async def _answer(channel: AsyncChannel) -> IpcMessage | None:
    """The worker's result or error message for the call; None once it has ended.
    What else it sends (data, progress, logs: nobody reads them here) is dropped."""
    while True:
        message = await channel.receive()
        if message is None or message.kind in (MessageKind.RESULT, MessageKind.ERROR):
            return message


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a kill that failed (the zygote is gone) is not worth a warning
