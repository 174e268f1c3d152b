"""The POSIX fallback backend: rlimits and a process group, no namespaces.

For macOS, and Linux hosts where namespaces are unavailable. `PosixStarter` is a
start method (like ForkStarter) that the asyncio SandboxManager drives
unchanged (`SandboxManager(config, start_method="posix")`).

How a sandbox starts: the host fork+execs a fresh interpreter running this
module (the *trampoline*; subprocess's C child code does only setsid, the
stdio and fd passing and exec, so a multi-threaded host is never forked into
Python code). The trampoline reads its spec from a pipe and applies, in order,
failing closed (stage, errno and message go back on an error pipe, and the
payload never runs):

    1 signals reset               5 identity (setgroups, setresgid, setresuid)
    2 parent-death signal (Linux) 6 parent-death signal again (a uid change clears it)
    3 file descriptors (map, close the rest)   7 no_new_privs (Linux)
    4 rlimits                     8 exec the program / run the callable

What it enforces:
- a new session: the sandbox is the leader of its own process group, and
  kill, timeout, pause (SIGSTOP) and resume (SIGCONT) go to the whole group,
  plus every descendant the sampler has seen (checked by psutil against pid
  reuse). The group is killed before the leader is reaped, so the group id
  cannot have been recycled;
- a wall timeout (the group is SIGKILLed), with RLIMIT_CPU as a backstop;
- RLIMIT_NOFILE from max_open_files, RLIMIT_CORE 0;
- RLIMIT_NPROC from max_processes: on Linux and macOS it counts every process
  of the sandbox's *uid on the whole host*, so it is a real ceiling only for a
  non-root uid, and sandboxes sharing a uid share it (root is exempt);
- RLIMIT_AS from memory_limit_mb (Linux; macOS does not enforce it): this is
  *address space per process*, not resident memory and not a total for the
  tree. It is applied, but counts as not enforced (see POSIX_UNENFORCEABLE);
- a clean environment (config.environment only), only the fds asked for
  (0, 1, 2 and 3 for Python payloads), the drop to config.uid/gid when the
  host runs as root, no_new_privs on Linux.
- resource usage: wait4 rusage of the leader, plus psutil samples of the tree
  (live stats, memory and process peaks).

What it cannot enforce: see `unenforced_protections()`. A config that asks for
any of those raises UnsupportedError naming every one, unless the caller lists
them in `allow_unenforced` ("all" accepts every gap). The result's
IsolationReport(backend="posix").not_enforced always lists every gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import math
import os
import pickle
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import psutil

from ..config import DEFAULT_MEMORY_LIMIT_MB, SandboxConfig
from ..errors import SandboxError, UnsupportedError
from ..launch.launcher import LaunchRequest
from ..launch.payload import Payload
from ..launch.setup_errors import parse_setup_error, report_failure
from ..launch.start_methods import StartMethod
from ..result import EXIT_SANDBOX_ERROR, IsolationReport, Outcome, ResourceUsage, SandboxResult

__all__ = [
    "POSIX_UNENFORCEABLE",
    "PosixStarter",
    "check_enforceable",
    "isolation_report",
    "plan_posix_rlimits",
    "unenforced_protections",
]

_NAMESPACE_GAPS = {
    "user": "no user namespace: the payload runs with real host uids",
    "pid": ("no PID namespace: the payload sees every host process and can signal those of its uid; "
            "a process that calls setsid() or setpgid() leaves the sandbox's process group and can "
            "outlive it (only descendants seen by the sampler are still killed)"),
    "net": "no network isolation: the payload has the host's network access",
    "mnt": "no mount namespace: the payload sees the host's file system with its uid's rights",
    "uts": "no UTS namespace: the hostname is the host's",
    "ipc": "no IPC namespace: System V IPC and POSIX message queues are shared with the host",
    "cgroup": "no cgroup namespace: the payload sees the host's cgroup tree",
}

POSIX_UNENFORCEABLE: frozenset[str] = frozenset(
    [f"namespaces.{n}" for n in _NAMESPACE_GAPS]
    + ["filesystem", "filesystem.binds.owner", "seccomp", "landlock", "no_new_privs", "capabilities", "uid",
       "memory_limit_mb", "max_processes", "cpu_quota_percent", "io_limits"]
)
"""Every protection name `allow_unenforced` may list (or "all"). Listing one is
the explicit choice to run without it."""

ALLOW_ALL = "all"
# Seconds between psutil samples of a running tree (peaks, descendants to kill).
SAMPLE_INTERVAL = 0.25
# How long freeze() waits for every process of the tree to show as stopped.
FREEZE_SETTLE_SECONDS = 2.0


def _system() -> str:
    return {"darwin": "macOS", "linux": "Linux"}.get(sys.platform, sys.platform)


def _sandbox_ids(config: SandboxConfig, euid: int, egid: int) -> tuple[int, int]:
    """The uid/gid the payload really runs as: config's when we are root, else ours."""
    return (config.uid_or_nobody, config.gid_or_nobody) if euid == 0 else (euid, egid)


