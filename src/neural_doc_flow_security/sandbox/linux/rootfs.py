"""The sandbox's root file system.

A tmpfs becomes the new root; system directories, the Python installation (when
asked) and the user's binds are bind-mounted into it read-only (writable user
binds nosuid,nodev), a parent always before what is below it, /proc is mounted
fresh with its kernel knobs read-only and its leaky files masked, /dev holds a
handful of harmless nodes, /tmp is a private tmpfs with a size cap. Then the
root is made read-only, pivot_root moves into it and the old root is detached.

No path is resolved through a symlink, on the host (bind sources: a user's
source must be its real path) or in the new root (targets: a writable bind is
ground the sandbox controls at the next launch); see _child.c. Directories made
only to hold a bind's mount point are mode 0111: crossed, never listed.

The plan is computed once per config in the parent (`plan_rootfs`) and turned
into the child's steps (`rootfs_steps`), which the child only executes.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import DEFAULT_ID_RANGE, NOBODY, FilesystemConfig
from . import ids
from . import syscalls as sc
from .steps import Step, StepTuple

# The staging mount point inside the child's private mount namespace: every bind
# source is opened before the root tmpfs hides it, so any path can be bound.
_STAGING = "/tmp"

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_ENTRIES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "nsswitch.conf",
    "ssl", "ca-certificates", "fonts", "mime.types", "magic", "python3", "python3.11",
    "python3.12", "python3.13", "ImageMagick-6", "xdg", "debian_version", "os-release",
)
DEV_NODES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms",
                     "kpagecount", "kpageflags", "kpagecgroup", "config.gz", "vmallocinfo")
PROC_MASKED_DIRS = ("acpi", "scsi", "asound", "driver")

_RO = sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV


@dataclass(frozen=True)
class Bind:
    """One bind mount of the plan."""

    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class RootfsPlan:
    """Everything the child needs to build the root, decided in the parent."""

    binds: tuple[Bind, ...]
    symlinks: tuple[tuple[str, str], ...]   # (path in sandbox, link text)
    files: tuple[tuple[str, bytes], ...]    # synthesized files (path, content)
    tmp_size_mb: int


@functools.cache
def python_paths() -> tuple[str, ...]:
    """Directories a Python payload needs: the interpreter (prefixes, standard
    library, site-packages) and this package. Not the rest of sys.path: the host
    application's own directories (its script directory, configuration, secrets)
    stay invisible; a callable defined there travels by value (see api.py)."""
    import site
    import sysconfig

    import neural_doc_flow_security

    paths = [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))]
    paths += [sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")]
    paths += site.getsitepackages()
    # Where this package is imported from (an editable install lives outside site-packages).
    paths.append(os.path.dirname(os.path.dirname(os.path.realpath(neural_doc_flow_security.__file__))))
    found: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if os.path.exists(real) and real != "/" and real not in found:
            found.append(real)
    return tuple(found)


def covered(path: str, parents: Iterable[str]) -> bool:
    """Whether `path` is one of `parents` or below one."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


# /etc/passwd and /etc/group list every id of a sandbox id range up to this many
# (a launch's id is not known when the root is planned, or built ahead by a spare).
MAX_LISTED_IDS = 4096
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _accounts(uid: int | None, gid: int | None, id_range: tuple[int, int]) -> tuple[bytes, bytes]:
    """/etc/passwd and /etc/group: root, nobody and the sandbox user, with its fixed
    ids or every id of the range it takes one from."""
    first, count = id_range
    if uid is not None and gid is not None:
        pairs = [(uid, gid)]
    else:
        listed = range(first, first + count) if count <= MAX_LISTED_IDS else range(0)
        pairs = [(n if uid is None else uid, n if gid is None else gid) for n in listed]
    users = "".join(f"sandbox:x:{u}:{g}:sandbox:/tmp:/bin/sh\n" for u, g in pairs if u not in (0, NOBODY))
    groups = "".join(f"sandbox:x:{g}:\n" for g in dict.fromkeys(g for _, g in pairs) if g not in (0, NOBODY))
    return (_PASSWD + users).encode(), (_GROUP + groups).encode()


