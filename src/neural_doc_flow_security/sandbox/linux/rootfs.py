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

An image root (`filesystem.image`) or a copy-on-write root (`filesystem.overlay`)
is an overlayfs instead of the tmpfs: see `_layered_steps`. Its layers are fds
opened without following symlinks, handed to overlayfs as /proc/self/fd paths.

A writable bind with owner = "caller" (config.BindMount) is, as root, an idmapped
mount: a user namespace made for the launch maps the sandbox's uid/gid, and only
them, to the caller's (Step.IDMAP), so the files it creates there are the caller's
on the host while it keeps its own unprivileged uid.

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
from ..errors import ConfigError
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
MAX_PTYS = 16
"""Pseudo-terminals a sandbox's devpts hands out: they come from the host's pool
(kernel.pty.max, 4096 by default, shared by every devpts instance but the host's own)."""
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms",
                     "kpagecount", "kpageflags", "kpagecgroup", "config.gz", "vmallocinfo")
PROC_MASKED_DIRS = ("acpi", "scsi", "asound", "driver")

_RO = sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV


@dataclass(frozen=True)
class Bind:
    """One bind mount of the plan (`copy_on_write`: an overlay with the source as its
    lower layer and an upper layer on the sandbox's overlay tmpfs)."""

    source: str
    target: str
    read_only: bool
    copy_on_write: bool = False
    idmap: bool = False  # files made there belong to the caller (RootfsPlan.idmap)


@dataclass(frozen=True)
class RootfsPlan:
    """Everything the child needs to build the root, decided in the parent."""

    binds: tuple[Bind, ...]
    symlinks: tuple[tuple[str, str], ...]   # (path in sandbox, link text)
    files: tuple[tuple[str, bytes], ...]    # synthesized files (path, content)
    tmp_size_mb: int
    image: str | None = None                # the image's root directory on the host
    overlay_size_mb: int = 0                # > 0: a copy-on-write root (overlay upper on a tmpfs of this size)
    mount_points: tuple[tuple[str, bool], ...] = ()  # (path, is a directory) made in the root's own layer
    user_namespace: bool = False            # overlays take the user.* xattrs (userxattr)
    overlay_changes: str = "discard"        # "report"/"keep": the child hands the overlay tmpfs to the parent
    overlay_keep_dir: str | None = None

    # (sandbox uid, gid (-1: the launch's id), host uid, gid): the id map of the binds
    # marked `idmap` (a writable bind with owner = "caller", as root); None: no such bind.
    idmap: tuple[int, int, int, int] | None = None

    @property
    def hands_back_changes(self) -> bool:
        """Whether the child sends its overlay tmpfs to the parent (to report or keep the changes)."""
        return bool(self.overlay_size_mb) and self.overlay_changes != "discard"

    @property
    def layered(self) -> bool:
        """Whether the root is an overlay (an image, or copy-on-write) rather than a tmpfs."""
        return self.image is not None or self.overlay_size_mb > 0

    @property
    def upper_layers(self) -> tuple[str, ...]:
        """The sandbox paths whose writes land in the overlay tmpfs, in layer order
        (layer i is the tmpfs's directory `i/upper`): the root, then each
        copy-on-write bind."""
        if not self.overlay_size_mb:
            return ()
        return ("/", *(bind.target for bind in self.binds if bind.copy_on_write))

    def describe(self) -> str:
        """The isolation report's words for this root."""
        root = f"image {self.image} (read-only)" if self.image else "read-only tmpfs root"
        if self.overlay_size_mb:
            root = (f"image {self.image}" if self.image else "host-derived root") + \
                f", copy-on-write (overlay, upper on a {self.overlay_size_mb} MiB tmpfs)"
        text = f"{root}, private /tmp, fresh /proc, minimal /dev"
        if self.image:
            text += "; /etc/passwd, /etc/group, /etc/hosts, /etc/hostname synthesized where the image lacks them"
        if self.idmap is not None:
            targets = ", ".join(bind.target for bind in self.binds if bind.idmap)
            text += (f"; idmapped (owner = caller): {targets}, the sandbox's uid/gid mapped to "
                     f"{self.idmap[2]}/{self.idmap[3]}")
        return text


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


