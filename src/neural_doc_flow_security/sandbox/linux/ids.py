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

import os
from dataclasses import dataclass

from ..errors import SandboxError
from . import flock

ID_DIRECTORY = "/run/ndf-sandbox/ids"
ACCOUNTS_DIRECTORY = "/run/ndf-sandbox/accounts"


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


def _directory(path: str = ID_DIRECTORY) -> str:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise SandboxError(f"id_range: cannot create {path} for the sandbox ids: {e.strerror}") from None
    return path


def account_files(contents: tuple[tuple[str, bytes], ...]) -> tuple[tuple[str, str], ...]:
    """Host files with these contents ((name, content): /etc/passwd and /etc/group
    listing every id of a range), made once and bound read-only into each sandbox:
    tens of kilobytes that a launch would otherwise copy. Returns (name, host path)."""
    import hashlib  # here: OpenSSL's load is not needed where no plan has account files

    digest = hashlib.sha256(repr(contents).encode()).hexdigest()[:20]
    directory = _directory(os.path.join(ACCOUNTS_DIRECTORY, digest))
    paths = []
    for name, content in contents:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                current = f.read(len(content) + 1)
        except FileNotFoundError:
            current = None
        if current != content:  # written whole, then renamed: a reader never sees a part
            temporary = f"{path}.{os.getpid()}"
            with open(temporary, "wb") as f:
                f.write(content)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        paths.append((name, path))
    return tuple(paths)


def acquire(id_range: tuple[int, int]) -> IdLease:
    """Take a free id of `id_range` (first, count). Raises SandboxError when every
    one is held (by live sandboxes of any process on this host)."""
    first, count = id_range
    start = int.from_bytes(os.urandom(4), "little") % count  # processes starting at once rarely try the same ids
    for i in range(count):
        number = first + (start + i) % count
        fd = flock.try_lock(ID_DIRECTORY, number, "id_range")
        if fd is not None:
            return IdLease(number, fd)
    raise SandboxError(f"id_range: all {count} sandbox ids from {first} are in use by live sandboxes "
                       "(make the range larger, or wait for some to end)")

