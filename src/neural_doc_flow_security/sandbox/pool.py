"""A warm pool: sandboxes set up to the moment before the payload, each used once.

Every protection is already in force in a pooled sandbox; it waits (with no wall
clock running) for its one call, and says so once it is warm. After use it is
thrown away like any other sandbox, so no state passes from one document to the
next. The pool refills in the background.

A pooled call costs one message each way on the sandbox's channel; the launcher
is told to start the wall clock and, after the answer, to kill the sandbox,
without a reply being awaited; the usage is read from the cgroup's counter
files, opened while the sandbox waited (launch/counters.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import SandboxError

if TYPE_CHECKING:
    from .api import SandboxHandle

log = logging.getLogger(__name__)


class WarmPool:
    """Keeps up to `size` idle sandboxes made by `create`."""

    def __init__(self, size: int, create: Callable[[], Awaitable[SandboxHandle]]) -> None:
        self.size = size
        self._create = create
        self._idle: deque[SandboxHandle] = deque()
        self._filling: asyncio.Task[None] | None = None
        self._closed = False
        self.failures = 0

    def start(self) -> None:
        """Begin filling."""
        self._kick()

    @property
    def idle(self) -> int:
        """Sandboxes ready (or getting ready) for a call."""
        from .api import Health

        return sum(h.health is Health.RUNNING for h in self._idle)

    def take(self) -> SandboxHandle | None:
        """An idle, live sandbox, or None when the pool is empty (the caller then
        starts one cold): the oldest of those waiting for their call, else the
        oldest still setting up. Call refill() once the taken sandbox's call is done:
        refilling while it runs would compete with it for the CPU and the zygote."""
        from .api import Health

        for dead in [h for h in self._idle if h.health is not Health.RUNNING]:
            self._idle.remove(dead)
        oldest = self._idle[0] if self._idle else None
        handle = next((h for h in self._idle if h._prepared.done()), oldest)
        if handle is not None:
            self._idle.remove(handle)
        return handle

    def refill(self) -> None:
        """Start topping the pool up again (in the background)."""
        self._kick()

    async def wait_ready(self) -> None:
        """Wait until the pool is full (or a refill failed) and every sandbox in it
        waits for its call."""
        while not self._closed:
            if self._filling is not None and not self._filling.done():
                await asyncio.wait([self._filling])
                continue
            setting_up = [h._prepared for h in self._idle if not h._prepared.done()]
            if not setting_up:
                return
            await asyncio.wait(setting_up)

    def _kick(self) -> None:
        if not self._closed and (self._filling is None or self._filling.done()):
            self._filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        while not self._closed and len(self._idle) < self.size:
            try:
                handle = await self._create()
            except SandboxError as e:
                self.failures += 1
                log.warning("warm pool: cannot start a sandbox: %s", e)
                return  # the next take() tries again; no hot retry loop
            if self._closed:
                await handle.kill()
                return
            self._idle.append(handle)

    async def close(self) -> None:
        """Stop refilling and kill the idle sandboxes."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, SandboxError):
                await self._filling
        while self._idle:
            with contextlib.suppress(SandboxError):
                await self._idle.popleft().kill()
