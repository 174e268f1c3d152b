"""cgroup backends (v1 and v2) behind one interface, the host probe and the factory.

    support = probe_cgroups()                         # what this host can do, cached
    remove_stale_cgroups()                            # once, when a manager starts
    cg = create_sandbox_cgroup("plugin-x", CgroupLimits(memory_bytes=256 << 20))
    cg.add_process(pid); ...; cg.stats(); cg.destroy()

Sandbox cgroups live in `<the manager's own cgroup>/neural-doc-flow/` in every
hierarchy used and are named ndf-<owner pid>-<owner start time>-<seq>[-<label>], so
remove_stale_cgroups() can tell a dead manager's leftovers from a live one's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ...errors import UnsupportedError
from . import _files
from .base import CgroupLimits, CgroupStats, CgroupSupport, ControllerSupport, SandboxCgroup
from .delegation import adopted_base
from .v1 import V1Cgroup
from .v2 import V2Cgroup

__all__ = [
    "CgroupLimits",
    "CgroupStats",
    "CgroupSupport",
    "ControllerSupport",
    "SandboxCgroup",
    "V1Cgroup",
    "V2Cgroup",
    "cgroup_for_sandbox_name",
    "create_sandbox_cgroup",
    "probe_cgroups",
    "remove_stale_cgroups",
]

PARENT_NAME = "neural-doc-flow"
CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "io", "freezer")
_V1_NAMES = {"memory": "memory", "cpu": "cpu", "cpuacct": "cpuacct", "pids": "pids",
             "io": "blkio", "freezer": "freezer"}
_V2_LIMIT_CONTROLLERS = ("memory", "cpu", "pids", "io")


@dataclass(frozen=True)
class _Mount:
    fstype: str  # "cgroup" or "cgroup2"
    root: str  # the cgroup path at the mount's root (not "/" inside a cgroup namespace bind)
    mountpoint: str
    options: frozenset[str]  # super options: the v1 controllers of this hierarchy


def _unescape(path: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1:i + 4].isdigit():
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _cgroup_mounts() -> list[_Mount]:
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
                continue
            mounts.append(_Mount(rfields[0], _unescape(fields[3]), _unescape(fields[4]),
                                 frozenset(rfields[2].split(","))))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """hierarchy key -> own path: "" for the unified hierarchy, else each v1 controller.
    A manager that moved into a leaf of its delegated cgroup (delegation.py) owns the
    delegated cgroup: its sandboxes are the leaf's siblings."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                own[""] = adopted_base(path)
            for c in controllers.split(","):
                if c:
                    own[c] = path
    return own


def _own_dir(mount: _Mount, own_path: str) -> str | None:
    root = mount.root.rstrip("/")
    if own_path != root and not own_path.startswith(root + "/"):
        return None  # our cgroup is not visible below this mount
    return os.path.join(mount.mountpoint, own_path[len(root):].lstrip("/")).rstrip("/")


def own_oom_kill_file() -> str | None:
    """The file counting OOM kills in this process's memory cgroup (v1 memory.oom_control,
    v2 memory.events), or None. A sandbox without a cgroup of its own is charged
    there: the kernel counts it there when it OOM-kills it, whichever limit ran out."""
    try:
        own, mounts = _own_cgroups(), _cgroup_mounts()
    except (OSError, ValueError):
        return None
    for mount in mounts:
        v1 = mount.fstype == "cgroup" and "memory" in mount.options and "memory" in own
        v2 = mount.fstype == "cgroup2" and "" in own
        own_dir = _own_dir(mount, own["memory" if v1 else ""]) if v1 or v2 else None
        if own_dir is not None:
            path = os.path.join(own_dir, "memory.oom_control" if v1 else "memory.events")
            if os.path.exists(path):
                return path
    return None


def _may_create_below(own_dir: str, parent: str) -> str:
    """"" if this process may create cgroups in `parent`, else the reason."""
    target = parent if os.path.isdir(parent) else own_dir
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{target} is not writable by uid {os.geteuid()} (no delegated subtree)"
    return ""


