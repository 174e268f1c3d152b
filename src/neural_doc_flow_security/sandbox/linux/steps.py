"""The steps a sandbox child executes, as data, and the clone that runs them.

launch/bootstrap.py lists the steps in order; the C extension `_child` clones
the child and executes them without running Python in between (see _child.c
for why). A step is a tuple `(Step.X, arg, ...)` of ints and bytes; the meaning
of each argument is documented at the kind below and in _child.c.
"""

from __future__ import annotations

import functools
import struct
from enum import IntEnum
from typing import TypeAlias

from . import _child

StepTuple: TypeAlias = tuple[int | bytes | None, ...]


class Step(IntEnum):
    """Step kinds (numbers shared with _child.c)."""

    STAGE = 1              # name: the stage the following steps belong to (for error reports)
    SETSID = 2
    RESET_SIGNALS = 3      # every disposition to default, nothing blocked
    PRCTL = 4              # option, arg
    WAIT_TOKEN = 5         # fd, token: read one byte, fail unless it is the token
    STILL_SUPERVISED = 6   # fd: re-arm the parent-death signal; a hang-up there means the parent died
    DIE_WITH_INIT = 7      # parent-death signal, and fail if init is already gone
    # File-system steps (8-14): no path is resolved through a symlink, and a relative
    # path is beneath the working directory (rootfs.py makes it the new root).
    MOUNT = 8              # source, target, fstype, flags, data, optional (skip a missing target)
    SETATTR = 9            # path, mount attributes to set, recursive
    OPEN_SOURCE = 10       # slot, path: open a bind source (O_PATH) while the host tree is visible
    BIND = 11              # slot or -1, source path, target, attributes, optional, keep the slot open
    MKDIR = 12             # path (and its parents)
    SYMLINK = 13           # link text, path
    WRITE_FILE = 14        # path, content
    CHDIR = 15             # path
    PIVOT_ROOT = 16        # into the current directory; the old root is detached
    SETHOSTNAME = 17       # name
    LOOPBACK_UP = 18
    ARRANGE_FDS = 19       # map (int32 target/source pairs), keep (int32s): close all others
    SETRLIMIT = 20         # resource, value (soft = hard)
    IDENTITY = 21          # uid, gid (-1: the launch's sandbox id), in a user namespace
    CAPABILITIES = 22      # allowed mask, ambient mask, last capability
    SECCOMP = 23           # BPF program, listener (keep or hand over the filter's listener, see LISTENER)
    CLOSE = 24             # fd
    FORK_PAYLOAD = 25      # status fd, uid, gid (as IDENTITY), in a user namespace, sync fd: fork; this process
                           # becomes init
    SPAWN_PROGRAM = 26     # status fd: posix_spawn the program; this process becomes its init
    EXEC_PROGRAM = 27
    RETURN = 28            # back to Python, in a callable's payload process
    MOVE_ERROR_FD = 29     # lowest fd number the error pipe may use
    SETNS = 30             # fd, namespace type: join a namespace made ahead of the clone
    JOIN_CGROUP = 31       # int32s: fds of cgroup.procs files to write this process into (then closed)
    AWAIT_LAUNCH = 32      # socket fd, staging fd: a spare receives the rest of its steps (pack_launch)
                           # in a memfd, with the payload's fds, placed from the staging fd on
    LANDLOCK_RULESET = 33  # handled fs rights, handled net rights, scopes: create the ruleset (linux/landlock.py)
    LANDLOCK_PATH = 34     # path, rights: allow them beneath path (O_PATH, no symlink followed)
    LANDLOCK_RESTRICT = 35  # enforce the ruleset on this process (and what it starts)
    OVERLAY = 36           # target, lower slots (int32s, top first), upper slot, work slot (-1: none), options,
                           # mount flags: an overlayfs of the opened layers (their slots are closed)
    SEND_SLOT = 37         # socket fd, slot: send the slot's fd to the parent (SCM_RIGHTS), close both
    IDMAP = 38             # sandbox uid, gid (-1: the launch's id), host uid, gid: make the user namespace
                           # that binds with MOUNT_ATTR_IDMAP apply (rootfs.py); all -2: close it
    PROXY_LISTENER = 41    # socket fd, port: listen on 127.0.0.1:port (the sandbox's network namespace) and send
                           # that socket to the parent (SCM_RIGHTS), for the connect proxy; close both
    LISTENER = 45          # mode (1 report, 2 learn), errno per syscall number (int32s), hand over (a forked
                           # payload sends init the listener of its filter; else init installs it on itself)
    UMASK = 46             # mask: this process's umask


_MAGIC = 0x4C46444E  # "NDFL", as _child.c's LAUNCH_MAGIC
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")


def _pack_bytes(value: bytes, nul: bool = True) -> bytes:
    return _U32.pack(len(value)) + value + (b"\0" if nul else b"")


@functools.lru_cache(maxsize=64)
def _pack_steps(steps: tuple[StepTuple, ...]) -> bytes:
    out = [struct.pack("<II", _MAGIC, len(steps))]
    for kind, *args in steps:
        out.append(struct.pack("<iI", kind, len(args)))
        for arg in args:
            if arg is None:
                out.append(b"\0")
            elif isinstance(arg, bytes):
                out.append(b"\2" + _pack_bytes(arg))
            else:
                out.append(b"\1" + struct.pack("<q", arg))
    return b"".join(out)


def pack_launch(steps: tuple[StepTuple, ...], argv: tuple[bytes, ...] = (), envp: tuple[bytes, ...] = (),
                cwd: bytes = b"/", python: bytes = b"", sandbox_id: int = -1) -> bytes:
    """The steps and what the program needs (argv, environment, working directory),
    packed for _child.c; `python` travels to a spare's payload process; `sandbox_id`:
    the uid and gid of the steps that leave them to the launch (-1: none)."""
    strings = [_U32.pack(len(argv)), *map(_pack_bytes, argv), _U32.pack(len(envp)), *map(_pack_bytes, envp)]
    return b"".join([_pack_steps(steps), *strings, _pack_bytes(cwd), _pack_bytes(python, nul=False),
                     _I64.pack(sandbox_id)])


def spawn(clone_flags: int, cgroup_fd: int | None, error_fd: int, steps: tuple[StepTuple, ...],
          argv: tuple[bytes, ...] = (), envp: tuple[bytes, ...] = (), cwd: bytes = b"/",
          trace_fd: int = -1, sandbox_id: int = -1) -> tuple[int, int, bytes | None]:
    """clone3 with `clone_flags` (into the v2 cgroup `cgroup_fd`) and run `steps` in
    the child. Returns (pid, pidfd, None) in the parent and (0, -1, python) in a
    callable's payload process once its steps passed (`python`: what a spare's
    launch carried for it, else None). With `trace_fd`, every stage writes
    "monotonic-ns pid name" to it. The caller must be single-threaded."""
    pid, pidfd, python = _child.spawn(clone_flags, -1 if cgroup_fd is None else cgroup_fd, error_fd,
                                      pack_launch(steps, argv, envp, cwd, sandbox_id=sandbox_id), trace_fd)
    return int(pid), int(pidfd), python
