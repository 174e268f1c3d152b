"""Numbers held with flock: a number (a sandbox id, a network slot) is taken by
locking the file <directory>/<number> exclusively for as long as it is in use.
Every process on the host takes them the same way, and the kernel releases the
lock of a holder that dies (the lock's fd is close-on-exec)."""

from __future__ import annotations

import errno
import fcntl
import os

from ..errors import SandboxError


def try_lock(directory: str, number: int, field: str) -> int | None:
    """The fd that holds <directory>/<number> locked (the file made 0600, the
    directory 0700 on first use: /run is a tmpfs), or None when another process
    holds it. Closing the fd gives the number back. Errors name `field`."""
    path = f"{directory}/{number}"
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise SandboxError(f"{field}: cannot open {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise SandboxError(f"{field}: cannot lock {path}: {e.strerror}") from None
    return fd
