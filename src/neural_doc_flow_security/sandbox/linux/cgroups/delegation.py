"""Whether this process runs in a cgroup v2 subtree delegated to it, and what it offers.

systemd delegates a subtree with `Delegate=yes` (`systemd-run --user --scope -p
Delegate=yes CMD`, a service with Delegate=, the user manager's user@UID.service);
container runtimes do the same for a container's cgroup. Delegation is visible in
the cgroup facts alone, so it is read from them, with no systemd needed:

- /proc/self/cgroup: the process's cgroup in the unified hierarchy ("0::/path");
- that directory, its cgroup.procs and cgroup.subtree_control: owned by and writable
  for this user (systemd chowns them to the unit's user; root owns everything);
- cgroup.controllers: the controllers the parent hands down, which this subtree may
  enable for its children; cgroup.subtree_control: those enabled already;
- cgroup.procs: whether processes live in the cgroup itself, which then cannot enable
  controllers for its children (the no-internal-processes rule);
- the path names the systemd unit (run-r<ID>.scope, user@UID.service, ...), and
  systemd >= 251 marks a delegated cgroup with the `user.delegate` /
  `trusted.delegate` extended attribute (read where permitted).

A process that is alone in a delegated cgroup cannot give its children controllers
while it lives there (the no-internal-processes rule). `adopt_delegated_subtree()`
moves it into a leaf, `<cgroup>/neural-doc-flow/ndf-<pid>-<start>-<n>-manager`, then
enables the handed-down limit controllers in `<cgroup>/cgroup.subtree_control`: its
sandbox cgroups are then that leaf's siblings, and the cgroup layer treats `<cgroup>`
as the manager's own. The leaf is named as sandbox cgroups are, so the stale-cgroup
cleanup removes it once its process is gone.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace

LIMITS_BY_CONTROLLER = {
    "memory": ("memory_limit_mb",),
    "pids": ("max_processes",),
    "cpu": ("cpu_quota_percent",),
    "io": ("io_read_bps", "io_write_bps"),
}
"""The config fields each v2 controller enforces."""

_UNIT_SUFFIXES = (".scope", ".service", ".slice")
MANAGER_LABEL = "manager"
"""The label of the leaf a manager moves itself into (ndf-<pid>-<start>-<n>-manager)."""


@dataclass(frozen=True)
class Delegation:
    """This process's cgroup v2 and whether it is a subtree delegated to it.

    `delegated`: the cgroup directory and its cgroup.procs and cgroup.subtree_control
    are writable by this process (owned by its uid, or it is root), so it may create
    and fill child cgroups. `offered`: the limit controllers the parent hands down
    (cgroup.controllers); `enabled`: those enabled for children already;
    `own_processes`: how many processes live in the cgroup itself (children cannot
    get controllers while any does). `limits` are the config fields the offered
    controllers can enforce; `usable_now` says whether sandbox cgroups can take
    them as things stand; `movable` that this process is alone in the cgroup, so
    adopt_delegated_subtree() can make them usable; `reason` why neither.
    """

    cgroup: str = ""  # the path in the unified hierarchy, e.g. /user.slice/.../run-r1.scope
    directory: str = ""  # where it is mounted here
    unit: str = ""  # the innermost systemd unit the path names
    user_manager: str = ""  # "user@1000.service" below a user's systemd
    owner_uid: int | None = None
    marked_delegated: bool = False  # systemd's user.delegate / trusted.delegate attribute
    delegated: bool = False
    offered: tuple[str, ...] = ()
    enabled: tuple[str, ...] = ()
    own_processes: int = 0
    limits: tuple[str, ...] = ()
    usable_now: bool = False
    movable: bool = False  # adopt_delegated_subtree() would make the limits usable
    reason: str = ""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _unified_path(proc_cgroup: str) -> str | None:
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
    return None


def adopted_base(path: str) -> str:
    """For the path of a leaf a manager moved into (adopt_delegated_subtree), the
    delegated cgroup it came from, which stays the manager's own; else `path`."""
    from . import PARENT_NAME

    head, _, leaf = path.rpartition("/")
    base, _, parent = head.rpartition("/")
    if parent == PARENT_NAME and re.fullmatch(rf"ndf-\d+-\d+-\d+-{MANAGER_LABEL}", leaf):
        return base or "/"
    return path


