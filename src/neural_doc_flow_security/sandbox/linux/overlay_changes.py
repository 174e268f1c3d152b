"""What a copy-on-write root's payload changed, read by the host.

The child sends the overlay's tmpfs (its directory fd, SCM_RIGHTS) to the parent
while it builds the root (rootfs.py); layer i's upper directory is `i/upper`.
Once the payload has ended (init reported, or was reaped: nothing in the
sandbox runs any more), the parent walks each upper directory: an entry there
is a path the payload created or modified (it exists in the layer's lower
directory, or not), a whiteout (a character device 0/0) one it deleted. The
walk is bounded (entries, depth) and never follows a symlink: every name is
opened relative to its directory's fd with O_NOFOLLOW. "keep" copies the
upper layers into a new host directory (or a new tar archive, for a name
ending in .tar) the same way: regular files, directories and symlinks only
(no device node, fifo or socket), permission bits without set-id or sticky
bits, owned by the host process, and never more bytes than the overlay's tmpfs
holds: a sparse file (a hole takes no tmpfs page) or a file hard-linked many
times would otherwise be written out in full on the host, each time, so a
payload could fill the host's disk from a small overlay.

Closing the received fd frees the tmpfs (its pages were charged to the
sandbox's memory cgroup, like any tmpfs page the payload wrote).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from ..result import FileChange, FilesystemChanges
from .rootfs import RootfsPlan

MAX_ENTRIES = 100_000
MAX_DEPTH = 128
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOOKUP = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def receive_tmpfs(sock_fd: int) -> int | None:
    """The overlay tmpfs's fd the child sent on `sock_fd`, or None (it failed before)."""
    sock = socket.socket(fileno=os.dup(sock_fd))
    try:
        sock.setblocking(False)
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    except (BlockingIOError, OSError):
        return None
    finally:
        sock.close()
    return fds[0] if fds else None


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    if dir_fd < 0:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _open_lower(name: str, dir_fd: int) -> int:
    if dir_fd < 0:
        return -1
    try:
        return os.open(name, _LOOKUP, dir_fd=dir_fd)
    except OSError:
        return -1


@dataclass
class _Walk:
    """One walk's bound and findings."""

    changes: list[FileChange]
    complete: bool = True
    error: str | None = None

    def full(self) -> bool:
        if len(self.changes) >= MAX_ENTRIES:
            self.complete = False
            self.error = f"more than {MAX_ENTRIES} changed paths: the list stops there"
        return not self.complete


