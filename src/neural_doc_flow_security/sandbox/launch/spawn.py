"""The parent side of a launch: clone the child, place it, release it, and read
what it reports when it ends.

    spawn_sandbox()   clone3 with the namespaces (and the v2 cgroup), write the
                      id maps, add the child to v1 cgroups, release it
    finish_sandbox()  after the init process exited: wait status, rusage, the
                      error and status pipes, cgroup stats -> SandboxResult
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import SandboxError, SetupError, UnsupportedError
from ..linux import steps
from ..linux import syscalls as sc
from ..linux.cgroups.base import CgroupStats, SandboxCgroup
from ..linux.ids import IdLease
from ..linux.namespaces import write_id_maps
from ..linux.steps import StepTuple
from ..result import EXIT_SANDBOX_ERROR, IsolationReport, Outcome, ResourceUsage, SandboxResult, SecurityEvent
from . import bootstrap
from .payload import ExecPayload, Payload, run_payload
from .plan import LaunchPlan
from .setup_errors import parse_setup_error

if TYPE_CHECKING:
    from ..linux.connect_proxy import ConnectProxy
    from ..linux.netpolicy import NetworkLease
    from .template import Template

STD_FDS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2))
# Exactly what init writes (_child.c run_init): wait status, then the reaped processes'
# peak RSS in KiB and CPU time (user, system) in microseconds, then what its seccomp
# listener counted: " s<nr>:<count>:<first, us since the epoch>" per syscall number
# (1024: any above) and " omitted <n>" for entries that did not fit.
_STATUS = re.compile(rb"(exit|signal) (-?[0-9]{1,3})(?: maxrss ([0-9]{1,15}) cpu ([0-9]{1,15}) ([0-9]{1,15}))?"
                     rb"((?: s[0-9]{1,4}:[0-9]{1,20}:[0-9]{1,20})*)(?: omitted ([0-9]{1,4}))?")
_SYSCALL_ENTRY = re.compile(rb" s([0-9]{1,4}):([0-9]{1,20}):([0-9]{1,20})")
_STATUS_LIMIT = 4096  # init's report is one write of at most PIPE_BUF
_INIT_FAILED = re.compile(rb"initfail ([0-9]{1,4}) ([a-z_]{1,16})")  # init could not do its job
# Asks a reporting init (one holding a seccomp listener) to end its payload and report
# now, so that the refused syscalls it counted survive a kill (_child.c REPORT_SIGNAL).
# Its killer waits at most REPORT_WAIT_MS for init to exit, then kills it anyway.
REPORT_SIGNAL = signal.SIGRTMAX
# 200 ms: init reports within a millisecond or two on an idle host, but reaping a payload
# with much memory, or a CPU quota its payload has used up, can delay it by tens of ms.
REPORT_WAIT_MS = 200
trace_fd = -1  # >= 0: every child stage writes "monotonic-ns pid name" here (benchmarks/stages.py)


@functools.cache
def _oom_kill_file() -> str | None:
    from ..linux.cgroups import own_oom_kill_file

    return own_oom_kill_file()


def _oom_kills_here() -> int | None:
    """OOM kills counted so far in this process's memory cgroup, or None."""
    path = _oom_kill_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path else -1
    except OSError:
        return None
    if fd < 0:
        return None
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in data.splitlines():
        if line.startswith(b"oom_kill "):
            return int(line.split()[1])
    return None


class _OomKills:
    """OOM kills in this process's memory cgroup that no sandbox has claimed yet.

    A sandbox without a cgroup of its own is charged to ours, so that is where the
    kernel counts its OOM kill, whichever limit above it (or the machine) ran out.
    The count is read once (about 100 µs on cgroup v1) and then only when a
    cgroup-less sandbox died of a SIGKILL the host did not send.
    """

    seen: int | None = None

    @classmethod
    def start_counting(cls) -> None:
        if cls.seen is None:
            cls.seen = _oom_kills_here()

    @classmethod
    def claim(cls) -> bool:
        """True if a kill was counted since the last claim (this sandbox's, most likely)."""
        now = _oom_kills_here()
        claimed = cls.seen is not None and now is not None and now > cls.seen
        if now is not None:
            cls.seen = min(now, cls.seen + 1) if claimed and cls.seen is not None else now
        return claimed