def plan_rootfs(config: FilesystemConfig, *, uid: int | None, gid: int | None, hostname: str,
                id_range: tuple[int, int] = DEFAULT_ID_RANGE) -> RootfsPlan:
    """Decide the mounts for a sandbox with this file-system config (`uid`/`gid`
    None: each launch's own, from `id_range`)."""
    binds: list[Bind] = []
    symlinks: list[tuple[str, str]] = []
    bound: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            symlinks.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(Bind(path, path, True))
            bound.append(path)
    for name in ETC_ENTRIES:
        path = "/etc/" + name
        if os.path.exists(path):  # the host's own links (localtime, os-release) resolved here: the child follows none
            binds.append(Bind(os.path.realpath(path), path, True))
    if config.python:
        for path in python_paths():
            if not covered(path, bound):
                binds.append(Bind(path, path, True))
                bound.append(path)
    passwd, group = _accounts(uid, gid, id_range)
    files: tuple[tuple[str, bytes], ...] = (
        ("/etc/hosts", f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n".encode()),
        ("/etc/hostname", f"{hostname}\n".encode()),
    )
    if uid is None or gid is None:  # a whole range: one host file for all, bound (cheaper than a copy each)
        binds += [Bind(os.path.realpath(path), "/etc/" + name, True)
                  for name, path in ids.account_files((("passwd", passwd), ("group", group)))]
    else:
        files = (("/etc/passwd", passwd), ("/etc/group", group), *files)
    # A user's source is taken as written: the child refuses a symlink on its path.
    binds += [Bind(bind.source, bind.target, bind.read_only) for bind in config.all_binds]
    # A parent before anything below it (a read-only part of a writable tree stays read-only);
    # otherwise in order, so that of two binds on one target the later one is on top.
    binds.sort(key=lambda bind: _relative(bind.target).count("/"))
    return RootfsPlan(tuple(binds), tuple(symlinks), files, config.tmp_size_mb)


def _b(text: str) -> bytes:
    return os.fsencode(text)


# How the child finds a bind's target (_child.c's TARGET_*).
_TARGET_MAKE, _TARGET_OPTIONAL, _TARGET_EXISTING = 0, 1, 2


def _bind(slot: int, source: str, target: str, attrs: int, *, optional: bool = False,
          keep_open: bool = False, existing: bool = False) -> StepTuple:
    how = _TARGET_OPTIONAL if optional else _TARGET_EXISTING if existing else _TARGET_MAKE
    return (Step.BIND, slot, _b(source), _b(target), attrs, how, int(keep_open))


def _beneath_writable(binds: tuple[Bind, ...]) -> list[bool]:
    """Per bind: whether its target lies beneath an earlier writable bind's target.
    Its mount point must exist there: a mount point made in a writable bind would be
    left in the host's directory after the sandbox."""
    writable: list[str] = []
    beneath = []
    for bind in binds:
        target = _relative(bind.target)
        beneath.append(any(target.startswith(parent + "/") for parent in writable))
        if not bind.read_only:
            writable.append(target)
    return beneath


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None, *,
           optional: bool = False) -> StepTuple:
    return (Step.MOUNT, None if source is None else _b(source), _b(target),
            None if fstype is None else _b(fstype), flags, None if data is None else _b(data), int(optional))


def _relative(path: str) -> str:
    """A path of the sandbox relative to its root (the child's working directory)."""
    return os.path.normpath(path).lstrip("/")


def _proc_steps(devnull_slot: int) -> list[StepTuple]:
    """A fresh /proc; its kernel knobs read-only, its leaky files masked (steps
    for entries this kernel lacks are skipped)."""
    steps: list[StepTuple] = [(Step.MKDIR, b"proc"),
                              _mount("proc", "proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)]
    steps += [_bind(-1, f"proc/{name}", f"proc/{name}", _RO, optional=True) for name in PROC_READ_ONLY]
    steps += [_bind(devnull_slot, "", f"proc/{name}", 0, optional=True, keep_open=True)
              for name in PROC_MASKED_FILES]
    steps += [_mount("tmpfs", f"proc/{name}", "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV, "size=0",
                     optional=True) for name in PROC_MASKED_DIRS]
    return steps


def _dev_steps() -> list[StepTuple]:
    """A minimal /dev: harmless nodes, a private devpts and /dev/shm; read-only."""
    steps: list[StepTuple] = [(Step.MKDIR, b"dev"),
                              _mount("tmpfs", "dev", "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "size=64k,mode=0755")]
    steps += [_bind(-1, "/dev/" + name, f"dev/{name}", sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)
              for name in DEV_NODES]
    steps += [(Step.SYMLINK, _b(link), _b(f"dev/{name}")) for name, link in DEV_LINKS]
    steps += [(Step.MKDIR, b"dev/pts"),
              _mount("devpts", "dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
              (Step.MKDIR, b"dev/shm"),
              _mount("tmpfs", "dev/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64m,mode=1777"),
              (Step.SETATTR, b"dev", sc.MOUNT_ATTR_RDONLY, 0)]
    return steps


@functools.lru_cache(maxsize=64)
def rootfs_steps(plan: RootfsPlan) -> tuple[StepTuple, ...]:
    """The child's steps that build the root from the plan and pivot into it (in
    its new mount namespace). Every bind source is opened before the root tmpfs
    hides it, so any host path can be bound. Once the root tmpfs is the working
    directory, every path is relative to it: _child.c resolves those beneath it and
    never through a symlink (a writable bind is the sandbox's ground)."""
    devnull_slot = len(plan.binds)
    steps: list[StepTuple] = [_mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)]
    steps += [(Step.OPEN_SOURCE, slot, _b(bind.source)) for slot, bind in enumerate(plan.binds)]
    steps += [(Step.OPEN_SOURCE, devnull_slot, b"/dev/null"),
              _mount("tmpfs", _STAGING, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m,mode=0755"),
              (Step.CHDIR, _b(_STAGING)),
              (Step.MKDIR, b"tmp"),
              _mount("tmpfs", "tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, f"size={plan.tmp_size_mb}m,mode=1777")]
    # The root's own links and files before any bind: the set-up writes nothing into a
    # bind (a user's bind on /etc/hosts covers ours; a bind nested in a writable one needs
    # its mount point there already), and their
    # directories are listable, unlike the ones made for a bind.
    steps += [(Step.SYMLINK, _b(link), _b(_relative(path))) for path, link in plan.symlinks]
    steps += [(Step.MKDIR, _b(_relative(directory)))
              for directory in dict.fromkeys(os.path.dirname(path) for path, _ in plan.files)]
    steps += [(Step.WRITE_FILE, _b(_relative(path)), content) for path, content in plan.files]
    steps += [_bind(slot, "", _relative(bind.target),
                    _RO if bind.read_only else sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV, existing=existing)
              for slot, (bind, existing) in enumerate(zip(plan.binds, _beneath_writable(plan.binds), strict=True))]
    steps += _proc_steps(devnull_slot)
    steps += _dev_steps()
    steps += [(Step.SETATTR, b".", _RO, 0), (Step.PIVOT_ROOT,)]
    return tuple(steps)
