"""Relaunch back-off for plugins whose sandboxes violate the channel protocol.

A sandbox that sends a frame the host refuses is killed at once, so a hostile
plugin can only "flood" the manager by being launched again and again: each
launch costs the host a few milliseconds of CPU in the zygote, the template and
the kernel, which a frame of garbage costs the plugin nothing to trigger. The
plugin id is chosen by the caller, never by the sandbox, so it is the unit of
blame: after a violation, the next launch of that plugin waits, 0.1 s after the
first violation, doubling with each further one up to a cap, until the plugin
has gone `forget_after` seconds without one. Other plugins are never delayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

FIRST_DELAY_SECONDS = 0.1
FORGET_AFTER_SECONDS = 60.0
MAX_PLUGINS_REMEMBERED = 4096


@dataclass
class _Streak:
    violations: int
    last: float
    not_before: float


class RelaunchBackoff:
    """Per plugin id: how long its next launch must wait after protocol violations.
    `cap_seconds` bounds one wait (None or 0: no back-off at all)."""

    def __init__(self, cap_seconds: float | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._cap = cap_seconds or 0.0
        self._clock = clock
        self._streaks: dict[str, _Streak] = {}

    def violated(self, plugin_id: str) -> None:
        """A sandbox of `plugin_id` violated the protocol: lengthen its wait."""
        if self._cap <= 0:
            return
        now = self._clock()
        streak = self._streaks.get(plugin_id)
        violations = 1 if streak is None or now - streak.last > FORGET_AFTER_SECONDS else streak.violations + 1
        delay = min(FIRST_DELAY_SECONDS * 2 ** min(violations - 1, 32), self._cap)
        self._streaks[plugin_id] = _Streak(violations, now, now + delay)
        if len(self._streaks) > MAX_PLUGINS_REMEMBERED:
            self._forget_old(now)

    def delay(self, plugin_id: str) -> float:
        """Seconds the next launch of `plugin_id` must still wait (0.0: none)."""
        streak = self._streaks.get(plugin_id)
        return 0.0 if streak is None else max(0.0, streak.not_before - self._clock())

    async def wait_turn(self, plugin_id: str) -> None:
        """Sleep until `plugin_id` may be launched again."""
        while (delay := self.delay(plugin_id)) > 0:
            await asyncio.sleep(delay)

    def throttled(self) -> int:
        """How many plugins must wait before their next launch now."""
        now = self._clock()
        return sum(streak.not_before > now for streak in self._streaks.values())

    def _forget_old(self, now: float) -> None:
        for plugin_id, streak in list(self._streaks.items()):
            if now - streak.last > FORGET_AFTER_SECONDS:
                del self._streaks[plugin_id]
        while len(self._streaks) > MAX_PLUGINS_REMEMBERED:  # all recent: drop the oldest
            del self._streaks[min(self._streaks, key=lambda p: self._streaks[p].last)]
