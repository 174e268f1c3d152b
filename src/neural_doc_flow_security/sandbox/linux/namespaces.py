"""Namespaces: which clone flags a config asks for, and the user-namespace id maps.

The child is created with every namespace at once (clone3), so the ones other
than the user namespace are owned by the new user namespace when there is one.
The parent writes the id maps while the child waits on the sync pipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import NamespaceConfig
from ..errors import UnsupportedError
from . import syscalls

_FLAGS = {
    "user": syscalls.CLONE_NEWUSER,
    "pid": syscalls.CLONE_NEWPID,
    "net": syscalls.CLONE_NEWNET,
    "mnt": syscalls.CLONE_NEWNS,
    "uts": syscalls.CLONE_NEWUTS,
    "ipc": syscalls.CLONE_NEWIPC,
    "cgroup": syscalls.CLONE_NEWCGROUP,
}


@dataclass(frozen=True)
class NamespacePlan:
    """The namespaces to create and, with a user namespace, the one-id maps."""

    names: tuple[str, ...]
    clone_flags: int
    uid_map: str = ""
    gid_map: str = ""

    @property
    def user(self) -> bool:
        return "user" in self.names


def plan_namespaces(config: NamespaceConfig, inner_uid: int, inner_gid: int,
                    euid: int, egid: int) -> NamespacePlan:
    """Which namespaces to unshare. With a user namespace (a caller that is not root)
    the sandbox's uid/gid map to the caller's own."""
    wanted = {
        "user": config.user_enabled(euid), "pid": config.pid, "net": config.net,
        "mnt": config.mnt, "uts": config.uts, "ipc": config.ipc, "cgroup": config.cgroup,
    }
    names = tuple(name for name, on in wanted.items() if on)
    flags = 0
    for name in names:
        flags |= _FLAGS[name]
    if not wanted["user"]:
        return NamespacePlan(names, flags)
    if euid == 0:
        # Root's child would itself be unmapped in a one-id map and could not set up
        # the root; that needs a subordinate id range (/etc/subuid), not done yet.
        raise UnsupportedError("namespaces.user", "as root, a user namespace needs a subordinate uid range, "
                               "which is not supported yet; leave namespaces.user unset (as root the "
                               "sandbox drops to an unprivileged uid without one)")
    return NamespacePlan(names, flags, f"{inner_uid} {euid} 1\n", f"{inner_gid} {egid} 1\n")


def write_id_maps(pid: int, plan: NamespacePlan) -> None:
    """Write the child's uid/gid maps (from the parent, before releasing the child).
    setgroups is denied, as the kernel requires for an unprivileged gid map."""
    base = f"/proc/{pid}/"
    for name, text in (("setgroups", "deny"), ("uid_map", plan.uid_map), ("gid_map", plan.gid_map)):
        fd = os.open(base + name, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