def _units(path: str) -> tuple[str, str]:
    names = [part for part in path.split("/") if part]
    units = [n for n in names if n.endswith(_UNIT_SUFFIXES)]
    manager = next((n for n in names if n.startswith("user@") and n.endswith(".service")), "")
    return (units[-1] if units else ""), manager


def _marked(directory: str) -> bool:
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(directory, name).strip() in (b"1", b"yes", b"true"):
                return True
        except OSError:  # no such attribute, no permission (trusted.* needs CAP_SYS_ADMIN), no xattrs
            continue
    return False


def detect_delegation(mountpoint: str | None = None, mount_root: str = "/",
                      proc_cgroup: str | None = None, euid: int | None = None) -> Delegation | None:
    """This process's delegation facts, or None where there is no cgroup v2 to speak of.

    `mountpoint` and `mount_root`: where the unified hierarchy is mounted and the
    cgroup at its root (from /proc/self/mountinfo when `mountpoint` is None);
    `proc_cgroup`: the text of /proc/self/cgroup; `euid`: whose delegation. The
    parameters let a fake tree stand in for /sys/fs/cgroup.
    """
    if mountpoint is None:
        from . import _cgroup_mounts

        unified = next((m for m in _cgroup_mounts() if m.fstype == "cgroup2"), None)
        if unified is None:
            return None
        mountpoint, mount_root = unified.mountpoint, unified.root
    euid = os.geteuid() if euid is None else euid
    path = _unified_path(_read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup)
    if path is None:
        return None
    path = adopted_base(path)  # moved already: the delegated cgroup is still what it has
    root = mount_root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return Delegation(cgroup=path, reason=f"own cgroup {path} is not visible below {mountpoint}")
    directory = os.path.join(mountpoint, path[len(root):].lstrip("/")).rstrip("/") or mountpoint
    unit, manager = _units(path)
    facts = Delegation(cgroup=path, directory=directory, unit=unit, user_manager=manager)
    try:
        st = os.stat(directory)
        offered = _read(os.path.join(directory, "cgroup.controllers")).split()
        enabled = _read(os.path.join(directory, "cgroup.subtree_control")).split()
        own = len(_read(os.path.join(directory, "cgroup.procs")).split())
    except OSError as e:
        return replace(facts, reason=f"cannot read {directory}: {e.strerror}")
    writable = [name for name in ("", "cgroup.procs", "cgroup.subtree_control")
                if _writable(os.path.join(directory, name), euid)]
    delegated = len(writable) == 3
    offered_limits = tuple(c for c in LIMITS_BY_CONTROLLER if c in offered)
    at_root = path == "/" and root in ("", "/")
    usable_now = delegated and bool(offered_limits) and (at_root or all(c in enabled for c in offered_limits))
    reason = ""
    if not delegated:
        missing = sorted({"", "cgroup.procs", "cgroup.subtree_control"} - set(writable))
        reason = (f"not delegated to uid {euid}: " + ", ".join(os.path.join(directory, m) for m in missing)
                  + " not writable")
    elif not offered_limits:
        reason = (f"no limit controller is handed down to it ({directory}/cgroup.controllers: "
                  f"{' '.join(offered) or 'empty'})")
    marked = _marked(directory)
    # Root may write anywhere: only a cgroup systemd marked as delegated is root's to rearrange.
    movable = (delegated and bool(offered_limits) and not usable_now and (euid != 0 or marked)
               and _only_us(directory, proc_cgroup is None))
    if delegated and offered_limits and not usable_now and not movable:
        reason = (f"{', '.join(c for c in offered_limits if c not in enabled)} not enabled in "
                  f"{directory}/cgroup.subtree_control, and {own} process(es) live in that cgroup, "
                  "so none can be (no-internal-processes rule)")
        reason += (": root rearranges only a cgroup systemd marked as delegated" if euid == 0 and not marked
                   else ": start ndf-sandbox (or the program using the API) as the only process of a "
                        "delegated scope (systemd-run --scope -p Delegate=yes ...)")
    return Delegation(
        cgroup=path, directory=directory, unit=unit, user_manager=manager, owner_uid=st.st_uid,
        marked_delegated=marked, delegated=delegated, offered=offered_limits,
        enabled=tuple(c for c in enabled if c in LIMITS_BY_CONTROLLER), own_processes=own,
        limits=tuple(field for c in offered_limits for field in LIMITS_BY_CONTROLLER[c]),
        usable_now=usable_now, movable=movable, reason=reason)