def _probe_v2(unified: _Mount | None, own: dict[str, str]) -> tuple[dict[str, ControllerSupport], bool]:
    """v2 support per controller (only those the unified hierarchy has) and whether the
    manager sits in the true root cgroup (may enable controllers there)."""
    found: dict[str, ControllerSupport] = {}
    if unified is None or "" not in own:
        return found, False
    own_dir = _own_dir(unified, own[""])
    if own_dir is None:
        return found, False
    parent = os.path.join(own_dir, PARENT_NAME)
    at_root = unified.root == "/" and own[""] == "/"
    reason = _may_create_below(own_dir, parent)
    if not reason and os.geteuid() != 0 and not os.access(os.path.join(own_dir, "cgroup.procs"), os.W_OK):
        reason = f"{own_dir}/cgroup.procs is not writable: cannot move sandbox processes"
    available = set(_files.read_text(os.path.join(own_dir, "cgroup.controllers")).split())
    delegated = set(_files.read_text(os.path.join(own_dir, "cgroup.subtree_control")).split())
    for name in _V2_LIMIT_CONTROLLERS:
        if name not in available:
            continue
        why = reason
        if not why and name not in delegated and not at_root:
            why = (f"{name} is not enabled in {own_dir}/cgroup.subtree_control and the manager "
                   "lives in that cgroup (no-internal-processes rule): run it in a leaf of a "
                   "delegated subtree")
        found[name] = ControllerSupport(name, "v2", parent, not why, why)
    # Core features of every non-root v2 cgroup: cpu.stat usage (cpuacct) and cgroup.freeze.
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    for name in ("cpuacct", "freezer"):
        why = reason or ("cgroup.freeze needs Linux >= 5.2" if name == "freezer" and release < (5, 2)
                         else "")
        found[name] = ControllerSupport(name, "v2", parent, not why, why)
    return found, at_root


@functools.cache
def _probe() -> tuple[CgroupSupport, bool]:
    mounts = _cgroup_mounts()
    own = _own_cgroups()
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v2, at_root = _probe_v2(unified, own)
    v1: dict[str, ControllerSupport] = {}
    for name, v1_name in _V1_NAMES.items():
        mount = next((m for m in mounts if m.fstype == "cgroup" and v1_name in m.options), None)
        if mount is None:
            continue
        own_dir = _own_dir(mount, own.get(v1_name, "/"))
        if own_dir is None:
            v1[name] = ControllerSupport(name, "v1", "", False,
                                         f"own {v1_name} cgroup is not visible below {mount.mountpoint}")
            continue
        parent = os.path.join(own_dir, PARENT_NAME)
        why = _may_create_below(own_dir, parent)
        v1[name] = ControllerSupport(name, "v1", parent, not why, why)
    # One backend per sandbox: v2 when the unified hierarchy carries memory (or no v1
    # hierarchy is mounted at all), else v1. Mixed setups are refused per controller.
    primary = "v2" if ("memory" in v2 or (not v1 and v2)) else "v1"
    controllers = []
    for name in CONTROLLERS:
        if name in ("cpuacct", "freezer"):
            chosen = (v2 if primary == "v2" else v1).get(name)
        else:
            chosen = v2.get(name) or v1.get(name)
        if chosen is None:
            controllers.append(ControllerSupport(name, "", "", False, "not available on this host"))
        elif chosen.version != primary and chosen.usable:
            controllers.append(ControllerSupport(
                name, chosen.version, chosen.parent, False,
                f"on cgroup {chosen.version} while the backend is {primary} (mixed hierarchies unsupported)"))
        else:
            controllers.append(chosen)
    return CgroupSupport(tuple(controllers)), at_root


def probe_cgroups() -> CgroupSupport:
    """What the cgroup backends can do on this host (probed once, then cached).

    Per controller (memory, cpu, cpuacct, pids, io, freezer): v2 if the unified hierarchy
    has it, else v1; `parent` is <own cgroup>/neural-doc-flow in that hierarchy; `usable`
    says whether this process may create sandbox cgroups there, `reason` why not.
    """
    return _probe()[0]


def cgroup_for_sandbox_name(name: str) -> str:
    """A fresh directory name for sandbox `name`, stamped with this manager's identity
    (ndf-<pid>-<start time>-<seq>-<name>, unsafe characters replaced)."""
    return _files.sandbox_dir_name(name)


def _parents(support: CgroupSupport, parent: str | None) -> dict[str, str]:
    """controller -> parent directory of every usable controller (parent renamed if asked)."""
    result = {}
    for c in support.controllers:
        if c.usable:
            result[c.name] = c.parent if parent is None else os.path.join(os.path.dirname(c.parent), parent)
    return result


