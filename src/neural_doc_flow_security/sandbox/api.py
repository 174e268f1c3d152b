"""The Python API: `SandboxManager` runs callables and programs in fresh sandboxes.

    async with SandboxManager(config) as manager:
        result = await manager.execute_sandboxed("my_plugin", lambda: 42)
        run = await manager.execute_command("pdftotext", ["pdftotext", "-", "-"], stdin=pdf)
        handle = await manager.spawn("ocr", long_running_fn)
        await manager.send_message("ocr", IpcMessage.control(ControlMessage.PAUSE))
        message = await manager.receive_message("ocr", timeout=1.0)

Every sandbox is used once. Leaving the `async with` block (or shutdown())
kills every sandbox still running; cancelling an awaiting task kills its
sandbox tree before the cancellation completes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import errno
import functools
import itertools
import os
import shlex
import signal
import sys
import threading
import time
import types
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import cloudpickle

from . import audit
from .backoff import RelaunchBackoff
from .config import SandboxConfig
from .errors import ConfigError, HostLimitError, ProtocolViolation, SandboxError
from .ipc.channel import AsyncChannel, create_channel_pair
from .ipc.limits import DecodeLimits
from .ipc.memfd import seal_bytes, unmap
from .ipc.messages import ControlMessage, IpcMessage, MessageKind
from .launch.counters import UsageCounters
from .launch.launcher import LaunchRequest
from .launch.payload import ExecPayload, Payload
from .launch.python_worker import CHANNEL_FD, PythonWorkerPayload, context_parameter
from .launch.start_methods import ForkStarter, StartMethod, ZygoteStarter, ZygoteStats
from .live_limits import LimitUpdate, LimitUpdateError, checked_changes
from .pool import WarmPool
from .result import IsolationReport, Outcome, ResourceUsage, SandboxResult

if TYPE_CHECKING:
    from .workers import WorkerPool

DEFAULT_OUTPUT_LIMIT = 1024 * 1024
DEFAULT_VIOLATION_BACKOFF = 5.0
ENDED_NAMES_KEPT = 64  # spawned plugins that have ended, still reachable by name
MAX_CALL_WITH_LAUNCH = 1024 * 1024  # a larger pickled call goes on the sandbox's channel
INBOX_MESSAGES = 1024  # unread messages of a spawned plugin before its channel is no longer read
INBOX_BLOBS = 16  # of which holding a memfd mapping (each holds a host fd on Python < 3.13)
ANSWER_GRACE_SECONDS = 0.05  # after its answer, a payload's own exit is awaited this long before the kill


class Health(enum.StrEnum):
    """Where a sandbox is in its life."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


@dataclass(frozen=True)
class SandboxInfo:
    """One line of list_sandboxes()."""

    plugin_id: str
    sandbox_id: int
    pid: int
    health: Health
    kind: str
    age_seconds: float


@dataclass(frozen=True)
class ManagerStats:
    """A manager's health, from stats(): what it runs on and what it has served.

    `zygotes_alive`: zygotes taking launches; `zygotes_stalled`: alive but out of
    rotation (they missed a deadline or a launch, until they answer again);
    `zygotes_restarted`: replacements started for zygotes that died;
    `zygotes_given_up`: slots whose zygote kept dying at start, not restarted (0
    unless the host refuses zygotes). `sandboxes_alive`: sandboxes running now
    (pooled ones included). `calls`: execute_sandboxed and execute_command calls
    finished, by outcome ("raised": the call raised instead of returning a
    result). `pool_idle` / `pool_size`: the warm pool's ready sandboxes and its
    size. `uptime_seconds`: since start(). `plugins_throttled`: plugin ids whose
    next launch waits because their sandboxes violated the protocol (see
    `violation_backoff_seconds`)."""

    zygotes_alive: int
    zygotes_stalled: int
    zygotes_restarted: int
    zygotes_given_up: int
    sandboxes_alive: int
    calls: dict[str, int]
    pool_idle: int
    pool_size: int
    uptime_seconds: float
    plugins_throttled: int = 0


@functools.cache
def _outside_python_paths(source: str) -> bool:
    from .linux.rootfs import covered, python_paths

    return not covered(os.path.realpath(source), python_paths())


_application_modules_seen: tuple[tuple[int, str | None], list[types.ModuleType]] | None = None


def _application_modules() -> list[types.ModuleType]:
    """The imported modules a sandbox cannot import: their file lies outside the
    Python installation that is bound in (a script, a test, an application directory).
    Looked up again only when a module was imported or removed since the last call
    (sys.modules' size or latest entry changed): a walk of it costs ~0.3 ms, paid by
    every call otherwise (the caller holds _by_value_lock)."""
    global _application_modules_seen
    state = (len(sys.modules), next(reversed(sys.modules), None))
    if _application_modules_seen is not None and _application_modules_seen[0] == state:
        return _application_modules_seen[1]
    found = []
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        # An alias entry (__main__ of a spawned process is __mp_main__) is skipped: registering
        # goes by the module's own name. __main__ itself always travels by value.
        if (isinstance(module, types.ModuleType) and isinstance(source, str) and name == module.__name__
                and name != "__main__" and _outside_python_paths(source)):
            found.append(module)
    _application_modules_seen = (state, found)
    return found


_by_value_lock = threading.Lock()  # cloudpickle's by-value registry is process-wide


def _pickle_call(call: tuple[Any, ...]) -> bytes:
    """cloudpickle the (function, args, kwargs) call. Functions and classes of modules
    the sandbox cannot import (see _application_modules) travel by value: the
    callable's own and those it reaches through its arguments (a Dask task wraps
    the application's function) or its globals."""
    with _by_value_lock:
        modules = _application_modules()
        for module in modules:
            cloudpickle.register_pickle_by_value(module)
        try:
            return bytes(cloudpickle.dumps(call))
        finally:
            for module in modules:
                cloudpickle.unregister_pickle_by_value(module)


class _OutputCapture:
    """Reads a pipe (the sandbox's stdout or stderr) to EOF in the background,
    keeping at most `limit` bytes; the rest is read and discarded."""

    def __init__(self, fd: int, limit: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._limit = limit
        self._kept = bytearray()
        self._eof = False
        self.truncated = False  # more than `limit` bytes were written
        self.task = asyncio.create_task(self._run())

    def _read_available(self) -> None:
        while not self._eof:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._eof = True
                return
            room = self._limit - len(self._kept)
            if len(chunk) > room:
                self.truncated = True
            if room > 0:
                self._kept += chunk[:room]

    async def _run(self) -> bytes:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self._fd, readable.set)
        try:
            while True:
                self._read_available()
                if self._eof:
                    return bytes(self._kept)
                readable.clear()
                await readable.wait()
        finally:
            loop.remove_reader(self._fd)
            os.close(self._fd)

    def so_far(self) -> bytes:
        """Everything written up to now (what is in the pipe is read first)."""
        if not self.task.done():
            self._read_available()
        return bytes(self._kept)

    def take(self) -> tuple[bytes, bool]:
        """Everything written since the last take() and whether more was dropped;
        the limit starts anew (a reused worker's output, call by call)."""
        kept, truncated = self.so_far(), self.truncated
        self._kept.clear()
        self.truncated = False
        return kept, truncated


class _Default:
    """The type of a keyword's "not given" marker (None is a value there)."""


_DEFAULT = _Default()