def image_root(image: str, root_path: str | None = None) -> str:
    """The root directory of `image` on the host: the directory itself, or, for an
    OCI bundle, its root.path beneath it: `root_path` as the caller read it
    (FilesystemConfig.image_root_path), else from the config.json beside it
    ("rootfs" by default). It must lie beneath the bundle: the child opens it without
    following a symlink in any component (the bundle is untrusted content)."""
    real = os.path.realpath(image)  # the caller's own path: its links are the caller's
    if not os.path.isdir(real):
        raise ConfigError("filesystem.image", f"not a directory: {image!r}")
    if root_path is None:
        if not os.path.lexists(os.path.join(real, "config.json")):
            return real
        from ..oci import OciError, read_spec
        from ..oci import root_path as spec_root_path

        try:
            root_path = spec_root_path(read_spec(real), default="rootfs")
        except OciError as e:
            raise ConfigError("filesystem.image", f"{e} (the OCI bundle {image!r})") from None
    root = os.path.normpath(os.path.join(real, root_path))
    if not os.path.isdir(root):
        raise ConfigError("filesystem.image", f"root.path {root_path!r} of the bundle {image!r} is not a directory")
    return root


def plan_rootfs(config: FilesystemConfig, *, uid: int | None, gid: int | None, hostname: str,
                id_range: tuple[int, int] = DEFAULT_ID_RANGE, user_namespace: bool = False,
                caller: tuple[int, int] | None = None) -> RootfsPlan:
    """Decide the mounts for a sandbox with this file-system config (`uid`/`gid`
    None: each launch's own, from `id_range`). `caller`: the host uid/gid that a
    bind with owner = "caller" maps the sandbox's to (root, with no user namespace;
    None: the sandbox's ids are the caller's already)."""
    binds: list[Bind] = []
    symlinks: list[tuple[str, str]] = []
    bound: list[str] = []
    image = image_root(config.image, config.image_root_path) if config.image is not None else None
    overlay_mb = config.overlay_mb if config.overlay else 0
    for path in SYSTEM_DIRS if image is None else ():
        if os.path.islink(path):
            symlinks.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(Bind(path, path, True, copy_on_write=bool(overlay_mb)))
            bound.append(path)
    for name in ETC_ENTRIES if image is None else ():
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
    if (uid is None or gid is None) and image is None and not overlay_mb:
        # A whole range: one host file for all, bound (cheaper than a copy each). A layered
        # root writes them into its own layer (a bind there would need a mount point).
        binds += [Bind(os.path.realpath(path), "/etc/" + name, True)
                  for name, path in ids.account_files((("passwd", passwd), ("group", group)))]
    else:
        files = (("/etc/passwd", passwd), ("/etc/group", group), *files)
    # A user's source is taken as written: the child refuses a symlink on its path.
    idmap = None
    if caller is not None and any(b.owner == "caller" for b in config.all_binds) and (uid, gid) != caller:
        idmap = (-1 if uid is None else uid, -1 if gid is None else gid, *caller)
    binds += [Bind(bind.source, bind.target, bind.read_only, idmap=idmap is not None and bind.owner == "caller")
              for bind in config.all_binds]
    # A parent before anything below it (a read-only part of a writable tree stays read-only);
    # otherwise in order, so that of two binds on one target the later one is on top.
    binds.sort(key=lambda bind: _relative(bind.target).count("/"))
    mount_points: tuple[tuple[str, bool], ...] = ()
    if image is not None or overlay_mb:
        # An overlay root cannot take a new mount point: its own layer holds them all.
        mount_points = tuple(dict.fromkeys(
            [("/proc", True), ("/dev", True), ("/tmp", True)]
            + [(bind.target, os.path.isdir(bind.source)) for bind in binds]))
    return RootfsPlan(tuple(binds), tuple(symlinks), files, config.tmp_size_mb, image=image,
                      overlay_size_mb=overlay_mb, mount_points=mount_points,
                      user_namespace=user_namespace and bool(image is not None or overlay_mb),
                      overlay_changes=config.overlay_changes, overlay_keep_dir=config.overlay_keep_dir, idmap=idmap)


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


def _bind_attributes(bind: Bind) -> int:
    """A bind's mount attributes: read-only, or writable nosuid,nodev (idmapped: owner = "caller")."""
    if bind.read_only:
        return _RO
    return sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | (sc.MOUNT_ATTR_IDMAP if bind.idmap else 0)


def _relative(path: str) -> str:
    """A path of the sandbox relative to its root (the child's working directory)."""
    return os.path.normpath(path).lstrip("/")


