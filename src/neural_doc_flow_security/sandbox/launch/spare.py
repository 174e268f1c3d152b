"""A spare: the next sandbox's init, cloned while the zygote is idle.

What a launch costs before any of its config is applied is paid ahead: clone3
with the namespaces (joining a network namespace made ahead), the first init
stages (bootstrap.spare_steps) and, on cgroup v1, the move into its cgroup,
which waits for an RCU grace period (~10 ms once the machine has been idle).
It may also build a root ahead: that of one of the launcher's latest launches
(a launcher keeps a spare for each of their roots, launcher.MAX_SPARES), when
it binds only system directories and the interpreter (`root_to_build_ahead`:
no user binds, whose sources could change before the launch), used for at most
ROOT_MAX_AGE (a file bound by itself, /etc/ld.so.cache say, may be replaced
meanwhile). The spare then waits in AWAIT_LAUNCH with nothing but its own fds.

A launch whose plan has the spare's namespaces and, if it built one, its root
(`matches`) takes it: the cgroup gets the sandbox's name and limits, then the
spare receives the rest of its steps (bootstrap.launch_steps, packed in a
memfd), the payload's fds and, for a callable, the pickled payload, and goes
on exactly like a cold child. A spare is used once. When none fits (or the one
that does has died: it is discarded), the launch takes the cold path. Only as
root without a user namespace (a user namespace's id maps depend on the config).
"""

from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import time
from dataclasses import dataclass

from ..errors import SandboxError
from ..linux import network
from ..linux import syscalls as sc
from ..linux.cgroups.base import SandboxCgroup
from ..linux.cgroups.v1 import V1Cgroup
from ..linux.ids import IdLease
from ..linux.namespaces import NamespacePlan
from ..linux.rootfs import RootfsPlan
from . import bootstrap
from .plan import LaunchPlan
from .setup_errors import parse_setup_error
from .spawn import SpawnedSandbox, clone_child, has_exited, pack_with_payload
from .template import Template

# The spare's own fds sit at or above this number, its payload's fds are staged
# just above them: below it, the payload's fd targets (0-3) and the error pipe.
FD_FLOOR = 64
ROOT_MAX_AGE = 60.0  # seconds


@dataclass
class Spare:
    """An init waiting for its launch. `pipes` holds the child's fd numbers."""

    clone_flags: int
    pid: int
    pidfd: int
    pipes: bootstrap.ChildPipes
    error_read: int
    status_read: int
    sync_write: int
    launch_socket: socket.socket  # ours; the child's end is closed here
    staging: int
    loopback: bool  # lo still to bring up (no namespace was made ahead)
    cgroup: SandboxCgroup | None
    rootfs: RootfsPlan | None  # the root it built, if any
    made_at: float  # monotonic clock


