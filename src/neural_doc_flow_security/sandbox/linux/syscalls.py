"""Thin ctypes wrappers for the Linux system calls Python's os module lacks.

Each wrapper raises OSError with the errno on failure, like the os module does.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# x86_64 and aarch64 share these numbers for the newer (>= 400) calls.
SYS_pidfd_send_signal = 424
SYS_ioprio_get = {"x86_64": 252, "aarch64": 31}.get(os.uname().machine)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_INTO_CGROUP = 0x200000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 16384
MS_PRIVATE = 1 << 18

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x00100000

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare exists only from Python 3.12)."""
    _check(_libc.unshare(flags))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2)."""
    return _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)))


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """pidfd_send_signal(2): signal exactly the process the pidfd refers to."""
    _check(_syscall(SYS_pidfd_send_signal, pidfd, sig, None, 0))


def ioprio_get_process(pid: int) -> int:
    """ioprio_get(2) of one process (IOPRIO_WHO_PROCESS)."""
    if SYS_ioprio_get is None:
        raise OSError(38, f"ioprio_get: not known on {os.uname().machine}")
    return _check(_syscall(SYS_ioprio_get, 1, pid))


def setns(fd: int, nstype: int) -> None:
    """setns(2) for the calling thread (os.setns exists only from Python 3.12)."""
    _check(_libc.setns(fd, nstype))
