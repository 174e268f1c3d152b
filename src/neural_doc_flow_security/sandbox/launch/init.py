"""The sandbox's pid 1: reaps every process, forwards signals to the payload and,
when the payload ends, reports its wait status and exits (which makes the kernel
kill whatever is left in the pid namespace)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import NoReturn

from ..linux import syscalls as sc

_CAP_KILL = 1 << 5


def encode_status(status: int) -> bytes:
    """The message init sends for a wait status: b'exit N' or b'signal N'."""
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}".encode()
    return f"exit {os.waitstatus_to_exitcode(status)}".encode()


def run_init(payload_pid: int, status_fd: int, forwarded: Iterable[signal.Signals], *,
             drop_privileges: bool) -> NoReturn:
    """Wait for the payload, reaping orphans meanwhile. Never returns. With
    `drop_privileges`, keep only the capability to signal the payload (when init
    already confined itself like the payload, there is nothing left to drop)."""
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(payload_pid, signum)
        except ProcessLookupError:
            pass

    for sig in forwarded:
        if sig != signal.SIGCHLD:
            signal.signal(sig, forward)
    if drop_privileges:
        sc.capset(_CAP_KILL, _CAP_KILL, 0)  # init needs only to signal the payload
    sc.prctl(sc.PR_SET_DUMPABLE, 0)
    os.closerange(0, status_fd)
    os.closerange(status_fd + 1, 65536)
    status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == payload_pid:
            break
    try:
        os.write(status_fd, encode_status(status))
    finally:
        os._exit(0)