def _writable(path: str, euid: int) -> bool:
    """Writable by `euid` (by the mode bits: the owner's for its owner; root writes anything)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if euid == 0:
        return True
    if st.st_uid == euid:
        return bool(st.st_mode & 0o200)
    return bool(st.st_mode & 0o002)


def _only_us(directory: str, this_process: bool) -> bool:
    """Whether the cgroup holds exactly one process, this one (for a fake tree, one)."""
    try:
        pids = _read(os.path.join(directory, "cgroup.procs")).split()
    except OSError:
        return False
    return pids == [str(os.getpid())] if this_process else len(pids) == 1


def adopt_delegated_subtree() -> str:
    """Move this process into a leaf of the delegated cgroup v2 it is alone in, and
    enable the handed-down limit controllers for the leaf's siblings (this process's
    sandbox cgroups). Returns the leaf's directory, or "" when there is nothing to do
    or it cannot be done (`ndf-sandbox check` tells why). Call it before this process
    starts other processes (a zygote) and before the cgroup probe matters.
    """
    if sys.platform != "linux":
        return ""
    try:
        found = detect_delegation()
    except (OSError, ValueError):
        return ""
    if found is None or not found.movable:
        return ""
    from ...errors import SandboxError
    from . import PARENT_NAME, _files, _probe

    parent = os.path.join(found.directory, PARENT_NAME)
    leaf = os.path.join(parent, _files.sandbox_dir_name(MANAGER_LABEL))
    try:
        _files.make_dir(parent)
        os.mkdir(leaf)
        try:
            _files.write_text(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        except SandboxError:
            os.rmdir(leaf)
            raise
    except (OSError, SandboxError):
        return ""
    for controller in found.offered:  # one by one: one the kernel refuses leaves the others
        try:
            _files.write_text(os.path.join(found.directory, "cgroup.subtree_control"), f"+{controller}")
        except SandboxError:
            continue
    _probe.cache_clear()
    return leaf


def describe(delegation: Delegation) -> tuple[str, str]:
    """(status, detail) for `ndf-sandbox check`: "yes" (sandbox cgroups can take the
    offered limits), "not used" (offered, but not usable as things stand) or "no"."""
    where = delegation.cgroup + (f" (systemd unit {delegation.unit})" if delegation.unit else "")
    if not delegation.delegated or not delegation.offered:
        return "no", f"{where}: {delegation.reason}"
    offers = f"{where}: delegated (owner uid {delegation.owner_uid}{', marked by systemd' if delegation.marked_delegated else ''}), offers {' '.join(delegation.offered)} -> {', '.join(delegation.limits)}"  # noqa: E501
    if delegation.usable_now:
        return "yes", offers
    if delegation.movable:
        return "yes", (f"{offers}; ndf-sandbox run and SandboxManager.start() move this process into "
                       f"{delegation.directory}/neural-doc-flow/ndf-...-{MANAGER_LABEL} and enable them there "
                       "for its sandboxes")
    return "not used", f"{offers}; {delegation.reason}"