def unenforced_protections(
    config: SandboxConfig, *, euid: int | None = None, egid: int | None = None,
    platform: str | None = None,
) -> list[tuple[str, str, bool]]:
    """Every protection this backend does not (fully) enforce for `config`, as
    (name, reason, requested). `requested` is true when the config asks for it:
    that is what fails closed. The others are still reported in not_enforced."""
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    platform = sys.platform if platform is None else platform
    uid, _ = _sandbox_ids(config, euid, egid)
    gaps: list[tuple[str, str, bool]] = []
    for name, reason in _NAMESPACE_GAPS.items():
        wanted = getattr(config.namespaces, name)
        requested = config.namespaces.user_enabled(euid) if name == "user" else bool(wanted)
        gaps.append((f"namespaces.{name}", reason, requested))
    fs = config.filesystem
    gaps.append(("filesystem", "no read-only root, binds or private /tmp: the host file system is "
                 "visible with the payload uid's rights",
                 config.namespaces.mnt or bool(fs.all_binds)))
    if any(bind.owner == "caller" for bind in fs.all_binds):
        gaps.append(("filesystem.binds.owner", f"no idmapped binds: files the payload creates belong to "
                     f"uid {uid}, not to the caller (uid {euid})", uid != euid))
    gaps.append(("seccomp", "no system-call filter in the posix backend", config.seccomp != "off"))
    gaps.append(("landlock", "no Landlock ruleset in the posix backend", config.landlock == "required"))
    if platform != "linux":
        gaps.append(("no_new_privs", f"no_new_privs is a Linux prctl ({_system()}): setuid programs "
                     "can still gain privileges", config.no_new_privs))
    if uid == 0:
        gaps.append(("capabilities", "the payload runs as root with every capability",
                     config.capabilities.drop_all))
    else:
        gaps.append(("capabilities", f"no capability sets are managed: uid {uid} simply has none"
                     + (f" (asked to keep {', '.join(config.capabilities.allowed)})"
                        if config.capabilities.allowed else ""), False))
    if euid != 0 and (config.uid_or_nobody, config.gid_or_nobody) != (euid, egid):
        gaps.append(("uid", f"switching to uid {config.uid_or_nobody}/gid {config.gid_or_nobody} needs root; "
                     "the payload "
                     f"runs as uid {euid}", True))
    if config.memory_limit_mb is not None:
        how = ("approximated by RLIMIT_AS: address space per process, not resident memory, and not "
               "a total for the tree" if platform == "linux"
               else f"{_system()} does not enforce RLIMIT_AS; no memory limit is applied")
        # The default profile's limit stands as an rlimit where one enforces it (as on
        # Linux without a cgroup: launch/limits.py); one the user set is refused.
        default_as_rlimit = platform == "linux" and config.memory_limit_mb == DEFAULT_MEMORY_LIMIT_MB
        gaps.append(("memory_limit_mb", f"no cgroup memory limit ({how})", not default_as_rlimit))
    if config.max_processes is not None and uid == 0:
        gaps.append(("max_processes", "RLIMIT_NPROC does not apply to root", True))
    elif config.max_processes is not None:
        gaps.append(("max_processes", f"RLIMIT_NPROC counts every process of uid {uid} on the host, "
                     "shared with anything else running as that uid", False))
    else:
        gaps.append(("max_processes", "no process limit was asked for (none applied)", False))
    gaps.append(("cpu_quota_percent", "no CPU rate limit (RLIMIT_CPU is total seconds, not a rate)",
                 config.cpu_quota_percent is not None))
    io_fields = [f for f in ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")
                 if getattr(config, f) is not None]
    gaps.append(("io_limits", "no I/O limits without cgroups"
                 + (f" (asked for {', '.join(io_fields)})" if io_fields else ""), bool(io_fields)))
    return gaps