def _entries(dir_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    for name in sorted(os.listdir(dir_fd)):
        yield name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _walk(walk: _Walk, upper_fd: int, lower_fd: int, prefix: str, in_lower: frozenset[str], depth: int) -> None:
    """List the changes beneath one upper directory; `lower_fd` is the same directory
    in the lower layer (-1: none), `in_lower` the sandbox paths of a layer the host
    cannot open (the set-up's own)."""
    if depth > MAX_DEPTH:
        walk.complete, walk.error = False, f"directories deeper than {MAX_DEPTH} levels are not listed"
        return
    for name, st in _entries(upper_fd):
        if walk.full():
            return
        path = prefix.rstrip("/") + "/" + os.fsdecode(name)
        lower = _lstat(name, lower_fd)
        existed = lower is not None or path in in_lower
        if _is_whiteout(st):
            walk.changes.append(FileChange(path, "deleted", _kind(lower.st_mode) if lower else "other"))
            continue
        if stat.S_ISDIR(st.st_mode):
            if not existed:
                walk.changes.append(FileChange(path, "created", "directory"))
            child = os.open(name, _DIR, dir_fd=upper_fd)
            child_lower = _open_lower(name, lower_fd) if lower is not None and stat.S_ISDIR(lower.st_mode) else -1
            try:
                _walk(walk, child, child_lower, path, in_lower, depth + 1)
            finally:
                os.close(child)
                if child_lower >= 0:
                    os.close(child_lower)
            continue
        size = st.st_size if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else 0
        walk.changes.append(FileChange(path, "modified" if existed else "created", _kind(st.st_mode), size))


def _setup_paths(plan: RootfsPlan) -> frozenset[str]:
    """The paths of the root's own layer (made by the set-up, gone after it)."""
    paths = {path for path, _ in plan.files} | {path for path, _ in plan.symlinks} | \
        {path for path, _ in plan.mount_points}
    for path in list(paths):
        while path not in ("/", ""):
            path = os.path.dirname(path)
            paths.add(path)
    return frozenset(paths)


def _layers(plan: RootfsPlan) -> list[tuple[str, str | None]]:
    """(sandbox path, lower directory on the host) of each upper layer, in order."""
    cow = [bind.source for bind in plan.binds if bind.copy_on_write]
    return list(zip(plan.upper_layers, [plan.image, *cow], strict=True))


def list_changes(tmpfs_fd: int, plan: RootfsPlan) -> FilesystemChanges:
    """The changes in the overlay tmpfs `tmpfs_fd` of a sandbox built from `plan`."""
    walk = _Walk([])
    in_lower = _setup_paths(plan)
    for i, (target, lower_dir) in enumerate(_layers(plan)):
        try:
            upper = os.open(f"{i}/upper", _DIR, dir_fd=tmpfs_fd)
        except OSError as e:
            return FilesystemChanges(tuple(walk.changes), False, error=f"cannot open layer {target}: {e.strerror}")
        try:
            lower = os.open(lower_dir, _LOOKUP) if lower_dir is not None else -1
        except OSError:
            lower = -1  # the lower directory is gone: every entry counts as created
        try:
            _walk(walk, upper, lower, target, in_lower if i == 0 else frozenset(), 0)
        except OSError as e:
            walk.complete, walk.error = False, f"cannot read the changes beneath {target}: {e.strerror}"
        finally:
            os.close(upper)
            if lower >= 0:
                os.close(lower)
        if not walk.complete:
            break
    return FilesystemChanges(tuple(walk.changes), walk.complete, error=walk.error)


def _make_dirs(root_fd: int, path: str) -> int:
    """The directory `path` (relative) below `root_fd`, made 0700 where missing; never
    through a symlink. Returns its fd."""
    fd = os.dup(root_fd)
    for name in [part for part in path.split("/") if part]:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=fd)
        try:
            child = os.open(name, _DIR, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


@dataclass
class _Budget:
    """The bytes a keep may still write: the overlay tmpfs's size, which bounds what
    its files hold (holes and further hard links of a file hold nothing more)."""

    left: int

    def take(self, size: int) -> None:
        if size > self.left:
            raise OSError(0, "the changes hold more bytes than the overlay's tmpfs (sparse files or hard links "
                             "are not written out on the host)")
        self.left -= size


def _copy_file(name: str, src_dir: int, dst_dir: int, mode: int, budget: _Budget) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        size = os.fstat(src).st_size
        budget.take(size)
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_dir)
        try:
            while size > 0 and (chunk := os.read(src, min(size, 1 << 20))):  # no more than was counted
                os.write(dst, chunk)
                size -= len(chunk)
            os.fchmod(dst, stat.S_IMODE(mode) & 0o777)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_tree(src_dir: int, dst_dir: int, depth: int, budget: _Budget) -> int:
    """Copy regular files, directories and symlinks of `src_dir` into `dst_dir`; returns how many."""
    if depth > MAX_DEPTH:
        raise OSError(0, f"directories deeper than {MAX_DEPTH} levels")
    copied = 0
    for name, st in _entries(src_dir):
        if stat.S_ISREG(st.st_mode):
            _copy_file(name, src_dir, dst_dir, st.st_mode, budget)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)
        elif stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=dst_dir)
            src_child = os.open(name, _DIR, dir_fd=src_dir)
            dst_child = os.open(name, _DIR, dir_fd=dst_dir)
            try:
                copied += _copy_tree(src_child, dst_child, depth + 1, budget)
                os.fchmod(dst_child, stat.S_IMODE(st.st_mode) & 0o777)
            finally:
                os.close(src_child)
                os.close(dst_child)
        else:
            continue  # whiteouts (listed as deleted), device nodes, fifos, sockets
        copied += 1
        if copied > MAX_ENTRIES:
            raise OSError(0, f"more than {MAX_ENTRIES} entries")
    return copied


