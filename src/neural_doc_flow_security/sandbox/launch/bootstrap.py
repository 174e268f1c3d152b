"""The child's bootstrap: every protection, in order, in one place.

The child is created by clone3 with all its namespaces (see spawn.py) and is
the sandbox's pid 1 (init.py). Any stage that fails reports "stage, errno,
message" on the error pipe and the process exits: nothing half-protected ever
runs the payload (fail closed).

    init stages                          confinement (_confine)
    1 new session                        10 file descriptors (map, close the rest)
    2 signals reset                      11 rlimits
    3 parent-death signal                12 identity (unprivileged uid/gid)
    4 wait for the id maps               13 parent-death signal, re-armed
    5 not dumpable                       14 capabilities
    6 mounts (new root, pivot_root)      15 no_new_privs
    7 hostname, loopback                 16 seccomp (last)
    8 wait for the cgroup                17 exec / run the callable (the error
    9 a program: init confines itself       pipe is closed first: nothing
      and posix_spawns it; a callable:      untrusted ever holds it)
      init forks, the child confines
      itself and runs it; init then
      reaps and forwards signals

The parent releases the child twice: once the user namespace's id maps are
written (b"m"), and once the child is in its cgroups (b"c"). The mounts run
in between, overlapping the slow cgroup v1 migration; no process is forked,
and nothing untrusted runs, before the child is in its cgroups.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from ..linux import seccomp
from ..linux import syscalls as sc
from ..linux.capabilities import apply_capabilities
from ..linux.credentials import drop_to
from ..linux.network import bring_up_loopback
from ..linux.rlimits import apply_rlimits
from ..linux.rootfs import apply_rootfs
from ..result import EXIT_SANDBOX_ERROR
from . import init
from .plan import LaunchPlan
from .setup_errors import report_failure

_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                      signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGCHLD)


class Payload:
    """What runs once every protection is in place. `run` must not return."""

    needs_python = False

    def run(self, environment: tuple[bytes, ...]) -> NoReturn:
        raise NotImplementedError


@dataclass(frozen=True)
class ExecPayload(Payload):
    """Execute a program (looked up in the sandbox's PATH)."""

    argv: tuple[str, ...]
    cwd: str = "/"

    def run(self, environment: tuple[bytes, ...]) -> NoReturn:
        env = dict(entry.decode().split("=", 1) for entry in environment)
        os.chdir(self.cwd)
        os.execvpe(self.argv[0], list(self.argv), env)

    def spawn(self, environment: tuple[bytes, ...]) -> int:
        """Start the program as a child (posix_spawn: vfork + exec); returns its pid."""
        env = dict(entry.decode().split("=", 1) for entry in environment)
        os.chdir(self.cwd)
        path = self.argv[0] if "/" in self.argv[0] else shutil.which(self.argv[0], path=env.get("PATH", ""))
        if path is None:
            raise FileNotFoundError(errno.ENOENT, f"command not found: {self.argv[0]}")
        return os.posix_spawn(path, list(self.argv), env)


@dataclass(frozen=True)
class ChildPipes:
    """The child's ends of the pipes to its parent."""

    sync_read: int     # parent writes b"m" after the id maps, b"c" after the cgroup
    error_write: int   # CLOEXEC: closed by exec, so EOF means "all stages passed"
    status_write: int  # init reports the payload's wait status here


def _stage(name: str, error_fd: int, action: Callable[[], object]) -> None:
    try:
        action()
    except BaseException as exc:  # noqa: BLE001 - any failure must end the child
        report_failure(error_fd, name, exc)


def _reset_signals() -> None:
    for sig in _FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _wait_for_parent(sync_read: int, token: bytes) -> None:
    # PDEATHSIG is armed already: if the parent died before that, the pipe shows EOF.
    if os.read(sync_read, 1) != token:
        raise ProcessLookupError(errno.ESRCH, "the parent exited before releasing the sandbox")


def _arrange_fds(fd_map: tuple[tuple[int, int], ...], keep_also: tuple[int, ...]) -> None:
    """Give the payload exactly the fds of `fd_map` (target <- source); close all
    others but `keep_also` (close-on-exec pipes to the parent)."""
    above = max((target for target, _ in fd_map), default=2) + 1
    staged = [(target, fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, above)) for target, source in fd_map]
    for target, source in staged:
        os.dup2(source, target, inheritable=True)
        os.close(source)
    keep = sorted({target for target, _ in fd_map} | set(keep_also))
    first = 0
    for fd in keep:
        if fd > first:
            sc.close_range(first, fd - 1)
        first = fd + 1
    sc.close_range(first, 0xFFFFFFFF)


