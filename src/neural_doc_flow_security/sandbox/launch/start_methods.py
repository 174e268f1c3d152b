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
import dataclasses
import itertools
import os
import pickle
import socket
import subprocess
import sys
import time
from typing import Any

import msgpack

from ..errors import SandboxError, UnsupportedError
from ..result import IsolationReport, SandboxResult
from .counters import counter_files
from .launcher import Launcher, LaunchRequest
from .spawn import SpawnedSandbox


class StartMethod(abc.ABC):
    """Starts sandboxes and reports their ends."""

    def __init__(self) -> None:
        self._exits: dict[int, asyncio.Future[SandboxResult]] = {}
        self.isolation: dict[int, IsolationReport] = {}  # by sandbox id, known once started
        self.counters: dict[int, tuple[str, ...]] = {}  # its usage counter files (launch/counters.py)

    def exit_future(self, sandbox_id: int) -> asyncio.Future[SandboxResult]:
        """Resolves with the sandbox's result when it has ended and been reaped."""
        if sandbox_id not in self._exits:
            self._exits[sandbox_id] = asyncio.get_running_loop().create_future()
        return self._exits[sandbox_id]

    def _exited(self, sandbox_id: int, result: SandboxResult) -> None:
        self.isolation.pop(sandbox_id, None)
        self.counters.pop(sandbox_id, None)
        future = self.exit_future(sandbox_id)
        if not future.done():
            future.set_result(result)

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
        if not reply.get("ok") and not self.exit_future(sandbox_id).done():
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
        loop.add_reader(spawned.status_read, self._report, sandbox_id, spawned.status_read)
        loop.add_reader(spawned.pidfd, self._reap, sandbox_id, spawned)
        self._schedule_deadlines()
        return spawned.pid

    def _report(self, sandbox_id: int, status_read: int) -> None:
        """Init reported the payload's end: the result is known before init is reaped."""
        asyncio.get_running_loop().remove_reader(status_read)
        result = self._launcher.report(sandbox_id)
        if result is not None:
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


class ZygoteGone(SandboxError):
    """A request could not be sent: the zygote has exited."""


