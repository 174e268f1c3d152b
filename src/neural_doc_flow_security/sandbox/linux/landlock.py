"""Landlock: a second file-system wall, independent of the mounts.

The mount namespace decides what the payload can see; Landlock (an LSM any
process can apply to itself) decides what it may touch, path by path. The
ruleset is derived from the same mount plan (linux/rootfs.py): read and
execute beneath the read-only binds (system directories, the Python
installation, the user's read-only binds), read beneath /proc and the few
files the set-up writes (/etc/passwd ...), read/write on the /dev nodes,
read/write beneath /tmp, /dev/shm and the writable binds, and no other file
access (directories list, as without Landlock: their names, never a file's
content or a write). An image root is read and execute beneath /, a
copy-on-write root read/write beneath / (its writes land in the sandbox's
overlay tmpfs). A mount made too wide by mistake (a bind of the host's /etc) is still
closed by the rules; a hole in Landlock is still closed by the mounts.

On ABI >= 4, TCP bind and connect are denied when the sandbox has its own
network namespace (it holds only loopback); with the host's network shared
(`namespaces.net = false`) TCP is left to the host: the config names no
allowed ports, so any rule would be a guess (the isolation report says so).
A config that grants CAP_NET_BIND_SERVICE (or keeps every capability) means
the payload to serve in its namespace: TCP is left to the namespace too.
On ABI >= 6 the payload can neither connect to an abstract unix socket nor
signal a process outside its own Landlock domain. Access rights a kernel's
ABI does not know are masked off, so the best ABI the kernel offers is used.

The rules are planned here, in the parent, and cached with the launch plan;
_child.c executes them as steps after pivot_root, the last stage before
seccomp: it opens each path O_PATH without following a symlink (openat2
RESOLVE_NO_SYMLINKS, like every file-system step) and makes the three
syscalls (landlock_create_ruleset, landlock_add_rule, landlock_restrict_self).

Why not the `landlock` package on PyPI: it is a Python API applied by the
calling interpreter (Ruleset().allow(path).apply()). Here no Python runs
between the clone and the payload: a program's init is C up to posix_spawn,
and a Python child would pay copy-on-write faults for every interpreter page
it touches (see _child.c). Three syscalls on an fd are a few lines of C in the
step loop, with no new dependency, and the C child opens the paths with the
same no-symlink resolution as the mounts.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from dataclasses import dataclass

from ..config import SandboxConfig
from .rootfs import DEV_NODES, RootfsPlan
from .steps import Step, StepTuple

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (generic table)
_CREATE_RULESET_VERSION = 1

# Access rights (include/uapi/linux/landlock.h) and the ABI that introduced them.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13        # ABI 2
TRUNCATE = 1 << 14     # ABI 3
IOCTL_DEV = 1 << 15    # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_FS_LATEST = (1 << 16) - 1

READ_EXECUTE = EXECUTE | READ_FILE | READ_DIR
READ = READ_FILE | READ_DIR
DEVICE = READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV
# Everything beneath /tmp and the writable binds but making device nodes (nodev anyway).
READ_WRITE = _FS_LATEST & ~(MAKE_CHAR | MAKE_BLOCK)

# Test-only (tests/landlock_runner.py): bind targets left out of the rules although
# mounted, to show that Landlock holds where the mounts alone would allow. The
# package never sets it; no config field or environment variable reaches it.
_UNRULED_FOR_TESTS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LandlockPlan:
    """A ruleset, decided in the parent: what is handled, and what is allowed where."""

    abi: int
    handled_fs: int
    handled_net: int
    scoped: int
    rules: tuple[tuple[str, int], ...]  # (absolute path in the sandbox, access rights)

    @property
    def description(self) -> str:
        """What the isolation report shows: `ABI 7`."""
        return f"ABI {self.abi}"


def _probe_abi() -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.c_void_p(None), ctypes.c_size_t(0),
                       ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return (int(abi), 0) if abi > 0 else (0, ctypes.get_errno())


@functools.cache
def abi() -> tuple[int, str]:
    """This kernel's Landlock ABI (0 if none) and, when 0, why."""
    version, err = _probe_abi()
    if version:
        return version, ""
    if err == errno.ENOSYS:
        return 0, "the kernel has no Landlock syscalls (ENOSYS)"
    if err == errno.EOPNOTSUPP:
        return 0, "Landlock is built in but disabled at boot (not in the lsm= list)"
    return 0, f"landlock_create_ruleset failed: {os.strerror(err)}"