def _confine(plan: LaunchPlan, err: int, fd_map: tuple[tuple[int, int], ...], keep_also: tuple[int, ...],
             still_supervised: Callable[[], None]) -> None:
    """The stages that confine the payload, in order; the last is seccomp."""
    cfg = plan.config
    _stage("file descriptors", err, lambda: _arrange_fds(fd_map, (err, *keep_also)))
    _stage("rlimits", err, lambda: apply_rlimits(plan.rlimits))
    _stage("identity", err, lambda: drop_to(cfg.uid, cfg.gid, in_user_namespace=plan.namespaces.user))
    _stage("parent-death signal", err, still_supervised)  # the uid change cleared it
    _stage("capabilities", err, lambda: apply_capabilities(plan.capabilities))
    if cfg.no_new_privs:
        _stage("no_new_privs", err, lambda: sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1))
    if plan.seccomp.enabled:
        _stage("seccomp", err, lambda: seccomp.install_program(plan.seccomp))


def run_child(plan: LaunchPlan, pipes: ChildPipes, payload: Payload,
              fd_map: tuple[tuple[int, int], ...], parent_pid: int) -> NoReturn:
    """Entry point of the clone3 child. Never returns."""
    # Above every fd the payload is to get, so that the fd map cannot collide with it.
    lowest = max((target for target, _ in fd_map), default=2) + 1
    err = fcntl.fcntl(pipes.error_write, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(pipes.error_write)
    cfg = plan.config

    # -- init stages (this process is pid 1 of the new pid namespace) --
    _stage("new session", err, os.setsid)
    _stage("signals", err, _reset_signals)
    _stage("parent-death signal", err, lambda: sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL))
    _stage("wait for the id maps", err, lambda: _wait_for_parent(pipes.sync_read, b"m"))
    # Not dumpable (only now: an unprivileged parent writes the maps through /proc/<pid>):
    # the payload, same uid in a user namespace, must never open /proc/1/fd/*.
    _stage("not dumpable", err, lambda: sc.prctl(sc.PR_SET_DUMPABLE, 0))
    if plan.rootfs is not None:
        rootfs = plan.rootfs
        _stage("mounts", err, lambda: apply_rootfs(rootfs))
    if "uts" in plan.namespaces.names:
        _stage("hostname", err, lambda: socket.sethostname(cfg.hostname))
    if "net" in plan.namespaces.names:
        _stage("loopback", err, bring_up_loopback)
    _stage("wait for the cgroup", err, lambda: _wait_for_parent(pipes.sync_read, b"c"))
    if "pid" not in plan.namespaces.names:
        _stage("child subreaper", err, lambda: sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1))

    if isinstance(payload, ExecPayload) and "pid" in plan.namespaces.names:
        # A program: init confines itself, then starts the program with
        # posix_spawn (no copy of this Python process); the program inherits
        # every protection. In the pid namespace the program cannot kill init.
        _confine(plan, err, fd_map, (pipes.status_write, pipes.sync_read),
                 lambda: _still_supervised(pipes.sync_read))
        spawned: list[int] = []
        _stage("exec", err, lambda: spawned.append(payload.spawn(plan.environment)))
        os.close(err)
        init.run_init(spawned[0], pipes.status_write, _FORWARDED_SIGNALS, drop_privileges=False)

    # A Python callable (or no pid namespace): fork the payload, which confines
    # itself; init keeps only the right to signal it.
    os.close(pipes.sync_read)
    init_pid = os.getpid()
    payload_pid = os.fork()
    if payload_pid:
        os.close(err)
        init.run_init(payload_pid, pipes.status_write, _FORWARDED_SIGNALS, drop_privileges=True)
    os.close(pipes.status_write)
    _stage("parent-death signal", err, lambda: _die_with(init_pid))
    _confine(plan, err, fd_map, (), lambda: _die_with(init_pid))
    if payload.needs_python:
        # Every stage passed; the callable is untrusted code that never execs, so
        # the error pipe (close-on-exec) must be closed by hand before it runs.
        os.close(err)
        payload.run(plan.environment)
    _stage("exec", err, lambda: payload.run(plan.environment))
    os._exit(EXIT_SANDBOX_ERROR)  # unreachable: payload.run does not return


def _die_with(parent_pid: int) -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        raise ProcessLookupError(errno.ESRCH, "the sandbox init exited")


def _still_supervised(sync_read: int) -> None:
    """Re-arm the parent-death signal; the parent (outside the pid namespace, so
    getppid() says 0) holds the write end of the sync pipe while it supervises us:
    a hang-up there means it died before the signal was armed."""
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    poller = select.poll()
    poller.register(sync_read, select.POLLIN)
    if poller.poll(0):
        raise ProcessLookupError(errno.ESRCH, "the parent exited")
