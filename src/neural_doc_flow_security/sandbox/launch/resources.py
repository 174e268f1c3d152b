"""Around a launch: the sandbox's cgroup, and what to say when the host refuses.

Limits set in the config are required: a host that cannot enforce one refuses
the launch (UnsupportedError naming it). Without limits, a cgroup is still
created where the host allows it, for kernel-side accounting and kill-all.
A zygote makes the next sandbox's cgroup while it is idle (a "spare").
"""

from __future__ import annotations

import itertools
import os
import threading

from ..config import SandboxConfig
from ..errors import SandboxError, SetupError, UnsupportedError
from ..linux import cgroups
from ..linux.cgroups.base import CgroupLimits, SandboxCgroup
from ..linux.cgroups.v1 import V1Cgroup
from .plan import LaunchPlan

_sequence = itertools.count()


def explain_setup_failure(config: SandboxConfig, error: SetupError) -> SandboxError:
    """A clone that failed usually means the host cannot create a namespace the
    config requires: name it and the reason (a sysctl, an LSM, no privilege).
    Probing the host is done only then, off the hot path."""
    if error.stage != "clone":
        return error
    from ..detect import missing_for, probe_features

    missing = missing_for(config, probe_features())  # fresh: this process may have changed since
    if not missing:
        return error
    return UnsupportedError(missing[0].split(":")[0], "; ".join(missing) + f" ({error})")


def block_devices(paths: list[str]) -> tuple[str, ...]:
    """The whole-disk block devices ("MAJ:MIN") that back these paths."""
    found: list[str] = []
    for path in paths:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        number = f"{os.major(dev)}:{os.minor(dev)}"
        sys_dir = f"/sys/dev/block/{number}"
        if not os.path.isdir(sys_dir):
            continue  # not a block device (tmpfs, overlay, ...)
        if os.path.exists(sys_dir + "/partition"):
            with open(os.path.realpath(sys_dir) + "/../dev") as f:
                number = f.read().strip()
        if number not in found:
            found.append(number)
    return tuple(found)


# The cgroup layer's names of its limits -> the config fields the user wrote.
_CONFIG_FIELDS = {"memory_bytes": "memory_limit_mb", "memory_high_bytes": "memory_limit_mb",
                  "swap_bytes": "memory_limit_mb", "io limits": "io_read_bps/io_write_bps/io_read_iops/io_write_iops"}