def unavailable_reason(config: SandboxConfig, kernel_abi: int, kernel_reason: str) -> str:
    """Why `config` runs without Landlock on a kernel of `kernel_abi` ("" if it does not)."""
    if config.landlock == "off":
        return "landlock: off"
    if not config.namespaces.mnt:
        return "landlock: not applied (its rules are derived from the mounts; namespaces.mnt is off)"
    if not config.no_new_privs:
        return "landlock: not applied (landlock_restrict_self needs no_new_privs = true)"
    if not kernel_abi:
        return f"landlock: not applied ({kernel_reason})"
    return ""


def tcp_denied(config: SandboxConfig) -> bool:
    """Whether the ruleset denies TCP bind/connect (given ABI >= 4): in the sandbox's
    own network namespace, unless the config lets the payload serve."""
    caps = config.capabilities
    return config.namespaces.net and caps.drop_all and "CAP_NET_BIND_SERVICE" not in caps.allowed


def plan_landlock(config: SandboxConfig, rootfs: RootfsPlan, kernel_abi: int) -> LandlockPlan:
    """The ruleset for a sandbox with these mounts, masked to what `kernel_abi` knows."""
    handled_fs = _FS_BY_ABI.get(kernel_abi, _FS_LATEST)
    # With a network policy, its nftables rules decide where TCP may connect.
    connect = 0 if config.network is not None else NET_CONNECT_TCP
    handled_net = NET_BIND_TCP | connect if kernel_abi >= 4 and tcp_denied(config) else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if kernel_abi >= 6 else 0
    rules: list[tuple[str, int]] = [(bind.target, READ_EXECUTE if bind.read_only else READ_WRITE)
                                    for bind in rootfs.binds if bind.target not in _UNRULED_FOR_TESTS]
    if rootfs.overlay_size_mb:
        # A copy-on-write root is the payload's to change everywhere (its writes land in the
        # overlay tmpfs); read-only binds on it stay read-only by their mounts.
        rules.append(("/", READ_WRITE))
    elif rootfs.image is not None:
        # The image is the payload's root: read and execute beneath it. Its files are not
        # ruled one by one (the image is untrusted: a symlink there would fail the launch).
        rules.append(("/", READ_EXECUTE))
    else:
        rules += [(path, READ_FILE) for path, _ in rootfs.files]
    # The root's own directories (/, /etc, made by the set-up) stay listable, as without
    # Landlock; READ_DIR is inherited, so any directory lists, but no file beneath is read.
    rules += [("/", READ_DIR), ("/proc", READ), ("/dev/pts", DEVICE | READ_DIR)]
    rules += [("/dev/" + name, DEVICE) for name in DEV_NODES]
    rules += [("/tmp", READ_WRITE), ("/dev/shm", READ_WRITE)]
    return LandlockPlan(abi=kernel_abi, handled_fs=handled_fs, handled_net=handled_net, scoped=scoped,
                        rules=tuple((path, access & handled_fs) for path, access in rules))


def landlock_steps(plan: LandlockPlan) -> list[StepTuple]:
    """The child's steps: create the ruleset, add a rule per path, restrict itself."""
    steps: list[StepTuple] = [(Step.LANDLOCK_RULESET, plan.handled_fs, plan.handled_net, plan.scoped)]
    steps += [(Step.LANDLOCK_PATH, os.fsencode(path), access) for path, access in plan.rules]
    steps.append((Step.LANDLOCK_RESTRICT,))
    return steps