class SandboxHandle:
    """A running sandbox: talk to it, watch it, pause, resume, stop, wait for it.

    Unread messages are bounded (INBOX_MESSAGES, INBOX_BLOBS): at the bound the
    channel is not read until receive() makes room, and the plugin's sends block.
    Once the sandbox has ended the rest is read in; memfd messages beyond
    INBOX_BLOBS are then dropped and counted in `dropped_blobs`.
    """

    def __init__(self, manager: SandboxManager, plugin_id: str, sandbox_id: int, kind: str,
                 config: SandboxConfig, keep_messages: bool) -> None:
        self.plugin_id = plugin_id
        self.sandbox_id = sandbox_id
        self.kind = kind
        self.config = config
        self.pid = 0
        self._health = Health.STARTING
        self._manager = manager
        self._starter = manager._starter
        self._keep_messages = keep_messages
        # Bounded by the reader (INBOX_MESSAGES, INBOX_BLOBS) while the sandbox runs; what
        # is left in its socket when it ends is read in regardless, so ending never waits.
        self._inbox: asyncio.Queue[IpcMessage] = asyncio.Queue()
        self._inbox_blobs = 0
        self._room = asyncio.Event()  # set when the inbox shrank or the sandbox ended
        self.dropped_blobs = 0
        # The latest status sample not yet taken by next_status(); pause() and resume()
        # empty it, and a sample taken across one of them is dropped (its health is stale).
        self._status: IpcMessage | None = None
        self._status_ready = asyncio.Event()
        self._health_changes = 0
        self._channel: AsyncChannel | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self._hands_over = False  # a pooled sandbox's reader stops at its heartbeat...
        self._read_by_answer = False  # ...and once it has, answer() reads on
        self._outputs: list[_OutputCapture] = []
        loop = asyncio.get_running_loop()
        self._answered: asyncio.Future[None] = loop.create_future()  # its result arrived, or it ended
        self._prepared: asyncio.Future[None] = loop.create_future()  # said it waits for its call, or ended
        self._reply: IpcMessage | None = None
        self._violation: ProtocolViolation | None = None
        self._stopped_by_host = False
        self._answered_then_killed = False
        # A reused worker (workers.py): let go between calls (its clean exit is an ok end),
        # or killed because a call ran over its wall timeout (the error text).
        self._let_go = False
        self._call_timed_out: str | None = None
        self._started = time.monotonic()
        self._armed_at = self._started  # its wall clock runs from here (a pooled one: from its call)
        self._last_seen = self._started
        self._counters: UsageCounters | None = None
        self._result: SandboxResult | None = None
        self._audit_start_done = False  # its start is audited once it runs for a plugin (a pooled one: when taken)
        self._audit_end_done = False
        self._worker_call: int | None = None  # a reused worker's current call number (WorkerPool sets it)
        # Taken before the launch: the start method forgets it once it is resolved.
        self._exit: asyncio.Future[SandboxResult] = self._starter.exit_future(sandbox_id)
        self._exit.add_done_callback(self._ended)

    def _ended(self, _: object) -> None:
        self._status_ready.set()  # wakes next_status(), which then returns None

    def _audit_start(self) -> None:
        """Audit its start, as the manager sees it (the isolation its launcher reported)."""
        self._audit_start_done = True
        isolation = self._starter.isolation.get(self.sandbox_id)
        if isolation is None and self._exit.done() and not self._exit.cancelled() and self._exit.exception() is None:
            isolation = self._exit.result().isolation  # it has ended already: its result has it
        audit.sandbox_started(self.sandbox_id, self.plugin_id, self.pid, isolation or IsolationReport(),
                              config=self.config, kind=self.kind, start_method=self._manager._start_method_name,
                              worker_call=self._worker_call)

    def _audit_end(self, result: SandboxResult) -> SandboxResult:
        """Audit its end once, with the result its caller gets."""
        if self._audit_start_done and not self._audit_end_done:
            self._audit_end_done = True
            audit.sandbox_ended(self.sandbox_id, self.plugin_id, result, worker_call=self._worker_call)
        return result

    @property
    def health(self) -> Health:
        """Where the sandbox is in its life; `exited` as soon as its end is known."""
        return Health.EXITED if self._exit.done() else self._health

    @health.setter
    def health(self, health: Health) -> None:
        self._health = health

    # -- talking ------------------------------------------------------------

    async def send(self, message: IpcMessage) -> None:
        """Send data to the plugin; control messages pause, resume or stop it."""
        self._manager._check_loop()
        if message.kind is MessageKind.CONTROL:
            command = message.control_message
            if command is ControlMessage.PAUSE:
                await self.pause()
            elif command is ControlMessage.RESUME:
                await self.resume()
            elif command is ControlMessage.UPDATE_LIMITS:
                await self.update_limits(**dict(message.limits))
            else:
                await self.stop()
            return
        if self._channel is None:
            raise SandboxError(f"{self.plugin_id}: a program sandbox has no message channel")
        await self._channel.send(message)

    async def receive(self, timeout: float | None = None) -> IpcMessage | None:
        """The next message from the plugin (data, progress, log); None on timeout or
        once the sandbox has ended and everything was read (then `health` is EXITED).
        Status samples are not messages: see next_status()."""
        self._manager._check_loop()
        await asyncio.sleep(0)  # let the channel reader run even when messages are waiting
        if not self._inbox.empty():
            return self._take()
        # Everything the plugin sent is in the inbox once its channel reader is done.
        ended: asyncio.Future[Any] = self._reader or self._exit
        deadline = None if timeout is None else time.monotonic() + timeout
        if not ended.done():
            getter = asyncio.ensure_future(self._inbox.get())
            try:
                await asyncio.wait([getter, ended], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                return self._took(getter.result())
            if not self._inbox.empty():
                return self._take()
            if not ended.done():
                return None  # timed out
        # Its channel is closed: the sandbox is ending. Say None once it has ended, so
        # that `health` agrees (within `timeout`: a plugin may close fd 3 and go on).
        if not self._exit.done():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exit), left)
        return None

    def _take(self) -> IpcMessage:
        return self._took(self._inbox.get_nowait())

    def _took(self, message: IpcMessage) -> IpcMessage:
        if _holds_mapping(message):
            self._inbox_blobs -= 1
        self._room.set()
        return message

    async def next_status(self, timeout: float | None = None) -> IpcMessage | None:
        """The latest status sample (taken every `status_interval` seconds) not taken
        yet, waiting for one if there is none; None on timeout or once the sandbox has
        ended. Only the latest sample is kept, and none taken before the last pause()
        or resume(): a sample never reports a health that is no longer true."""
        self._manager._check_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._status is None and not self._exit.done():
            self._status_ready.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_ready.wait(), left)
        sample, self._status = self._status, None
        return None if self._exit.done() else sample

    async def status(self) -> IpcMessage:
        """Health, heartbeat age and live resource usage, read from the kernel now.

        `usage` is named as ResourceUsage (see StatusUsage), plus the live values
        `memory_current_bytes`, `processes_current` and `frozen`."""
        self._manager._check_loop()
        usage: dict[str, float] = {}
        if self.health is not Health.EXITED:
            reply = await self._starter.control("stats", self.sandbox_id)
            if reply.get("ok"):
                usage = {k: float(v) for k, v in reply["stats"].items()}
        return IpcMessage.status(health=self.health.value, heartbeat_age=time.monotonic() - self._last_seen,
                                 usage=usage)

    # -- control ------------------------------------------------------------

    async def pause(self) -> None:
        """Freeze the whole tree (cgroup freezer, else SIGSTOP): its CPU time stops."""
        self._manager._check_loop()
        reply = await self._starter.control("freeze", self.sandbox_id)
        if not reply.get("ok"):
            raise SandboxError(f"{self.plugin_id}: cannot pause: {reply.get('error')}")
        self._health_changed(Health.PAUSED)

    async def resume(self) -> None:
        """Undo pause()."""
        self._manager._check_loop()
        reply = await self._starter.control("thaw", self.sandbox_id)
        if not reply.get("ok"):
            raise SandboxError(f"{self.plugin_id}: cannot resume: {reply.get('error')}")
        self._health_changed(Health.RUNNING)

    async def update_limits(self, *, memory_limit_mb: int | None | _Default = _DEFAULT,
                            cpu_quota_percent: int | None | _Default = _DEFAULT,
                            max_processes: int | None | _Default = _DEFAULT,
                            io_read_bps: int | None | _Default = _DEFAULT,
                            io_write_bps: int | None | _Default = _DEFAULT) -> LimitUpdate:
        """Change the cgroup limits of the running sandbox; None lifts one, a field
        not given stays. Values are checked like the config's (ConfigError naming the
        field). A lowered memory limit is the kernel's to enforce: cgroup v2 reclaims,
        else OOM-kills in the sandbox (`oom_kills` in the returned LimitUpdate, and the
        result's outcome is then `oom`); cgroup v1 reclaims, else refuses. A change
        that cannot be made raises LimitUpdateError naming the field, and nothing of
        it was applied. Each change, and each refusal, is an audit event."""
        self._manager._check_loop()
        given = {"memory_limit_mb": memory_limit_mb, "cpu_quota_percent": cpu_quota_percent,
                 "max_processes": max_processes, "io_read_bps": io_read_bps, "io_write_bps": io_write_bps}
        config, changes = checked_changes(self.config, {k: v for k, v in given.items()
                                                        if not isinstance(v, _Default)})
        if self._exit.done():
            raise LimitUpdateError(next(iter(changes)), f"{self.plugin_id} has ended: its limits cannot change")
        reply = await self._starter.control("update_limits", self.sandbox_id, changes=changes)
        if not reply.get("ok"):
            field = reply.get("field") or next(iter(changes))
            error = str(reply.get("error") or "refused")
            audit.limits_update_refused(self.sandbox_id, self.plugin_id, changes, field, error,
                                        worker_call=self._worker_call)
            prefix = f"{field}: "
            raise LimitUpdateError(field, error[len(prefix):] if error.startswith(prefix) else error)
        update = LimitUpdate.from_dict(reply["update"])
        self.config = config
        audit.limits_updated(self.sandbox_id, self.plugin_id, update, worker_call=self._worker_call)
        return update

    def _health_changed(self, health: Health) -> None:
        if self.health is not Health.EXITED:
            self.health = health
        self._health_changes += 1
        self._status = None  # taken before the change: its health is no longer true

    async def stop(self, grace_seconds: float = 2.0) -> SandboxResult:
        """Ask the plugin to stop (STOP message), then SIGTERM, then kill the tree."""
        self._manager._check_loop()
        if self.health is Health.PAUSED:
            await self.resume()
        exit_future = self._exit
        if not exit_future.done() and self._audit_start_done:
            audit.sandbox_killed(self.sandbox_id, self.plugin_id, "stop", worker_call=self._worker_call)
        self._stopped_by_host = True
        if self._channel is not None:
            with contextlib.suppress(OSError, ValueError):
                await self._channel.send(IpcMessage.control(ControlMessage.STOP))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_future), grace_seconds)
        if not exit_future.done():
            await self._starter.control("signal", self.sandbox_id, signal=signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exit_future), grace_seconds)
        if not exit_future.done():
            await self._starter.control("kill", self.sandbox_id)
        return await self.wait()

    async def kill(self) -> SandboxResult:
        """Kill the whole tree now and return the result."""
        return await self._kill("kill")

    async def _kill(self, reason: str) -> SandboxResult:
        self._manager._check_loop()
        self._stopped_by_host = True
        if not self._exit.done():
            if self._audit_start_done:
                audit.sandbox_killed(self.sandbox_id, self.plugin_id, reason, worker_call=self._worker_call)
            await self._starter.control("kill", self.sandbox_id)
        return await self.wait()

    # -- the end ------------------------------------------------------------

    async def wait(self) -> SandboxResult:
        """Wait for the sandbox to end; the result merges the kernel's view (exit,
        resources) with what the plugin sent (its return value or exception)."""
        self._manager._check_loop()
        if self._result is None:
            try:
                ended = await asyncio.shield(self._exit)
            finally:
                self.health = Health.EXITED
                await asyncio.gather(*self._tasks, return_exceptions=True)
                if self._channel is not None:
                    self._channel.close()
            stdout, stderr = [await o.task for o in self._outputs] or [b"", b""]
            self._result = self._audit_end(self._merge(ended, stdout, stderr))
        return self._result

    async def answer(self) -> SandboxResult:
        """The result of a callable once it has answered: the plugin's value or
        exception, its usage read from the kernel at that moment; the tree is killed
        then, and this returns once no process of it runs any more (the rest of the
        teardown happens in the background). `exit_code` is None in that case.
        Ends like wait() when the sandbox ends before answering."""
        exit_future = self._exit
        if self._hands_over and self._reader is not None:
            # A pooled sandbox taken before its heartbeat was read: its reader owns the
            # channel until then; take it over only once the reader has stopped.
            await asyncio.shield(self._reader)
        if self._read_by_answer and self._channel is not None:
            # Read the answer in this task: no hop through a reader task on the critical path.
            self._read_by_answer = False
            await self._read_channel(self._channel, until_answered=True)
        await self._answered
        isolation = self._starter.isolation.get(self.sandbox_id)
        if exit_future.done() or self._violation is not None or isolation is None:
            return await self.wait()
        usage = self._read_counters()
        if usage is None and not self._starter.counters.get(self.sandbox_id):
            # No cgroup: its usage is what its init reports when it ends (it exits once
            # it has answered; the kill only ends what it may have left running).
            self._answered_then_killed = True
            await self._starter.notify("kill", self.sandbox_id)
            return await self.wait()
        if usage is None:  # counters not readable here: the launcher reads them and kills, one round trip
            collected = await self._starter.control("collect", self.sandbox_id)
            if not collected.get("ok"):
                return await self.wait()
            usage = ResourceUsage(**collected["usage"])
        stdout, stderr = (o.so_far() for o in self._outputs)
        reply = self._reply
        if reply is not None and reply.kind is MessageKind.RESULT:  # what _merge makes of it, built once
            result = SandboxResult(Outcome.OK, output=reply.value, stdout=stdout, stderr=stderr,
                                   resource_usage=usage, isolation=isolation,
                                   stdout_truncated=self._outputs[0].truncated,
                                   stderr_truncated=self._outputs[1].truncated)
        else:
            result = self._merge(SandboxResult(Outcome.OK, resource_usage=usage, isolation=isolation), stdout, stderr)
        # The call returns only once no process of the sandbox runs: a payload that
        # answers and goes on must not outlive its call (it could still write to its
        # binds). Its end is init's report (init has killed and reaped the rest of its
        # pid namespace) or, once init is killed, its pidfd. A payload exits right
        # after its answer, and its init reports at once; killing init instead would
        # make the call wait for the namespaces' teardown, so init is killed only when
        # the payload has not ended by itself within a grace period.
        with contextlib.suppress(SandboxError):  # the zygote is gone, and its sandboxes with it
            await asyncio.wait([exit_future], timeout=ANSWER_GRACE_SECONDS)
            if not exit_future.done():
                await self._starter.notify("kill", self.sandbox_id)
                await asyncio.shield(exit_future)
        if exit_future.done() and not exit_future.cancelled() and exit_future.exception() is None:
            # What the host observed while it ran (denied connections) and init's seccomp listener
            # counted (refused syscalls; none if init was killed before reporting) are in the ended result.
            events = exit_future.result().security_events
            if events:
                result = dataclasses.replace(result, security_events=result.security_events + events)
        self._audit_end(result)  # with them
        self._manager._reap_later(self)
        return result

    def _merge(self, ended: SandboxResult, stdout: bytes, stderr: bytes) -> SandboxResult:
        truncated = [o.truncated for o in self._outputs] or [False, False]
        result = dataclasses.replace(ended, stdout=stdout, stderr=stderr, stdout_truncated=truncated[0],
                                     stderr_truncated=truncated[1])
        if self._violation is not None:
            return dataclasses.replace(result, outcome=Outcome.PROTOCOL_VIOLATION,
                                       error=f"protocol violation: {self._violation}")
        if result.outcome in (Outcome.TIMEOUT, Outcome.OOM, Outcome.SANDBOX_ERROR):
            return result
        if self._call_timed_out is not None and result.outcome is Outcome.KILLED:
            return dataclasses.replace(result, outcome=Outcome.TIMEOUT, error=self._call_timed_out)
        if self._answered_then_killed and result.outcome is Outcome.KILLED:  # by us, after its answer
            result = dataclasses.replace(result, outcome=Outcome.OK, signal=None, error=None)
        reply = self._reply
        if self._channel is None:  # a program: its exit status is its result
            return result
        if reply is not None and reply.kind is MessageKind.ERROR:
            return dataclasses.replace(result, outcome=Outcome.ERROR,
                                       error=f"{reply.error_type}: {reply.message}\n{reply.traceback}".rstrip(),
                                       error_type=reply.error_type, error_message=reply.message,
                                       traceback=reply.traceback)
        if reply is not None and result.outcome is Outcome.OK:
            return dataclasses.replace(result, output=reply.value)
        if self._let_go and result.outcome is Outcome.OK:
            return result
        if result.outcome is Outcome.OK:
            what = "was stopped by the host" if self._stopped_by_host else "exited"
            return dataclasses.replace(result, outcome=Outcome.KILLED if self._stopped_by_host else Outcome.ERROR,
                                       error=f"the plugin {what} without sending a result")
        return result

    # -- plumbing -----------------------------------------------------------

    def _open_counters(self) -> UsageCounters | None:
        """Open the cgroup counter files of the sandbox (closed when it ends), if it has them."""
        files = self._starter.counters.get(self.sandbox_id)
        if self._counters is None and files:
            try:
                counters = self._counters = UsageCounters(files)
            except OSError:
                return None
            self._exit.add_done_callback(lambda _: counters.close())
        return self._counters

    def _read_counters(self) -> ResourceUsage | None:
        """The usage now, read from the kernel by this process; None when it cannot be
        (no cgroup, or it is already gone)."""
        counters = self._counters or self._open_counters()
        try:
            return counters.read(time.monotonic() - self._armed_at) if counters is not None else None
        except OSError:
            return None

    def _attach(self, channel: AsyncChannel | None, stdout_fd: int, stderr_fd: int, output_limit: int,
                status_interval: float | None, pooled: bool = False) -> None:
        self._channel = channel
        self._outputs = [_OutputCapture(stdout_fd, output_limit), _OutputCapture(stderr_fd, output_limit)]
        if channel is not None:
            self._hands_over = pooled
            self._exit.add_done_callback(lambda _: self._room.set())
            self._reader = asyncio.create_task(self._read_channel(channel, until_prepared=pooled))
            self._tasks.append(self._reader)
        if status_interval and self._keep_messages:
            self._tasks.append(asyncio.create_task(self._sample_status(status_interval)))

    async def _read_channel(self, channel: AsyncChannel, *, until_prepared: bool = False,
                            until_answered: bool = False) -> None:
        """Read the sandbox's messages until it closes the channel (or, `until_prepared`,
        its heartbeat: then answer() reads on; `until_answered`, its result)."""
        try:
            while True:
                message = await channel.receive()
                if message is None:
                    return
                self._last_seen = time.monotonic()
                if message.kind in (MessageKind.RESULT, MessageKind.ERROR):
                    if self._reply is not None:
                        raise ProtocolViolation("the plugin sent a second result")
                    self._reply = message
                    _resolve(self._answered)
                    if until_answered:
                        return
                elif message.kind is MessageKind.HEARTBEAT:
                    _resolve(self._prepared)
                    if until_prepared:
                        self._read_by_answer = True
                        return
                elif self._keep_messages:
                    await self._queue(message)
        except ProtocolViolation as violation:
            self._violation = violation.with_traceback(None)  # its frames held what it refused
            self._manager._backoff.violated(self.plugin_id)
            audit.protocol_violation(self.sandbox_id, self.plugin_id, str(violation),
                                     worker_call=self._worker_call)
            if not self._exit.done() and self._audit_start_done:
                audit.sandbox_killed(self.sandbox_id, self.plugin_id, "protocol_violation",
                                        worker_call=self._worker_call)
            with contextlib.suppress(SandboxError):
                await self._starter.control("kill", self.sandbox_id)
        except (OSError, SandboxError):
            return
        finally:
            _resolve(self._prepared)

    async def _queue(self, message: IpcMessage) -> None:
        """Put a message in the inbox; while the inbox is full the channel is not read
        (the plugin's sends block), until the host reads or the sandbox ends."""
        blob = _holds_mapping(message)
        ended = self._exit
        while not ended.done() and (self._inbox.qsize() >= INBOX_MESSAGES
                                    or (blob and self._inbox_blobs >= INBOX_BLOBS)):
            self._room.clear()
            await self._room.wait()
        if blob and self._inbox_blobs >= INBOX_BLOBS:
            # It ended with more memfds unread than the bound: their mappings (and fds) go now.
            if isinstance(message.content, memoryview):
                unmap(message.content)
            self.dropped_blobs += 1
            return
        self._inbox_blobs += blob
        self._inbox.put_nowait(message)

    async def _sample_status(self, interval: float) -> None:
        exit_future = self._exit
        while not exit_future.done():
            with contextlib.suppress(TimeoutError, SandboxError):
                await asyncio.wait_for(asyncio.shield(exit_future), interval)
            if exit_future.done():
                return
            changes = self._health_changes
            with contextlib.suppress(SandboxError):
                sample = await self.status()
                if changes == self._health_changes and not exit_future.done():
                    self._status = sample
                    self._status_ready.set()