def check_enforceable(config: SandboxConfig, allow_unenforced: Iterable[str] = (), *,
                      euid: int | None = None, egid: int | None = None,
                      platform: str | None = None) -> tuple[str, ...]:
    """Fail closed: raise UnsupportedError naming every requested protection that
    is not in `allow_unenforced`; else return the not_enforced lines for the report."""
    allowed = set(allow_unenforced)
    unknown = allowed - POSIX_UNENFORCEABLE - {ALLOW_ALL}
    if unknown:
        raise UnsupportedError("allow_unenforced", f"unknown protection name(s) {sorted(unknown)}; "
                               f"known: {sorted(POSIX_UNENFORCEABLE)} or 'all'")
    gaps = unenforced_protections(config, euid=euid, egid=egid, platform=platform)
    if ALLOW_ALL not in allowed:
        refused = [(name, reason) for name, reason, requested in gaps if requested and name not in allowed]
        if refused:
            raise UnsupportedError(
                ", ".join(name for name, _ in refused),
                "; ".join(f"{name}: {reason}" for name, reason in refused)
                + " (list them in allow_unenforced to run without them)")
    return tuple(f"{name}: {reason}" for name, reason, _ in gaps)


def plan_posix_rlimits(config: SandboxConfig,
                       platform: str | None = None) -> tuple[tuple[str, int, int], ...]:
    """(name, soft, hard) for every rlimit the trampoline sets."""
    platform = sys.platform if platform is None else platform
    limits = [("RLIMIT_NOFILE", config.max_open_files, config.max_open_files), ("RLIMIT_CORE", 0, 0)]
    if config.max_processes is not None:
        limits.append(("RLIMIT_NPROC", config.max_processes, config.max_processes))
    if config.max_file_size_mb is not None:
        size = config.max_file_size_mb * 1024 * 1024
        limits.append(("RLIMIT_FSIZE", size, size))
    if config.memory_limit_mb is not None and platform == "linux":
        size = config.memory_limit_mb * 1024 * 1024
        limits.append(("RLIMIT_AS", size, size))
    if config.timeout_seconds is not None:
        # A backstop for the wall timer: SIGXCPU one second after the wall budget, SIGKILL after two.
        soft = math.ceil(config.timeout_seconds) + 1
        limits.append(("RLIMIT_CPU", soft, soft + 1))
    return tuple(limits)


def isolation_report(config: SandboxConfig, not_enforced: tuple[str, ...], *,
                     euid: int | None = None, egid: int | None = None,
                     platform: str | None = None) -> IsolationReport:
    """The IsolationReport of a posix run."""
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    platform = sys.platform if platform is None else platform
    uid, gid = _sandbox_ids(config, euid, egid)
    limits = [f"rlimit {name[7:].lower()}={soft}" + (f"/{hard}" if hard != soft else "")
              for name, soft, hard in plan_posix_rlimits(config, platform)]
    limits += ["new session: the process group is killed as a whole", "clean environment",
               "only the mapped file descriptors"]
    if config.timeout_seconds is not None:
        limits.append(f"wall timeout {config.timeout_seconds}s")
    return IsolationReport(
        backend="posix",
        namespaces=(),
        rootfs="host file system (not isolated)",
        uid=uid,
        gid=gid,
        capabilities=("all (runs as root)",) if uid == 0 else (),
        no_new_privs=config.no_new_privs and platform == "linux",
        seccomp="off",
        cgroup="",
        limits=tuple(limits),
        not_enforced=not_enforced,
    )