@dataclass
class SpawnedSandbox:
    """A running sandbox as its parent sees it. `pid` is the sandbox's init."""

    plan: LaunchPlan
    pid: int
    pidfd: int
    error_read: int
    status_read: int
    cgroup: SandboxCgroup | None
    sync_write: int = -1  # held open while we supervise: the child sees a hang-up if we die
    started: float = field(default_factory=time.monotonic)
    timed_out: bool = False
    armed: bool = True  # a pooled sandbox waits unarmed (no deadline) until its call comes
    reported: SandboxResult | None = None  # its result, taken from init's report before init was reaped
    killed: bool = False
    status_report: bytes | None = None
    ids: IdLease | None = None  # its sandbox id, held while it lives (linux/ids.py)
    changes_read: int = -1  # where the child sends a copy-on-write root's tmpfs (linux/overlay_changes.py)
    # Its network policy's link and tables (linux/netpolicy.py), or its connect proxy
    # (linux/connect_proxy.py: the child sends the proxy's listening socket on `proxy_read`).
    network: NetworkLease | ConnectProxy | None = None
    proxy_read: int = -1
    program: bool = False  # it runs a program (else a Python callable)
    _isolation: IsolationReport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cgroup is None:
            _OomKills.start_counting()

    @property
    def deadline(self) -> float | None:
        """When the wall timeout fires (monotonic clock), if it is running."""
        timeout = self.plan.config.timeout_seconds
        if timeout is None or not self.armed or self.timed_out or self.reported is not None:
            return None
        return self.started + timeout

    def arm(self) -> None:
        """Start the wall clock now (for a sandbox that waited in the pool)."""
        self.started = time.monotonic()
        self.armed = True

    def signal(self, sig: int) -> None:
        """Signal the sandbox's init (never a recycled pid: it goes through the pidfd)."""
        try:
            sc.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def isolation(self) -> IsolationReport:
        """The protections in force for this sandbox (built once: audit, zygote reply, result)."""
        if self._isolation is None:
            self._isolation = self.plan.isolation_report(cgroup=self.cgroup.description if self.cgroup else "",
                                                         sandbox_id=self.ids.id if self.ids else None,
                                                         program=self.program)
        return self._isolation

    def kill(self) -> None:
        """Kill the whole tree. With a pid namespace, killing its init kills every
        process in it; without one, the cgroup is killed too (finish_sandbox kills
        the cgroup again once init is gone, so nothing that forked meanwhile stays)."""
        self.killed = True
        seccomp = self.plan.seccomp_for(self.program)
        # Only pid 1 of a pid namespace ignores the signal before its handler is there.
        if ((seccomp.reports or seccomp.learns) and "pid" in self.plan.namespaces.names
                and self.reported is None and self.status_report is None):
            ask_report(self.pidfd)
        self.signal(signal.SIGKILL)
        if self.cgroup is not None and "pid" not in self.plan.namespaces.names:
            self.cgroup.kill()


def usage_from_cgroup(stats: CgroupStats, wall: float, floor: ResourceUsage | None = None) -> ResourceUsage:
    """Resource usage from the sandbox's cgroup counters (never lower than `floor`,
    the rusage of the reaped tree, where there is one)."""
    floor = floor or ResourceUsage()
    return ResourceUsage(
        wall_seconds=wall,
        cpu_user_seconds=max(floor.cpu_user_seconds, stats.cpu_user_usec / 1e6),
        cpu_system_seconds=max(floor.cpu_system_seconds, stats.cpu_system_usec / 1e6),
        memory_peak_bytes=stats.memory_peak_bytes or floor.memory_peak_bytes,
        processes_peak=stats.pids_peak,
        io_read_bytes=stats.io_read_bytes,
        io_write_bytes=stats.io_write_bytes,
        oom_kills=stats.oom_kills,
        pids_limit_hits=stats.pids_limit_hits,
        cpu_throttled_periods=stats.cpu_nr_throttled,
        cpu_throttled_seconds=stats.cpu_throttled_usec / 1e6,
    )


def _payload_parts(payload: Payload | None, environment: tuple[bytes, ...]
                   ) -> tuple[tuple[bytes, ...], bytes, tuple[Payload, tuple[bytes, ...], tuple[int, ...]] | None]:
    """A program's argv and working directory, or what a callable's payload process runs."""
    if isinstance(payload, ExecPayload):
        return tuple(os.fsencode(arg) for arg in payload.argv), os.fsencode(payload.cwd), None
    python = (payload, environment, python_signal_handlers()) if payload is not None else None
    return (), b"/", python


