"""Sandbox ids: a host uid/gid of its own for each live sandbox (as root).

The kernel counts some limits per uid (inotify instances and watches, RLIMIT_NPROC,
the user namespace, mqueue and pipe-buffer counts): sandboxes that shared one uid
shared those, and one could exhaust them for all others. As root each sandbox
therefore runs as an id of `SandboxConfig.id_range` (first, count) that no other
live sandbox has, like isolate's box uids; the uid and the gid are the same number.

An id is taken by locking its file, /run/ndf-sandbox/ids/<id>, with flock for as
long as the sandbox lives: every manager, zygote and `ndf-sandbox run` on the host
takes ids the same way, and the kernel releases the lock of a holder that dies.
The holder is the process that supervises the sandbox (a zygote, the `fork`
start method's manager, the CLI); the lock's fd never reaches the sandbox (it is
close-on-exec and the child closes every fd it is not given).
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
from dataclasses import dataclass

from ..errors import SandboxError

ID_DIRECTORY = "/run/ndf-sandbox/ids"


@dataclass
class IdLease:
    """An id held for one sandbox; `release` gives it back (so does the holder's death)."""

    id: int
    fd: int

    def release(self) -> None:
        """Give the id back (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)  # the last fd of the lock's open file: the lock goes with it
            self.fd = -1


def _directory() -> str:
    try:
        os.makedirs(ID_DIRECTORY, mode=0o700, exist_ok=True)
    except OSError as e:
        raise SandboxError(f"id_range: cannot create {ID_DIRECTORY} for the sandbox id locks: {e.strerror}") from None
    return ID_DIRECTORY


def acquire(id_range: tuple[int, int]) -> IdLease:
    """Take a free id of `id_range` (first, count). Raises SandboxError when every
    one is held (by live sandboxes of any process on this host)."""
    first, count = id_range
    directory = _directory()
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        start = random.randrange(count)  # processes starting at once rarely try the same ids
        for i in range(count):
            number = first + (start + i) % count
            fd = os.open(str(number), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise SandboxError(f"id_range: cannot lock {directory}/{number}: {e.strerror}") from None
            return IdLease(number, fd)
    finally:
        os.close(dir_fd)
    raise SandboxError(f"id_range: all {count} sandbox ids from {first} are in use by live sandboxes "
                       "(make the range larger, or wait for some to end)")