def _tar_tree(src_dir: int, tar: tarfile.TarFile, prefix: str, depth: int, count: int, budget: _Budget) -> int:
    """Add regular files, directories and symlinks of `src_dir` to `tar` under `prefix`."""
    if depth > MAX_DEPTH:
        raise OSError(0, f"directories deeper than {MAX_DEPTH} levels")
    for name, st in _entries(src_dir):
        info = tarfile.TarInfo(f"{prefix}/{os.fsdecode(name)}".lstrip("/"))
        info.mode, info.mtime = stat.S_IMODE(st.st_mode) & 0o777, int(st.st_mtime)
        if stat.S_ISREG(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_dir)
            with os.fdopen(fd, "rb") as f:
                info.size = os.fstat(f.fileno()).st_size
                budget.take(info.size)
                tar.addfile(info, f)
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=src_dir)
            tar.addfile(info)
        elif stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            child = os.open(name, _DIR, dir_fd=src_dir)
            try:
                count = _tar_tree(child, tar, info.name, depth + 1, count, budget)
            finally:
                os.close(child)
        else:
            continue
        count += 1
        if count > MAX_ENTRIES:
            raise OSError(0, f"more than {MAX_ENTRIES} entries")
    return count


def _keep_tar(tmpfs_fd: int, plan: RootfsPlan, destination: str) -> None:
    """The upper layers as a new tar archive at `destination` (never through a symlink)."""
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        count, budget = 0, _Budget(plan.overlay_size_mb << 20)
        for i, (target, _) in enumerate(_layers(plan)):
            upper = os.open(f"{i}/upper", _DIR, dir_fd=tmpfs_fd)
            try:
                count = _tar_tree(upper, tar, target.rstrip("/"), 0, count, budget)
            finally:
                os.close(upper)


def keep_changes(tmpfs_fd: int, plan: RootfsPlan, destination: str) -> str | None:
    """Copy the upper layers into the new host directory `destination` (each at its
    sandbox path), or, for a name ending in .tar, into a new tar archive there;
    returns what went wrong, or None."""
    if destination.endswith(".tar"):
        try:
            _keep_tar(tmpfs_fd, plan, destination)
        except (OSError, tarfile.TarError) as e:
            return f"filesystem.overlay_keep_dir: writing the changes into {destination!r} failed: " \
                   f"{getattr(e, 'strerror', None) or e}"
        return None
    try:
        os.mkdir(destination, 0o700)
        root = os.open(destination, _DIR)
    except OSError as e:
        return f"filesystem.overlay_keep_dir: cannot make {destination!r}: {e.strerror}"
    budget = _Budget(plan.overlay_size_mb << 20)
    try:
        for i, (target, _) in enumerate(_layers(plan)):
            upper = os.open(f"{i}/upper", _DIR, dir_fd=tmpfs_fd)
            try:
                if not os.listdir(upper):
                    continue  # nothing changed beneath `target`: no empty directory for it
                dst = _make_dirs(root, target)
                try:
                    _copy_tree(upper, dst, 0, budget)
                finally:
                    os.close(dst)
            finally:
                os.close(upper)
    except OSError as e:
        return f"filesystem.overlay_keep_dir: copying the changes into {destination!r} stopped: " \
               f"{e.strerror or e}"
    finally:
        os.close(root)
    return None


def collect(sock_fd: int, plan: RootfsPlan) -> FilesystemChanges:
    """Receive the child's overlay tmpfs on `sock_fd`, list (and keep) its changes, free it."""
    tmpfs = receive_tmpfs(sock_fd)
    if tmpfs is None:
        return FilesystemChanges(complete=False, error="the sandbox did not hand over its overlay")
    try:
        try:
            changes = list_changes(tmpfs, plan)
        except OSError as e:
            return FilesystemChanges(complete=False, error=f"cannot read the overlay's changes: {e.strerror or e}")
        if plan.overlay_changes == "keep" and plan.overlay_keep_dir is not None:
            error = keep_changes(tmpfs, plan, plan.overlay_keep_dir)
            return FilesystemChanges(changes.changes, changes.complete and error is None,
                                     kept_in=None if error else plan.overlay_keep_dir,
                                     error=error or changes.error)
        return changes
    finally:
        os.close(tmpfs)
