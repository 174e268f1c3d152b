"""The cgroup v2 backend: one leaf directory in the unified hierarchy.

Layout: <manager's own cgroup>/neural-doc-flow/ndf-...; the neural-doc-flow directory
holds no process and enables the needed controllers for its children in
cgroup.subtree_control (the no-internal-processes rule: sandbox cgroups are leaves).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from ...errors import ConfigError, SandboxError, SetupError, UnsupportedError
from . import _files
from .base import CgroupLimits, CgroupStats, SandboxCgroup

CPU_PERIOD_US = 100_000
_DEVICE = re.compile(r"^\d+:\d+$")
_IO_KEYS = (("io_read_bps", "rbps"), ("io_write_bps", "wbps"),
            ("io_read_iops", "riops"), ("io_write_iops", "wiops"))


def _controllers(path: str, filename: str) -> set[str]:
    try:
        return set(_files.read_text(os.path.join(path, filename)).split())
    except FileNotFoundError:
        return set()


def needed_controllers(limits: CgroupLimits) -> list[str]:
    """The v2 controllers a set of limits needs, besides memory and pids (always wanted)."""
    wanted = ["memory", "pids"]
    if limits.cpu_quota_percent is not None:
        wanted.append("cpu")
    if limits.io_requested:
        wanted.append("io")
    return wanted


def enable_controllers(parent: str, controllers: Iterable[str], *, may_enable_above: bool) -> None:
    """Make `controllers` available to children of `parent` (created if missing).

    `parent`'s own parent must already delegate them, unless `may_enable_above` (the
    manager runs in the true root cgroup, which is exempt from the no-internal-processes
    rule), in which case they are enabled there too. A controller that cannot be
    enabled raises UnsupportedError naming it.
    """
    above = os.path.dirname(parent)
    for name in controllers:
        if name in _controllers(parent, "cgroup.subtree_control"):
            continue
        if name not in _controllers(above, "cgroup.subtree_control"):
            if not may_enable_above or name not in _controllers(above, "cgroup.controllers"):
                raise UnsupportedError(
                    f"cgroup {name} controller",
                    f"not enabled in {above}/cgroup.subtree_control (delegate it to the manager)")
            _enable(above, name)
        _files.make_dir(parent)
        _enable(parent, name)


def _enable(path: str, name: str) -> None:
    try:
        _files.write_text(os.path.join(path, "cgroup.subtree_control"), f"+{name}")
    except SetupError as e:
        raise UnsupportedError(f"cgroup {name} controller",
                               f"cannot enable it in {path}: {e}") from e


class V2Cgroup(SandboxCgroup):
    """A sandbox cgroup: one leaf directory `path` in the unified hierarchy."""

    version = "v2"

    def __init__(self, name: str, path: str, *, may_enable_above: bool = False) -> None:
        self.name = name
        self.path = path
        self._parent = os.path.dirname(path)
        self._may_enable_above = may_enable_above
        self._limits: CgroupLimits | None = None
        self._memory_peak_seen = 0
        self._pids_peak_seen = 0

    @classmethod
    def create(cls, name: str, parent: str, limits: CgroupLimits, *,
               controllers: Iterable[str] = (), may_enable_above: bool = False) -> V2Cgroup:
        """Create leaf `name` below `parent`, enabling `controllers` (the usable ones among
        memory, pids, cpu, io) in the parent first, then apply the limits."""
        cgroup = cls(name, os.path.join(parent, name), may_enable_above=may_enable_above)
        try:
            enable_controllers(parent, controllers, may_enable_above=may_enable_above)
            _files.make_dir(parent)
            try:
                os.mkdir(cgroup.path)
            except OSError as e:
                raise SetupError("cgroup", f"cannot create cgroup {cgroup.path}: {e.strerror}",
                                 e.errno or 0) from e
            cgroup.apply(limits)
        except BaseException:
            cgroup.destroy()
            raise
        return cgroup

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _require(self, controller: str, field: str) -> None:
        if controller in _controllers(self.path, "cgroup.controllers"):
            return
        try:
            enable_controllers(self._parent, [controller], may_enable_above=self._may_enable_above)
        except UnsupportedError as e:
            raise UnsupportedError(field, e.reason) from e
        if controller not in _controllers(self.path, "cgroup.controllers"):
            raise UnsupportedError(field, f"the {controller} controller is not available in {self.path}")

    def apply(self, limits: CgroupLimits) -> None:
        """Write memory.max/.high/.swap.max, cpu.max, pids.max and io.max ("max" for None)."""
        have = _controllers(self.path, "cgroup.controllers")
        if limits.memory_bytes is not None or limits.memory_high_bytes is not None:
            self._require("memory", "memory_bytes")
            have.add("memory")
        if "memory" in have:
            self._apply_memory(limits)
        if limits.cpu_quota_percent is not None:
            self._require("cpu", "cpu_quota_percent")
            have.add("cpu")
        if "cpu" in have:
            pct = limits.cpu_quota_percent
            quota = "max" if pct is None else str(max(1000, pct * CPU_PERIOD_US // 100))
            _files.write_text(self._file("cpu.max"), f"{quota} {CPU_PERIOD_US}")
        if limits.max_processes is not None:
            self._require("pids", "max_processes")
            have.add("pids")
        if "pids" in have:
            n = limits.max_processes
            _files.write_text(self._file("pids.max"), "max" if n is None else str(n))
        if limits.io_requested:
            if not limits.io_devices:
                raise ConfigError("io_devices", "I/O limits need at least one block device (\"MAJ:MIN\")")
            self._require("io", "io limits")
            have.add("io")
        for dev in limits.io_devices:
            if not _DEVICE.match(dev):
                raise ConfigError("io_devices", f"expected \"MAJOR:MINOR\", got {dev!r}")
        if "io" in have:
            self._apply_io(limits)
        self._limits = limits

    def _apply_memory(self, limits: CgroupLimits) -> None:
        def fmt(v: int | None) -> str:
            return "max" if v is None else str(v)

        swap_file = self._file("memory.swap.max")
        if os.path.exists(swap_file):
            _files.write_text(swap_file, "max" if limits.memory_bytes is None else str(limits.swap_bytes))
        elif limits.memory_bytes is not None and (limits.swap_bytes or _files.swap_active()):
            raise UnsupportedError("swap_bytes", "memory.swap.max is missing (no swap accounting) "
                                   "and swap is active, so memory could escape into swap")
        _files.write_text(self._file("memory.max"), fmt(limits.memory_bytes))
        _files.write_text(self._file("memory.high"), fmt(limits.memory_high_bytes))

    def _apply_io(self, limits: CgroupLimits) -> None:
        old = self._limits.io_devices if self._limits else ()
        for dev in dict.fromkeys(old + limits.io_devices):
            active = dev in limits.io_devices
            parts = [f"{key}={(getattr(limits, field) if active else None) or 'max'}"
                     for field, key in _IO_KEYS]
            _files.write_text(self._file("io.max"), f"{dev} " + " ".join(parts))

    def _lift_io_limits(self) -> None:
        # Throttled bios hold their writer in uninterruptible sleep: lift the throttle so
        # a killed sandbox can actually exit.
        if self._limits and self._limits.io_devices and os.path.exists(self._file("io.max")):
            for dev in self._limits.io_devices:
                _files.write_text(self._file("io.max"), f"{dev} rbps=max wbps=max riops=max wiops=max")

    def add_process(self, pid: int) -> None:
        """Write `pid` to cgroup.procs."""
        _files.write_text(self._file("cgroup.procs"), str(pid))

    def clone_into_fd(self) -> int | None:
        """A new O_DIRECTORY fd of the cgroup for clone3(CLONE_INTO_CGROUP); the caller closes it."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def stats(self) -> CgroupStats:
        """Usage from memory.*, cpu.stat, pids.*, io.stat and cgroup.events."""
        values: dict[str, int | bool] = {}
        if os.path.exists(self._file("memory.current")):
            current = _files.read_int(self._file("memory.current"))
            self._memory_peak_seen = max(self._memory_peak_seen, current)
            values["memory_current_bytes"] = current
            values["memory_peak_bytes"] = _files.read_int(self._file("memory.peak"), self._memory_peak_seen)
            values["oom_kills"] = _files.read_keyed(self._file("memory.events")).get("oom_kill", 0)
        cpu = _files.read_keyed(self._file("cpu.stat"))
        values["cpu_usage_usec"] = cpu.get("usage_usec", 0)
        values["cpu_user_usec"] = cpu.get("user_usec", 0)
        values["cpu_system_usec"] = cpu.get("system_usec", 0)
        values["cpu_nr_throttled"] = cpu.get("nr_throttled", 0)
        values["cpu_throttled_usec"] = cpu.get("throttled_usec", 0)
        if os.path.exists(self._file("pids.current")):
            current = _files.read_int(self._file("pids.current"))
            self._pids_peak_seen = max(self._pids_peak_seen, current)
            values["pids_current"] = current
            values["pids_peak"] = _files.read_int(self._file("pids.peak"), self._pids_peak_seen)
            values["pids_limit_hits"] = _files.read_keyed(self._file("pids.events")).get("max", 0)
        values["io_read_bytes"], values["io_write_bytes"] = self._io_bytes()
        values["frozen"] = self._events().get("frozen", 0) == 1
        return CgroupStats(**values)  # type: ignore[arg-type]

    def _io_bytes(self) -> tuple[int, int]:
        try:
            return _files.io_stat_bytes(_files.read_text(self._file("io.stat")))
        except FileNotFoundError:
            return 0, 0

    def _events(self) -> dict[str, int]:
        return _files.read_keyed(self._file("cgroup.events"))

    def freeze(self, timeout: float = 10.0) -> None:
        """Write 1 to cgroup.freeze and wait until cgroup.events says "frozen 1".

        Raises SandboxError (and thaws again) if that does not happen within `timeout`.
        """
        _files.write_text(self._file("cgroup.freeze"), "1")
        if not _files.wait_until(lambda: self._events().get("frozen", 0) == 1, timeout):
            self.thaw()
            raise SandboxError(f"cgroup {self.name}: not frozen after {timeout}s")

    def thaw(self) -> None:
        """Write 0 to cgroup.freeze."""
        _files.write_text(self._file("cgroup.freeze"), "0")

    def _populated(self) -> bool:
        return bool(_files.procs(self.path))

    def kill(self, timeout: float = 30.0) -> None:
        """cgroup.kill (or freeze + SIGKILL each member on kernels < 5.14); waits until empty."""
        if not self._populated():
            return
        self._lift_io_limits()
        kill_file = self._file("cgroup.kill")
        if os.path.exists(kill_file):
            _files.write_text(kill_file, "1")
        else:
            frozen = False
            try:
                self.freeze(timeout=2.0)
                frozen = True
            except SandboxError:
                pass
            _files.signal_members([self.path])
            if frozen:
                self.thaw()

        def empty() -> bool:
            if not self._populated():
                return True
            _files.signal_members([self.path])
            return False

        if not _files.wait_until(empty, timeout):
            raise SandboxError(
                f"cgroup {self.name}: processes {_files.procs(self.path)} survived SIGKILL")

    def destroy(self) -> None:
        """Kill what is left, remove the directory, and the parent once it is empty."""
        if os.path.isdir(self.path):
            self.kill()
        _files.remove_dir(self.path)
        _files.remove_if_empty(self._parent)

    @property
    def description(self) -> str:
        """e.g. "cgroup v2: /sys/fs/cgroup/neural-doc-flow/ndf-1-2-3 (memory pids)"."""
        enabled = " ".join(sorted(_controllers(self.path, "cgroup.controllers")))
        return f"cgroup v2: {self.path} ({enabled or 'no controllers'})"
