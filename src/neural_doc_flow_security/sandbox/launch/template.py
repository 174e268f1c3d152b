"""The template: a frozen copy of the zygote that clones every sandbox.

A forked process pays for every page its parent writes afterwards (the page was
shared, so it is copied), and so does the parent: a zygote that forked its
sandboxes itself copied ~500 pages of its own Python per launch. So the zygote
forks once, after the imports a payload needs, a template that runs no Python
again: the C clone server (_child.serve) clones each sandbox with CLONE_PARENT
(the zygote is its parent: it waits for it and holds its pidfd) from the launch
the zygote sends, with the fds the child needs placed at the zygote's own
numbers, so the steps are the same either way. A callable's payload process
returns from serve() into Python here, and runs the payload the launch carried.

The template dies with the zygote (parent-death signal) or when its socket
closes; a zygote whose template died (its socket hangs up) starts no more
sandboxes and exits (its own memory holds earlier requests). Only the zygote uses one; the CLI and the
"fork" start method clone directly (linux/steps.spawn).
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from typing import NoReturn

from ..errors import SandboxError
from ..linux import _child
from ..result import EXIT_SANDBOX_ERROR
from .payload import run_payload

_REQUEST = struct.Struct("<QiiiI")  # as _child.c request_t, followed by the fd numbers
_REPLY = struct.Struct("<q")


class TemplateGone(SandboxError):
    """The template process died: its zygote starts no more sandboxes (fail closed)."""


class Template:
    """The zygote's end of its template process."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _serve(theirs, parent)
        theirs.close()
        self.pid = pid
        self._sock = ours

    def clone(self, clone_flags: int, cgroup_fd: int | None, error_fd: int, launch: bytes,
              fds: tuple[int, ...], trace_fd: int = -1) -> tuple[int, int]:
        """Clone a child running the packed `launch` (a payload's Python part in it);
        `fds`: this process's fds the child needs, at the same numbers (error_fd,
        cgroup_fd and trace_fd are added). Returns (pid, pidfd); the child is ours."""
        needed = tuple(dict.fromkeys((*fds, error_fd) + ((cgroup_fd,) if cgroup_fd is not None else ())
                                     + ((trace_fd,) if trace_fd >= 0 else ())))
        from ..ipc.memfd import seal_bytes  # mmap: not on `ndf-sandbox run`'s path

        memfd = seal_bytes(launch, "ndf-launch")
        try:
            header = _REQUEST.pack(clone_flags, -1 if cgroup_fd is None else cgroup_fd, error_fd, trace_fd,
                                   len(needed)) + struct.pack(f"<{len(needed)}i", *needed)
            self._sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd, *needed]))])
        except (BrokenPipeError, ConnectionResetError) as e:  # else (ENOBUFS...) nothing was sent
            raise TemplateGone(f"the template process is gone: {e}") from None
        finally:
            os.close(memfd)
        try:
            data, ancdata, _, _ = self._sock.recvmsg(_REPLY.size, socket.CMSG_SPACE(array.array("i").itemsize))
        except OSError as e:  # the answer may still come: no later clone could trust its answer
            raise TemplateGone(f"the template process is gone: {e}") from None
        if len(data) != _REPLY.size:
            raise TemplateGone("the template process is gone")
        (outcome,) = _REPLY.unpack(data)
        pidfds = [fd for level, kind, payload in ancdata if level == socket.SOL_SOCKET
                  and kind == socket.SCM_RIGHTS for fd in array.array("i", payload)]
        if outcome < 0:
            for fd in pidfds:
                os.close(fd)
            if outcome == -errno.EINVAL:
                _child.check(launch)  # a malformed launch: ValueError with the reason
            raise OSError(-outcome, os.strerror(-outcome))
        if len(pidfds) != 1:
            raise SandboxError("the template sent no pidfd")
        return int(outcome), pidfds[0]

    def fileno(self) -> int:
        """Its socket: readable only once the template has gone (clone() reads each
        answer before it returns)."""
        return self._sock.fileno()

    def close(self) -> None:
        """End the template (EOF on its socket) and reap it."""
        self._sock.close()
        os.waitpid(self.pid, 0)


def _serve(sock: socket.socket, parent: int) -> NoReturn:
    """The template process; never returns into the zygote's code."""
    code = 0
    try:
        fd = sock.detach()
        os.closerange(0, fd)
        os.closerange(fd + 1, 1 << 20)
        served = _child.serve(fd, parent)
        if served is not None:  # a callable's payload process
            code = EXIT_SANDBOX_ERROR
            import pickle  # here: `ndf-sandbox run` imports this module, never runs a template

            run_payload(*pickle.loads(served[2]))
    finally:
        os._exit(code)
