"""Start methods: how the asyncio manager gets sandboxes started.

Both implement the same small async interface (spawn, control, exit future,
close), like multiprocessing's popen_* modules:

- ZygoteStarter (default): a fresh single-threaded interpreter (zygote.py)
  forks every sandbox; the host is never forked.
- ForkStarter (`start_method="fork"`): the manager's own process forks, from
  its event-loop thread. Only for hosts that know they are single-threaded and
  small.
"""

from __future__ import annotations

import abc
import array
import asyncio
import contextlib
import dataclasses
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import msgpack

from .. import audit
from ..errors import SandboxError, UnsupportedError
from ..result import IsolationReport, Outcome, SandboxResult
from .counters import counter_files
from .launcher import Launcher, LaunchRequest
from .spawn import SpawnedSandbox, ask_report_async, has_exited


class StartMethod(abc.ABC):
    """Starts sandboxes and reports their ends."""

    def __init__(self) -> None:
        self._exits: dict[int, asyncio.Future[SandboxResult]] = {}
        self.isolation: dict[int, IsolationReport] = {}  # by sandbox id, known once started
        self.counters: dict[int, tuple[str, ...]] = {}  # its usage counter files (launch/counters.py)

    def exit_future(self, sandbox_id: int) -> asyncio.Future[SandboxResult]:
        """Resolves with the sandbox's result when it has ended and been reaped (or
        with the SandboxError that says why it cannot be known). Take it before
        spawn(): once it is resolved the start method forgets it (nothing is kept
        per sandbox), and asking again then makes a new one that never resolves."""
        future = self._exits.get(sandbox_id)
        if future is None:
            future = self._exits[sandbox_id] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieved)
        return future

    def running(self, sandbox_id: int) -> bool:
        """Whether the sandbox is being started or runs (its end is not known yet)."""
        future = self._exits.get(sandbox_id)
        return future is not None and not future.done()

    def _exited(self, sandbox_id: int, result: SandboxResult) -> None:
        self._forget(sandbox_id)
        future = self._exits.pop(sandbox_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _failed(self, sandbox_id: int, error: BaseException) -> None:
        """Its end cannot be known (its zygote died): its waiters get `error`."""
        self._forget(sandbox_id)
        future = self._exits.pop(sandbox_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _forget(self, sandbox_id: int) -> None:
        self.isolation.pop(sandbox_id, None)
        self.counters.pop(sandbox_id, None)

    @abc.abstractmethod
    async def start(self) -> None:
        """Get ready to spawn."""

    @abc.abstractmethod
    async def spawn(self, sandbox_id: int, request: LaunchRequest, fds: dict[int, int]) -> int:
        """Start a sandbox; `fds` maps the sandbox's fd numbers to ours. Returns its pid."""

    @abc.abstractmethod
    async def control(self, op: str, sandbox_id: int, **args: Any) -> dict[str, Any]:
        """kill, freeze, thaw, signal(signal=N), stats, arm(at=T) or collect; returns the reply."""

    async def notify(self, op: str, sandbox_id: int, **args: Any) -> None:
        """control() without waiting for the reply where the transport allows it (arm,
        kill): requests are carried out in the order they were made. Raises
        SandboxError when it cannot be sent or, here, when it failed."""
        reply = await self.control(op, sandbox_id, **args)
        if not reply.get("ok") and self.running(sandbox_id):
            raise SandboxError(f"{op}: {reply.get('error')}")

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill every sandbox still running and release everything."""


class ForkStarter(StartMethod):
    """Fork sandboxes from this process (its event-loop thread)."""

    def __init__(self) -> None:
        super().__init__()
        self._launcher = Launcher()
        self._deadline_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        pass

    async def spawn(self, sandbox_id: int, request: LaunchRequest, fds: dict[int, int]) -> int:
        launch = dataclasses.replace(request, fd_map=tuple(fds.items()))
        spawned = self._launcher.start(sandbox_id, launch)
        self.isolation[sandbox_id] = spawned.isolation()
        self.counters[sandbox_id] = counter_files(spawned.cgroup)
        loop = asyncio.get_running_loop()
        loop.add_reader(spawned.status_read, self._report, sandbox_id, spawned)
        loop.add_reader(spawned.pidfd, self._reap, sandbox_id, spawned)
        self._schedule_deadlines()
        return spawned.pid

    def _report(self, sandbox_id: int, spawned: SpawnedSandbox) -> None:
        """Init reported the payload's end: the result is known before init is reaped,
        and given once init has exited (its tree with it; else _reap gives it)."""
        asyncio.get_running_loop().remove_reader(spawned.status_read)
        result = self._launcher.report(sandbox_id)
        if result is not None and has_exited(spawned.pidfd):
            self._exited(sandbox_id, result)

    def _reap(self, sandbox_id: int, spawned: SpawnedSandbox) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(spawned.pidfd)
        loop.remove_reader(spawned.status_read)
        self._exited(sandbox_id, self._launcher.finish(sandbox_id))
        self._schedule_deadlines()

    def _schedule_deadlines(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        deadline = self._launcher.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._deadline_timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._launcher.expire()
        self._schedule_deadlines()

    async def control(self, op: str, sandbox_id: int, **args: Any) -> dict[str, Any]:
        try:
            if op == "stats":
                return {"ok": True, "stats": self._launcher.stats(sandbox_id)}
            if op == "collect":
                return {"ok": True, "usage": dataclasses.asdict(self._launcher.collect(sandbox_id))}
            if op == "update_limits":
                try:
                    update = self._launcher.update_limits(sandbox_id, args["changes"])
                except SandboxError as e:
                    return {"ok": False, "error": str(e), "field": getattr(e, "field", None)}
                return {"ok": True, "update": update.to_dict()}
            if op == "signal":
                self._launcher.signal(sandbox_id, args["signal"])
            elif op == "arm":
                self._launcher.arm(sandbox_id, args.get("at"))
                self._schedule_deadlines()  # its deadline is new
            elif op == "freeze":
                return {"ok": True, "how": self._launcher.freeze(sandbox_id)}
            else:
                getattr(self._launcher, op)(sandbox_id)
            return {"ok": True}
        except KeyError:
            return {"ok": False, "error": "no such sandbox (it has exited)"}

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sandbox_id, spawned in list(self._launcher.running.items()):
            loop.remove_reader(spawned.pidfd)
            loop.remove_reader(spawned.status_read)
            self._launcher.kill(sandbox_id)
            self._exited(sandbox_id, self._launcher.finish(sandbox_id))
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()


def _retrieved(future: asyncio.Future[Any]) -> None:
    """An exit future failed while nobody awaited it (the sandbox's call had already
    been answered) is no error worth a "never retrieved" line at exit."""
    if not future.cancelled():
        future.exception()


class ZygoteGone(SandboxError):
    """A request could not be sent: the zygote has exited."""


# Kept by name: the locale decides how the zygote's Python decodes file names.
_ZYGOTE_KEEPS = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
_ZYGOTE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ZYGOTE_MODULE = "neural_doc_flow_security.sandbox.launch.zygote"
# `python -I -c BOOT MODULE PACKAGE_ROOT FD PARENT_PID`: isolated mode ignores every
# PYTHON* variable, the user site and the working directory, so this package's root
# is put on the path by hand (it may be an editable install or on PYTHONPATH).
_ZYGOTE_BOOT = ("import importlib, sys; sys.path.insert(0, sys.argv[2]); "
                "sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))")


def zygote_environment() -> dict[str, str]:
    """The zygote's environment: the locale and time zone, a fixed PATH, nothing
    else. Every sandbox is a fork of the zygote, so its memory holds the zygote's
    original environment strings: the host's secrets (tokens, keys, PYTHON*
    variables naming the application's paths) must not be among them. The zygote
    runs Python in isolated mode (-I), which needs no PYTHON* variable."""
    env = {k: v for k, v in os.environ.items() if k in _ZYGOTE_KEEPS}
    env["PATH"] = _ZYGOTE_PATH
    return env


def zygote_sys_path() -> list[str]:
    """The zygote's sys.path: this process's, less every directory a sandbox cannot
    see (the script's directory, the working directory, the application's own
    paths): only the Python installation and this package (linux/rootfs.python_paths).
    A zygote that imported from the others would keep their file listings (the
    import system's caches) in the memory of every sandbox."""
    from ..linux.rootfs import covered, python_paths

    return [p for p in sys.path if p and covered(os.path.realpath(p), python_paths())]


def zygote_command(fd: int) -> list[str]:
    """The zygote's command line (started with cwd "/" and zygote_environment())."""
    import neural_doc_flow_security

    package_root = os.path.dirname(os.path.dirname(os.path.realpath(neural_doc_flow_security.__file__)))
    return [sys.executable, "-I", "-c", _ZYGOTE_BOOT, ZYGOTE_MODULE, package_root, str(fd), str(os.getpid())]


def _log() -> Any:
    import logging

    return logging.getLogger(__name__)


class _Zygote:
    """One zygote process and the manager's end of its socket."""

    def __init__(self, starter: ZygoteStarter) -> None:
        self.starter = starter
        self.sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.running: set[int] = set()
        self.send_lock = asyncio.Lock()
        self.dead: str | None = None
        self.preparing = False  # making a spare ahead: a launch sent now would wait for it
        self.refusing = ""  # why it starts nothing more (its template died): it exits when idle
        self.stalled = ""  # why it is out of rotation: it did not answer in time (until it does)
        self.started_at = 0.0  # monotonic

    @property
    def name(self) -> str:
        """How errors and logs name it."""
        return f"zygote {self.process.pid}" if self.process is not None else "the zygote"

    def serving(self) -> bool:
        """Whether launches may be sent to it."""
        return not self.dead and not self.refusing and not self.stalled

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Started from the event-loop thread: the zygote's parent-death signal
            # follows this thread (it is usually the main thread).
            self.process = subprocess.Popen(
                zygote_command(theirs.fileno()), pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                close_fds=True, cwd="/", env=zygote_environment(),
            )
        finally:
            theirs.close()
        self.started_at = time.monotonic()
        self.sock = ours
        ours.sendall(pickle.dumps({"op": "hello", "sys_path": zygote_sys_path(),
                                   "preload": list(self.starter.preload)}))
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        self._read_one()

    def drain(self) -> None:
        """Read everything it has sent so far."""
        while self._read_one():
            pass

    def _read_one(self) -> bool:
        """Read and act on one message; False when there was none to read."""
        if self.sock is None or self.dead:
            return False
        try:
            data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(array.array("i").itemsize))
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True  # it exited before reading all we sent: what it sent before is still queued
        fds = [fd for level, kind, payload in ancdata if level == socket.SOL_SOCKET
               and kind == socket.SCM_RIGHTS for fd in array.array("i", payload)]
        if not data:
            self.gone(f"{self.name} exited")
            return False
        self._act_on(data, fds)
        return True

    def _act_on(self, data: bytes, fds: list[int]) -> None:
        if self.stalled:
            _log().warning("%s answers again: back in rotation", self.name)
            self.stalled = ""
        message = msgpack.unpackb(data, raw=False)
        if message["op"] == "preparing":
            self.preparing = message["busy"]
            return
        if message["op"] == "refusing":
            self.refusing = message["why"]
            return
        if message["op"] == "exited":
            self.running.discard(message["id"])
            self.starter._exited(message["id"], SandboxResult.from_dict(message["result"]))
            return
        future = self.replies.pop(message["req"], None)
        if message["op"] == "started":  # its pidfd came along: the manager's own way to kill it
            self.running.add(message["id"])
            if future is None or future.done():  # nobody waits for it (the launch was given up)
                for fd in fds:
                    os.close(fd)
                self.starter._orphaned(self, message["id"])
                return
            message["pidfd"] = fds[0] if fds else -1
            if fds:  # kept from now on: an "exited" that follows at once waits for init's exit too
                self.starter._pidfds[message["id"]] = fds[0]
        else:
            for fd in fds:
                os.close(fd)
        if future is not None and not future.done():
            future.set_result(message)

    def gone(self, why: str) -> None:
        """It has exited (or was killed): what it ran fails with `why`."""
        first = self.dead is None
        self.dead = why
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        for future in self.replies.values():
            if not future.done():
                future.set_exception(SandboxError(why))
        self.replies.clear()
        for sandbox_id in list(self.running):
            self.starter._failed(sandbox_id, SandboxError(f"{why}: the sandbox died with it"))
        self.running.clear()
        if first:
            self.starter._zygote_gone(self)

    async def request(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Send a request and wait for its reply."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        message["req"] = next(self.starter._requests)
        self.replies[message["req"]] = future
        try:
            await self.send(message, fds)
            return await future
        except BaseException:
            self.replies.pop(message["req"], None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by gone() meanwhile: retrieved (this raises instead)
            raise

    async def send(self, message: dict[str, Any], fds: list[int]) -> None:
        """Send a request; one without a "req" number gets no reply. Raises ZygoteGone
        when it could not be sent: the zygote has exited or takes no more requests."""
        if self.dead or self.sock is None:
            raise ZygoteGone(self.dead or "the zygote is not running")
        try:
            await self._send(message, fds)
        except (BrokenPipeError, ConnectionResetError):
            # What it sent before (answers, results) is still to be read: gone() follows
            # at the end of it (EOF).
            self.refusing = self.refusing or "the zygote takes no more requests"
            raise ZygoteGone(f"{self.name} exited") from None

    async def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        data = pickle.dumps(message)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        if not self.send_lock.locked() and self.sock is not None:  # nobody waits before us: keep the order
            try:
                self.sock.sendmsg([data], ancillary)
                return
            except BlockingIOError:
                pass
        # The zygote is behind. One sender at a time waits for the socket to drain: the
        # event loop keeps a single writer callback per fd.
        async with self.send_lock:
            while True:
                if self.dead or self.sock is None:
                    raise ZygoteGone(self.dead or "the zygote is not running")
                try:
                    self.sock.sendmsg([data], ancillary)
                    return
                except BlockingIOError:
                    writable: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(self.sock.fileno(), _resolve_once, writable)
                    try:
                        await writable
                    finally:
                        loop.remove_writer(self.sock.fileno())

    async def close(self) -> None:
        if self.sock is not None:
            if not self.dead:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()  # EOF: the zygote kills its sandboxes and exits
            self.sock = None
        if self.process is not None:
            try:
                await asyncio.wait_for(_reaped(self.process), CLOSE_WAIT)
            except TimeoutError:  # stopped, or stuck: it must not outlive the manager
                _log().error("%s did not exit within %ss of the shutdown: killed", self.name, CLOSE_WAIT)
                self.process.kill()
                await _reaped(self.process)
        self.gone(self.dead or "the manager was shut down")


async def _reaped(process: subprocess.Popen[bytes]) -> int:
    """Wait for a child to exit (through its pidfd: no thread) and reap it."""
    if process.returncode is not None:
        return process.returncode
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return process.wait()
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, _resolve_once, exited)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return process.wait()


def _resolve_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _timeout_of(request: LaunchRequest) -> float | None:
    """The launch's wall timeout, if it is one (the zygote refuses any other value)."""
    timeout = request.config.timeout_seconds
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < float("inf"):
        return float(timeout)
    return None


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


CLOSE_WAIT = 10.0  # seconds a zygote gets to end its sandboxes and exit at shutdown
DEADLINE_GRACE = 1.0  # the manager kills a sandbox itself this long after its zygote should have
LAUNCH_ANSWER_WAIT = 10.0  # a zygote that answers no request within this (a launch: or its timeout) is stalled
STALLED_KILL_AFTER = 60.0  # seconds a stalled zygote has to answer again before it is killed and replaced
WAIT_FOR_ZYGOTE = 30.0  # a launch waits this long for a zygote to serve it (one restarting or stalled)
STABLE_AFTER = 5.0  # a zygote that died sooner than this after its start died "at start"
MAX_FAILED_STARTS = 5  # in a row, in one slot: then it is not restarted (reported)
RESTART_BACKOFF = 0.1  # seconds before the second restart in a row; doubles each time
MAX_RESTART_BACKOFF = 5.0


@dataclasses.dataclass(frozen=True)
class ZygoteStats:
    """The zygotes of a manager."""

    alive: int  # serving launches
    stalled: int  # alive but out of rotation (did not answer in time)
    restarted: int  # replacements started since the manager started
    given_up: int  # slots whose zygote kept dying at start (not restarted)


class ZygoteStarter(StartMethod):
    """Sandboxes are started by `count` zygote processes (default: one per CPU, at
    most 4), each over its own SOCK_SEQPACKET socket. A zygote spends much of a
    launch waiting on the kernel (cgroup migration, namespace set-up), so more
    than one keeps the CPUs busy.

    Supervised: a zygote that exits (killed, crashed, its template died) is replaced
    in the background, at once the first time, with a growing pause when one keeps
    dying at start, and not any more after MAX_FAILED_STARTS such deaths in a row
    (logged as an error; launches then go to the others, or fail saying why). A
    sandbox's wall timeout is enforced here too, through the pidfd its zygote sent:
    a zygote that misses a deadline (stopped, stuck) is out of rotation until it
    answers again."""

    def __init__(self, count: int | None = None, preload: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.preload = preload  # modules each zygote imports before it forks its template
        self._zygotes = [_Zygote(self) for _ in range(count or min(4, os.cpu_count() or 1))]
        self._owner: dict[int, _Zygote] = {}
        self._requests = itertools.count(1)
        self._pidfds: dict[int, int] = {}  # by sandbox id: its init, to kill it without the zygote
        self._timeouts: dict[int, float] = {}  # by sandbox id: its wall timeout (seconds)
        self._init_ending: set[int] = set()  # result in, init not yet exited (pidfd watched)
        self._watchdogs: dict[int, asyncio.TimerHandle] = {}
        self._failed_starts = [0] * len(self._zygotes)  # by slot, in a row
        self._given_up: dict[int, str] = {}  # slot -> why it is not restarted
        self._restarting: set[int] = set()  # slots whose replacement is pending
        self._tasks: set[asyncio.Task[Any]] = set()
        self._departed: list[_Zygote] = []  # exited, being reaped and replaced
        self.restarted = 0
        self._supervising = False

    @property
    def pid(self) -> int | None:
        """The first zygote's pid."""
        process = self._zygotes[0].process
        return process.pid if process else None

    @property
    def pids(self) -> list[int]:
        """Every zygote's pid."""
        return [z.process.pid for z in self._zygotes if z.process is not None]

    def zygote_stats(self) -> ZygoteStats:
        """How many zygotes serve, are stalled, were restarted or given up."""
        return ZygoteStats(alive=sum(z.serving() for z in self._zygotes),
                           stalled=sum(bool(not z.dead and z.stalled) for z in self._zygotes),
                           restarted=self.restarted, given_up=len(self._given_up))

    async def start(self) -> None:
        for zygote in self._zygotes:
            zygote.start()
        self._supervising = True

    # -- supervision ----------------------------------------------------------

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _zygote_gone(self, zygote: _Zygote) -> None:
        if not self._supervising or zygote not in self._zygotes:
            return
        slot = self._zygotes.index(zygote)
        self._restarting.add(slot)
        self._departed.append(zygote)
        self._background(self._replace(slot, zygote))

    async def _replace(self, slot: int, old: _Zygote) -> None:
        try:
            status = "gone"
            if old.process is not None:
                try:
                    status = _describe_exit(await asyncio.wait_for(_reaped(old.process), CLOSE_WAIT))
                except TimeoutError:  # it closed its socket but does not exit: end it
                    old.process.kill()
                    status = _describe_exit(await _reaped(old.process))
            await old.close()
            self._departed.remove(old)
            at_start = time.monotonic() - old.started_at < STABLE_AFTER
            self._failed_starts[slot] = self._failed_starts[slot] + 1 if at_start else 0
            # The dead zygote's cgroups (its sandboxes died with it), off the loop: killing and
            # removing them waits for the kernel, while the other zygotes' sandboxes are served.
            await asyncio.to_thread(self._remove_leftovers)
            if self._failed_starts[slot] >= MAX_FAILED_STARTS:
                why = (f"{old.name} {status}: the zygotes of this slot died within {STABLE_AFTER}s of their start "
                       f"{self._failed_starts[slot]} times in a row; not restarted")
                self._given_up[slot] = why
                _log().error("%s", why)
                audit.zygote_given_up(why)
                return
            if self._failed_starts[slot] > 1:
                await asyncio.sleep(min(MAX_RESTART_BACKOFF, RESTART_BACKOFF * 2 ** (self._failed_starts[slot] - 2)))
            if not self._supervising:
                return
            new = _Zygote(self)
            new.start()
            self._zygotes[slot] = new
            self.restarted += 1
            _log().warning("%s %s (%s): replaced by %s (restart %d)", old.name, status, old.dead,
                           new.name, self.restarted)
            audit.zygote_replaced(old.process.pid if old.process else None, status,
                                  new.process.pid if new.process else None, self.restarted)
        except Exception:
            _log().exception("cannot replace %s", old.name)
            self._given_up[slot] = f"{old.name} could not be replaced (see the log)"
        finally:
            self._restarting.discard(slot)

    def _remove_leftovers(self) -> None:
        from ..linux.cgroups import remove_stale_cgroups

        try:
            remove_stale_cgroups()
        except (OSError, SandboxError) as e:
            _log().info("cannot remove the cgroups of a dead zygote: %s", e)

    def _why_none(self) -> str:
        reasons = [*self._given_up.values()] + [z.dead or z.refusing or z.stalled for z in self._zygotes]
        return "no zygote can start sandboxes: " + "; ".join(dict.fromkeys(r for r in reasons if r))

    # -- launching ------------------------------------------------------------

    async def spawn(self, sandbox_id: int, request: LaunchRequest, fds: dict[int, int]) -> int:
        ended = self.exit_future(sandbox_id)
        try:
            zygote, reply = await self._launch(sandbox_id, request, fds)
        except BaseException:
            if not ended.done():
                self._exits.pop(sandbox_id, None)
            raise
        if ended.done() or sandbox_id not in zygote.running:  # it has ended already (its pidfd is closed)
            return int(reply["pid"])
        self._owner[sandbox_id] = zygote
        self.isolation[sandbox_id] = IsolationReport.from_dict(reply["isolation"])
        self.counters[sandbox_id] = tuple(reply["counters"])
        timeout = _timeout_of(request)
        if timeout is not None:
            self._timeouts[sandbox_id] = timeout
            if request.armed:
                self._watch(sandbox_id, time.monotonic())
        return int(reply["pid"])

    async def _launch(self, sandbox_id: int, request: LaunchRequest,
                      fds: dict[int, int]) -> tuple[_Zygote, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + WAIT_FOR_ZYGOTE
        answer_within = max(LAUNCH_ANSWER_WAIT, (_timeout_of(request) or 0.0) + DEADLINE_GRACE)
        while True:
            serving = [z for z in self._zygotes if z.serving()]
            if not serving:
                # One is being replaced, or stalled: it may serve soon.
                waiting = self._restarting or any(not z.dead and not z.refusing for z in self._zygotes)
                if waiting and loop.time() < give_up_at and self._supervising:
                    await asyncio.sleep(0.02)
                    continue
                raise SandboxError(self._why_none())
            zygote = min(serving, key=lambda z: (len(z.running) + len(z.replies), z.preparing))
            message = {"op": "spawn", "id": sandbox_id, "request": request, "targets": list(fds)}
            try:
                reply = await asyncio.wait_for(zygote.request(message, list(fds.values())), answer_within)
            except ZygoteGone as e:  # the request never left
                reply = {"op": "failed", "elsewhere": True, "error": str(e)}
            except TimeoutError:
                why = f"{zygote.name} did not answer a launch within {answer_within:.1f}s"
                self._stalled(zygote, why)
                raise SandboxError(f"{why}: it is out of rotation until it answers") from None
            if reply["op"] == "started":
                return zygote, reply
            if not reply.get("elsewhere"):
                if reply.get("protection"):
                    raise UnsupportedError(reply["protection"], reply["reason"])
                raise SandboxError(reply["error"])
            # Nothing was started (the zygote is gone, or its template): another zygote takes it.
            zygote.refusing = zygote.refusing or reply["error"]

    def _stalled(self, zygote: _Zygote, why: str) -> None:
        if not zygote.stalled and not zygote.dead:
            _log().error("%s: out of rotation until it answers", why)
            zygote.stalled = why
            asyncio.get_running_loop().call_later(STALLED_KILL_AFTER, self._end_if_stalled, zygote, why)

    def _end_if_stalled(self, zygote: _Zygote, why: str) -> None:
        """Still no answer long after it stalled: it is killed (and replaced)."""
        if zygote.stalled == why and not zygote.dead and zygote.process is not None and self._supervising:
            _log().error("%s: no answer for %ss more: killed", why, STALLED_KILL_AFTER)
            zygote.process.kill()

    def _orphaned(self, zygote: _Zygote, sandbox_id: int) -> None:
        """A sandbox started for a launch that was given up: end it."""
        async def kill() -> None:
            with contextlib.suppress(SandboxError):
                await zygote.send({"op": "kill", "id": sandbox_id}, [])

        self._background(kill())

    def _exited(self, sandbox_id: int, result: SandboxResult) -> None:
        pidfd = self._pidfds.get(sandbox_id)
        if pidfd is not None and not has_exited(pidfd):
            # Init reports (the payload has ended) before it exits itself, and its tree
            # ends with it: whoever gets the result finds no process of the sandbox.
            self._init_ending.add(sandbox_id)
            finish = super()._exited

            def init_exited() -> None:
                self._init_ending.discard(sandbox_id)
                asyncio.get_running_loop().remove_reader(pidfd)
                finish(sandbox_id, result)

            asyncio.get_running_loop().add_reader(pidfd, init_exited)
            return
        super()._exited(sandbox_id, result)

    def _forget(self, sandbox_id: int) -> None:
        super()._forget(sandbox_id)
        self._owner.pop(sandbox_id, None)
        self._timeouts.pop(sandbox_id, None)
        watchdog = self._watchdogs.pop(sandbox_id, None)
        if watchdog is not None:
            watchdog.cancel()
        pidfd = self._pidfds.pop(sandbox_id, None)
        if pidfd is not None:
            if sandbox_id in self._init_ending:  # its zygote died meanwhile: _failed() tells
                self._init_ending.discard(sandbox_id)
                asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    # -- the manager's own deadline -------------------------------------------

    def _watch(self, sandbox_id: int, armed_at: float) -> None:
        """Its zygote kills it at its deadline; this fires DEADLINE_GRACE later, in case it did not."""
        timeout = self._timeouts.get(sandbox_id)
        if timeout is None or not self.running(sandbox_id):
            return
        old = self._watchdogs.pop(sandbox_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, armed_at + timeout + DEADLINE_GRACE - time.monotonic())
        self._watchdogs[sandbox_id] = loop.call_later(delay, self._overdue, sandbox_id)

    def _overdue(self, sandbox_id: int) -> None:
        self._watchdogs.pop(sandbox_id, None)
        zygote = self._owner.get(sandbox_id)
        if zygote is None or not self.running(sandbox_id):
            return
        zygote.drain()  # its result may be waiting in the socket
        if not self.running(sandbox_id):
            return
        timeout = self._timeouts.get(sandbox_id)
        self._kill_directly(sandbox_id)
        why = f"{zygote.name} did not end sandbox {sandbox_id} at its wall timeout of {timeout}s"
        self._stalled(zygote, why)
        zygote.running.discard(sandbox_id)
        self._exited(sandbox_id, SandboxResult(
            Outcome.TIMEOUT, signal=signal.SIGKILL, isolation=self.isolation.get(sandbox_id) or IsolationReport(),
            error=f"wall timeout of {timeout}s (enforced by the manager: {zygote.name} did not answer)"))

    async def _ask_report(self, sandbox_id: int) -> None:
        """Before a kill: let a reporting init (a pid namespace's, which ignores the signal
        when it holds no listener) write what its listener counted (bounded wait)."""
        pidfd = self._pidfds.get(sandbox_id)
        isolation = self.isolation.get(sandbox_id)
        if pidfd is not None and isolation is not None and "pid" in isolation.namespaces:
            await ask_report_async(pidfd)  # the manager's loop goes on serving meanwhile

    def _kill_directly(self, sandbox_id: int) -> None:
        """SIGKILL the sandbox's init through its pidfd (its pid namespace goes with it)."""
        pidfd = self._pidfds.get(sandbox_id)
        if pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    # -- control --------------------------------------------------------------

    async def control(self, op: str, sandbox_id: int, **args: Any) -> dict[str, Any]:
        zygote = self._owner.get(sandbox_id)
        if zygote is None:
            return {"ok": False, "error": "no such sandbox (it has exited)"}
        if op == "kill":  # at once, whether or not its zygote answers; the zygote then ends the rest
            await self._ask_report(sandbox_id)
            self._kill_directly(sandbox_id)
            with contextlib.suppress(ZygoteGone):
                await zygote.send({"op": "kill", "id": sandbox_id}, [])
            return {"ok": True}
        try:
            return await asyncio.wait_for(zygote.request({"op": op, "id": sandbox_id, **args}, []),
                                          LAUNCH_ANSWER_WAIT)
        except TimeoutError:
            why = f"{zygote.name} did not answer {op!r} within {LAUNCH_ANSWER_WAIT}s"
            self._stalled(zygote, why)
            return {"ok": False, "error": why}

    async def notify(self, op: str, sandbox_id: int, **args: Any) -> None:
        zygote = self._owner.get(sandbox_id)
        if zygote is None:
            return  # it has exited
        if op == "arm":
            self._watch(sandbox_id, args.get("at") or time.monotonic())
        if op == "kill":
            self._kill_directly(sandbox_id)
        await zygote.send({"op": op, "id": sandbox_id, **args}, [])

    async def close(self) -> None:
        """Kill every running sandbox, wait (bounded) for their results, stop the zygotes."""
        self._supervising = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [(z, i) for z in self._zygotes if not z.dead for i in list(z.running)]
        for _, sandbox_id in running:
            self._kill_directly(sandbox_id)
        with contextlib.suppress(TimeoutError):  # a stopped zygote's full socket: its sandboxes are killed above
            await asyncio.wait_for(asyncio.gather(*(z.send({"op": "kill", "id": i}, []) for z, i in running),
                                                  return_exceptions=True), CLOSE_WAIT)
        exits = [self._exits[i] for _, i in running if i in self._exits]
        if exits:
            await asyncio.wait(exits, timeout=CLOSE_WAIT)
        await asyncio.gather(*(z.close() for z in self._zygotes + self._departed))
