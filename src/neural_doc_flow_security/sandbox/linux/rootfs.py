"""The sandbox's root file system.

A tmpfs becomes the new root; system directories, the Python installation (when
asked) and the user's binds are bind-mounted into it read-only (user `binds`
read-write), /proc is mounted fresh with its kernel knobs read-only and its
leaky files masked, /dev holds a handful of harmless nodes, /tmp is a private
tmpfs with a size cap. Then the root is made read-only, pivot_root moves into it
and the old root is detached.

The plan is computed once per config in the parent (`plan_rootfs`); the child
only executes it (`apply_rootfs`).
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import FilesystemConfig
from . import syscalls as sc

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


def plan_rootfs(config: FilesystemConfig, *, uid: int, gid: int, hostname: str) -> RootfsPlan:
    """Decide the mounts for a sandbox with this file-system config."""
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
        if os.path.islink(path) and not os.path.exists(path):
            continue
        if os.path.exists(path):
            binds.append(Bind(path, path, True))
    if config.python:
        for path in python_paths():
            if not covered(path, bound):
                binds.append(Bind(path, path, True))
                bound.append(path)
    for bind in config.read_only_binds + config.binds:
        binds.append(Bind(bind.source, bind.target, bind.read_only))
    user_line = f"sandbox:x:{uid}:{gid}:sandbox:/tmp:/bin/sh\n" if uid not in (0, 65534) else ""
    group_line = f"sandbox:x:{gid}:\n" if gid not in (0, 65534) else ""
    files = (
        ("/etc/passwd", ("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:"
                         "/usr/sbin/nologin\n" + user_line).encode()),
        ("/etc/group", ("root:x:0:\nnogroup:x:65534:\n" + group_line).encode()),
        ("/etc/hosts", f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n".encode()),
        ("/etc/hostname", f"{hostname}\n".encode()),
    )
    return RootfsPlan(tuple(binds), tuple(symlinks), files, config.tmp_size_mb)


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _make_mount_point(target: str, is_dir: bool) -> None:
    if is_dir:
        _mkdirs(target)
    else:
        _mkdirs(os.path.dirname(target))
        if not os.path.lexists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _bind(source: str, target: str, attrs: int, *, is_dir: bool) -> None:
    _make_mount_point(target, is_dir)
    sc.mount(source, target, None, sc.MS_BIND | sc.MS_REC)
    sc.mount_setattr(target, attrs, recursive=True)


def _open_sources(plan: RootfsPlan) -> list[tuple[int, Bind]]:
    opened = []
    for bind in plan.binds:
        try:
            fd = os.open(bind.source, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"bind source {bind.source}: {e.strerror}") from None
        opened.append((fd, bind))
    return opened


def _mount_proc(root: str, devnull_fd: int) -> None:
    proc = root + "/proc"
    _mkdirs(proc)
    sc.mount("proc", proc, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for name in PROC_READ_ONLY:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            sc.mount_setattr(path, _RO, recursive=True)
    for name in PROC_MASKED_FILES:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            sc.mount(f"/proc/self/fd/{devnull_fd}", path, None, sc.MS_BIND)
    for name in PROC_MASKED_DIRS:
        path = f"{proc}/{name}"
        if os.path.isdir(path):
            sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV, "size=0")


def _mount_dev(root: str) -> None:
    dev = root + "/dev"
    _mkdirs(dev)
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "size=64k,mode=0755")
    for name in DEV_NODES:
        _bind("/dev/" + name, f"{dev}/{name}", sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC, is_dir=False)
    for name, link in DEV_LINKS:
        os.symlink(link, f"{dev}/{name}")
    _mkdirs(dev + "/pts")
    sc.mount("devpts", dev + "/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    _mkdirs(dev + "/shm")
    sc.mount("tmpfs", dev + "/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64m,mode=1777")
    sc.mount_setattr(dev, sc.MOUNT_ATTR_RDONLY, recursive=False)


def apply_rootfs(plan: RootfsPlan) -> None:
    """Build the root from the plan and pivot into it (child, in a new mount ns)."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sources = _open_sources(plan)
    devnull_fd = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
    root = _STAGING
    sc.mount("tmpfs", root, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m,mode=0755")
    _mkdirs(root + "/tmp")
    sc.mount("tmpfs", root + "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, f"size={plan.tmp_size_mb}m,mode=1777")
    for fd, bind in sources:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        attrs = _RO if bind.read_only else sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
        _bind(f"/proc/self/fd/{fd}", root + bind.target, attrs, is_dir=is_dir)
        os.close(fd)
    for path, link in plan.symlinks:
        os.symlink(link, root + path)
    for path, content in plan.files:
        _mkdirs(os.path.dirname(root + path))
        fd = os.open(root + path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        os.write(fd, content)
        os.close(fd)
    _mount_proc(root, devnull_fd)
    os.close(devnull_fd)
    _mount_dev(root)
    sc.mount_setattr(root, _RO, recursive=False)
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