def zygote_environment() -> dict[str, str]:
    """The zygote's environment: what Python needs to start as this one did, nothing
    else. Every sandbox is a fork of the zygote, so its memory holds the zygote's
    original environment strings: the host's secrets (tokens, keys in variables)
    must not be among them."""
    keep = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
    return {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYTHON")}


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

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Started from the event-loop thread: the zygote's parent-death signal
            # follows this thread (it is usually the main thread).
            self.process = subprocess.Popen(
                [sys.executable, "-m", "neural_doc_flow_security.sandbox.launch.zygote",
                 str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                env=zygote_environment(),
            )
        finally:
            theirs.close()
        self.sock = ours
        ours.sendall(pickle.dumps({"op": "hello", "sys_path": sys.path}))
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except ConnectionResetError:
            return  # it exited before reading all we sent: what it sent before is still queued
        if not data:
            self.gone("the zygote exited")
            return
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
        if future is not None and not future.done():
            future.set_result(message)

    def gone(self, why: str) -> None:
        self.dead = why
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        for future in self.replies.values():
            if not future.done():
                future.set_exception(SandboxError(why))
        for sandbox_id in self.running:
            exit_future = self.starter.exit_future(sandbox_id)
            if not exit_future.done():
                exit_future.set_exception(SandboxError(why))
        self.replies.clear()

    async def request(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Send a request and wait for its reply."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        message["req"] = next(self.starter._requests)
        self.replies[message["req"]] = future
        try:
            await self.send(message, fds)
        except BaseException:
            self.replies.pop(message["req"], None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by gone() meanwhile: retrieved (this raises instead)
            raise
        return await future

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
            raise ZygoteGone("the zygote exited") from None

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
            await asyncio.get_running_loop().run_in_executor(None, self.process.wait)
        self.gone(self.dead or "the manager was shut down")


def _resolve_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ZygoteStarter(StartMethod):
    """Sandboxes are started by `count` zygote processes (default: one per CPU, at
    most 4), each over its own SOCK_SEQPACKET socket. A zygote spends much of a
    launch waiting on the kernel (cgroup migration, namespace set-up), so more
    than one keeps the CPUs busy."""

    def __init__(self, count: int | None = None) -> None:
        super().__init__()
        self._zygotes = [_Zygote(self) for _ in range(count or min(4, os.cpu_count() or 1))]
        self._owner: dict[int, _Zygote] = {}
        self._requests = itertools.count(1)

    @property
    def pid(self) -> int | None:
        """The first zygote's pid."""
        process = self._zygotes[0].process
        return process.pid if process else None

    @property
    def pids(self) -> list[int]:
        """Every zygote's pid."""
        return [z.process.pid for z in self._zygotes if z.process is not None]

    async def start(self) -> None:
        for zygote in self._zygotes:
            zygote.start()

    async def spawn(self, sandbox_id: int, request: LaunchRequest, fds: dict[int, int]) -> int:
        while True:
            alive = [z for z in self._zygotes if not z.dead and not z.refusing]
            if not alive:
                first = self._zygotes[0]
                raise SandboxError(first.dead or first.refusing or "no zygote is running")
            zygote = min(alive, key=lambda z: (len(z.running) + len(z.replies), z.preparing))
            self._owner[sandbox_id] = zygote
            zygote.running.add(sandbox_id)
            try:
                reply = await zygote.request(
                    {"op": "spawn", "id": sandbox_id, "request": request, "targets": list(fds)}, list(fds.values()))
            except ZygoteGone as e:  # the request never left
                reply = {"op": "failed", "elsewhere": True, "error": str(e)}
            except BaseException:
                self._drop_launch(zygote, sandbox_id)
                raise
            if reply["op"] == "started":
                break
            self._drop_launch(zygote, sandbox_id)
            if not reply.get("elsewhere"):
                if reply.get("protection"):
                    raise UnsupportedError(reply["protection"], reply["reason"])
                raise SandboxError(reply["error"])
            # Nothing was started (the zygote is gone, or its template): another zygote takes it.
            zygote.refusing = zygote.refusing or reply["error"]
        self.exit_future(sandbox_id).add_done_callback(lambda _: self._owner.pop(sandbox_id, None))
        self.isolation[sandbox_id] = IsolationReport.from_dict(reply["isolation"])
        self.counters[sandbox_id] = tuple(reply["counters"])
        return int(reply["pid"])

    def _drop_launch(self, zygote: _Zygote, sandbox_id: int) -> None:
        """Forget a launch that did not start, with the exit future that gone() may
        have failed meanwhile (nobody awaits it)."""
        zygote.running.discard(sandbox_id)
        self._owner.pop(sandbox_id, None)
        failed = self._exits.pop(sandbox_id, None)
        if failed is not None and failed.done() and not failed.cancelled():
            failed.exception()  # retrieved

    async def control(self, op: str, sandbox_id: int, **args: Any) -> dict[str, Any]:
        zygote = self._owner.get(sandbox_id)
        if zygote is None:
            return {"ok": False, "error": "no such sandbox (it has exited)"}
        return await zygote.request({"op": op, "id": sandbox_id, **args}, [])

    async def notify(self, op: str, sandbox_id: int, **args: Any) -> None:
        zygote = self._owner.get(sandbox_id)
        if zygote is not None:  # else it has exited
            await zygote.send({"op": op, "id": sandbox_id, **args}, [])

    async def close(self) -> None:
        """Kill every running sandbox, wait (bounded) for their results, stop the zygotes."""
        running = [(z, i) for z in self._zygotes if not z.dead for i in list(z.running)]
        await asyncio.gather(*(z.request({"op": "kill", "id": i}, []) for z, i in running),
                             return_exceptions=True)
        exits = [self.exit_future(i) for _, i in running]
        if exits:
            await asyncio.wait(exits, timeout=10.0)
        await asyncio.gather(*(z.close() for z in self._zygotes))