# ---------------------------------------------------------------- the host side


@dataclass
class _Sandbox:
    """A running posix sandbox as the host sees it; `pid` is also its process group."""

    pid: int
    process: subprocess.Popen[bytes]
    config: SandboxConfig
    report: IsolationReport
    error_read: int
    exit_fd: int
    exit_source: Any = None  # keeps a kqueue object alive (macOS)
    started: float = field(default_factory=time.monotonic)
    timed_out: bool = False
    frozen: bool = False
    memory_peak: int = 0
    processes_peak: int = 0
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


def _tree(sandbox: _Sandbox) -> list[psutil.Process]:
    """The leader and its descendants (by parent links), as psutil sees them now."""
    try:
        leader = psutil.Process(sandbox.pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return []


class PosixStarter(StartMethod):
    """Start sandboxes with rlimits and a process group (no namespaces).

    `allow_unenforced`: names from POSIX_UNENFORCEABLE (or "all") the caller
    accepts losing; any other requested protection this backend cannot enforce
    makes spawn() raise UnsupportedError naming it.
    """

    def __init__(self, allow_unenforced: Iterable[str] = ()) -> None:
        super().__init__()
        self.allow_unenforced = tuple(allow_unenforced)
        unknown = set(self.allow_unenforced) - POSIX_UNENFORCEABLE - {ALLOW_ALL}
        if unknown:
            raise UnsupportedError("allow_unenforced", f"unknown protection name(s) {sorted(unknown)}; "
                                   f"known: {sorted(POSIX_UNENFORCEABLE)} or 'all'")
        self._running: dict[int, _Sandbox] = {}

    async def start(self) -> None:
        if sys.platform != "linux" and not hasattr(select, "kqueue"):
            raise UnsupportedError("posix backend", f"no way to watch process exits on {sys.platform}")

    async def spawn(self, sandbox_id: int, request: LaunchRequest, fds: dict[int, int]) -> int:
        config = request.config
        not_enforced = check_enforceable(config, self.allow_unenforced)  # before anything runs
        report = isolation_report(config, not_enforced)
        spec_read, spec_write = os.pipe()
        error_read, error_write = os.pipe()
        for fd in (spec_read, spec_write, error_read, error_write):
            os.set_inheritable(fd, False)
        try:
            _write_spec(spec_write, config, request.payload, fds)
            os.close(spec_write)
            spec_write = -1
            process = subprocess.Popen(
                [sys.executable, "-I", "-m", __name__, str(spec_read), str(error_write), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fds.get(2, subprocess.DEVNULL),
                pass_fds=(spec_read, error_write, *fds.values()), close_fds=True,
                env=dict(config.environment), cwd="/", start_new_session=True,
            )
        except BaseException:
            os.close(error_read)
            raise
        finally:
            for fd in (spec_read, spec_write, error_write):
                if fd >= 0:
                    os.close(fd)
        sandbox = _Sandbox(process.pid, process, config, report, error_read, -1)
        try:
            self._watch_exit(sandbox_id, sandbox)
        except BaseException:
            self._kill_group(sandbox)
            _, status, _ = os.wait4(sandbox.pid, 0)
            process.returncode = status
            os.close(error_read)
            raise
        self._running[sandbox_id] = sandbox
        self.isolation[sandbox_id] = report
        self.exit_future(sandbox_id)
        loop = asyncio.get_running_loop()
        if config.timeout_seconds is not None:
            sandbox.timers.append(loop.call_later(config.timeout_seconds, self._expire, sandbox_id))
        sandbox.timers.append(loop.call_later(SAMPLE_INTERVAL, self._sample_periodically, sandbox_id))
        return sandbox.pid

    def _watch_exit(self, sandbox_id: int, sandbox: _Sandbox) -> None:
        """Get a readable fd when the leader exits, without reaping it (the zombie
        keeps its pid, so the group id stays ours until we kill the group)."""
        loop = asyncio.get_running_loop()
        if sys.platform == "linux":
            sandbox.exit_fd = os.pidfd_open(sandbox.pid)
            loop.add_reader(sandbox.exit_fd, self._reap, sandbox_id)
        else:
            kq = select.kqueue()
            sandbox.exit_source = kq
            sandbox.exit_fd = kq.fileno()
            try:
                kq.control([select.kevent(sandbox.pid, filter=select.KQ_FILTER_PROC,
                                          flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
                                          fflags=select.KQ_NOTE_EXIT)], 0)
            except ProcessLookupError:
                loop.call_soon(self._reap, sandbox_id)  # it has exited already
            else:
                loop.add_reader(sandbox.exit_fd, self._reap, sandbox_id)

    # -- the end ------------------------------------------------------------

    def _reap(self, sandbox_id: int) -> None:
        sandbox = self._running.pop(sandbox_id, None)
        if sandbox is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sandbox.exit_fd)
        for timer in sandbox.timers:
            timer.cancel()
        self._kill_group(sandbox)  # stragglers; the leader is a zombie, the group id is still ours
        try:
            _, status, rusage = os.wait4(sandbox.pid, 0)
            sandbox.process.returncode = status  # keeps subprocess from polling a recycled pid
            wall = time.monotonic() - sandbox.started
            error_report = _read_available(sandbox.error_read)
            result = _result(sandbox, status, rusage, wall, error_report)
        finally:
            os.close(sandbox.error_read)
            if sandbox.exit_source is not None:
                sandbox.exit_source.close()
            else:
                os.close(sandbox.exit_fd)
        self._exited(sandbox_id, result)

    def _kill_group(self, sandbox: _Sandbox) -> None:
        """SIGKILL the process group and every descendant seen (psutil checks the pid
        still names the same process)."""
        self._signal_group(sandbox, signal.SIGKILL)

    def _signal_group(self, sandbox: _Sandbox, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sandbox.pid, sig)
        for process in list(sandbox.seen.values()):
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)

    def _expire(self, sandbox_id: int) -> None:
        sandbox = self._running.get(sandbox_id)
        if sandbox is not None:
            sandbox.timed_out = True
            self._kill_group(sandbox)

    def _sample(self, sandbox: _Sandbox) -> dict[str, Any]:
        """Live usage of the tree, named as in ResourceUsage (plus current values)."""
        tree = _tree(sandbox)
        user = system = 0.0
        rss = 0
        for process in tree:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                user += times.user
                system += times.system
                rss += process.memory_info().rss
                if process.pid != sandbox.pid:
                    sandbox.seen.setdefault(process.pid, process)
        sandbox.memory_peak = max(sandbox.memory_peak, rss)
        sandbox.processes_peak = max(sandbox.processes_peak, len(tree))
        return {"wall_seconds": time.monotonic() - sandbox.started, "cpu_user_seconds": user,
                "cpu_system_seconds": system, "memory_peak_bytes": sandbox.memory_peak,
                "processes_peak": sandbox.processes_peak, "memory_current_bytes": rss,
                "processes_current": len(tree), "frozen": float(sandbox.frozen)}

    def _sample_periodically(self, sandbox_id: int) -> None:
        sandbox = self._running.get(sandbox_id)
        if sandbox is None:
            return
        self._sample(sandbox)
        sandbox.seen = {pid: p for pid, p in sandbox.seen.items() if _still_running(p)}
        loop = asyncio.get_running_loop()
        sandbox.timers = [t for t in sandbox.timers if not t.cancelled() and t.when() > loop.time()]
        sandbox.timers.append(loop.call_later(SAMPLE_INTERVAL, self._sample_periodically, sandbox_id))

    # -- control ------------------------------------------------------------

    async def control(self, op: str, sandbox_id: int, **args: Any) -> dict[str, Any]:
        sandbox = self._running.get(sandbox_id)
        if sandbox is None:
            return {"ok": False, "error": "no such sandbox (it has exited)"}
        if op == "stats":
            return {"ok": True, "stats": self._sample(sandbox)}
        if op == "kill":
            self._kill_group(sandbox)
        elif op == "signal":
            self._signal_group(sandbox, int(args["signal"]))
        elif op == "freeze":
            self._sample(sandbox)  # learn the descendants first
            self._signal_group(sandbox, signal.SIGSTOP)
            sandbox.frozen = True
            await self._settle_stopped(sandbox)
            return {"ok": True, "how": "SIGSTOP"}
        elif op == "thaw":
            self._signal_group(sandbox, signal.SIGCONT)
            sandbox.frozen = False
        else:
            return {"ok": False, "error": f"unknown operation {op!r}"}
        return {"ok": True}

    async def _settle_stopped(self, sandbox: _Sandbox) -> None:
        """Return once every process of the tree shows as stopped (SIGSTOP is asynchronous)."""
        deadline = time.monotonic() + FREEZE_SETTLE_SECONDS
        while time.monotonic() < deadline:
            states = []
            for process in _tree(sandbox):
                with contextlib.suppress(psutil.Error):
                    states.append(process.status())
            if all(s in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) for s in states):
                return
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        futures = []
        for sandbox_id, sandbox in list(self._running.items()):
            self._kill_group(sandbox)
            futures.append(asyncio.shield(self.exit_future(sandbox_id)))
        if futures:
            await asyncio.gather(*futures, return_exceptions=True)


