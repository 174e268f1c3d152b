"""Which mechanism enforces each resource limit of a config on this host.

A limit goes to the sandbox's cgroup where the host gives one with its controller.
Where it does not (an unprivileged user without a delegated cgroup subtree), an
rlimit stands in, weaker, when the user opted in (`rootless_limits = "rlimit"`) or
the limit is the default profile's (the defaults must bound a sandbox everywhere,
and `ndf-sandbox run -- CMD` must work without root); else the launch is refused,
naming the config field. The isolation report says which mechanism holds each one.

    memory_limit_mb    cgroup memory  | RLIMIT_AS: address space of each process
    max_processes      cgroup pids    | RLIMIT_NPROC: counted per uid in the sandbox's
                                        own user namespace, or for the sandbox's own
                                        host uid (as root: linux/ids.py), so apart from
                                        other processes; refused for a shared uid
    cpu_quota_percent  cgroup cpu     | RLIMIT_CPU: CPU seconds of each process, the
                                        quota's share of the wall timeout
    io_*               cgroup io      | none: refused
    max_file_size_mb   RLIMIT_FSIZE always (writable binds have no quota)
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass

from ..config import DEFAULT_MAX_PROCESSES, DEFAULT_MEMORY_LIMIT_MB, SandboxConfig
from ..errors import UnsupportedError
from ..linux.cgroups.base import CgroupSupport

MIB = 1024 * 1024

# config field -> the cgroup controllers that enforce it (any one of them)
CONTROLLERS: dict[str, tuple[str, ...]] = {
    "memory_limit_mb": ("memory",),
    "cpu_quota_percent": ("cpu",),
    "max_processes": ("pids",),
    "io_read_bps": ("io", "blkio"),
    "io_write_bps": ("io", "blkio"),
    "io_read_iops": ("io", "blkio"),
    "io_write_iops": ("io", "blkio"),
}
_DEFAULTS = {"memory_limit_mb": DEFAULT_MEMORY_LIMIT_MB, "max_processes": DEFAULT_MAX_PROCESSES}


@dataclass(frozen=True)
class LimitPlan:
    """The config fields its cgroup enforces, the rlimits that stand in for the
    others (resource, value), and one line per limit for the isolation report."""

    by_cgroup: frozenset[str]
    rlimits: tuple[tuple[int, int], ...]
    described: tuple[str, ...]


def _cgroup_reason(field: str, support: CgroupSupport | None, unknown: str) -> str:
    """"" when a cgroup controller for `field` is usable here, else why not."""
    if support is None:
        return unknown
    found = [c for c in (support.get(n) for n in CONTROLLERS[field]) if c is not None]
    if any(c.usable for c in found):
        return ""
    if not found:
        return f"no {' or '.join(CONTROLLERS[field])} cgroup controller on this host"
    return "; ".join(f"cgroup {c.name} controller: {c.reason or 'not usable'}" for c in found)


def _rlimit_for(config: SandboxConfig, field: str, value: int, user_ns: bool,
                own_uid: bool) -> tuple[int, int, str] | str:
    """(resource, value, description) standing in for a limit, or why none can."""
    if field == "memory_limit_mb":
        return resource.RLIMIT_AS, value * MIB, f"memory_limit_mb={value}: rlimit RLIMIT_AS (per process)"
    if field == "max_processes":
        if user_ns:
            return (resource.RLIMIT_NPROC, value,
                    f"max_processes={value}: rlimit RLIMIT_NPROC (in the sandbox's user namespace)")
        if own_uid:
            return (resource.RLIMIT_NPROC, value,
                    f"max_processes={value}: rlimit RLIMIT_NPROC (the sandbox's own uid)")
        return (f"RLIMIT_NPROC would count every process of uid {config.uid} on the host (no user "
                "namespace, and the uid is not the sandbox's own)")
    if field == "cpu_quota_percent":
        if config.timeout_seconds is None:
            return "RLIMIT_CPU needs timeout_seconds (the quota's share of the wall timeout)"
        seconds = max(1, math.ceil(config.timeout_seconds * value / 100))
        return (resource.RLIMIT_CPU, seconds,
                f"cpu_quota_percent={value}: rlimit RLIMIT_CPU={seconds} s (per process, not a rate)")
    return "no rlimit stands in for an I/O limit"


def limit_problems(config: SandboxConfig, support: CgroupSupport | None, user_ns: bool,
                   unknown: str = "cgroups could not be probed") -> tuple[LimitPlan, list[tuple[str, str]]]:
    """The plan, and the limits that cannot be enforced here: (field, reason).
    `support` None: the cgroup probe failed, `unknown` says why. `user_ns`: the
    sandbox has a user namespace of its own."""
    own_uid = config.uid is None  # each launch takes a host uid of its own
    by_cgroup: set[str] = set()
    rlimits: list[tuple[int, int]] = []
    described: list[str] = []
    problems: list[tuple[str, str]] = []
    for field in CONTROLLERS:
        value = getattr(config, field)
        if value is None:
            continue
        why = _cgroup_reason(field, support, unknown)
        if not why:
            by_cgroup.add(field)
            described.append(f"{field}={value}: cgroup")
            continue
        if config.rootless_limits != "rlimit" and _DEFAULTS.get(field) != value:
            problems.append((field, f"{why}; set rootless_limits = \"rlimit\" (CLI --rootless-limits "
                                    "rlimit) to enforce it with an rlimit instead, weaker than a cgroup"))
            continue
        standin = _rlimit_for(config, field, value, user_ns, own_uid)
        if isinstance(standin, str):
            problems.append((field, f"{why}, and {standin}"))
            continue
        rlimits.append(standin[:2])
        described.append(standin[2])
    if config.max_file_size_mb is not None:
        rlimits.append((resource.RLIMIT_FSIZE, config.max_file_size_mb * MIB))
        described.append(f"max_file_size_mb={config.max_file_size_mb}: rlimit RLIMIT_FSIZE")
    if config.namespaces.mnt:
        described.append(f"filesystem.tmp_size_mb={config.filesystem.tmp_size_mb}: tmpfs size of /tmp")
    return LimitPlan(frozenset(by_cgroup), tuple(rlimits), tuple(described)), problems


def plan_limits(config: SandboxConfig, support: CgroupSupport | None, user_ns: bool) -> LimitPlan:
    """The plan; UnsupportedError naming the first config field this host cannot enforce."""
    plan, problems = limit_problems(config, support, user_ns)
    if problems:
        field, reason = problems[0]
        raise UnsupportedError(field, reason)
    return plan
