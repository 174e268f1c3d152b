"""A LaunchPlan: everything the child bootstrap needs, computed once per config.

Planning (reading /etc, compiling the seccomp filter, resolving capabilities)
happens in the parent and is cached, so the forked child only executes it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ..config import NOBODY, SandboxConfig
from ..errors import SandboxError, UnsupportedError
from ..linux import landlock, seccomp
from ..linux.capabilities import CapabilityPlan, plan_capabilities
from ..linux.cgroups.base import CgroupSupport
from ..linux.namespaces import NamespacePlan, plan_namespaces
from ..linux.rlimits import RlimitPlan, plan_rlimits
from ..linux.rootfs import RootfsPlan, plan_rootfs
from ..linux.seccomp import SeccompProgram
from ..result import IsolationReport
from .limits import LimitPlan, plan_limits
from .payload import environment_entries


@dataclass(frozen=True)
class LaunchPlan:
    """The decided form of a SandboxConfig for this host and this caller."""

    config: SandboxConfig
    namespaces: NamespacePlan
    rootfs: RootfsPlan | None
    rlimits: RlimitPlan
    capabilities: CapabilityPlan
    seccomp: seccomp.SeccompProgram  # a callable's filter
    environment: tuple[bytes, ...]
    limits: LimitPlan  # which limit the cgroup enforces, which an rlimit
    landlock: landlock.LandlockPlan | None = None
    not_enforced: tuple[str, ...] = ()  # what this config, on this host, leaves open
    # The payload's uid and gid; None: each launch's own, from the id range (linux/ids.py).
    uid: int | None = NOBODY
    gid: int | None = NOBODY
    command_seccomp: SeccompProgram | None = None  # a program's, where it differs
    network_method: str = ""  # how its network policy is enforced: "veth", "proxy" ("": it has none)

    def seccomp_for(self, program: bool) -> SeccompProgram:
        """The seccomp filter of a program's (`program`) or a callable's launch."""
        return self.command_seccomp if program and self.command_seccomp is not None else self.seccomp

    @property
    def needs_ids(self) -> bool:
        """Whether each launch takes a sandbox id of its own (linux/ids.py)."""
        return self.uid is None or self.gid is None

    @property
    def cgroup_limits_requested(self) -> bool:
        """Whether the sandbox's cgroup must enforce a limit (it is then required)."""
        return bool(self.limits.by_cgroup)

    def isolation_report(self, cgroup: str = "", limits: tuple[str, ...] = (),
                         sandbox_id: int | None = None, program: bool = False) -> IsolationReport:
        """What this plan enforces (the bootstrap fails closed, so planned == in force);
        `sandbox_id`: the launch's id, where the plan leaves the uid or gid to it."""
        cfg = self.config
        return IsolationReport(
            backend="linux",
            namespaces=self.namespaces.names,
            rootfs=self.rootfs.describe() if self.rootfs else "host",
            uid=_or(self.uid, sandbox_id),
            gid=_or(self.gid, sandbox_id),
            capabilities=self.capabilities.names,
            no_new_privs=cfg.no_new_privs,
            seccomp=self.seccomp_for(program).description,
            landlock=self.landlock.description if self.landlock else "off",
            cgroup=cgroup,
            limits=self.limits.described + self.rlimits.describe() + limits,
            not_enforced=self.not_enforced,
        )


def _or(fixed: int | None, sandbox_id: int | None) -> int:
    if fixed is not None:
        return fixed
    return sandbox_id if sandbox_id is not None else -1


def plan_launch(config: SandboxConfig) -> LaunchPlan:
    """Plan a launch of `config` by this process (as it is now: its effective ids
    decide whether a user namespace is needed)."""
    return _plan_launch(config, os.geteuid(), os.getegid())