def _holds_mapping(message: IpcMessage) -> bool:
    """Whether a received message holds a memfd mapping (a blob that came by memfd)."""
    return isinstance(message.content, memoryview) and message.content.nbytes > 0


class SandboxCalls:
    """Calls with per-call options (from SandboxManager.with_options()): every
    positional and keyword argument after the callable goes to the callable."""

    def __init__(self, manager: SandboxManager, sandbox_config: SandboxConfig | None,
                 context: bool | None) -> None:
        self.manager = manager
        self.sandbox_config = sandbox_config
        self.context = context

    async def execute_sandboxed(self, plugin_id: str, function: Callable[..., Any], /, *args: Any,
                                **kwargs: Any) -> SandboxResult:
        """SandboxManager.execute_sandboxed with these options."""
        context = self.manager._context_flag(function, self.context, stacklevel=2)
        return await self.manager._execute(plugin_id, function, args, kwargs, self.sandbox_config, context)

    async def spawn(self, plugin_id: str, function: Callable[..., Any], /, *args: Any,
                    **kwargs: Any) -> SandboxHandle:
        """SandboxManager.spawn with these options."""
        context = self.manager._context_flag(function, self.context, stacklevel=2)
        return await self.manager._spawn(plugin_id, function, args, kwargs, self.sandbox_config, context)