def _tmpfs_data(size_mb: int, mode: str) -> str:
    """Options of a tmpfs the payload writes: `size_mb` MiB and as many inodes as it has
    4 KiB pages. size= bounds file data only; an empty file, a directory or a short
    link takes no page, and without nr_inodes (default: half the host's RAM pages) a
    payload could fill the kernel's memory with millions of them, charged to no one
    without a memory cgroup."""
    return f"size={size_mb}m,nr_inodes={max(1024, size_mb * 256)},mode={mode}"


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
                              _mount("tmpfs", "dev", "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC,
                                     "size=64k,nr_inodes=1024,mode=0755")]
    steps += [_bind(-1, "/dev/" + name, f"dev/{name}", sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)
              for name in DEV_NODES]
    steps += [(Step.SYMLINK, _b(link), _b(f"dev/{name}")) for name, link in DEV_LINKS]
    steps += [(Step.MKDIR, b"dev/pts"),
              _mount("devpts", "dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                     f"newinstance,ptmxmode=0666,mode=0620,max={MAX_PTYS}"),
              (Step.MKDIR, b"dev/shm"),
              _mount("tmpfs", "dev/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, _tmpfs_data(64, "1777")),
              (Step.SETATTR, b"dev", sc.MOUNT_ATTR_RDONLY, 0)]
    return steps


def _overlay(target: str, lowers: tuple[int, ...], upper: int = -1, work: int = -1, options: str = "") -> StepTuple:
    return (Step.OVERLAY, _b(target), b"".join(slot.to_bytes(4, "little", signed=True) for slot in lowers),
            upper, work, _b(options), sc.MS_NOSUID | sc.MS_NODEV)


def _layered_steps(plan: RootfsPlan, changes_socket: int) -> list[StepTuple]:
    """The root as an overlay: its lower layers are the image (if any) above the root's
    own layer (the set-up's files, links and every mount point: an overlay without an
    upper layer takes no new one, and one with an upper layer would report them as
    the payload's changes); with `overlay_size_mb`, its upper layer and those of the
    copy-on-write binds are directories `i/upper` (and `i/work`) of one tmpfs of that
    size, charged to the sandbox's memory cgroup like any tmpfs page it writes. With
    `changes_socket`, that tmpfs is sent to the parent, which reads the changes from
    it once the payload has ended (linux/overlay_changes.py)."""
    devnull_slot = len(plan.binds)
    image_slot, layer_slot, upper_slot = devnull_slot + 1, devnull_slot + 2, devnull_slot + 3
    options = "userxattr" if plan.user_namespace else ""
    steps: list[StepTuple] = [_mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)]
    steps += [(Step.OPEN_SOURCE, slot, _b(bind.source)) for slot, bind in enumerate(plan.binds)]
    steps.append((Step.OPEN_SOURCE, devnull_slot, b"/dev/null"))
    if plan.image is not None:
        steps.append((Step.OPEN_SOURCE, image_slot, _b(plan.image)))
    steps += [_mount("tmpfs", _STAGING, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=4m,mode=0755"),
              (Step.CHDIR, _b(_STAGING)), (Step.MKDIR, b"layer")]
    steps += [(Step.SYMLINK, _b(link), b"layer/" + _b(_relative(path))) for path, link in plan.symlinks]
    steps += [(Step.MKDIR, b"layer/" + _b(_relative(path if is_dir else os.path.dirname(path))))
              for path, is_dir in plan.mount_points]
    steps += [(Step.MKDIR, b"layer/" + _b(_relative(directory)))
              for directory in dict.fromkeys(os.path.dirname(path) for path, _ in plan.files)]
    steps += [(Step.WRITE_FILE, b"layer/" + _b(_relative(path)), content) for path, content in plan.files]
    steps += [(Step.WRITE_FILE, b"layer/" + _b(_relative(path)), b"")
              for path, is_dir in plan.mount_points if not is_dir]
    steps.append((Step.OPEN_SOURCE, layer_slot, b"layer"))
    layers = plan.upper_layers
    if layers:
        steps += [(Step.MKDIR, b"rw"), _mount("tmpfs", "rw", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                                               _tmpfs_data(plan.overlay_size_mb, "0755"))]
        for i in range(len(layers)):
            steps += [(Step.MKDIR, f"rw/{i}/upper".encode()), (Step.MKDIR, f"rw/{i}/work".encode()),
                      (Step.OPEN_SOURCE, upper_slot + 2 * i, f"rw/{i}/upper".encode()),
                      (Step.OPEN_SOURCE, upper_slot + 2 * i + 1, f"rw/{i}/work".encode())]
        if changes_socket >= 0:
            rw_slot = upper_slot + 2 * len(layers)
            steps += [(Step.OPEN_SOURCE, rw_slot, b"rw"), (Step.SEND_SLOT, changes_socket, rw_slot)]
    lowers = (image_slot, layer_slot) if plan.image is not None else (layer_slot,)
    upper, work = (upper_slot, upper_slot + 1) if layers else (-1, -1)
    steps += [(Step.MKDIR, b"root"),
              _overlay("root", lowers, upper, work, options),
              (Step.CHDIR, b"root"),
              _mount("tmpfs", "tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, _tmpfs_data(plan.tmp_size_mb, "1777"))]
    if plan.idmap is not None:  # the user namespace of the idmapped binds, while the host's /proc is here
        steps.append((Step.IDMAP, *plan.idmap))
    layer = 1
    for slot, (bind, existing) in enumerate(zip(plan.binds, _beneath_writable(plan.binds), strict=True)):
        if bind.copy_on_write:
            upper = upper_slot + 2 * layer
            steps.append(_overlay(_relative(bind.target), (slot,), upper, upper + 1, options))
            layer += 1
        else:
            steps.append(_bind(slot, "", _relative(bind.target), _bind_attributes(bind), existing=existing))
    if plan.idmap is not None:
        steps.append((Step.IDMAP, -2, -2, -2, -2))
    steps += _proc_steps(devnull_slot)
    steps += _dev_steps()
    steps += [(Step.SETATTR, b".", sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV if layers else _RO, 0),
              (Step.PIVOT_ROOT,)]
    return steps


@functools.lru_cache(maxsize=64)
def rootfs_steps(plan: RootfsPlan, changes_socket: int = -1) -> tuple[StepTuple, ...]:
    """The child's steps that build the root from the plan and pivot into it (in
    its new mount namespace). Every bind source is opened before the root tmpfs
    hides it, so any host path can be bound. Once the root tmpfs is the working
    directory, every path is relative to it: _child.c resolves those beneath it and
    never through a symlink (a writable bind is the sandbox's ground). `changes_socket`:
    where a copy-on-write root's tmpfs is sent (plan.hands_back_changes)."""
    if plan.layered:
        return tuple(_layered_steps(plan, changes_socket))
    devnull_slot = len(plan.binds)
    steps: list[StepTuple] = [_mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)]
    steps += [(Step.OPEN_SOURCE, slot, _b(bind.source)) for slot, bind in enumerate(plan.binds)]
    steps += [(Step.OPEN_SOURCE, devnull_slot, b"/dev/null"),
              _mount("tmpfs", _STAGING, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m,mode=0755"),
              (Step.CHDIR, _b(_STAGING)),
              (Step.MKDIR, b"tmp"),
              _mount("tmpfs", "tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, _tmpfs_data(plan.tmp_size_mb, "1777"))]
    # The root's own links and files before any bind: the set-up writes nothing into a
    # bind (a user's bind on /etc/hosts covers ours; a bind nested in a writable one needs
    # its mount point there already), and their
    # directories are listable, unlike the ones made for a bind.
    steps += [(Step.SYMLINK, _b(link), _b(_relative(path))) for path, link in plan.symlinks]
    steps += [(Step.MKDIR, _b(_relative(directory)))
              for directory in dict.fromkeys(os.path.dirname(path) for path, _ in plan.files)]
    steps += [(Step.WRITE_FILE, _b(_relative(path)), content) for path, content in plan.files]
    if plan.idmap is not None:  # the user namespace of the idmapped binds, while the host's /proc is here
        steps.append((Step.IDMAP, *plan.idmap))
    steps += [_bind(slot, "", _relative(bind.target), _bind_attributes(bind), existing=existing)
              for slot, (bind, existing) in enumerate(zip(plan.binds, _beneath_writable(plan.binds), strict=True))]
    if plan.idmap is not None:
        steps.append((Step.IDMAP, -2, -2, -2, -2))
    steps += _proc_steps(devnull_slot)
    steps += _dev_steps()
    steps += [(Step.SETATTR, b".", _RO, 0), (Step.PIVOT_ROOT,)]
    return tuple(steps)