def _still_running(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _write_spec(fd: int, config: SandboxConfig, payload: Payload, fds: dict[int, int]) -> None:
    """Two pickles (host -> sandbox: the host trusts itself): sys.path, then the spec."""
    paths = [os.path.abspath(p) for p in sys.path]
    spec = {
        "fd_map": tuple(fds.items()),
        "rlimits": plan_posix_rlimits(config),
        "uid": config.uid_or_nobody,
        "gid": config.gid_or_nobody,
        "no_new_privs": config.no_new_privs,
        "environment": tuple(f"{k}={v}".encode() for k, v in config.environment),
        "payload": payload,
    }
    data = pickle.dumps(paths) + pickle.dumps(spec)
    os.set_blocking(fd, False)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BlockingIOError:
        raise SandboxError(f"the sandbox spec ({len(data)} bytes) does not fit in a pipe") from None


def _read_available(fd: int, limit: int = 65536) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    total = 0
    with contextlib.suppress(BlockingIOError):
        while total < limit:
            chunk = os.read(fd, limit - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def _result(sandbox: _Sandbox, status: int, rusage: resource.struct_rusage, wall: float,
            error_report: bytes) -> SandboxResult:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    maxrss = rusage.ru_maxrss if sys.platform == "darwin" else rusage.ru_maxrss * 1024
    usage = ResourceUsage(wall_seconds=wall, cpu_user_seconds=rusage.ru_utime,
                          cpu_system_seconds=rusage.ru_stime,
                          memory_peak_bytes=max(maxrss, sandbox.memory_peak),
                          processes_peak=max(1, sandbox.processes_peak))
    base = SandboxResult(Outcome.OK, resource_usage=usage, isolation=sandbox.report)
    if error_report:
        return dataclasses.replace(base, outcome=Outcome.SANDBOX_ERROR,
                                   error=str(parse_setup_error(error_report)))
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    base = dataclasses.replace(base, exit_code=exit_code, signal=sig)
    config = sandbox.config
    if sandbox.timed_out:
        return dataclasses.replace(base, outcome=Outcome.TIMEOUT,
                                   error=f"wall timeout of {config.timeout_seconds}s")
    cpu_limit = next((soft for name, soft, _ in plan_posix_rlimits(config) if name == "RLIMIT_CPU"), None)
    if sig is not None and cpu_limit is not None and (
            sig == signal.SIGXCPU or rusage.ru_utime + rusage.ru_stime >= cpu_limit):
        return dataclasses.replace(base, outcome=Outcome.TIMEOUT,
                                   error=f"CPU time limit (RLIMIT_CPU {cpu_limit}s) exceeded")
    if sig is not None:
        return dataclasses.replace(base, outcome=Outcome.KILLED, error=f"killed by signal {sig}")
    if exit_code == 0:
        return base
    return dataclasses.replace(base, outcome=Outcome.ERROR, error=f"exit code {exit_code}")


# ---------------------------------------------------------------- the trampoline (sandbox side)


def _set_parent_death_signal(parent_pid: int) -> None:
    if sys.platform == "linux":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent_pid:
            raise ProcessLookupError("the host exited before the sandbox started")


def _set_no_new_privs() -> None:
    if sys.platform == "linux":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _open_fds() -> list[int]:
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return sorted(int(name) for name in os.listdir(directory))
        except OSError:
            continue
    return list(range(os.sysconf("SC_OPEN_MAX")))


def _arrange_fds(fd_map: tuple[tuple[int, int], ...], error_fd: int) -> None:
    """Give the payload exactly the fds of `fd_map` (target <- source); close all others."""
    above = max([error_fd, *(t for t, _ in fd_map)]) + 1
    staged = [(target, fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, above)) for target, source in fd_map]
    for _, source in fd_map:
        with contextlib.suppress(OSError):
            os.close(source)
    for target, source in staged:
        os.dup2(source, target, inheritable=True)
        os.close(source)
    keep = {target for target, _ in fd_map} | {error_fd}
    targets = {target for target, _ in fd_map}
    if not {0, 1, 2} <= targets:  # the standard streams always exist: /dev/null for the missing ones
        for fd in {0, 1, 2} - targets:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd, inheritable=True)
                os.close(null)
            keep.add(fd)
    for fd in _open_fds():
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _apply_rlimits(limits: tuple[tuple[str, int, int], ...]) -> None:
    for name, soft, hard in limits:
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _drop_identity(uid: int, gid: int, parent_pid: int) -> None:
    if os.geteuid() != 0:
        return  # not root: runs as the caller (reported as the "uid" gap)
    os.setgroups([])
    if sys.platform == "linux":
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        ok = os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid)
    else:  # no setres*id: as root, setgid/setuid set the real, effective and saved ids
        os.setgid(gid)
        os.setuid(uid)
        ok = (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (uid, uid, gid, gid)
    if not ok:
        raise PermissionError(f"uid/gid are {os.getuid()}/{os.getgid()}, wanted {uid}/{gid}")
    _set_parent_death_signal(parent_pid)  # a uid change clears it


def run_trampoline(spec_fd: int, error_fd: int, parent_pid: int) -> NoReturn:
    """The sandbox side: apply every stage in order, then run the payload. Never returns."""
    err = error_fd

    def stage(name: str, action: Any) -> Any:
        try:
            return action()
        except BaseException as exc:  # noqa: BLE001 - any failure must end the sandbox
            report_failure(err, name, exc)

    def read_spec() -> dict[str, Any]:
        with open(spec_fd, "rb", closefd=True) as f:
            sys.path[:] = pickle.load(f)
            spec: dict[str, Any] = pickle.load(f)
            return spec

    spec = stage("spec", read_spec)
    fd_map: tuple[tuple[int, int], ...] = spec["fd_map"]
    # Out of the way of the payload's fd map (dup2 onto a target would close it silently).
    err = stage("file descriptors", lambda: fcntl.fcntl(
        error_fd, fcntl.F_DUPFD_CLOEXEC, max([2, *(t for t, _ in fd_map)]) + 1))
    os.close(error_fd)
    payload: Payload = spec["payload"]
    if not payload.needs_python:  # Python ignores these; a program must get the defaults back
        stage("signals", lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGPIPE, signal.SIGXFSZ)])
    stage("parent-death signal", lambda: _set_parent_death_signal(parent_pid))
    stage("file descriptors", lambda: _arrange_fds(fd_map, err))
    stage("rlimits", lambda: _apply_rlimits(spec["rlimits"]))
    stage("identity", lambda: _drop_identity(spec["uid"], spec["gid"], parent_pid))
    if spec["no_new_privs"]:
        stage("no_new_privs", _set_no_new_privs)
    if payload.needs_python:
        os.close(err)  # EOF on the error pipe: every stage passed
        try:
            payload.run(spec["environment"])
        finally:
            os._exit(EXIT_SANDBOX_ERROR)
    stage("exec", lambda: payload.run(spec["environment"]))  # exec closes the CLOEXEC error pipe
    os._exit(EXIT_SANDBOX_ERROR)


if __name__ == "__main__":
    run_trampoline(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