def shlex_example(argv: str | bytes) -> str:
    """How a command string would look as the list execute_command wants."""
    text = argv.decode(errors="replace") if isinstance(argv, bytes) else argv
    try:
        return repr(shlex.split(text))
    except ValueError:
        return "['/bin/echo', 'hi']"


def _warn_sandbox_config_kwarg(sandbox_config: SandboxConfig | None, method: str) -> None:
    if sandbox_config is not None:
        warnings.warn(
            f"{method}(..., sandbox_config=...) is deprecated (the keyword cannot reach a callable that takes "
            f"one): use manager.with_options(sandbox_config=...).{method}(...)", DeprecationWarning, stacklevel=3)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fd_limit_message(exc: OSError, alive: int) -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"cannot start another sandbox: the manager is out of file descriptors "
            f"(RLIMIT_NOFILE {soft}, {alive} sandboxes alive, each holds about 3): {exc.strerror}")


def raise_fd_limit() -> None:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit: every live
    sandbox holds a few of the manager's fds, so the soft limit caps how many can run."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as nr_open:
            target = int(nr_open.read())
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _preload_modules(names: Iterable[str]) -> tuple[str, ...]:
    """Check `preload`: importable module names, from the Python installation the
    sandboxes see (the zygote imports from nowhere else)."""
    import importlib.util

    from .linux.rootfs import covered, python_paths

    if isinstance(names, str):
        raise ConfigError("preload", f"must be a list of module names, got the string {names!r}")
    checked = []
    for name in names:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError("preload", f"must be module names, got {name!r}")
        try:
            spec = importlib.util.find_spec(name)
        except ImportError as exc:
            raise ConfigError("preload", f"cannot import {name!r}: {exc}") from None
        if spec is None:
            raise ConfigError("preload", f"no module named {name!r}")
        if spec.origin and os.path.isabs(spec.origin) and not covered(os.path.realpath(spec.origin), python_paths()):
            raise ConfigError("preload", f"{name!r} ({spec.origin}) lies outside the Python installation the "
                                         "sandboxes see")
        checked.append(name)
    return tuple(checked)


