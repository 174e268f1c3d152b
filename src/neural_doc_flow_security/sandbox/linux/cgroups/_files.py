"""Plain-file helpers shared by the v1 and v2 backends: reading and writing cgroup
control files, killing what a cgroup holds, removing directories, and the
ownership stamp in sandbox cgroup names."""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable

from ...errors import SandboxError, SetupError

# Sandbox cgroup directories are named ndf-<owner pid>-<owner start time>-<seq>[-<label>]
# so that a later manager can tell a dead manager's leftovers from a live one's.
_OWNER_NAME = re.compile(r"^ndf-(\d+)-(\d+)-(\d+)(?:-[A-Za-z0-9_.-]*)?$")
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_seq = itertools.count(1)
_seq_lock = threading.Lock()

POLL_INTERVAL = 0.005


def read_text(path: str) -> str:
    """The content of a control file, stripped."""
    with open(path) as f:
        return f.read().strip()


def read_int(path: str, default: int = 0) -> int:
    """An integer control file; `default` when it is missing or reads "max"."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return default
    return default if text == "max" else int(text)


def blkio_bytes(text: str) -> tuple[int, int]:
    """(read, write) bytes summed over devices from v1 blkio.throttle.io_service_bytes*."""
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            read += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            write += int(parts[2])
    return read, write


def io_stat_bytes(text: str) -> tuple[int, int]:
    """(read, write) bytes summed over devices from v2 io.stat ("MAJ:MIN rbytes=N wbytes=N ...")."""
    read = write = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                write += int(value)
    return read, write


def read_keyed(path: str) -> dict[str, int]:
    """A flat-keyed file ("key value" per line) such as cpu.stat or memory.events."""
    result: dict[str, int] = {}
    try:
        text = read_text(path)
    except FileNotFoundError:
        return result
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            result[parts[0]] = int(parts[1])
    return result


def write_text(path: str, value: str) -> None:
    """Write one value to a control file; errors name the file and the value."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError("cgroup", f"cannot open {path}: {e.strerror}", e.errno or 0) from e
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise SetupError("cgroup", f"writing {value!r} to {path}: {e.strerror}", e.errno or 0) from e
    finally:
        os.close(fd)


def procs(directory: str) -> list[int]:
    """The pids in a cgroup's cgroup.procs ([] when the cgroup is gone)."""
    try:
        return [int(x) for x in read_text(os.path.join(directory, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def signal_members(directories: Iterable[str], sig: int = signal.SIGKILL) -> int:
    """Send `sig` to every process listed in the cgroups; returns how many were signalled.

    A pid is first pinned with a pidfd and then checked to still be a member, so a pid
    that exited and was reused by an unrelated process in between is never signalled.
    """
    dirs = list(directories)
    listed = {pid for d in dirs for pid in procs(d)}
    pinned: dict[int, int] = {}
    try:
        for pid in listed:
            try:
                pinned[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        still = {pid for d in dirs for pid in procs(d)}
        sent = 0
        for pid, fd in pinned.items():
            if pid in still:
                try:
                    signal.pidfd_send_signal(fd, sig)
                    sent += 1
                except ProcessLookupError:
                    pass
        return sent
    finally:
        for fd in pinned.values():
            os.close(fd)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate()` until true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def remove_dir(path: str, timeout: float = 5.0) -> None:
    """rmdir a cgroup; a missing one is fine. EBUSY right after the last process left is
    retried (the kernel releases the css asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise SandboxError(f"cannot remove cgroup {path}: {e.strerror}") from e
        time.sleep(POLL_INTERVAL)


def remove_if_empty(path: str) -> None:
    """rmdir a shared parent (neural-doc-flow) when nothing else is left in it."""
    try:
        os.rmdir(path)
    except OSError as e:
        # Busy or not empty: another sandbox uses it. No permission: this process
        # (e.g. now in a user namespace) did not create it; its creator removes it.
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT, errno.EACCES, errno.EPERM):
            raise SandboxError(f"cannot remove cgroup parent {path}: {e.strerror}") from e


def make_dir(path: str) -> None:
    """mkdir a cgroup (parents included; an existing one is fine)."""
    try:
        os.mkdir(path)
    except FileNotFoundError:
        make_dir(os.path.dirname(path))
        make_dir(path)
    except FileExistsError:
        pass
    except OSError as e:
        raise SetupError("cgroup", f"cannot create cgroup {path}: {e.strerror}", e.errno or 0) from e


def swap_active() -> bool:
    """Whether any swap area is on (then an unlimited swap would let memory escape)."""
    try:
        with open("/proc/swaps") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return False


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


@functools.lru_cache(maxsize=4)
def _own_start_time(pid: int) -> int:
    return process_start_time(pid) or 0  # keyed by pid: a forked child has its own


def sandbox_dir_name(label: str = "") -> str:
    """A fresh, ownership-stamped cgroup directory name for one sandbox of this process."""
    pid = os.getpid()
    start = _own_start_time(pid)
    with _seq_lock:
        seq = next(_seq)
    safe = _LABEL_UNSAFE.sub("_", label)[:64]
    return f"ndf-{pid}-{start}-{seq}" + (f"-{safe}" if safe else "")


def parse_owner(name: str) -> tuple[int, int] | None:
    """(owner pid, owner start time) of a sandbox cgroup name, or None if not one of ours."""
    m = _OWNER_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def owner_alive(pid: int, start: int) -> bool:
    """Whether the manager that created a cgroup still runs (same pid and start time,
    and not a zombie: a dead owner that its parent has not reaped yet is dead)."""
    if process_start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
