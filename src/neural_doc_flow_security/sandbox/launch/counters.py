"""A sandbox's usage counters, read by the manager itself: the cgroup's counter
files, opened ahead of time and read with pread.

The launcher names the files when it starts a sandbox (`counter_files`); the
manager opens them (`UsageCounters`) and reads them the moment a callable has
answered: a few syscalls, no round trip to the zygote. The numbers are the
kernel's, from the same files linux/cgroups reads in stats().
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from ..linux.cgroups import _files
from ..linux.cgroups.base import SandboxCgroup
from ..linux.cgroups.v1 import V1Cgroup
from ..linux.cgroups.v2 import V2Cgroup
from ..result import ResourceUsage

# (v1 controller, candidate files): the first file that exists is used; the
# memory and CPU counters are required.
_V1 = (("memory", ("memory.max_usage_in_bytes",)), ("cpuacct", ("cpuacct.usage_user",)),
       ("cpuacct", ("cpuacct.usage_sys",)), ("pids", ("pids.peak", "pids.current")),
       ("io", ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes")),
       ("memory", ("memory.oom_control",)), ("pids", ("pids.events",)), ("cpu", ("cpu.stat",)))
_V2 = (("memory.peak", "memory.current"), ("cpu.stat",), ("pids.peak", "pids.current"), ("io.stat",),
       ("memory.events",), ("pids.events",))
_REQUIRED = 3  # the first three counters of either list


def counter_files(cgroup: SandboxCgroup | None) -> tuple[str, ...]:
    """The files holding the usage of the sandbox in `cgroup`; empty when it has none
    (or lacks the memory or CPU counters): then usage is read by the launcher."""
    if isinstance(cgroup, V1Cgroup):
        paths = cgroup.paths
        wanted = [[os.path.join(paths[c], name) for name in names] if c in paths else []
                  for c, names in _V1]
    elif isinstance(cgroup, V2Cgroup):
        wanted = [[os.path.join(cgroup.path, name) for name in names] for names in _V2]
    else:
        return ()
    found = [next((f for f in candidates if os.path.exists(f)), "") for candidates in wanted]
    if not all(found[:_REQUIRED]):
        return ()
    return tuple(f for f in found if f)


def _keyed(text: bytes) -> dict[bytes, int]:
    return {key: int(value) for key, _, value in (line.partition(b" ") for line in text.splitlines())}


def _cpu_stat(text: bytes) -> dict[str, float]:
    """cpu.stat: v2's has the CPU time and throttling (usec); v1's only the throttling (ns)."""
    stat = _keyed(text)
    values: dict[str, float] = {"cpu_throttled_periods": stat.get(b"nr_throttled", 0)}
    if b"user_usec" in stat:
        values.update(cpu_user_seconds=stat[b"user_usec"] / 1e6, cpu_system_seconds=stat.get(b"system_usec", 0) / 1e6,
                      cpu_throttled_seconds=stat.get(b"throttled_usec", 0) / 1e6)
    else:
        values["cpu_throttled_seconds"] = stat.get(b"throttled_time", 0) / 1e9
    return values


def _io(split: Callable[[str], tuple[int, int]]) -> Callable[[bytes], dict[str, float]]:
    def parse(text: bytes) -> dict[str, float]:
        read, write = split(text.decode())
        return {"io_read_bytes": read, "io_write_bytes": write}
    return parse


_PARSERS: dict[str, Callable[[bytes], dict[str, float]]] = {
    "memory.max_usage_in_bytes": lambda t: {"memory_peak_bytes": int(t)},
    "memory.peak": lambda t: {"memory_peak_bytes": int(t)},
    "memory.current": lambda t: {"memory_peak_bytes": int(t)},
    "cpuacct.usage_user": lambda t: {"cpu_user_seconds": int(t) / 1e9},
    "cpuacct.usage_sys": lambda t: {"cpu_system_seconds": int(t) / 1e9},
    "cpu.stat": _cpu_stat,
    "memory.oom_control": lambda t: {"oom_kills": _keyed(t).get(b"oom_kill", 0)},
    "memory.events": lambda t: {"oom_kills": _keyed(t).get(b"oom_kill", 0)},
    "pids.events": lambda t: {"pids_limit_hits": _keyed(t).get(b"max", 0)},
    "pids.peak": lambda t: {"processes_peak": int(t)},
    "pids.current": lambda t: {"processes_peak": int(t)},
    "blkio.throttle.io_service_bytes_recursive": _io(_files.blkio_bytes),
    "blkio.throttle.io_service_bytes": _io(_files.blkio_bytes),
    "io.stat": _io(_files.io_stat_bytes),
}


class UsageCounters:
    """The counter files of one sandbox, open until close(). read() raises OSError
    once the cgroup is gone (the sandbox ended and was reaped)."""

    def __init__(self, files: Iterable[str]) -> None:
        self._open: list[tuple[int, Callable[[bytes], dict[str, float]]]] = []
        try:
            for path in files:
                self._open.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC),
                                   _PARSERS[os.path.basename(path)]))
        except BaseException:
            self.close()
            raise

    def read(self, wall_seconds: float) -> ResourceUsage:
        """The usage now, with `wall_seconds` as measured by the caller."""
        values: dict[str, float] = {}
        for fd, parse in self._open:
            values.update(parse(os.pread(fd, 4096, 0)))
        return ResourceUsage(wall_seconds=wall_seconds, **values)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the files. Idempotent."""
        while self._open:
            os.close(self._open.pop()[0])