def cgroup_limits(config: SandboxConfig, plan: LaunchPlan) -> CgroupLimits:
    """The limits the cgroup of a config enforces (others may be rlimits, see
    launch/limits.py); I/O limits apply to the disks behind its binds."""
    mine = plan.limits.by_cgroup

    def value(field: str) -> int | None:
        found: int | None = getattr(config, field) if field in mine else None
        return found

    devices: tuple[str, ...] = ()
    if any(value(f) is not None for f in ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")):
        sources = [b.source for b in plan.rootfs.binds] if plan.rootfs else ["/"]
        devices = block_devices(sources + ["/tmp"])
        if not devices:
            raise UnsupportedError("io_read_bps/io_write_bps/io_read_iops/io_write_iops",
                                   "no block device backs the sandbox's file system")
    memory = value("memory_limit_mb")
    return CgroupLimits(
        memory_bytes=memory * 1024 * 1024 if memory else None,
        cpu_quota_percent=value("cpu_quota_percent"),
        max_processes=value("max_processes"),
        io_read_bps=value("io_read_bps"),
        io_write_bps=value("io_write_bps"),
        io_read_iops=value("io_read_iops"),
        io_write_iops=value("io_write_iops"),
        io_devices=devices,
    )


def create_cgroup(config: SandboxConfig, name: str, plan: LaunchPlan) -> SandboxCgroup | None:
    """The sandbox's cgroup: required when limits are set, else made when possible.
    A spare made ahead (make_spare_cgroup) is used when it has the controllers."""
    limits = cgroup_limits(config, plan)
    label = f"{name}-{next(_sequence)}"
    spare = _take_spare(label, limits)
    if spare is not None:
        return spare
    if plan.cgroup_limits_requested:
        try:
            return cgroups.create_sandbox_cgroup(label, limits)
        except UnsupportedError as e:
            raise in_config_terms(e) from None
    try:
        return cgroups.create_sandbox_cgroup(label, limits)
    except (SandboxError, OSError):
        return None  # accounting only; nothing was required


_spare: V1Cgroup | None = None
_spare_maker: threading.Thread | None = None


def spare_cgroup_wanted() -> bool:
    """Whether make_spare_cgroup() would make one (cgroup v1, none made or in the making)."""
    return _spare is None and _spare_maker is None and not cgroups.joined_at_clone()


def make_spare_cgroup(*, in_background: bool = False) -> bool:
    """Make an unlimited cgroup for the next launch now (a zygote when idle; the
    CLI in a thread while it imports). Only on cgroup v1, where a cgroup can take
    its sandbox's name later; best effort. Whether there was one to make."""
    global _spare_maker
    if not spare_cgroup_wanted():
        return False
    if in_background:
        _spare_maker = threading.Thread(target=_make_spare, name="ndf-cgroup", daemon=True)
        _spare_maker.start()
    else:
        _make_spare()
    return True


def _make_spare() -> None:
    global _spare
    try:
        made = cgroups.create_sandbox_cgroup(f"next-{next(_sequence)}", CgroupLimits())
    except (SandboxError, OSError):
        return
    if isinstance(made, V1Cgroup):
        _spare = made
    else:
        made.destroy()


def discard_spare_cgroup() -> None:
    """Remove the spare cgroup, if any (the zygote's shutdown)."""
    global _spare
    _join_spare_maker()
    spare, _spare = _spare, None
    if spare is not None:
        spare.destroy()


def _join_spare_maker() -> None:
    global _spare_maker
    if _spare_maker is not None:
        _spare_maker.join()
        _spare_maker = None


def _take_spare(label: str, limits: CgroupLimits) -> SandboxCgroup | None:
    global _spare
    _join_spare_maker()
    spare, _spare = _spare, None
    if spare is None:
        return None
    try:
        _adopt(spare, label, limits)
    except (SandboxError, OSError):
        spare.destroy()
        return None
    return spare


def _adopt(cgroup: SandboxCgroup, label: str, limits: CgroupLimits) -> None:
    if isinstance(cgroup, V1Cgroup):
        cgroup.rename(cgroups.cgroup_for_sandbox_name(label))
    if limits != CgroupLimits():
        cgroup.apply(limits)  # UnsupportedError if it lacks a controller the limits need


def adopt_cgroup(cgroup: SandboxCgroup, config: SandboxConfig, name: str, plan: LaunchPlan) -> None:
    """A cgroup made ahead (a spare sandbox's, launch/spare.py) becomes the sandbox's:
    its name (v1; v2 cannot rename) and its limits. Raises if a limit cannot be set."""
    try:
        _adopt(cgroup, f"{name}-{next(_sequence)}", cgroup_limits(config, plan))
    except UnsupportedError as e:
        raise in_config_terms(e) from None


def in_config_terms(error: UnsupportedError) -> UnsupportedError:
    """The cgroup layer's error, naming the config field the user wrote."""
    field = _CONFIG_FIELDS.get(error.protection)
    return error if field is None else UnsupportedError(field, error.reason)


def cgroup_for_spare() -> SandboxCgroup | None:
    """An unlimited cgroup for a spare sandbox: the spare cgroup made ahead, else a
    new one; None where this host gives none."""
    global _spare
    _join_spare_maker()
    made, _spare = _spare, None
    if made is not None:
        return made
    try:
        return cgroups.create_sandbox_cgroup(f"next-{next(_sequence)}", CgroupLimits())
    except (SandboxError, OSError):
        return None
