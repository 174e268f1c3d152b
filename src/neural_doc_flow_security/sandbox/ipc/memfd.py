"""Sealed memfds: how big payloads cross the IPC boundary without copies.

The sender writes the bytes into a memfd and seals it against shrinking,
growing, writing and further sealing, then passes the fd with SCM_RIGHTS. The
receiver verifies the seals before it maps anything: an unsealed memfd could be
rewritten by the sandbox while the host reads it, and one that may shrink would
raise SIGBUS in the host when a mapped page disappears.

The pages belong to whoever wrote them, so a sandbox's blob is charged to the
sandbox's memory cgroup, not the host's. A memfd with holes (ftruncate without
writes) is refused: reading a hole would allocate the page on the reader's
account, moving the sandbox's memory onto the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import sys
from typing import Any

from ..errors import ProtocolViolation

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def seal_bytes(data: bytes | bytearray | memoryview, name: str = "ndf-ipc") -> int:
    """Copy `data` into a new memfd, seal it, and return the fd (close-on-exec; caller closes)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_sealed(fd: int, max_bytes: int) -> memoryview:
    """Map a received memfd read-only after checking its seals and size.

    Returns a read-only memoryview over the mapping (zero copy). The caller
    still owns `fd` and may close it at once; the mapping stays valid.
    Raises ProtocolViolation if `fd` is not a fully sealed memfd of at most
    `max_bytes` bytes.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        info = os.fstat(fd)
    except OSError as exc:
        raise ProtocolViolation(f"passed fd is not a sealable memfd: {exc.strerror}") from None
    missing = REQUIRED_SEALS & ~seals
    if missing:
        raise ProtocolViolation(f"memfd is missing seals {missing:#x} (has {seals:#x})")
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolViolation("passed fd is not a regular memfd")
    size = info.st_size
    if size > max_bytes:
        raise ProtocolViolation(f"memfd of {size} bytes exceeds the limit of {max_bytes}")
    if size == 0:
        return memoryview(b"")
    _refuse_holes(fd, size, info.st_blocks)
    options: dict[str, Any] = {}
    if sys.version_info >= (3, 13):
        options["trackfd"] = False  # older Pythons keep a dup of the fd for the mapping's lifetime
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, **options)
    except (OSError, ValueError) as exc:
        raise ProtocolViolation(f"cannot map memfd: {exc}") from None
    return memoryview(mapping)


def _refuse_holes(fd: int, size: int, blocks: int) -> None:
    # st_blocks counts the pages the writer allocated (in 512-byte units); SEEK_HOLE
    # also finds a hole that page rounding hides. The seals forbid punching new holes.
    if blocks * 512 < size:
        raise ProtocolViolation(
            f"memfd of {size} bytes has holes (only {blocks * 512} bytes written): "
            "reading it would allocate the sandbox's memory on the host"
        )
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:
        return  # no SEEK_HOLE here; st_blocks already said it was written
    if hole < size:
        raise ProtocolViolation(f"memfd of {size} bytes has a hole at offset {hole}")


def unmap(view: memoryview) -> None:
    """Release a view returned by read_sealed and unmap its memfd at once (with the
    descriptor the mapping holds on Python < 3.13), instead of when it is collected."""
    try:
        owner = view.obj
    except ValueError:  # already released
        return
    view.release()
    if isinstance(owner, mmap.mmap):
        with contextlib.suppress(BufferError):  # another view still uses it: it goes with that one
            owner.close()
