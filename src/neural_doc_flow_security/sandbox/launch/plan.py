"""A LaunchPlan: everything the child bootstrap needs, computed once per config.

Planning (reading /etc, compiling the seccomp filter, resolving capabilities)
happens in the parent and is cached, so the forked child only executes it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ..config import SandboxConfig
from ..linux import seccomp
from ..linux.capabilities import CapabilityPlan, plan_capabilities
from ..linux.namespaces import NamespacePlan, plan_namespaces
from ..linux.rlimits import RlimitPlan, plan_rlimits
from ..linux.rootfs import RootfsPlan, plan_rootfs
from ..result import IsolationReport
from .payload import environment_entries


@dataclass(frozen=True)
class LaunchPlan:
    """The decided form of a SandboxConfig for this host and this caller."""

    config: SandboxConfig
    namespaces: NamespacePlan
    rootfs: RootfsPlan | None
    rlimits: RlimitPlan
    capabilities: CapabilityPlan
    seccomp: seccomp.SeccompProgram
    environment: tuple[bytes, ...]
    not_enforced: tuple[str, ...] = ()  # what this config, on this host, leaves open

    def isolation_report(self, cgroup: str = "", limits: tuple[str, ...] = ()) -> IsolationReport:
        """What this plan enforces (the bootstrap fails closed, so planned == in force)."""
        cfg = self.config
        return IsolationReport(
            backend="linux",
            namespaces=self.namespaces.names,
            rootfs="read-only tmpfs root, private /tmp, fresh /proc, minimal /dev" if self.rootfs else "host",
            uid=cfg.uid,
            gid=cfg.gid,
            capabilities=self.capabilities.names,
            no_new_privs=cfg.no_new_privs,
            seccomp=self.seccomp.description,
            cgroup=cgroup,
            limits=self.rlimits.describe() + limits,
            not_enforced=self.not_enforced,
        )


def plan_launch(config: SandboxConfig) -> LaunchPlan:
    """Plan a launch of `config` by this process (as it is now: its effective ids
    decide whether a user namespace is needed)."""
    return _plan_launch(config, os.geteuid(), os.getegid())


@functools.lru_cache(maxsize=64)
def _plan_launch(config: SandboxConfig, euid: int, egid: int) -> LaunchPlan:
    ns = plan_namespaces(config.namespaces, config.uid, config.gid, euid, egid)
    rootfs = (plan_rootfs(config.filesystem, uid=config.uid, gid=config.gid, hostname=config.hostname)
              if config.namespaces.mnt else None)
    return LaunchPlan(
        config=config,
        namespaces=ns,
        rootfs=rootfs,
        rlimits=plan_rlimits(config.max_open_files),
        capabilities=plan_capabilities(config.capabilities),
        seccomp=seccomp.compile_profile(config.seccomp),
        environment=environment_entries(config.environment),
        not_enforced=_left_open(config, ns, euid, egid),
    )


def _left_open(config: SandboxConfig, ns: NamespacePlan, euid: int, egid: int) -> tuple[str, ...]:
    """Consequences of the config's own choices, and of running unprivileged, that
    the isolation report must state (nothing here was required and refused)."""
    notes = []
    if "pid" not in ns.names:
        notes.append(f"namespaces.pid: off, so processes of uid {config.uid} outside the sandbox (other "
                     "sandboxes too) are visible and can be signalled")
    if "net" not in ns.names:
        notes.append("namespaces.net: off, the host's network is shared")
    if "mnt" not in ns.names:
        notes.append("namespaces.mnt: off, the host's file system is visible")
    extra_groups = sorted(set(os.getgroups()) - {egid}) if ns.user else []
    if extra_groups:
        notes.append(f"credentials: the caller's supplementary groups {extra_groups} stay in force (an "
                     "unprivileged user namespace cannot drop them)")
    return tuple(notes)
