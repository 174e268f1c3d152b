"""The one small interface both cgroup backends (v1, v2) implement."""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class CgroupLimits:
    """Limits for one sandbox cgroup. None means: no limit of that kind.

    `cpu_quota_percent`: 100 = one full CPU (quota == period), 50 = half a CPU.
    `io_devices`: "MAJOR:MINOR" of the block devices the I/O limits apply to.
    `swap_bytes`: swap the sandbox may use beyond memory (0 = none).
    """

    memory_bytes: int | None = None
    memory_high_bytes: int | None = None
    swap_bytes: int = 0
    cpu_quota_percent: int | None = None
    max_processes: int | None = None
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None
    io_devices: tuple[str, ...] = ()

    @property
    def io_requested(self) -> bool:
        return any(v is not None for v in (self.io_read_bps, self.io_write_bps,
                                           self.io_read_iops, self.io_write_iops))


@dataclass(frozen=True)
class CgroupStats:
    """Resource usage read from the kernel's cgroup files."""

    memory_current_bytes: int = 0
    memory_peak_bytes: int = 0
    oom_kills: int = 0
    cpu_usage_usec: int = 0
    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    cpu_nr_throttled: int = 0
    cpu_throttled_usec: int = 0
    pids_current: int = 0
    pids_peak: int = 0
    pids_limit_hits: int = 0  # forks refused because pids.max was reached
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    frozen: bool = False


class SandboxCgroup(abc.ABC):
    """One sandbox's cgroup (one directory per hierarchy on v1, one on v2).

    Lifecycle: create (by the backend's factory) -> apply(limits) -> add_process
    (before the child runs anything untrusted) -> stats/freeze/thaw/update while it
    runs -> kill -> destroy. destroy() is idempotent and never raises for a
    cgroup that is already gone.
    """

    version: str  # "v1" or "v2"
    _limits: CgroupLimits | None = None

    @property
    def limits(self) -> CgroupLimits:
        """The limits last applied (none: unlimited)."""
        return self._limits or CgroupLimits()

    @abc.abstractmethod
    def apply(self, limits: CgroupLimits) -> None:
        """Write the limits; a limit whose controller is missing raises UnsupportedError."""

    def update(self, limits: CgroupLimits) -> None:
        """Change limits while the sandbox runs."""
        self.apply(limits)

    @abc.abstractmethod
    def add_process(self, pid: int) -> None:
        """Move `pid` (a child that has not yet run untrusted code) into this cgroup."""

    def clone_into_fd(self) -> int | None:
        """A directory fd for clone3(CLONE_INTO_CGROUP), or None (v1: use add_process)."""
        return None

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """Current usage and peaks."""

    @abc.abstractmethod
    def freeze(self) -> None:
        """Stop every process in the cgroup; returns once they are frozen."""

    @abc.abstractmethod
    def thaw(self) -> None:
        """Undo freeze()."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process in the cgroup; returns once it is empty."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Kill what is left and remove the cgroup directories."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Human-readable: version, controllers and paths (for the isolation report)."""


@dataclass(frozen=True)
class ControllerSupport:
    """Whether one controller (memory, cpu, pids, io/blkio, freezer) is usable here."""

    name: str
    version: str  # "v1", "v2" or "" when absent
    parent: str  # the directory below which sandbox cgroups would be created
    usable: bool
    reason: str = ""  # why not usable


@dataclass(frozen=True)
class CgroupSupport:
    """What the cgroup backends can do on this host, probed once."""

    controllers: tuple[ControllerSupport, ...] = ()

    def get(self, name: str) -> ControllerSupport | None:
        return next((c for c in self.controllers if c.name == name), None)
