"""Resource limits (setrlimit, the SETRLIMIT step) for the payload: open files, no core
dumps, and those that stand in for a cgroup's (launch/limits.py)."""

from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class RlimitPlan:
    """(resource, soft=hard) pairs to set in the child."""

    limits: tuple[tuple[int, int], ...]

    def describe(self) -> tuple[str, ...]:
        names = {resource.RLIMIT_NOFILE: "nofile", resource.RLIMIT_CORE: "core",
                 resource.RLIMIT_NPROC: "nproc", resource.RLIMIT_FSIZE: "fsize",
                 resource.RLIMIT_AS: "as", resource.RLIMIT_CPU: "cpu"}
        return tuple(f"rlimit {names.get(r, str(r))}={v}" for r, v in self.limits)


def plan_rlimits(max_open_files: int, more: tuple[tuple[int, int], ...] = ()) -> RlimitPlan:
    """The rlimits every Linux sandbox gets (open files, no core dumps), and `more`
    (limits that stand in for a cgroup's, a file size cap: launch/limits.py)."""
    return RlimitPlan(((resource.RLIMIT_NOFILE, max_open_files), (resource.RLIMIT_CORE, 0)) + more)