def _high(fd: int) -> int:
    """`fd` moved to FD_FLOOR or above (close-on-exec)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_FLOOR)
    os.close(fd)
    return moved


def root_to_build_ahead(plan: LaunchPlan) -> RootfsPlan | None:
    """The root a spare may build for launches like this one: only system
    directories, the interpreter and synthesized files (no user binds)."""
    fs = plan.config.filesystem
    return plan.rootfs if not fs.all_binds and fs.overlay_changes == "discard" else None


def make_spare(namespaces: NamespacePlan, cgroup: SandboxCgroup | None, template: Template | None = None,
               rootfs: RootfsPlan | None = None) -> Spare:
    """Clone a spare with these namespaces into `cgroup` (v2 with the clone; v1: the
    child writes itself into the cgroup.procs files), through `template` or from
    this process (then single-threaded); with `rootfs`, it builds that root. A
    failure closes everything and raises; the cgroup stays the caller's until
    this returns."""
    if namespaces.user or "pid" not in namespaces.names:
        raise SandboxError("a spare needs a pid namespace and no user namespace")
    ours: list[int] = []
    theirs: list[int] = []
    try:
        sync_read, sync_write = os.pipe2(os.O_CLOEXEC)
        ours.append(sync_write)
        theirs.append(_high(sync_read))
        error_read, error_write = os.pipe2(os.O_CLOEXEC)
        ours.append(error_read)
        theirs.append(_high(error_write))
        status_read, status_write = os.pipe2(os.O_CLOEXEC)
        ours.append(status_read)
        theirs.append(_high(status_write))
        pipes = bootstrap.ChildPipes(*theirs)
        our_socket, their_socket = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.append(our_socket.detach())
        child_socket = _high(their_socket.detach())
        theirs.append(child_socket)
        procs: list[int] = []
        if isinstance(cgroup, V1Cgroup):
            for directory in dict.fromkeys(cgroup.paths.values()):
                procs.append(_high(os.open(os.path.join(directory, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)))
                theirs.append(procs[-1])
        cgroup_fd = cgroup.clone_into_fd() if cgroup is not None else None
        if cgroup_fd is not None:
            theirs.append(cgroup_fd)
        netns_fd = network.take() if network.can_prepare(namespaces.names) else None
        if template is None:
            network.settle()  # no thread may run while this process clones
        if netns_fd is not None:
            theirs.append(netns_fd)
        staging = max(theirs) + 1
        spare_steps = bootstrap.spare_steps(pipes, netns_fd, tuple(procs), child_socket, staging, rootfs)
        clone_flags = namespaces.clone_flags & ~(sc.CLONE_NEWNET if netns_fd is not None else 0)
        pid, pidfd = clone_child(template, clone_flags, cgroup_fd, pipes.error_write, spare_steps, tuple(theirs))
    except BaseException:
        for fd in ours + theirs:
            os.close(fd)
        raise
    for fd in theirs:
        os.close(fd)
    return Spare(namespaces.clone_flags, pid, pidfd, pipes, error_read, status_read, sync_write,
                 socket.socket(fileno=ours[3]), staging, loopback=netns_fd is None, cgroup=cgroup, rootfs=rootfs,
                 made_at=time.monotonic())


def matches(spare: Spare, plan: LaunchPlan, fd_map: tuple[tuple[int, int], ...]) -> bool:
    """Whether `spare` can start a sandbox of `plan` with these fds."""
    return (spare.clone_flags == plan.namespaces.clone_flags and not plan.namespaces.user
            and not (plan.rootfs is not None and plan.rootfs.hands_back_changes)  # needs a socket of its own
            and "pid" in plan.namespaces.names and len(fd_map) < 8
            and all(target < FD_FLOOR for target, _ in fd_map)
            and (spare.rootfs is None or (spare.rootfs == plan.rootfs and not root_stale(spare))))


def root_stale(spare: Spare) -> bool:
    """Whether the root the spare built is too old to be used."""
    return spare.rootfs is not None and time.monotonic() - spare.made_at >= ROOT_MAX_AGE


def alive(spare: Spare) -> bool:
    """Whether the spare still waits (it may have failed a stage, or been killed)."""
    return not has_exited(spare.pidfd)


def launch(spare: Spare, plan: LaunchPlan, payload: bootstrap.Payload,
           fd_map: tuple[tuple[int, int], ...], ids: IdLease | None = None) -> SpawnedSandbox:
    """Send the spare its launch; it runs the payload of `plan` like a cold child. The
    cgroup's name and limits must be in place (the caller's). Raises OSError if the
    spare is gone (the caller discards it)."""
    from ..ipc.memfd import seal_bytes  # mmap: not on `ndf-sandbox run`'s path

    program = isinstance(payload, bootstrap.ExecPayload)
    staged = tuple((target, spare.staging + i) for i, (target, _) in enumerate(fd_map))
    launch_steps = bootstrap.launch_steps(plan, program, spare.pipes, staged, spare.loopback,
                                          mounted=spare.rootfs is not None)
    memfd = seal_bytes(pack_with_payload(launch_steps, payload, plan.environment, ids.id if ids else -1),
                       "ndf-launch")
    try:
        fds = array.array("i", [memfd, *(source for _, source in fd_map)])
        started = time.monotonic()
        spare.launch_socket.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    finally:
        os.close(memfd)
    spare.launch_socket.close()
    return SpawnedSandbox(plan, spare.pid, spare.pidfd, spare.error_read, spare.status_read, spare.cgroup,
                          spare.sync_write, started=started, ids=ids, program=program)


def discard(spare: Spare) -> None:
    """Kill an unused spare, reap it, close its fds and remove its cgroup."""
    try:
        sc.pidfd_send_signal(spare.pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(spare.pid, 0)
    os.set_blocking(spare.error_read, False)
    try:
        report = os.read(spare.error_read, 4096)
    except BlockingIOError:
        report = b""
    if report:
        import logging  # on first use: `ndf-sandbox run` starts without it

        logging.getLogger(__name__).warning("a spare sandbox failed before its launch: %s", parse_setup_error(report))
    spare.launch_socket.close()
    for fd in (spare.pidfd, spare.error_read, spare.status_read, spare.sync_write):
        os.close(fd)
    if spare.cgroup is not None:
        spare.cgroup.destroy()