def pack_with_payload(child_steps: tuple[StepTuple, ...], payload: Payload | None,
                      environment: tuple[bytes, ...], sandbox_id: int = -1) -> bytes:
    """The packed launch (steps.pack_launch) for a child that is not a fork of this
    process (the template's, a spare's): a callable's payload travels pickled in it."""
    import pickle  # a callable's launch only: `ndf-sandbox run` does without

    argv, cwd, python = _payload_parts(payload, environment)
    return steps.pack_launch(child_steps, argv, environment, cwd, pickle.dumps(python) if python else b"",
                             sandbox_id)


def clone_child(template: Template | None, clone_flags: int, cgroup_fd: int | None, error_fd: int,
                child_steps: tuple[StepTuple, ...], child_fds: tuple[int, ...], payload: Payload | None = None,
                environment: tuple[bytes, ...] = (), sandbox_id: int = -1) -> tuple[int, int]:
    """clone3 a child that runs `child_steps` (then `payload`; a spare's payload
    comes with its launch): through the `template` (a zygote's), else from this
    process, which must be single-threaded. `child_fds`: the fds of this process
    the child uses. Returns (pid, pidfd); a payload process never returns."""
    if template is not None:
        pid, pidfd = template.clone(clone_flags, cgroup_fd, error_fd,
                                    pack_with_payload(child_steps, payload, environment, sandbox_id), child_fds,
                                    trace_fd)
        _raise_oom_score(pid)
        return pid, pidfd
    argv, cwd, python = _payload_parts(payload, environment)
    if not isinstance(payload, ExecPayload):
        import pickle  # here, not in the payload process, which may no longer see the module
    pid, pidfd, received = steps.spawn(clone_flags, cgroup_fd, error_fd, child_steps, argv, environment, cwd,
                                       trace_fd, sandbox_id)
    if pid == 0:  # a callable's payload process: every protection is in place
        try:
            run_payload(*(pickle.loads(received) if received is not None else python or ()))
        finally:
            os._exit(EXIT_SANDBOX_ERROR)  # never unwind into the parent's code
    _raise_oom_score(pid)
    return pid, pidfd


SANDBOX_OOM_SCORE_ADJ = 1000
"""Every sandbox process: the kernel's OOM killer picks sandboxes before anything else
(zygotes have zygote.HELPER_OOM_SCORE_ADJ; the manager keeps its own)."""


def _raise_oom_score(pid: int) -> None:
    # From here, not as a child step: the child cannot name its own /proc entry
    # without a symlink (/proc/self), and child steps never follow one. Raising the
    # score needs no privilege. The child forks its payload (which inherits it) only
    # after a token from this process, or, a spare, after its launch.
    with contextlib.suppress(OSError):  # it died already, or (a spare, unprivileged) is not dumpable any more
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"%d" % SANDBOX_OOM_SCORE_ADJ)
        finally:
            os.close(fd)


