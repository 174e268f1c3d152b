"""The payload for Python callables: runs inside the sandbox, after every protection.

It waits on its channel (fd 3) for one CALL message (cloudpickled function and
arguments, sent by the host; a pooled sandbox first says it is waiting with a
HEARTBEAT), runs it, sends back one RESULT or ERROR message
(msgpack: nothing pickled ever travels towards the host) and exits; a reused
worker (`serve`) answers CALL after CALL until the host closes the channel. The module
imports the payload needs happen here, inside the sandbox.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import sys
import time
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from ..ipc.channel import SyncChannel
from ..ipc.limits import DecodeLimits
from ..ipc.messages import ChannelRole, ControlMessage, IpcMessage, MessageKind
from .payload import Payload

CHANNEL_FD = 3
PROGRESS_INTERVAL = 0.02  # seconds between progress messages (50/s, far below the host's rate limit)


class PluginContext:
    """What a plugin gets when its callable takes a `ctx` parameter.

    send / receive binary data, report progress, log, and see whether the host
    asked it to stop (poll `stop_requested` or block in `wait_for_stop`).
    """

    def __init__(self, channel: SyncChannel) -> None:
        self._channel = channel
        self._inbox: deque[IpcMessage] = deque()
        self._stop = False
        self._progress: IpcMessage | None = None  # reported, not sent yet
        self._progress_sent_at = -PROGRESS_INTERVAL

    def send(self, data: bytes | bytearray | memoryview, *, tag: str = "") -> None:
        """Send bytes to the host (large ones travel as a sealed memfd)."""
        self.flush_progress()
        self._channel.send(IpcMessage.data(data, tag=tag))

    def report_progress(self, fraction: float, note: str = "") -> None:
        """Tell the host how far along the work is (0.0 to 1.0).

        Call it as often as you like: at most one progress message goes out per
        PROGRESS_INTERVAL seconds, carrying the latest report and how many it stands
        for (`reports`); one still pending goes before any other message and the result.
        """
        pending = self._progress.reports if self._progress is not None else 0
        self._progress = IpcMessage.progress(fraction, note, reports=pending + 1)
        if time.monotonic() - self._progress_sent_at >= PROGRESS_INTERVAL:
            self.flush_progress()

    def flush_progress(self) -> None:
        """Send the progress reported and not sent yet, if any."""
        message, self._progress = self._progress, None
        if message is not None:
            self._progress_sent_at = time.monotonic()
            self._channel.send(message)

    def log(self, text: str, level: str = "info") -> None:
        """Send a log line to the host."""
        self.flush_progress()
        self._channel.send(IpcMessage.log(level, text))

    def _pump(self, timeout: float | None) -> bool:
        try:
            message = self._channel.receive(timeout)
        except TimeoutError:
            return False
        if message is None:
            return False
        if message.kind is MessageKind.CONTROL and message.control_message is ControlMessage.STOP:
            self._stop = True
        else:
            self._inbox.append(message)
        return True

    def receive(self, timeout: float | None = None) -> IpcMessage | None:
        """The next message from the host (data), or None on timeout, when the host
        is gone, or once it asked the plugin to stop."""
        while not self._inbox:
            if self._stop or not self._pump(timeout):
                return None
        return self._inbox.popleft()

    @property
    def stop_requested(self) -> bool:
        """True once the host sent STOP (checks the channel without blocking)."""
        while not self._stop and self._pump(0):
            pass
        return self._stop

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Block until the host sends STOP (True) or the timeout passes (False)."""
        while not self._stop:
            if not self._pump(timeout):
                break
        return self._stop


def wants_context(function: Callable[..., Any]) -> bool:
    """Whether the callable's first parameter is the plugin context (`ctx`)."""
    return context_parameter(function) is not None


def context_parameter(function: Callable[..., Any]) -> Literal["annotation", "name"] | None:
    """How the callable's first parameter asks for the plugin context: annotated
    `PluginContext` ("annotation"), only named `ctx` ("name", deprecated), or not (None)."""
    if (isinstance(function, types.FunctionType) and not hasattr(function, "__wrapped__")
            and not hasattr(function, "__signature__")):
        # What inspect.signature() would say, read off the code object: this runs on every call.
        code = function.__code__
        if code.co_argcount:
            first = code.co_varnames[0]
            return _how(first, function.__annotations__.get(first, inspect.Parameter.empty))
        if not code.co_kwonlyargcount and not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
            return None  # no parameters
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    return _how(parameters[0].name, parameters[0].annotation) if parameters else None


def _how(name: str, annotation: object) -> Literal["annotation", "name"] | None:
    if annotation is PluginContext or annotation == "PluginContext":
        return "annotation"
    return "name" if name == "ctx" else None


@dataclass(frozen=True)
class PythonWorkerPayload(Payload):
    """Run one cloudpickled call: `call`, when it travels with the launch (a cold
    call), else the first message on fd 3. `pooled`: the call may be long in
    coming, so warm up first and then say so (a HEARTBEAT); a cold worker's call
    is already there, and a warm-up would only delay it.

    `serve`: a reused worker (sandbox/workers.py): say it is ready (a HEARTBEAT),
    then run every CALL that comes, one after another, until the host closes the
    channel; each call starts in /tmp. `reset_tmp`: empty /tmp after each call
    (the worker ends when it cannot: the host then starts a fresh one)."""

    needs_python = True
    pooled: bool = False
    call: bytes | None = field(default=None, repr=False)
    serve: bool = False
    reset_tmp: bool = False

    def run(self, environment: tuple[bytes, ...]) -> NoReturn:
        enter_sandbox_process(environment)
        channel = SyncChannel.from_fd(CHANNEL_FD)
        if self.pooled:
            _warm_up()
        try:
            if self.pooled or self.serve:
                channel.send(IpcMessage.heartbeat())
            if self.serve:
                self._serve(channel)
            else:
                self._answer_one(channel)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)

    def _answer_one(self, channel: SyncChannel) -> None:
        payload = self.call
        if payload is None:
            call = channel.receive()
            if call is None or call.kind is not MessageKind.CALL:
                return  # the host went away before sending work
            payload = bytes(call.payload)
        _answer(channel, payload)

    def _serve(self, channel: SyncChannel) -> None:
        """Answer calls until the host closes the channel (or sends anything but a call)."""
        tmp_device = os.stat("/tmp").st_dev
        while True:
            call = channel.receive()
            if call is None or call.kind is not MessageKind.CALL:
                return
            channel.next_call()
            os.chdir("/tmp")
            _answer(channel, bytes(call.payload))
            if self.reset_tmp and not _empty_directory("/tmp", tmp_device):
                return  # something in it could not be removed: this worker must not serve another call


