"""The cgroup v1 backend: one directory per controller hierarchy.

Controller names used here are the ControllerSupport names: memory, cpu, cpuacct,
pids, io (the v1 blkio hierarchy) and freezer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ...errors import ConfigError, SandboxError, UnsupportedError
from . import _files
from .base import CgroupLimits, CgroupStats, SandboxCgroup

CFS_PERIOD_US = 100_000
UNFROZEN_KILL_SECONDS = 0.5  # a killed tree is gone in milliseconds as a rule
_DEVICE = re.compile(r"^\d+:\d+$")
# Always joined when available: stats, freeze and kill need them.
_ALWAYS = ("memory", "cpuacct", "pids", "freezer")
_BLKIO_FILES = (
    ("io_read_bps", "blkio.throttle.read_bps_device"),
    ("io_write_bps", "blkio.throttle.write_bps_device"),
    ("io_read_iops", "blkio.throttle.read_iops_device"),
    ("io_write_iops", "blkio.throttle.write_iops_device"),
)


def _check_devices(limits: CgroupLimits) -> None:
    if limits.io_requested and not limits.io_devices:
        raise ConfigError("io_devices", "I/O limits need at least one block device (\"MAJ:MIN\")")
    for dev in limits.io_devices:
        if not _DEVICE.match(dev):
            raise ConfigError("io_devices", f"expected \"MAJOR:MINOR\", got {dev!r}")


class V1Cgroup(SandboxCgroup):
    """A sandbox cgroup over v1 hierarchies: `dirs` maps controller -> cgroup directory."""

    version = "v1"

    def __init__(self, name: str, dirs: Mapping[str, str], parents: Mapping[str, str]) -> None:
        self.name = name
        self._dirs = dict(dirs)
        self._parents = dict(parents)
        self._limits: CgroupLimits | None = None
        self._pids_peak_seen = 0

    @classmethod
    def create(cls, name: str, parents: Mapping[str, str], limits: CgroupLimits) -> V1Cgroup:
        """Create `name` below `parents` (controller -> parent dir of each usable v1
        controller) in the hierarchies the limits need plus memory/cpuacct/pids/freezer,
        then apply the limits. Nothing is left behind if this fails."""
        wanted = [c for c in _ALWAYS if c in parents]
        for field, controller, requested in (
            ("memory_bytes", "memory", limits.memory_bytes is not None),
            ("cpu_quota_percent", "cpu", limits.cpu_quota_percent is not None),
            ("max_processes", "pids", limits.max_processes is not None),
            ("io limits", "io", limits.io_requested),
        ):
            if requested and controller not in parents:
                raise UnsupportedError(field, f"the v1 {controller} controller is not usable here")
            if requested and controller not in wanted:
                wanted.append(controller)
        if limits.memory_high_bytes is not None:
            raise UnsupportedError("memory_high_bytes", "cgroup v1 has no memory.high")
        _check_devices(limits)
        dirs = {c: os.path.join(parents[c], name) for c in wanted}
        cgroup = cls(name, dirs, {c: parents[c] for c in wanted})
        try:
            for d in dict.fromkeys(dirs.values()):  # co-mounted controllers share one dir
                _files.make_dir(d)
            if limits == CgroupLimits():
                cgroup._limits = limits  # a new cgroup is unlimited already
            else:
                cgroup.apply(limits)
        except BaseException:
            cgroup.destroy()
            raise
        return cgroup

    def _file(self, controller: str, name: str) -> str:
        return os.path.join(self._dirs[controller], name)

    def apply(self, limits: CgroupLimits) -> None:
        """Write every limit (None writes "unlimited") to the hierarchies joined at creation."""
        if limits.memory_high_bytes is not None:
            raise UnsupportedError("memory_high_bytes", "cgroup v1 has no memory.high")
        _check_devices(limits)
        for field, controller, requested in (
            ("memory_bytes", "memory", limits.memory_bytes is not None),
            ("cpu_quota_percent", "cpu", limits.cpu_quota_percent is not None),
            ("max_processes", "pids", limits.max_processes is not None),
            ("io limits", "io", limits.io_requested),
        ):
            if requested and controller not in self._dirs:
                raise UnsupportedError(
                    field, f"the v1 {controller} hierarchy was not joined when the cgroup was created")
        if "memory" in self._dirs:
            self._apply_memory(limits)
        if "cpu" in self._dirs:
            pct = limits.cpu_quota_percent
            _files.write_text(self._file("cpu", "cpu.cfs_period_us"), str(CFS_PERIOD_US))
            quota = -1 if pct is None else max(1000, pct * CFS_PERIOD_US // 100)
            _files.write_text(self._file("cpu", "cpu.cfs_quota_us"), str(quota))
        if "pids" in self._dirs:
            n = limits.max_processes
            _files.write_text(self._file("pids", "pids.max"), "max" if n is None else str(n))
        if "io" in self._dirs:
            self._apply_io(limits)
        self._limits = limits

    def _apply_memory(self, limits: CgroupLimits) -> None:
        mem_file = self._file("memory", "memory.limit_in_bytes")
        memsw_file = self._file("memory", "memory.memsw.limit_in_bytes")
        has_memsw = os.path.exists(memsw_file)
        if limits.memory_bytes is None:
            if has_memsw:  # memsw must stay >= limit: lift it first
                _files.write_text(memsw_file, "-1")
            _files.write_text(mem_file, "-1")
            return
        if not has_memsw:
            if limits.swap_bytes or _files.swap_active():
                raise UnsupportedError(
                    "swap_bytes", "memory.memsw.limit_in_bytes is missing (swap accounting off) "
                    "and swap is active, so memory could escape into swap")
            _files.write_text(mem_file, str(limits.memory_bytes))
            return
        memsw = limits.memory_bytes + limits.swap_bytes
        # The kernel insists on limit <= memsw at every step, so the order depends on direction.
        if limits.memory_bytes > _files.read_int(memsw_file):
            _files.write_text(memsw_file, str(memsw))
            _files.write_text(mem_file, str(limits.memory_bytes))
        else:
            _files.write_text(mem_file, str(limits.memory_bytes))
            _files.write_text(memsw_file, str(memsw))

    def _apply_io(self, limits: CgroupLimits) -> None:
        old = self._limits.io_devices if self._limits else ()
        for dev in dict.fromkeys(old + limits.io_devices):
            active = dev in limits.io_devices
            for field, filename in _BLKIO_FILES:
                value = getattr(limits, field) if active else None
                _files.write_text(self._file("io", filename), f"{dev} {value or 0}")

    def _lift_io_limits(self) -> None:
        # Throttled bios hold their writer in uninterruptible sleep: lift the throttle so
        # a killed sandbox can actually exit.
        if "io" in self._dirs and self._limits and self._limits.io_devices and os.path.isdir(
                self._dirs["io"]):
            for dev in self._limits.io_devices:
                for _, filename in _BLKIO_FILES:
                    _files.write_text(self._file("io", filename), f"{dev} 0")

    def add_process(self, pid: int) -> None:
        """Write `pid` to cgroup.procs in every joined hierarchy."""
        for d in dict.fromkeys(self._dirs.values()):
            _files.write_text(os.path.join(d, "cgroup.procs"), str(pid))

    def stats(self) -> CgroupStats:
        """Usage from memory.*, cpuacct.*, cpu.stat, pids.*, blkio.throttle.* and freezer.state."""
        values: dict[str, int | bool] = {}
        if "memory" in self._dirs:
            values["memory_current_bytes"] = _files.read_int(self._file("memory", "memory.usage_in_bytes"))
            values["memory_peak_bytes"] = _files.read_int(self._file("memory", "memory.max_usage_in_bytes"))
            values["oom_kills"] = _files.read_keyed(self._file("memory", "memory.oom_control")).get(
                "oom_kill", 0)
        if "cpuacct" in self._dirs:
            values["cpu_usage_usec"] = _files.read_int(self._file("cpuacct", "cpuacct.usage")) // 1000
            try:  # nanoseconds, where the kernel has them (cpuacct.stat counts 10 ms ticks)
                values["cpu_user_usec"] = _files.read_int(self._file("cpuacct", "cpuacct.usage_user")) // 1000
                values["cpu_system_usec"] = _files.read_int(self._file("cpuacct", "cpuacct.usage_sys")) // 1000
            except FileNotFoundError:
                ticks = _files.read_keyed(self._file("cpuacct", "cpuacct.stat"))
                hz = os.sysconf("SC_CLK_TCK")
                values["cpu_user_usec"] = ticks.get("user", 0) * 1_000_000 // hz
                values["cpu_system_usec"] = ticks.get("system", 0) * 1_000_000 // hz
        if "cpu" in self._dirs:
            cpu = _files.read_keyed(self._file("cpu", "cpu.stat"))
            values["cpu_nr_throttled"] = cpu.get("nr_throttled", 0)
            values["cpu_throttled_usec"] = cpu.get("throttled_time", 0) // 1000
        if "pids" in self._dirs:
            current = _files.read_int(self._file("pids", "pids.current"))
            self._pids_peak_seen = max(self._pids_peak_seen, current)
            values["pids_current"] = current
            values["pids_peak"] = _files.read_int(self._file("pids", "pids.peak"), self._pids_peak_seen)
            values["pids_limit_hits"] = _files.read_keyed(self._file("pids", "pids.events")).get("max", 0)
        if "io" in self._dirs:
            values["io_read_bytes"], values["io_write_bytes"] = self._io_bytes()
        if "freezer" in self._dirs:
            values["frozen"] = self._freezer_state() == "FROZEN"
        return CgroupStats(**values)  # type: ignore[arg-type]

    def _io_bytes(self) -> tuple[int, int]:
        for name in ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes"):
            try:
                return _files.blkio_bytes(_files.read_text(self._file("io", name)))
            except FileNotFoundError:
                continue
        return 0, 0

    def _freezer_state(self) -> str:
        try:
            return _files.read_text(self._file("freezer", "freezer.state"))
        except FileNotFoundError:
            return ""

    def freeze(self, timeout: float = 10.0) -> None:
        """Write FROZEN and poll freezer.state until the kernel reports FROZEN.

        Raises SandboxError (and thaws again) if a task cannot be frozen within `timeout`,
        e.g. one stuck in uninterruptible sleep on throttled I/O.
        """
        if "freezer" not in self._dirs:
            raise UnsupportedError("freeze", "no v1 freezer hierarchy is usable here")
        _files.write_text(self._file("freezer", "freezer.state"), "FROZEN")
        if not _files.wait_until(lambda: self._freezer_state() == "FROZEN", timeout):
            self.thaw()
            raise SandboxError(f"cgroup {self.name}: not frozen after {timeout}s")

    def thaw(self) -> None:
        """Write THAWED to freezer.state."""
        if "freezer" not in self._dirs:
            raise UnsupportedError("freeze", "no v1 freezer hierarchy is usable here")
        _files.write_text(self._file("freezer", "freezer.state"), "THAWED")

    def _members(self) -> list[int]:
        return sorted({pid for d in self._dirs.values() for pid in _files.procs(d)})

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL every member and wait until empty; members still there after
        UNFROZEN_KILL_SECONDS (forking meanwhile, or frozen) are frozen, SIGKILLed, thawed.
        Not frozen first: v1 frozen tasks do not die of SIGKILL, so a killer that died
        (itself SIGKILLed) between the freeze and the thaw would leave them frozen for good."""
        dirs = list(dict.fromkeys(self._dirs.values()))
        if not self._members():
            return
        self._lift_io_limits()
        _files.signal_members(dirs)
        if _files.wait_until(lambda: not self._members(), UNFROZEN_KILL_SECONDS):
            return
        frozen = False
        if "freezer" in self._dirs:
            try:
                self.freeze(timeout=2.0)
                frozen = True
            except SandboxError:
                pass  # a task in uninterruptible sleep: kill without the freeze, loop below
        _files.signal_members(dirs)
        if frozen:
            self.thaw()

        def empty() -> bool:
            if not self._members():
                return True
            _files.signal_members(dirs)  # anything forked before the signal landed
            return False

        if not _files.wait_until(empty, timeout):
            raise SandboxError(f"cgroup {self.name}: processes {self._members()} survived SIGKILL")

    def rename(self, name: str) -> None:
        """Give the (empty) cgroup another name in every hierarchy (a spare made
        ahead takes its sandbox's name; v1 renames within the same parent)."""
        for controller, old in self._dirs.items():
            new = os.path.join(os.path.dirname(old), name)
            for other, same in self._dirs.items():  # co-mounted controllers share one dir
                if same == old and other != controller:
                    self._dirs[other] = new
            if not os.path.isdir(new):
                try:
                    os.rename(old, new)
                except OSError as e:
                    raise SandboxError(f"cannot rename cgroup {old} to {name}: {e.strerror}") from e
            self._dirs[controller] = new
        self.name = name

    def destroy(self) -> None:
        """Kill what is left, remove every directory and the shared parents once empty."""
        if any(os.path.isdir(d) for d in self._dirs.values()):
            self.kill()
            if "freezer" in self._dirs and os.path.isdir(self._dirs["freezer"]):
                self.thaw()
        for d in dict.fromkeys(self._dirs.values()):
            _files.remove_dir(d)
        for p in dict.fromkeys(self._parents.values()):
            _files.remove_if_empty(p)

    @property
    def paths(self) -> dict[str, str]:
        """controller -> directory of this cgroup."""
        return dict(self._dirs)

    @property
    def description(self) -> str:
        """e.g. "cgroup v1: memory=/sys/fs/cgroup/memory/.../ndf-1-2-3, pids=..."."""
        return "cgroup v1: " + ", ".join(f"{c}={d}" for c, d in sorted(self._dirs.items()))
