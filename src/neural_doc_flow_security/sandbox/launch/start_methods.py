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
import os
import pickle
import socket
import subprocess
import sys
import time
from typing import Any

import msgpack

from ..errors import SandboxError, UnsupportedError
from ..result import SandboxResult
from .launcher import Launcher, LaunchRequest


class StartMethod(abc.ABC):
    """Starts sandboxes and reports their ends."""

    def __init__(self) -> None:
        self._exits: dict[int, asyncio.Future[SandboxResult]] = {}

    def exit_future(self, sandbox_id: int) -> asyncio.Future[SandboxResult]:
        """Resolves with the sandbox's result when it has ended and been reaped."""
        if sandbox_id not in self._exits:
            self._exits[sandbox_id] = asyncio.get_running_loop().create_future()
        return self._exits[sandbox_id]

    def _exited(self, sandbox_id: int, result: SandboxResult) -> None:
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
        """kill, freeze, thaw, signal(signal=N) or stats; returns the reply."""

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
        asyncio.get_running_loop().add_reader(spawned.pidfd, self._reap, sandbox_id, spawned.pidfd)
        self._schedule_deadlines()
        return spawned.pid

    def _reap(self, sandbox_id: int, pidfd: int) -> None:
        asyncio.get_running_loop().remove_reader(pidfd)
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
            if op == "signal":
                self._launcher.signal(sandbox_id, args["signal"])
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
            self._launcher.kill(sandbox_id)
            self._exited(sandbox_id, self._launcher.finish(sandbox_id))
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()


class ZygoteStarter(StartMethod):
    """Talk to a zygote process over a SOCK_SEQPACKET socket."""

    def __init__(self) -> None:
        super().__init__()
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._unpacker = msgpack.Unpacker(raw=False)
        self._dead: str | None = None

    @property
    def pid(self) -> int | None:
        """The zygote's pid."""
        return self._process.pid if self._process else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Started from the event-loop thread: the zygote's parent-death signal
            # follows this thread (it is usually the main thread).
            self._process = subprocess.Popen(
                [sys.executable, "-m", "neural_doc_flow_security.sandbox.launch.zygote",
                 str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            theirs.close()
        self._sock = ours
        ours.sendall(pickle.dumps({"op": "hello", "sys_path": sys.path}))
        ours.setblocking(False)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self._zygote_gone("the zygote exited")
            return
        message = msgpack.unpackb(data, raw=False)
        sandbox_id = message.get("id")
        if message["op"] == "exited":
            self._exited(sandbox_id, SandboxResult.from_dict(message["result"]))
            return
        future = self._replies.pop(sandbox_id, None)
        if future is not None and not future.done():
            future.set_result(message)

    def _zygote_gone(self, why: str) -> None:
        self._dead = why
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        for future in list(self._replies.values()) + list(self._exits.values()):
            if not future.done():
                future.set_exception(SandboxError(why))
        self._replies.clear()

    async def _request(self, message: dict[str, Any], fds: list[int] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        if self._dead or self._sock is None:
            raise SandboxError(self._dead or "the zygote is not running")
        sandbox_id = message.get("id")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[sandbox_id] = future  # type: ignore[index]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self._sock.sendmsg([pickle.dumps(message)], ancillary)
        return await future

    async def spawn(self, sandbox_id: int, request: LaunchRequest, fds: dict[int, int]) -> int:
        reply = await self._request(
            {"op": "spawn", "id": sandbox_id, "request": request, "targets": list(fds)}, list(fds.values()))
        if reply["op"] == "failed":
            if reply.get("protection"):
                raise UnsupportedError(reply["protection"], reply["reason"])
            raise SandboxError(reply["error"])
        self.exit_future(sandbox_id)
        return int(reply["pid"])

    async def control(self, op: str, sandbox_id: int, **args: Any) -> dict[str, Any]:
        return await self._request({"op": op, "id": sandbox_id, **args})

    async def close(self) -> None:
        if self._sock is not None:
            if not self._dead:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()  # EOF: the zygote kills its sandboxes and exits
            self._sock = None
        if self._process is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._process.wait)
        self._dead = self._dead or "the manager was shut down"
        for future in self._exits.values():
            if not future.done():
                future.set_exception(SandboxError(self._dead))