def spawn_sandbox(plan: LaunchPlan, payload: Payload, *,
                  cgroup: SandboxCgroup | None = None,
                  make_cgroup: Callable[[], SandboxCgroup | None] | None = None,
                  fd_map: tuple[tuple[int, int], ...] = STD_FDS, netns_fd: int | None = None,
                  template: Template | None = None, ids: IdLease | None = None) -> SpawnedSandbox:
    """Start a sandbox (through `template`, else cloned here: then the caller must
    be single-threaded). For a Python callable this returns in the parent only:
    the payload process leaves through payload.run() (which never returns).

    `cgroup`: the sandbox's cgroup, made before (v2 joins it with the clone);
    `make_cgroup`: makes it after the clone, while the child sets up (v1).
    `netns_fd`: the sandbox's network namespace, made ahead (linux/network.py);
    this takes it over. `ids`: the sandbox id of a plan that needs one (the caller's
    to release)."""
    cgroup_fd = cgroup.clone_into_fd() if cgroup is not None else None
    sync_read, sync_write = os.pipe2(os.O_CLOEXEC)
    error_read, error_write = os.pipe2(os.O_CLOEXEC)
    status_read, status_write = os.pipe2(os.O_CLOEXEC)
    changes_read, changes_write = -1, -1
    if plan.rootfs is not None and plan.rootfs.hands_back_changes:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        changes_read, changes_write = ours.detach(), theirs.detach()
    proxy_read, proxy_write = -1, -1
    if plan.network_method == "proxy":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proxy_read, proxy_write = ours.detach(), theirs.detach()
    program = payload if isinstance(payload, ExecPayload) else None
    pipes = bootstrap.ChildPipes(sync_read, error_write, status_write, changes_write, proxy_write)
    child_steps = bootstrap.child_steps(plan, program is not None, pipes, fd_map, netns_fd,
                                        sync_write if template is None else None)
    clone_flags = plan.namespaces.clone_flags & ~(sc.CLONE_NEWNET if netns_fd is not None else 0)
    child_fds = (sync_read, status_write, *(source for _, source in fd_map)) + \
        ((netns_fd,) if netns_fd is not None else ()) + ((changes_write,) if changes_write >= 0 else ()) + \
        ((proxy_write,) if proxy_write >= 0 else ())
    try:
        pid, pidfd = clone_child(template, clone_flags, cgroup_fd, error_write, child_steps, child_fds,
                                 payload, plan.environment, ids.id if ids else -1)
    except Exception as e:
        for fd in (sync_read, sync_write, error_read, error_write, status_read, status_write, cgroup_fd, netns_fd,
                   *((changes_read, changes_write) if changes_read >= 0 else ()),
                   *((proxy_read, proxy_write) if proxy_read >= 0 else ())):
            if fd is not None:
                os.close(fd)
        if isinstance(e, SandboxError):  # the template is gone
            raise
        if not isinstance(e, OSError):  # the steps were refused before any clone
            raise SetupError("launch", f"invalid launch: {e}") from None
        raise SetupError("clone", f"clone3 with namespaces {', '.join(plan.namespaces.names)} "
                         f"failed: {e.strerror}", e.errno or 0) from None
    for fd in (sync_read, error_write, status_write, cgroup_fd, netns_fd, changes_write, proxy_write):
        if fd is not None and fd >= 0:
            os.close(fd)
    spawned = SpawnedSandbox(plan, pid, pidfd, error_read, status_read, cgroup, sync_write, ids=ids,
                             changes_read=changes_read, proxy_read=proxy_read, program=program is not None)
    try:
        if plan.namespaces.user:
            write_id_maps(pid, plan.namespaces)
            os.write(sync_write, b"m")
        if make_cgroup is not None:
            spawned.cgroup = make_cgroup()
        if spawned.cgroup is not None and cgroup_fd is None:  # v1: no CLONE_INTO_CGROUP
            spawned.cgroup.add_process(pid)
        os.write(sync_write, b"c")
    except BaseException as e:
        # Our refusal of a protection stands. Any other error while the child has given
        # up is its failed stage (our writes to it then fail), which finish_sandbox() reports.
        if not isinstance(e, UnsupportedError) and gave_up(spawned):
            return spawned
        spawned.kill()
        os.waitpid(pid, 0)
        _close(spawned)
        if spawned.cgroup is not None and make_cgroup is not None:
            spawned.cgroup.destroy()
        raise
    return spawned


def python_signal_handlers() -> tuple[int, ...]:
    """The signals this process has Python handlers for. Read in the parent: the
    C child resets every signal, and the payload makes Python's view agree
    touching only what it changes."""
    return tuple(sig for sig in range(1, 32) if signal.getsignal(sig) not in (signal.SIG_DFL, None))


def ask_report(pidfd: int) -> None:
    """Ask the sandbox's init (pid 1 of its pid namespace) to end its payload and report
    what its seccomp listener counted, and wait (at most REPORT_WAIT_MS) for it to exit:
    called before a SIGKILL. An init that holds no listener has no handler: it ignores it."""
    try:
        sc.pidfd_send_signal(pidfd, REPORT_SIGNAL)
    except OSError:  # gone, or not ours to ask: the SIGKILL that follows must happen all the same
        return
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.poll(REPORT_WAIT_MS)


async def ask_report_async(pidfd: int) -> None:
    """ask_report for an event loop that serves other sandboxes meanwhile: the wait
    (at most REPORT_WAIT_MS, e.g. for a payload whose large memory takes long to free)
    never blocks it."""
    import asyncio

    try:
        sc.pidfd_send_signal(pidfd, REPORT_SIGNAL)
    except OSError:  # gone, or not ours to ask: the SIGKILL that follows must happen all the same
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def ended() -> None:
        if not exited.done():
            exited.set_result(None)

    watched = os.dup(pidfd)  # a loop has one reader per fd number: the caller's own stays its own
    loop.add_reader(watched, ended)
    try:
        await asyncio.wait([exited], timeout=REPORT_WAIT_MS / 1000)
    finally:
        loop.remove_reader(watched)
        os.close(watched)