@functools.lru_cache(maxsize=64)
def _plan_launch(config: SandboxConfig, euid: int, egid: int) -> LaunchPlan:
    user_namespace = config.namespaces.user_enabled(euid)
    # In a user namespace the sandbox's ids map to the caller's own (65534 inside by
    # default): the kernel charges a namespace's per-uid counts to the caller's uid too.
    uid = config.uid if config.uid is not None or not user_namespace else NOBODY
    gid = config.gid if config.gid is not None or not user_namespace else NOBODY
    ns = plan_namespaces(config.namespaces, NOBODY if uid is None else uid, NOBODY if gid is None else gid,
                         euid, egid)
    # owner = "caller" binds: as root the sandbox's own ids are mapped to ours; in a user namespace they are ours.
    rootfs = (plan_rootfs(config.filesystem, uid=uid, gid=gid, hostname=config.hostname, id_range=config.id_range,
                          user_namespace=ns.user, caller=None if user_namespace else (euid, egid))
              if config.namespaces.mnt else None)
    method = _network_method(config, ns.user or euid != 0)
    environment = config.environment
    notes: tuple[str, ...] = ()
    if method == "proxy":
        from ..linux import connect_proxy

        names = {name for name, _ in connect_proxy.environment()}
        environment = tuple(p for p in environment if p[0] not in names) + connect_proxy.environment()
        notes = (f"network: the policy is enforced by a connect proxy (HTTP CONNECT, SOCKS5 at "
                 f"{connect_proxy.PROXY_ADDRESS}): TCP only, for proxy-aware clients; no UDP",)
    limits = plan_limits(config, _cgroup_support(), ns.user)
    ruleset, landlock_note = _plan_landlock_rules(config, rootfs)
    return LaunchPlan(
        config=config,
        namespaces=ns,
        rootfs=rootfs,
        rlimits=plan_rlimits(config.max_open_files, limits.rlimits),
        limits=limits,
        capabilities=plan_capabilities(config.capabilities),
        seccomp=seccomp.compile_profile("allow-list" if config.seccomp == "default" else config.seccomp),
        command_seccomp=seccomp.compile_profile("deny-list") if config.seccomp == "default" else None,
        environment=environment_entries(environment),
        landlock=ruleset,
        not_enforced=_left_open(config, ns, euid, egid) + landlock_note + notes,
        uid=uid,
        gid=gid,
        network_method=method,
    )


def _network_method(config: SandboxConfig, unprivileged: bool) -> str:
    """How the config's network policy is enforced ("": it has none): "veth" as root
    without a user namespace, else the connect proxy; refused (naming the field) where
    the method asked for cannot, or the proxy cannot carry the policy."""
    policy = config.network
    if policy is None:
        return ""
    if policy.method == "veth" and unprivileged:
        from ..linux.netpolicy import ROOTLESS_REASON

        raise UnsupportedError("network.method", "'veth' needs root without a user namespace (a veth pair and "
                               f"nftables rules); {ROOTLESS_REASON}")
    if policy.method == "veth" or (policy.method == "auto" and not unprivileged):
        return "veth"
    problem = policy.proxy_problem()
    if problem is not None:
        raise UnsupportedError(problem[0], f"{problem[1]} (without root it enforces the network policy)")
    return "proxy"


def _cgroup_support() -> CgroupSupport | None:
    from ..linux.cgroups import probe_cgroups

    try:
        return probe_cgroups()
    except (OSError, SandboxError):
        return None


def _plan_landlock_rules(config: SandboxConfig,
                         rootfs: RootfsPlan | None) -> tuple[landlock.LandlockPlan | None, tuple[str, ...]]:
    """The Landlock ruleset and what it leaves open, or why there is none (fail closed
    when it is required: the config refuses "required" without mounts or no_new_privs)."""
    kernel_abi, kernel_reason = landlock.abi() if config.landlock != "off" else (0, "")
    why = landlock.unavailable_reason(config, kernel_abi, kernel_reason)
    if why or rootfs is None:
        if config.landlock == "required":
            raise UnsupportedError("landlock", kernel_reason or why)
        return None, (why,) if why else ()
    ruleset = landlock.plan_landlock(config, rootfs, kernel_abi)
    notes: list[str] = []
    if kernel_abi < 4:
        notes.append(f"landlock: ABI {kernel_abi} cannot restrict TCP")
    elif not config.namespaces.net:
        notes.append("landlock: TCP bind/connect unrestricted (namespaces.net is off: the host's network is shared)")
    elif config.network is not None:
        notes.append("landlock: TCP connect left to the network policy")
    elif not ruleset.handled_net:
        notes.append("landlock: TCP bind/connect left to the sandbox's network namespace (the payload may serve: "
                     "CAP_NET_BIND_SERVICE)")
    if kernel_abi < 6:
        notes.append(f"landlock: ABI {kernel_abi} cannot scope signals and abstract unix sockets")
    return ruleset, tuple(notes)


def _left_open(config: SandboxConfig, ns: NamespacePlan, euid: int, egid: int) -> tuple[str, ...]:
    """Consequences of the config's own choices, and of running unprivileged, that
    the isolation report must state (nothing here was required and refused)."""
    notes = []
    if "pid" not in ns.names:
        notes.append("namespaces.pid: off, so host processes of the sandbox's uid (other sandboxes too, if "
                     "they share a fixed uid) are visible and can be signalled")
    if "net" not in ns.names:
        notes.append("namespaces.net: off, the host's network is shared")
    if "mnt" not in ns.names:
        notes.append("namespaces.mnt: off, the host's file system is visible")
    extra_groups = sorted(set(os.getgroups()) - {egid}) if ns.user else []
    if extra_groups:
        notes.append(f"credentials: the caller's supplementary groups {extra_groups} stay in force (an "
                     "unprivileged user namespace cannot drop them)")
    return tuple(notes)