def import_modules(*names: str) -> None:
    """Import these modules (a reused worker's replacement, before its first call)."""
    import importlib

    for name in names:
        importlib.import_module(name)


def _answer(channel: SyncChannel, payload: bytes) -> None:
    """Run the call and send its result (or its exception) to the host."""
    reply = _run_call(payload, channel)
    sys.stdout.flush()  # the host may return as soon as the answer arrives
    sys.stderr.flush()
    try:
        channel.send(reply)
    except (TypeError, ValueError, OverflowError) as exc:  # no wire type, an int over 64 bits, a limit
        hint = ("the host's limit: raise it in SandboxManager(decode_limits=DecodeLimits(...))"
                if " exceeds max_" in str(exc) else
                "results may hold None, bool, int, float, str, bytes, list, dict, tuple, set, "
                "frozenset, datetime, date, time, Decimal and dataclass instances (as dicts); "
                "dict keys and set items: str, bytes, int, bool or None")
        channel.send(IpcMessage.error(type(exc).__name__, f"the result cannot be sent to the host: {exc} ({hint})"))


def _empty_directory(path: str, device: int) -> bool:
    """Remove everything below `path` that lies on `device` (a bind mounted below
    it is not the worker's own, and is left alone); False if anything of ours is left."""
    emptied = True
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if info.st_dev != device:
                continue
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)  # a call may have made it unreadable
                emptied = _empty_directory(entry.path, device) and emptied
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            emptied = False
    return emptied


# What this process last made its environment: a zygote sets the default
# sandbox's once, so that its forks need not (every page they write is a copy).
_environment_applied: tuple[bytes, ...] | None = None


def apply_environment(environment: tuple[bytes, ...]) -> None:
    """Make os.environ exactly `environment` ("NAME=value" entries)."""
    global _environment_applied
    if environment != _environment_applied:  # reading both writes no page
        os.environ.clear()
        os.environ.update(entry.decode().split("=", 1) for entry in environment)  # type: ignore[misc]
        _environment_applied = environment


@functools.cache
def _sandbox_stdio() -> tuple[io.TextIOWrapper, io.TextIOWrapper, io.TextIOWrapper]:
    """Text streams on fds 0, 1 and 2, made once (by a zygote before it forks)."""
    return (io.TextIOWrapper(io.FileIO(0, "r", closefd=False)),
            io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True),
            io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True))


def prepare_in_zygote(environment: tuple[bytes, ...]) -> None:
    """Do in a zygote what each of its payload processes would otherwise do."""
    apply_environment(environment)
    _sandbox_stdio()


def enter_sandbox_process(environment: tuple[bytes, ...]) -> None:
    """The payload process's own set-up: its environment, /tmp as the working
    directory, and sys.stdin/stdout/stderr on its fds 0-2 (the host may have
    replaced those objects: pytest, Jupyter)."""
    apply_environment(environment)
    os.chdir("/tmp")
    sys.stdin, sys.stdout, sys.stderr = _sandbox_stdio()


def _warm_up() -> None:
    """Run the whole call path once, over a private socketpair, before waiting for
    the real call: the pages it touches are copied (copy-on-write after the fork)
    now, not while the host waits for the answer."""
    import cloudpickle

    from ..ipc.channel import create_channel_pair

    def dummy(value: int) -> int:  # a local function is pickled by value, like most plugins
        return value + 1

    host_end, sandbox_end = create_channel_pair()
    with SyncChannel(host_end, role=ChannelRole.HOST) as host, SyncChannel(sandbox_end) as sandbox:
        host.send(IpcMessage.call(cloudpickle.dumps((dummy, (1,), {}))))
        call = sandbox.receive()
        assert call is not None
        sandbox.send(_run_call(bytes(call.payload), sandbox))
        host.receive()


def _run_call(payload: bytes, channel: SyncChannel) -> IpcMessage:
    try:
        import cloudpickle

        function, args, kwargs, *flags = cloudpickle.loads(payload)
        if len(flags) > 1:  # the host's DecodeLimits: a message it would refuse is refused here
            channel.expect_peer_limits(DecodeLimits(**flags[1]))
        context = None
        if flags[0] if flags else wants_context(function):  # the host decides (older hosts: by name)
            context = PluginContext(channel)
            args = (context, *args)
        value = function(*args, **kwargs)
        if inspect.isawaitable(value):
            import asyncio  # only here: asyncio (and ssl) stay out of the template and its payloads

            value = asyncio.run(_await(value))
        if context is not None:
            context.flush_progress()
        return IpcMessage.result(value)
    except BaseException as exc:  # noqa: BLE001 - the plugin's failure is its result
        return IpcMessage.from_exception(exc)


async def _await(awaitable: Any) -> Any:
    return await awaitable