def _start_method(name: str, allow_unenforced: Iterable[str], preload: tuple[str, ...] = ()) -> StartMethod:
    if name == "zygote":
        return ZygoteStarter(preload=preload)
    if name == "fork":
        return ForkStarter()
    if name == "posix":
        from .fallback.posix import PosixStarter

        return PosixStarter(allow_unenforced=allow_unenforced)
    raise ValueError(f"start_method: must be 'zygote', 'fork' or 'posix', got {name!r}")


class SandboxManager:
    """Runs callables and programs in fresh, throw-away sandboxes.

    `config` is the default for every call (secure defaults when omitted).
    `start_method`: "zygote" (default; a small fork server, the host is never
    forked), "fork" (fork this process; only for small single-threaded hosts) or
    "posix" (the fallback backend: rlimits and a process group, no namespaces;
    macOS, or Linux without namespaces; it refuses configs it cannot enforce
    unless each missing protection is named in `allow_unenforced`, see
    fallback/posix.py's POSIX_UNENFORCEABLE; "all" allows every one).
    `max_concurrent`: sandboxes alive at once (default: CPUs x 4); more calls wait.
    `status_interval`: seconds between status samples delivered to spawn() handles.
    `pool_size`: keep this many sandboxes of `config` set up in advance (each used
    once); execute_sandboxed calls with the manager's config take one from the pool.
    `output_limit`: bytes of stdout and of stderr kept per sandbox (1 MiB); more
    is read and dropped, and the result's `stdout_truncated`/`stderr_truncated` say so.
    `spawn_timeout_seconds`: the wall timeout of spawn() plugins started without
    their own config (default None: they run until stopped or the manager shuts
    down; `config.timeout_seconds` applies to every other call).
    `violation_backoff_seconds`: after a sandbox of a plugin id violates the
    channel protocol, the next launch of that plugin id waits 0.1 s, doubling with
    each further violation up to this many seconds (default 5; None or 0: no
    wait), until it has gone 60 s without one. A refused frame kills its sandbox,
    so a hostile plugin's "flood" is a stream of launches; this keeps it from
    taking the host's CPU from other plugins, which are never delayed.
    `audit_log`: a file the audit events are appended to as JSON lines while the
    manager runs (audit.py; reopened when logrotate moves it). The events go to
    the `neural_doc_flow_security.audit` logger either way: configure it for
    other sinks (audit.add_stderr_sink, add_syslog_sink).
    `preload`: module names (of the Python installation) each zygote imports before
    it forks its template, so that every sandbox starts with them imported instead
    of importing them itself (e.g. a parser library every plugin uses); only the
    "zygote" start method uses it.

    A manager belongs to the event loop it was started in: calling it from
    another loop raises SandboxError at once, and so does starting it again
    after shutdown().
    """

    def __init__(self, config: SandboxConfig | None = None, *,
                 start_method: Literal["zygote", "fork", "posix"] = "zygote",
                 max_concurrent: int | None = None,
                 status_interval: float | None = 1.0,
                 pool_size: int = 0,
                 output_limit: int = DEFAULT_OUTPUT_LIMIT,
                 decode_limits: DecodeLimits | None = None,
                 allow_unenforced: Iterable[str] = (),
                 spawn_timeout_seconds: float | None = None,
                 violation_backoff_seconds: float | None = DEFAULT_VIOLATION_BACKOFF,
                 audit_log: str | None = None,
                 preload: Iterable[str] = ()) -> None:
        self.config = config or SandboxConfig()
        self._audit_log = audit_log
        self._audit_sink: Any = None
        if spawn_timeout_seconds is not None:
            SandboxConfig(timeout_seconds=spawn_timeout_seconds)  # the same checks as the config field's
        if violation_backoff_seconds is not None and not (
                isinstance(violation_backoff_seconds, (int, float)) and not isinstance(violation_backoff_seconds, bool)
                and 0 <= violation_backoff_seconds <= 3600):
            raise ConfigError("violation_backoff_seconds", f"must be None or a number of seconds from 0 to 3600, "
                                                           f"got {violation_backoff_seconds!r}")
        self._backoff = RelaunchBackoff(violation_backoff_seconds)
        if allow_unenforced and start_method != "posix":
            raise ValueError("allow_unenforced: only the posix start method can run with missing protections")
        self._starter = _start_method(start_method, allow_unenforced, _preload_modules(preload))
        self._start_method_name = start_method
        self._max_concurrent = max_concurrent or (os.cpu_count() or 1) * 4
        self._slots: asyncio.Semaphore | None = None
        self._status_interval = status_interval
        self._output_limit = output_limit
        self._decode_limits = decode_limits or DecodeLimits()
        self._ids = itertools.count(1)
        self._handles: dict[int, SandboxHandle] = {}
        self._by_plugin: dict[str, SandboxHandle] = {}
        self._ended: collections.deque[SandboxHandle] = collections.deque()  # in _by_plugin, ended
        self._background: set[asyncio.Task[Any]] = set()
        self._pool_size = pool_size
        self._pool: WarmPool | None = None
        self._spawn_timeout = spawn_timeout_seconds
        self._spawning: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        self._started_at = 0.0
        self._calls: collections.Counter[str] = collections.Counter()
        self._worker_pools: set[WorkerPool] = set()

    async def __aenter__(self) -> SandboxManager:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start the zygote and remove cgroups left behind by a dead manager."""
        if self._closed:
            raise SandboxError("this SandboxManager was shut down and cannot be started again; make a new one")
        if self._started:
            self._check_loop()
            return
        self._loop = asyncio.get_running_loop()
        from .launch.stdio import ensure_std_fds
        from .linux.cgroups import remove_stale_cgroups

        ensure_std_fds()  # a closed fd 0-2 would be taken by the zygote's socket or a sandbox's pipe
        if sys.platform == "linux":
            from .linux.cgroups.delegation import adopt_delegated_subtree

            adopt_delegated_subtree()  # alone in a delegated cgroup: before the zygote, which would share it
        with contextlib.suppress(OSError, SandboxError):
            remove_stale_cgroups()
        with contextlib.suppress(OSError, ValueError):  # e.g. no /proc/sys/fs/nr_open (macOS)
            raise_fd_limit()
        self._slots = asyncio.Semaphore(self._max_concurrent)
        if self._audit_log is not None and self._audit_sink is None:
            self._audit_sink = audit.add_file_sink(self._audit_log)
        await self._starter.start()
        self._started = True
        self._started_at = time.monotonic()
        if self._pool_size > 0:
            self._pool = WarmPool(self._pool_size, lambda: self._create(
                "pool", PythonWorkerPayload(pooled=True), self.config, keep_messages=False,
                with_channel=True, stdin=None, pooled=True))
            self._pool.start()

    async def wait_pool_ready(self) -> None:
        """Wait until the warm pool is full of sandboxes waiting for their call and the
        sandboxes of earlier calls are reaped (e.g. before timing a pooled call)."""
        self._check_loop()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._pool is not None:
            await self._pool.wait_ready()

    async def shutdown(self) -> None:
        """Kill every sandbox still running and stop the zygote."""
        if self._closed or not self._started:
            return
        self._check_loop()
        self._closed = True
        for workers in list(self._worker_pools):
            await workers.close()
        if self._pool is not None:
            await self._pool.close()
        handles = list(self._handles.values())  # forgotten as they end, in close()
        for handle in handles:
            if handle._audit_start_done and not handle._exit.done():
                audit.sandbox_killed(handle.sandbox_id, handle.plugin_id, "shutdown", worker_call=handle._worker_call)
        await self._starter.close()
        await asyncio.gather(*(h.wait() for h in handles), return_exceptions=True)  # their fds are closed
        await asyncio.gather(*self._background, return_exceptions=True)
        from .linux.cgroups import remove_stale_cgroups

        with contextlib.suppress(OSError, SandboxError):
            remove_stale_cgroups()  # of a zygote that died (killed): its spare's, its sandboxes
        if self._audit_sink is not None:
            audit.remove_sink(self._audit_sink)
            self._audit_sink = None

    def stats(self) -> ManagerStats:
        """Its health now: zygotes alive and restarted, sandboxes alive, calls served
        by outcome, the warm pool, uptime (see ManagerStats)."""
        running = self._started and not self._closed
        zygotes = (self._starter.zygote_stats() if running and isinstance(self._starter, ZygoteStarter)
                   else ZygoteStats(alive=0, stalled=0, restarted=0, given_up=0))  # none: "fork", "posix"
        return ManagerStats(
            zygotes_alive=zygotes.alive, zygotes_stalled=zygotes.stalled,
            zygotes_restarted=zygotes.restarted, zygotes_given_up=zygotes.given_up,
            sandboxes_alive=sum(h.health is not Health.EXITED for h in self._handles.values()),
            calls=dict(self._calls), pool_idle=self._pool.idle if self._pool is not None else 0,
            pool_size=self._pool_size,
            uptime_seconds=time.monotonic() - self._started_at if self._started else 0.0,
            plugins_throttled=self._backoff.throttled())

    async def _count(self, call: Awaitable[SandboxResult]) -> SandboxResult:
        try:
            result = await call
        except BaseException:
            self._calls["raised"] += 1
            raise
        self._calls[result.outcome.value] += 1
        return result

    # -- running ------------------------------------------------------------

    def with_options(self, *, sandbox_config: SandboxConfig | None = None,
                     context: bool | None = None) -> SandboxCalls:
        """Per-call options that cannot collide with the callable's own keyword
        arguments: `manager.with_options(sandbox_config=cfg, context=True)
        .execute_sandboxed("p", fn, *args, **kwargs)` passes every kwarg to fn.
        `context`: True gives fn a PluginContext as its first argument, False never
        (None: the deprecated detection by a first parameter named `ctx`)."""
        return SandboxCalls(self, sandbox_config, context)

    def worker_pool(self, *, max_workers: int | None = None, max_tasks_per_child: int | None = 1,
                    reset_tmp: bool = False, sandbox_config: SandboxConfig | None = None,
                    context: bool | None = None) -> WorkerPool:
        """Sandboxed workers that serve many calls, like ProcessPoolExecutor's
        `max_tasks_per_child`: up to `max_workers` (default: this manager's
        max_concurrent) workers of `sandbox_config` (default: the manager's), each
        serving up to `max_tasks_per_child` calls of one plugin id and reuse key,
        then replaced (None: until the pool closes; 1, the default: a fresh sandbox
        per call, as execute_sandboxed). `reset_tmp`: empty the worker's /tmp after
        each call. What a reused worker may leak between calls: see workers.py and
        the README. Workers count against max_workers, not max_concurrent."""
        from .workers import WorkerPool

        self._check_loop()
        pool = WorkerPool(self, sandbox_config or self.config, max_workers=max_workers or self._max_concurrent,
                          max_tasks_per_child=max_tasks_per_child, reset_tmp=reset_tmp, context=context)
        self._worker_pools.add(pool)
        return pool

    async def execute_sandboxed(self, plugin_id: str, function: Callable[..., Any], /, *args: Any,
                                sandbox_config: SandboxConfig | None = None, **kwargs: Any) -> SandboxResult:
        """Run `function(*args, **kwargs)` in a fresh sandbox; its return value is
        `result.output`, an exception it raises is `result.error_type`/`error_message`/
        `traceback`. A first parameter annotated `PluginContext` gets the plugin's context.

        Deprecated forms (they warn): `sandbox_config=` here (use with_options(); a
        callable's own `sandbox_config` kwarg is taken by it), and a context given
        to a first parameter only because it is named `ctx` (annotate it, or use
        with_options(context=True))."""
        _warn_sandbox_config_kwarg(sandbox_config, "execute_sandboxed")
        context = self._context_flag(function, None, stacklevel=2)
        return await self._execute(plugin_id, function, args, kwargs, sandbox_config, context)

    async def _execute(self, plugin_id: str, function: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any], config: SandboxConfig | None, context: bool) -> SandboxResult:
        """execute_sandboxed with its options decided (counted in stats())."""
        return await self._count(self._execute_sandboxed(plugin_id, function, args, kwargs, config, context))

    async def _execute_sandboxed(self, plugin_id: str, function: Callable[..., Any], args: tuple[Any, ...],
                                 kwargs: dict[str, Any], config: SandboxConfig | None,
                                 context: bool) -> SandboxResult:
        handle = await self._launch(plugin_id, PythonWorkerPayload(), config, keep_messages=False,
                                    call=(function, args, kwargs, context))
        try:
            return await self._finish(handle, early=True)
        finally:
            if self._pool is not None:
                self._pool.refill()

    async def execute_command(self, plugin_id: str, argv: list[str] | tuple[str, ...], *,
                              stdin: bytes | str | None = None, cwd: str = "/",
                              sandbox_config: SandboxConfig | None = None,
                              timeout: float | None | _Default = _DEFAULT,
                              env: Mapping[str, str] | None = None,
                              check: bool = False, text: bool = False, encoding: str | None = None
                              ) -> SandboxResult:
        """Run a program in a fresh sandbox; `stdin` is its standard input, its
        stdout and stderr come back (bounded) in the result. Like subprocess.run:
        `argv` is a list (a str is a TypeError: there is no shell); `timeout` (seconds,
        None for none) replaces the config's wall timeout for this call; `env`
        replaces its environment; `check=True` raises OutcomeError (with `.result`)
        unless the outcome is ok; `text=True` or an `encoding` makes a str `stdin`
        acceptable and sets the result's `encoding` (`result.stdout_text`, `stderr_text`)."""
        if isinstance(argv, (str, bytes)):
            raise TypeError(f"execute_command: argv must be a list of strings (no shell parses it), got "
                            f"{type(argv).__name__} {argv!r}; e.g. {shlex_example(argv)}")
        config = sandbox_config or self.config
        try:
            if not isinstance(timeout, _Default):
                config = dataclasses.replace(config, timeout_seconds=timeout)
            if env is not None:
                config = dataclasses.replace(config, environment=tuple(env.items()))
        except ConfigError as e:
            audit.launch_refused(plugin_id, e)
            raise
        if isinstance(stdin, str):
            if not (text or encoding):
                raise TypeError("execute_command: stdin is a str: pass bytes, or text=True / encoding=")
            stdin = stdin.encode(encoding or "utf-8")
        command_stdin = stdin

        async def run() -> SandboxResult:
            handle = await self._launch(plugin_id, ExecPayload(tuple(argv), cwd), config,
                                        keep_messages=False, stdin=command_stdin)
            return await self._finish(handle)

        result = await self._count(run())
        if encoding:
            result = dataclasses.replace(result, encoding=encoding)
        return result.raise_for_outcome() if check else result

    async def spawn(self, plugin_id: str, function: Callable[..., Any], /, *args: Any,
                    sandbox_config: SandboxConfig | None = None, **kwargs: Any) -> SandboxHandle:
        """Start a long-running plugin and return its handle (also reachable by
        plugin_id, which must not name a plugin that is still alive). Without its
        own config it runs with the manager's config and `spawn_timeout_seconds`
        (default: no wall timeout). `sandbox_config=` and a context found by the
        name `ctx` are deprecated as in execute_sandboxed()."""
        _warn_sandbox_config_kwarg(sandbox_config, "spawn")
        context = self._context_flag(function, None, stacklevel=2)
        return await self._spawn(plugin_id, function, args, kwargs, sandbox_config, context)

    async def _spawn(self, plugin_id: str, function: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any], config: SandboxConfig | None, context: bool) -> SandboxHandle:
        alive = self._by_plugin.get(plugin_id)
        if plugin_id in self._spawning or (alive is not None and alive.health is not Health.EXITED):
            raise SandboxError(f"spawn: a plugin named {plugin_id!r} is still running; stop it or use another "
                               "plugin_id")
        if config is None:
            config = dataclasses.replace(self.config, timeout_seconds=self._spawn_timeout)
        self._spawning.add(plugin_id)
        try:
            handle = await self._launch(plugin_id, PythonWorkerPayload(), config, keep_messages=True,
                                        call=(function, args, kwargs, context))
        finally:
            self._spawning.discard(plugin_id)
        self._by_plugin[plugin_id] = handle
        return handle

    async def send_message(self, plugin_id: str, message: IpcMessage) -> None:
        """Send a message to the spawned plugin `plugin_id` (control: pause, resume, stop)."""
        await self._handle(plugin_id).send(message)

    async def receive_message(self, plugin_id: str, timeout: float | None = None) -> IpcMessage | None:
        """The next message from the spawned plugin, or None on timeout / when it ended."""
        return await self._handle(plugin_id).receive(timeout)

    def get_handle(self, plugin_id: str) -> SandboxHandle:
        """The handle of the plugin most recently spawned as `plugin_id`."""
        return self._handle(plugin_id)

    def list_sandboxes(self) -> list[SandboxInfo]:
        """Every sandbox alive now."""
        now = time.monotonic()
        return [SandboxInfo(h.plugin_id, h.sandbox_id, h.pid, h.health, h.kind, now - h._started)
                for h in self._handles.values() if h.health is not Health.EXITED]

    # -- plumbing -----------------------------------------------------------

    def _check_loop(self) -> None:
        """Refuse a call made from an event loop other than the one the manager was
        started in (it would wait for events that loop never delivers)."""
        if self._loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise SandboxError(
                "this SandboxManager was started in another event loop (each asyncio.run() or thread has "
                "its own); start it and call it in one loop, e.g. `async with SandboxManager() as m:` "
                "inside the coroutine that uses it")

    def _context_flag(self, function: Callable[..., Any], context: bool | None, *, stacklevel: int) -> bool:
        """Whether `function` gets a PluginContext: as asked, else by its first
        parameter (annotated PluginContext, or named `ctx`: deprecated). `stacklevel`:
        the frames from our caller up to the user's code (for the warning)."""
        if context is not None:
            return bool(context)
        how = context_parameter(function)
        if how == "name":
            warnings.warn(
                f"{getattr(function, '__qualname__', function)!r} gets a PluginContext only because its first "
                "parameter is named `ctx`; this is deprecated: annotate it `ctx: PluginContext` or use "
                "manager.with_options(context=True) (context=False passes your own first argument)",
                DeprecationWarning, stacklevel=stacklevel + 1)
        return how is not None

    def _handle(self, plugin_id: str) -> SandboxHandle:
        try:
            return self._by_plugin[plugin_id]
        except KeyError:
            raise SandboxError(f"no spawned plugin named {plugin_id!r}") from None

    async def _launch(self, plugin_id: str, payload: Payload, config: SandboxConfig | None, *,
                      keep_messages: bool, call: tuple[Any, ...] | None = None,
                      stdin: bytes | None = None) -> SandboxHandle:
        try:
            return await self._launch_checked(plugin_id, payload, config, keep_messages=keep_messages, call=call,
                                              stdin=stdin)
        except SandboxError as e:  # ConfigError, UnsupportedError, HostLimitError...: nothing runs
            audit.launch_refused(plugin_id, e)
            raise

    async def _launch_checked(self, plugin_id: str, payload: Payload, config: SandboxConfig | None, *,
                              keep_messages: bool, call: tuple[Any, ...] | None,
                              stdin: bytes | None) -> SandboxHandle:
        if not self._started or self._closed:
            raise SandboxError("the SandboxManager is not running (use `async with SandboxManager()`)")
        if config is not None and not isinstance(config, SandboxConfig):
            raise ConfigError("sandbox_config", f"must be a SandboxConfig, got {config!r:.200}")
        if config is not None and config is not self.config:
            dataclasses.replace(config)  # checked again: one changed after it was built raises ConfigError here
        self._check_loop()
        assert self._slots is not None
        await self._backoff.wait_turn(plugin_id)  # its sandboxes sent garbage: not before its turn
        # The sandbox is told the limits its messages are decoded with (a result over them fails there).
        call_bytes = (_pickle_call((*call, dataclasses.asdict(self._decode_limits))) if call is not None
                      else None)
        await self._slots.acquire()
        try:
            pooled = self._pool.take() if self._pool is not None and config in (None, self.config) \
                and call_bytes is not None and not keep_messages else None
            if (pooled is None and isinstance(payload, PythonWorkerPayload) and call_bytes is not None
                    and len(call_bytes) <= MAX_CALL_WITH_LAUNCH):
                # The call travels with the launch: the sandbox runs it as soon as it is set up.
                payload = dataclasses.replace(payload, call=call_bytes)
                call_bytes = None
            handle = pooled or await self._create(plugin_id, payload, config or self.config,
                                                  keep_messages=keep_messages, with_channel=call is not None,
                                                  stdin=stdin, pooled=False)
        except BaseException:
            self._slots.release()
            raise
        handle._exit.add_done_callback(lambda _: self._slots.release())  # type: ignore[union-attr]
        if pooled is not None:
            handle.plugin_id = plugin_id
            handle._armed_at = time.monotonic()
            handle._audit_start()
        try:
            if handle._channel is not None and call_bytes is not None:
                try:
                    await handle._channel.send(IpcMessage.call(call_bytes))
                except OSError:
                    pass  # it died before reading its work; wait() reports how
            if pooled is not None:
                # Its wall clock starts from the moment the call was sent; the launcher
                # carries this out before any later request, no reply is awaited.
                try:
                    await self._starter.notify("arm", handle.sandbox_id, at=handle._armed_at)
                except SandboxError:
                    await self._kill_quietly(handle)  # no wall clock could be started: it must not run unbounded
                    raise SandboxError(f"{plugin_id}: the pooled sandbox could not be armed") from None
        except asyncio.CancelledError:
            await asyncio.shield(self._kill_quietly(handle))  # gone before the cancellation completes
            raise
        return handle

    async def _create(self, plugin_id: str, payload: Payload, config: SandboxConfig, *, keep_messages: bool,
                      with_channel: bool, stdin: bytes | None, pooled: bool) -> SandboxHandle:
        """Start one sandbox (not counted against max_concurrent: the caller does that).
        A pooled one has no wall clock running until it is armed, and its usage
        counters are opened now, while it waits."""
        sandbox_id = next(self._ids)
        handle = SandboxHandle(self, plugin_id, sandbox_id, "callable" if with_channel else "command", config,
                               keep_messages)
        channel = None
        # `theirs` go to the sandbox and are closed once it has them; `ours` are kept by
        # the handle, closed here only if the launch fails. Each fd is owned from the
        # call that made it: no error path can leak one.
        with contextlib.ExitStack() as theirs, contextlib.ExitStack() as ours:
            try:
                if stdin is not None:
                    stdin_fd = seal_bytes(stdin, "ndf-stdin")
                    theirs.callback(os.close, stdin_fd)
                    os.lseek(stdin_fd, 0, os.SEEK_SET)
                else:
                    stdin_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    theirs.callback(os.close, stdin_fd)
                fds = {0: stdin_fd}
                read_ends: list[int] = []
                for target in (1, 2):
                    read_end, write_end = os.pipe2(os.O_CLOEXEC)
                    ours.callback(os.close, read_end)
                    theirs.callback(os.close, write_end)
                    read_ends.append(read_end)
                    fds[target] = write_end
                if with_channel:
                    host_end, sandbox_end = create_channel_pair()
                    ours.callback(host_end.close)
                    theirs.callback(sandbox_end.close)
                    channel = AsyncChannel(host_end, self._decode_limits)
                    fds[CHANNEL_FD] = sandbox_end.fileno()
                # Without limits: see LaunchRequest.accounting_cgroup.
                accounting: Literal["always", "when idle", "never"] = (
                    "always" if keep_messages or pooled else "when idle" if with_channel else "never")
                request = LaunchRequest(config, payload, plugin_id, armed=not pooled, accounting_cgroup=accounting)
                handle.pid = await self._start_sandbox(sandbox_id, request, fds)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise HostLimitError(_fd_limit_message(exc, len(self._handles))) from exc
                raise SandboxError(f"{plugin_id}: cannot start the sandbox: {exc}") from exc
            ours.pop_all()
        stdout_r, stderr_r = read_ends
        self._handles[sandbox_id] = handle
        handle._exit.add_done_callback(lambda _: self._forget(sandbox_id))
        handle.health = Health.RUNNING
        handle._attach(channel, stdout_r, stderr_r, self._output_limit, self._status_interval, pooled)
        if pooled:
            handle._open_counters()
        else:
            handle._audit_start()
        return handle

    async def _start_sandbox(self, sandbox_id: int, request: LaunchRequest, fds: dict[int, int]) -> int:
        """starter.spawn(); a cancellation that arrives meanwhile waits for the launch
        and kills what it started before it completes (no orphan runs on). Only a
        zygote's launch can be interrupted (it awaits the zygote's reply); the other
        start methods start the sandbox before their first await."""
        if not isinstance(self._starter, ZygoteStarter):
            return await self._starter.spawn(sandbox_id, request, fds)
        spawning = asyncio.ensure_future(self._starter.spawn(sandbox_id, request, fds))
        try:
            return await asyncio.shield(spawning)
        except asyncio.CancelledError:
            await asyncio.shield(self._undo_launch(spawning, sandbox_id))
            raise
        finally:
            # A failed launch's exception holds this frame: without the task in it, no
            # cycle keeps the launch's frames (and fds) alive until the garbage collector runs.
            del spawning

    async def _undo_launch(self, spawning: asyncio.Future[int], sandbox_id: int) -> None:
        try:
            await spawning
        except BaseException:  # noqa: BLE001 - it did not start: nothing to undo
            return
        exit_future = self._starter.exit_future(sandbox_id)
        with contextlib.suppress(SandboxError):
            await self._starter.control("kill", sandbox_id)
        with contextlib.suppress(BaseException):
            await exit_future

    def _forget(self, sandbox_id: int) -> None:
        handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            handle.health = Health.EXITED
            _resolve(handle._answered)
            if handle._keep_messages:  # a spawned plugin: its fds are closed, its name released
                self._reap_later(handle)

    def _release_name(self, handle: SandboxHandle) -> None:
        """A spawned plugin has ended: its name stays reachable (get_handle, receive_message)
        for the latest ENDED_NAMES_KEPT ended plugins only, so that spawning under ever
        new names keeps nothing more (the handle that spawn() returned keeps its result)."""
        if self._by_plugin.get(handle.plugin_id) is not handle or handle in self._ended:
            return
        self._ended.append(handle)
        while len(self._ended) > ENDED_NAMES_KEPT:
            oldest = self._ended.popleft()
            if self._by_plugin.get(oldest.plugin_id) is oldest:
                del self._by_plugin[oldest.plugin_id]

    def _reap_later(self, handle: SandboxHandle) -> None:
        """Let a sandbox that has answered finish its teardown in the background."""
        task = asyncio.create_task(self._wait_quietly(handle))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wait_quietly(self, handle: SandboxHandle) -> None:
        with contextlib.suppress(SandboxError):
            await handle.wait()
        self._release_name(handle)

    async def _finish(self, handle: SandboxHandle, *, early: bool = False) -> SandboxResult:
        try:
            return await (handle.answer() if early else handle.wait())
        except asyncio.CancelledError:
            # The tree must be gone before the cancellation completes.
            await asyncio.shield(self._kill_quietly(handle))
            raise

    async def _kill_quietly(self, handle: SandboxHandle) -> None:
        with contextlib.suppress(SandboxError):
            await handle._kill("cancelled")