def has_exited(pidfd: int, *more: int) -> bool:
    """Whether the process behind `pidfd` has exited (poll: any fd number works), or
    any of `more` is readable."""
    poller = select.poll()
    for fd in (pidfd, *more):
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def gave_up(spawned: SpawnedSandbox) -> bool:
    """Whether a child still held at its sync points failed a stage: its error report
    is readable (it writes it first, then exits; its id maps, cgroup move and release
    fail with ESRCH or EPIPE before its pidfd says so), or it has exited."""
    return has_exited(spawned.pidfd, spawned.error_read)


def _read_available(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        try:
            chunk = os.read(fd, limit - total)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _close(spawned: SpawnedSandbox) -> None:
    for fd in (spawned.pidfd, spawned.error_read, spawned.status_read, spawned.sync_write, spawned.changes_read,
               spawned.proxy_read):
        if fd < 0:
            continue
        try:
            os.close(fd)
        except OSError:
            pass
    spawned.changes_read = spawned.proxy_read = -1


_INIT_EXIT_MS = 10_000  # generous: init exits right after its report


def _with_changes(spawned: SpawnedSandbox, result: SandboxResult) -> SandboxResult:
    """The result with what the payload changed on its copy-on-write root, when the
    config asks (read once, after the payload ended: nothing in the sandbox runs)."""
    if spawned.changes_read < 0 or spawned.plan.rootfs is None or result.outcome is Outcome.SANDBOX_ERROR:
        return result
    from ..linux import overlay_changes
    from ..result import FilesystemChanges

    try:
        # Init reports just before it exits: until it has, a process the payload left
        # could still be changing the upper layer under the host's walk.
        poller = select.poll()
        poller.register(spawned.pidfd, select.POLLIN)
        if not poller.poll(_INIT_EXIT_MS):
            return replace(result, filesystem_changes=FilesystemChanges(
                complete=False, error="the sandbox's init had not exited: its changes were not read"))
        changes = overlay_changes.collect(spawned.changes_read, spawned.plan.rootfs)
    finally:
        os.close(spawned.changes_read)
        spawned.changes_read = -1
    return replace(result, filesystem_changes=changes)


def reported_result(spawned: SpawnedSandbox) -> SandboxResult | None:
    """The result as soon as init has reported the payload's end (its status pipe is
    readable): init exits right after, and with it, as pid 1, every process of the
    sandbox. None when it has not, when it was killed (finish_sandbox tells, once the
    tree is gone), or has no pid namespace to end the tree with."""
    if spawned.reported is not None or spawned.status_report is not None or "pid" not in spawned.plan.namespaces.names:
        return spawned.reported
    spawned.status_report = report = _read_available(spawned.status_read, _STATUS_LIMIT)  # one write by init
    if spawned.killed:
        # Init wrote its report because it was asked to before the SIGKILL: its tree may
        # still be dying. A killed sandbox's result waits for init's exit (finish_sandbox),
        # so that whoever killed it finds no process of it running.
        return None
    if not (_STATUS.fullmatch(report) or _INIT_FAILED.fullmatch(report)):
        return None
    stats = spawned.cgroup.stats() if spawned.cgroup is not None else None
    wall = time.monotonic() - spawned.started
    spawned.reported = _with_changes(
        spawned, _result(spawned, None, None, wall, _read_available(spawned.error_read, 4096), report, stats))
    return spawned.reported


def finish_sandbox(spawned: SpawnedSandbox, *, destroy_cgroup: bool = True) -> SandboxResult:
    """Reap the init process and turn everything it left into a SandboxResult (the
    reported one, if it was). Always kills what is left of the tree; destroys the
    (then empty) cgroup unless the caller does so later."""
    try:
        _, wait_status, rusage = os.wait4(spawned.pid, 0)
        wall = time.monotonic() - spawned.started
        stats: CgroupStats | None = None
        if spawned.cgroup is not None:
            spawned.cgroup.kill()  # before reading: nothing left may hold the pipes open
            stats = spawned.cgroup.stats() if spawned.reported is None else None
        if spawned.reported is not None:
            return spawned.reported
        # Non-blocking: without a pid namespace or cgroup an escaped process could
        # still hold a pipe; what was written before init exited is there already.
        error_report = _read_available(spawned.error_read, 4096)
        status_report = spawned.status_report
        if status_report is None:
            status_report = _read_available(spawned.status_read, _STATUS_LIMIT)
        return _with_changes(spawned, _result(spawned, wait_status, rusage, wall, error_report, status_report,
                                              stats))
    finally:
        try:
            if spawned.cgroup is not None and destroy_cgroup:
                spawned.cgroup.destroy()
        finally:
            _close(spawned)


def _syscall_events(spawned: SpawnedSandbox, match: re.Match[bytes] | None) -> tuple[SecurityEvent, ...]:
    """The syscalls init's listener answered: refused ("denied_syscall"), or, learning,
    let through ("learned_syscall"); most frequent first. A count that did not fit in
    init's report is one event "(omitted)" with the number of syscalls left out."""
    if match is None or not match.group(6):
        return ()
    from ..linux.seccomp import syscall_name

    kind = "learned_syscall" if spawned.plan.seccomp_for(spawned.program).learns else "denied_syscall"
    events = [SecurityEvent(kind, syscall_name(int(nr)) if int(nr) < 1024 else "syscall_above_1023", int(count),
                            int(first) / 1e6)
              for nr, count, first in _SYSCALL_ENTRY.findall(match.group(6))]
    events.sort(key=lambda event: (-event.count, event.target))
    if match.group(7):
        events.append(SecurityEvent(kind, "(omitted)", int(match.group(7))))
    return tuple(events)


def _result(spawned: SpawnedSandbox, wait_status: int | None, rusage: resource.struct_rusage | None, wall: float,
            error_report: bytes, status_report: bytes, stats: CgroupStats | None) -> SandboxResult:
    """`wait_status` and `rusage` of the reaped init, or None for init's report alone."""
    match = _STATUS.fullmatch(status_report)
    # Init's own resident set is a copy of its parent's; what it reaped is the sandbox's.
    reported = match is not None and match.group(3) is not None
    peak_kib = int(match.group(3)) if match and reported else rusage.ru_maxrss if rusage else 0
    user, system = ((int(match.group(4)) / 1e6, int(match.group(5)) / 1e6) if match and reported and rusage is None
                    else (rusage.ru_utime, rusage.ru_stime) if rusage else (0.0, 0.0))
    usage = ResourceUsage(
        wall_seconds=wall,
        cpu_user_seconds=user,
        cpu_system_seconds=system,
        memory_peak_bytes=peak_kib * 1024,
    )
    if stats is not None:
        usage = usage_from_cgroup(stats, wall, floor=usage)
    isolation = spawned.isolation()
    base = SandboxResult(Outcome.OK, resource_usage=usage, isolation=isolation,
                         security_events=_syscall_events(spawned, match))
    if error_report:
        return replace(base, outcome=Outcome.SANDBOX_ERROR, error=str(parse_setup_error(error_report)))
    init_failed = _INIT_FAILED.fullmatch(status_report)
    if init_failed:
        code = int(init_failed.group(1))
        return replace(base, outcome=Outcome.SANDBOX_ERROR,
                       error=f"the sandbox's init failed at {init_failed.group(2).decode()}: "
                             f"{os.strerror(code) if 0 < code < 4096 else 'unknown error'} (errno {code}); "
                             "the payload was killed")
    kind = match.group(1).decode() if match else ""
    exit_code = int(match.group(2)) if match and kind == "exit" else None
    sig = int(match.group(2)) if match and kind == "signal" else None
    if kind not in ("exit", "signal") and wait_status is not None and os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)  # init itself was killed (timeout, stop, OOM)
    base = replace(base, exit_code=exit_code, signal=sig)
    config = spawned.plan.config
    if spawned.timed_out:
        return replace(base, outcome=Outcome.TIMEOUT, error=f"wall timeout of {config.timeout_seconds}s")
    if stats is not None and stats.oom_kills:
        return replace(base, outcome=Outcome.OOM,
                       error=f"out of memory: the kernel OOM-killed {stats.oom_kills} process(es) "
                             f"at memory_limit_mb={config.memory_limit_mb}")
    if sig == signal.SIGKILL and not spawned.killed and spawned.cgroup is None and _OomKills.claim():
        # No cgroup of its own: it was charged to ours, where the kernel counts the kill.
        return replace(base, outcome=Outcome.OOM,
                       error="out of memory: the kernel's OOM killer killed it (a memory limit above "
                             "the sandbox, or the machine's memory, ran out)")
    if sig is not None:
        return replace(base, outcome=Outcome.KILLED, error=f"killed by signal {sig}")
    if exit_code == 0:
        return base
    return replace(base, outcome=Outcome.ERROR, error=f"exit code {exit_code}")