def _check_parent_name(parent: str | None) -> None:
    if parent is not None and (not parent or "/" in parent or parent in (".", "..")):
        raise ValueError(f"parent must be a single directory name, got {parent!r}")


def joined_at_clone() -> bool:
    """Whether a sandbox enters its cgroup with the clone itself (CLONE_INTO_CGROUP,
    cgroup v2 only), so the cgroup must exist before; on v1 the parent moves the
    child in after the clone, so the cgroup can be made while the child sets up."""
    support, _ = _probe()
    return {c.version for c in support.controllers if c.usable} == {"v2"}


def create_sandbox_cgroup(name: str, limits: CgroupLimits, parent: str | None = None) -> SandboxCgroup:
    """Create and limit a cgroup for one sandbox (v2 or v1, whichever this host uses).

    `name` is a label folded into the directory name; `parent` replaces "neural-doc-flow"
    as the directory below the manager's own cgroup. A requested limit whose controller is
    missing or unusable raises UnsupportedError naming the limit (fail closed).
    """
    _check_parent_name(parent)
    support, at_root = _probe()
    for field, controller, requested in (
        ("memory_bytes", "memory", limits.memory_bytes is not None),
        ("memory_high_bytes", "memory", limits.memory_high_bytes is not None),
        ("cpu_quota_percent", "cpu", limits.cpu_quota_percent is not None),
        ("max_processes", "pids", limits.max_processes is not None),
        ("io limits", "io", limits.io_requested),
    ):
        c = support.get(controller)
        if requested and (c is None or not c.usable):
            raise UnsupportedError(field, f"cgroup {controller} controller: "
                                   f"{c.reason if c else 'not available on this host'}")
    parents = _parents(support, parent)
    if not parents:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in support.controllers)
        raise UnsupportedError("cgroups", f"no usable cgroup hierarchy ({reasons})")
    dirname = cgroup_for_sandbox_name(name)
    versions = {c.version for c in support.controllers if c.usable}
    if versions == {"v2"}:
        wanted = [c for c in ("memory", "pids", "cpu", "io")
                  if c in parents and (c in ("memory", "pids") or
                                       (c == "cpu" and limits.cpu_quota_percent is not None) or
                                       (c == "io" and limits.io_requested))]
        parent_dir = next(iter(parents.values()))
        return V2Cgroup.create(dirname, parent_dir, limits, controllers=wanted, may_enable_above=at_root)
    return V1Cgroup.create(dirname, parents, limits)


def _existing_sandbox_dirs(support: CgroupSupport, parent: str | None) -> dict[str, dict[str, str]]:
    """sandbox dir name -> {controller: parent dir} for every ndf-* cgroup found."""
    found: dict[str, dict[str, str]] = {}
    for controller, parent_dir in _parents(support, parent).items():
        try:
            entries = os.listdir(parent_dir)
        except FileNotFoundError:
            continue
        for entry in entries:
            if _files.parse_owner(entry) and os.path.isdir(os.path.join(parent_dir, entry)):
                found.setdefault(entry, {})[controller] = parent_dir
    return found


def remove_stale_cgroups(parent: str | None = None) -> list[str]:
    """Remove sandbox cgroups left by managers that are gone (call once at manager start).

    Only ndf-<pid>-<start>-* directories are considered, and only those whose owner
    (same pid and start time) no longer runs; their processes are killed first.
    Returns the directories removed.
    """
    _check_parent_name(parent)
    support, at_root = _probe()
    removed: list[str] = []
    for dirname, parents in sorted(_existing_sandbox_dirs(support, parent).items()):
        owner = _files.parse_owner(dirname)
        assert owner is not None
        if _files.owner_alive(*owner):
            continue
        paths = {c: os.path.join(p, dirname) for c, p in parents.items()}
        cgroup: SandboxCgroup
        if {c.version for c in support.controllers if c.usable} == {"v2"}:
            cgroup = V2Cgroup(dirname, next(iter(paths.values())), may_enable_above=at_root)
        else:
            cgroup = V1Cgroup(dirname, paths, parents)
        cgroup.destroy()
        removed.extend(sorted(set(paths.values())))
    return removed
