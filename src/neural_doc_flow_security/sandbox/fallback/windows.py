"""The Windows backend: one Job Object per run, driven through ctypes (no pywin32).

What it enforces: a job memory limit, an active-process limit, a hard-capped
CPU rate, UI restrictions, no breakaway, kill-on-close of the whole tree, a wall
timeout (TerminateJobObject), and a restricted token with every privilege but
SeChangeNotifyPrivilege removed (CreateRestrictedToken(DISABLE_MAX_PRIVILEGE)).
The process is created suspended, put into the job, and only then resumed, so
none of its code runs outside the job.

What Windows cannot do here: no namespaces (the payload sees the host's file
system with the caller's rights, the network, other processes and named
objects), no syscall filter (seccomp), no no_new_privs, no uid/gid switch (it
runs as the calling user), no open-handle limit, no I/O limits. Following the
fail-closed rule, a config that asks for any of these raises UnsupportedError
naming them, unless the caller lists them in `allow_unenforced` (the explicit
"I accept that this is not enforced" switch; `WINDOWS_UNENFORCEABLE` lists
every name). The result's IsolationReport.not_enforced always says what was
missing.

Layout: pure logic first (limit structures built from a SandboxConfig, the
unenforced list, outcome mapping; unit-tested on Linux), then `Win32Api`, the
only place that calls kernel32/advapi32 (tested on Linux against fake DLL
objects), then `run_command_windows`, which strings them together.

CPU mapping: SandboxConfig.cpu_quota_percent counts CPUs (100 = one full CPU),
while JOBOBJECT_CPU_RATE_CONTROL_INFORMATION.CpuRate is the share of the
*whole machine* in 1/10000 (10000 = all CPUs). So
CpuRate = round(cpu_quota_percent * 100 / cpu_count), clamped to 1..10000:
on 4 CPUs, 50% of one CPU -> 1250 (12.5% of the machine); 400% -> 10000.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import SandboxConfig
from ..errors import SetupError, UnsupportedError
from ..result import IsolationReport, Outcome, ResourceUsage, SandboxResult

__all__ = [
    "WINDOWS_UNENFORCEABLE",
    "JobLimits",
    "Win32Api",
    "cpu_rate_for",
    "job_limits_for",
    "outcome_for",
    "run_command_windows",
    "unenforced_protections",
]

# ---------------------------------------------------------------- Win32 constants

JOB_OBJECT_LIMIT_ACTIVE_PROCESS = 0x00000008
JOB_OBJECT_LIMIT_JOB_MEMORY = 0x00000200
JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION = 0x00000400
JOB_OBJECT_LIMIT_BREAKAWAY_OK = 0x00000800
JOB_OBJECT_LIMIT_SILENT_BREAKAWAY_OK = 0x00001000
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000

JOB_OBJECT_CPU_RATE_CONTROL_ENABLE = 0x1
JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP = 0x4

JOB_OBJECT_UILIMIT_HANDLES = 0x0001
JOB_OBJECT_UILIMIT_READCLIPBOARD = 0x0002
JOB_OBJECT_UILIMIT_WRITECLIPBOARD = 0x0004
JOB_OBJECT_UILIMIT_SYSTEMPARAMETERS = 0x0008
JOB_OBJECT_UILIMIT_DISPLAYSETTINGS = 0x0010
JOB_OBJECT_UILIMIT_GLOBALATOMS = 0x0020
JOB_OBJECT_UILIMIT_DESKTOP = 0x0040
JOB_OBJECT_UILIMIT_EXITWINDOWS = 0x0080
UI_RESTRICTIONS_ALL = (
    JOB_OBJECT_UILIMIT_HANDLES | JOB_OBJECT_UILIMIT_READCLIPBOARD | JOB_OBJECT_UILIMIT_WRITECLIPBOARD
    | JOB_OBJECT_UILIMIT_SYSTEMPARAMETERS | JOB_OBJECT_UILIMIT_DISPLAYSETTINGS
    | JOB_OBJECT_UILIMIT_GLOBALATOMS | JOB_OBJECT_UILIMIT_DESKTOP | JOB_OBJECT_UILIMIT_EXITWINDOWS
)

# JOBOBJECTINFOCLASS
JobObjectBasicUIRestrictions = 4
JobObjectAssociateCompletionPortInformation = 7
JobObjectBasicAndIoAccountingInformation = 8
JobObjectExtendedLimitInformation = 9
JobObjectCpuRateControlInformation = 15

# Completion-port messages of a job.
JOB_OBJECT_MSG_ACTIVE_PROCESS_LIMIT = 3
JOB_OBJECT_MSG_NEW_PROCESS = 6
JOB_OBJECT_MSG_EXIT_PROCESS = 7
JOB_OBJECT_MSG_ABNORMAL_EXIT_PROCESS = 8
JOB_OBJECT_MSG_PROCESS_MEMORY_LIMIT = 9
JOB_OBJECT_MSG_JOB_MEMORY_LIMIT = 10

CREATE_SUSPENDED = 0x00000004
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_UNICODE_ENVIRONMENT = 0x00000400
CREATE_NO_WINDOW = 0x08000000
CREATION_FLAGS = CREATE_SUSPENDED | CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW | CREATE_UNICODE_ENVIRONMENT

STARTF_USESTDHANDLES = 0x00000100
HANDLE_FLAG_INHERIT = 0x00000001
DISABLE_MAX_PRIVILEGE = 0x1
TOKEN_ASSIGN_PRIMARY = 0x0001
TOKEN_DUPLICATE = 0x0002
TOKEN_QUERY = 0x0008
INFINITE = 0xFFFFFFFF
WAIT_OBJECT_0 = 0x0
WAIT_TIMEOUT = 0x102
ERROR_BROKEN_PIPE = 109
INVALID_HANDLE_VALUE = -1

# NTSTATUS exit codes that mean "ran out of memory".
STATUS_NO_MEMORY = 0xC0000017
STATUS_COMMITMENT_LIMIT = 0xC000012D
MEMORY_STATUSES = frozenset({STATUS_NO_MEMORY, STATUS_COMMITMENT_LIMIT})
_KNOWN_STATUSES = {
    0xC0000005: "STATUS_ACCESS_VIOLATION",
    0xC0000017: "STATUS_NO_MEMORY",
    0xC000001D: "STATUS_ILLEGAL_INSTRUCTION",
    0xC0000094: "STATUS_INTEGER_DIVIDE_BY_ZERO",
    0xC00000FD: "STATUS_STACK_OVERFLOW",
    0xC000012D: "STATUS_COMMITMENT_LIMIT",
    0xC0000409: "STATUS_STACK_BUFFER_OVERRUN",
    0xC000013A: "STATUS_CONTROL_C_EXIT",
}
# The exit code TerminateJobObject gives every process on a wall timeout.
TIMEOUT_EXIT_CODE = 0xC0000102  # STATUS_TIMEOUT
# Captured stdout/stderr stop growing here (the rest is read and dropped).
MAX_CAPTURE_BYTES = 64 * 1024 * 1024

# ---------------------------------------------------------------- structures
# Declared with fixed-size ctypes types (not ctypes.wintypes) so they build, and
# their layout can be checked, on any platform. Sizes match 64-bit Windows.

DWORD = ctypes.c_uint32
WORD = ctypes.c_uint16
HANDLE = ctypes.c_void_p
LARGE_INTEGER = ctypes.c_int64
SIZE_T = ctypes.c_size_t
ULONG_PTR = ctypes.c_size_t


class JOBOBJECT_BASIC_LIMIT_INFORMATION(ctypes.Structure):  # noqa: N801 - Win32 name
    _fields_ = [
        ("PerProcessUserTimeLimit", LARGE_INTEGER),
        ("PerJobUserTimeLimit", LARGE_INTEGER),
        ("LimitFlags", DWORD),
        ("MinimumWorkingSetSize", SIZE_T),
        ("MaximumWorkingSetSize", SIZE_T),
        ("ActiveProcessLimit", DWORD),
        ("Affinity", ULONG_PTR),
        ("PriorityClass", DWORD),
        ("SchedulingClass", DWORD),
    ]


class IO_COUNTERS(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("ReadOperationCount", ctypes.c_uint64),
        ("WriteOperationCount", ctypes.c_uint64),
        ("OtherOperationCount", ctypes.c_uint64),
        ("ReadTransferCount", ctypes.c_uint64),
        ("WriteTransferCount", ctypes.c_uint64),
        ("OtherTransferCount", ctypes.c_uint64),
    ]


class JOBOBJECT_EXTENDED_LIMIT_INFORMATION(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("BasicLimitInformation", JOBOBJECT_BASIC_LIMIT_INFORMATION),
        ("IoInfo", IO_COUNTERS),
        ("ProcessMemoryLimit", SIZE_T),
        ("JobMemoryLimit", SIZE_T),
        ("PeakProcessMemoryUsed", SIZE_T),
        ("PeakJobMemoryUsed", SIZE_T),
    ]


class JOBOBJECT_BASIC_ACCOUNTING_INFORMATION(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("TotalUserTime", LARGE_INTEGER),
        ("TotalKernelTime", LARGE_INTEGER),
        ("ThisPeriodTotalUserTime", LARGE_INTEGER),
        ("ThisPeriodTotalKernelTime", LARGE_INTEGER),
        ("TotalPageFaultCount", DWORD),
        ("TotalProcesses", DWORD),
        ("ActiveProcesses", DWORD),
        ("TotalTerminatedProcesses", DWORD),
    ]


class JOBOBJECT_BASIC_AND_IO_ACCOUNTING_INFORMATION(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("BasicInfo", JOBOBJECT_BASIC_ACCOUNTING_INFORMATION),
        ("IoInfo", IO_COUNTERS),
    ]


class JOBOBJECT_CPU_RATE_CONTROL_INFORMATION(ctypes.Structure):  # noqa: N801
    # The union's first member (CpuRate) is the one used with HARD_CAP.
    _fields_ = [("ControlFlags", DWORD), ("CpuRate", DWORD)]


class JOBOBJECT_BASIC_UI_RESTRICTIONS(ctypes.Structure):  # noqa: N801
    _fields_ = [("UIRestrictionsClass", DWORD)]


class JOBOBJECT_ASSOCIATE_COMPLETION_PORT(ctypes.Structure):  # noqa: N801
    _fields_ = [("CompletionKey", ctypes.c_void_p), ("CompletionPort", HANDLE)]


class SECURITY_ATTRIBUTES(ctypes.Structure):  # noqa: N801
    _fields_ = [("nLength", DWORD), ("lpSecurityDescriptor", ctypes.c_void_p),
                ("bInheritHandle", ctypes.c_int)]


class STARTUPINFOW(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("cb", DWORD),
        ("lpReserved", ctypes.c_void_p),
        ("lpDesktop", ctypes.c_void_p),
        ("lpTitle", ctypes.c_void_p),
        ("dwX", DWORD),
        ("dwY", DWORD),
        ("dwXSize", DWORD),
        ("dwYSize", DWORD),
        ("dwXCountChars", DWORD),
        ("dwYCountChars", DWORD),
        ("dwFillAttribute", DWORD),
        ("dwFlags", DWORD),
        ("wShowWindow", WORD),
        ("cbReserved2", WORD),
        ("lpReserved2", ctypes.c_void_p),
        ("hStdInput", HANDLE),
        ("hStdOutput", HANDLE),
        ("hStdError", HANDLE),
    ]


class PROCESS_INFORMATION(ctypes.Structure):  # noqa: N801
    _fields_ = [("hProcess", HANDLE), ("hThread", HANDLE), ("dwProcessId", DWORD), ("dwThreadId", DWORD)]


# ---------------------------------------------------------------- pure logic

_NAMESPACE_GAPS = {
    "user": "no user namespaces: the payload runs as the calling Windows user",
    "pid": "no PID namespace: the payload can see other processes and open those of the same user",
    "net": "no network isolation: the payload has the host's network access",
    "mnt": ("no file system isolation: the payload sees the host's files with the caller's rights "
            "(no read-only root, binds or private /tmp)"),
    "uts": "no UTS namespace: the hostname is the host's",
    "ipc": "no IPC namespace: named objects (mutexes, sections, pipes) are shared with the session",
    "cgroup": "no cgroup namespace (the job object stands in for the cgroup)",
}

WINDOWS_UNENFORCEABLE: frozenset[str] = frozenset(
    [f"namespaces.{n}" for n in _NAMESPACE_GAPS]
    + ["seccomp", "landlock", "no_new_privs", "uid", "max_open_files", "io_limits", "capabilities",
       "max_file_size_mb"]
)
"""Every protection name `allow_unenforced` may list. Passing all of them is the
explicit choice to run with job-object limits only."""


def unenforced_protections(
    config: SandboxConfig, *, restricted_token: bool = True
) -> list[tuple[str, str, bool]]:
    """Every protection this backend does not enforce for `config`, as
    (name, reason, requested). `requested` is true when the config asks for it,
    which is what fails closed; the others are still reported in not_enforced."""
    gaps: list[tuple[str, str, bool]] = []
    for name, reason in _NAMESPACE_GAPS.items():
        wanted = getattr(config.namespaces, name)
        # user=None means "on when not root"; a Windows caller is never root.
        requested = wanted is not False
        gaps.append((f"namespaces.{name}", reason, requested))
    gaps.append(("seccomp", "no system-call filter on Windows", config.seccomp != "off"))
    gaps.append(("landlock", "no Landlock on Windows", config.landlock == "required"))
    gaps.append(("no_new_privs", "no equivalent of no_new_privs on Windows", config.no_new_privs))
    gaps.append(("uid", "no uid/gid switch: runs as the calling user, not uid "
                 f"{config.uid_or_nobody}/gid {config.gid_or_nobody}", True))
    gaps.append(("max_open_files", f"no per-process handle limit (asked for {config.max_open_files})", True))
    io_fields = [f for f in ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")
                 if getattr(config, f) is not None]
    gaps.append(("io_limits", "I/O limits are not implemented for job objects"
                 + (f" (asked for {', '.join(io_fields)})" if io_fields else ""), bool(io_fields)))
    if config.max_file_size_mb is not None:
        gaps.append(("max_file_size_mb", "no file size limit for job objects", True))
    if not restricted_token:
        gaps.append(("capabilities", "no restricted token: the payload keeps the caller's privileges",
                     config.capabilities.drop_all))
    return gaps


def check_enforceable(
    config: SandboxConfig, allow_unenforced: Iterable[str] = (), *, restricted_token: bool = True
) -> tuple[str, ...]:
    """Fail closed: raise UnsupportedError for requested protections that are not
    in `allow_unenforced`; else return the not_enforced lines for the report."""
    allowed = set(allow_unenforced)
    unknown = allowed - WINDOWS_UNENFORCEABLE
    if unknown:
        raise UnsupportedError(
            "allow_unenforced", f"unknown protection name(s) {sorted(unknown)}; "
            f"known: {sorted(WINDOWS_UNENFORCEABLE)}")
    gaps = unenforced_protections(config, restricted_token=restricted_token)
    refused = [(name, reason) for name, reason, requested in gaps if requested and name not in allowed]
    if refused:
        raise UnsupportedError(
            ", ".join(name for name, _ in refused),
            "; ".join(f"{name}: {reason}" for name, reason in refused)
            + " (list them in allow_unenforced to run without them)",
        )
    return tuple(f"{name}: {reason}" for name, reason, _ in gaps)


def cpu_rate_for(cpu_quota_percent: int, cpu_count: int) -> int:
    """CpuRate (1/10000 of the whole machine) for a quota in percent of one CPU."""
    cpus = max(1, cpu_count)
    return max(1, min(10000, round(cpu_quota_percent * 100 / cpus)))


@dataclass(frozen=True)
class JobLimits:
    """What a job object is set to, derived from a SandboxConfig."""

    limit_flags: int
    job_memory_bytes: int = 0
    active_processes: int = 0
    cpu_rate: int | None = None
    ui_restrictions: int = UI_RESTRICTIONS_ALL

    def describe(self, config: SandboxConfig) -> tuple[str, ...]:
        """Human-readable limits for the isolation report."""
        out = []
        if self.job_memory_bytes:
            out.append(f"memory {config.memory_limit_mb} MiB (job memory)")
        if self.active_processes:
            out.append(f"processes {self.active_processes} (active processes)")
        if self.cpu_rate is not None:
            out.append(f"cpu {config.cpu_quota_percent}% of one CPU "
                       f"(CpuRate {self.cpu_rate}/10000, hard cap)")
        if config.timeout_seconds is not None:
            out.append(f"wall timeout {config.timeout_seconds:g}s")
        out.append("kill on job close, no breakaway, die on unhandled exception, UI restricted")
        return tuple(out)


def job_limits_for(config: SandboxConfig, cpu_count: int) -> JobLimits:
    """The job-object limits that enforce `config`'s resource limits.

    `max_processes` maps to ActiveProcessLimit as is (Linux counts the sandbox's
    init in it; here there is none, so the payload gets one process more).
    """
    flags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE | JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION
    memory = 0
    if config.memory_limit_mb is not None:
        flags |= JOB_OBJECT_LIMIT_JOB_MEMORY
        memory = config.memory_limit_mb * 1024 * 1024
    processes = 0
    if config.max_processes is not None:
        flags |= JOB_OBJECT_LIMIT_ACTIVE_PROCESS
        processes = config.max_processes
    rate = cpu_rate_for(config.cpu_quota_percent, cpu_count) if config.cpu_quota_percent else None
    return JobLimits(limit_flags=flags, job_memory_bytes=memory, active_processes=processes, cpu_rate=rate)


def extended_limit_info(limits: JobLimits) -> JOBOBJECT_EXTENDED_LIMIT_INFORMATION:
    """The JobObjectExtendedLimitInformation structure for `limits`."""
    if limits.limit_flags & (JOB_OBJECT_LIMIT_BREAKAWAY_OK | JOB_OBJECT_LIMIT_SILENT_BREAKAWAY_OK):
        raise ValueError("breakaway must never be allowed")
    info = JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
    info.BasicLimitInformation.LimitFlags = limits.limit_flags
    info.BasicLimitInformation.ActiveProcessLimit = limits.active_processes
    info.JobMemoryLimit = limits.job_memory_bytes
    return info


def cpu_rate_info(rate: int) -> JOBOBJECT_CPU_RATE_CONTROL_INFORMATION:
    """The hard-capped JobObjectCpuRateControlInformation structure."""
    info = JOBOBJECT_CPU_RATE_CONTROL_INFORMATION()
    info.ControlFlags = JOB_OBJECT_CPU_RATE_CONTROL_ENABLE | JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP
    info.CpuRate = rate
    return info


def windows_environment(
    environment: Iterable[tuple[str, str]], host_environment: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The payload's environment: the config's variables, plus SystemRoot from
    the host when missing (many Windows programs, Python included, fail without it)."""
    env = list(environment)
    names = {k.upper() for k, _ in env}
    if "SYSTEMROOT" not in names:
        root = next((v for k, v in host_environment.items() if k.upper() == "SYSTEMROOT"), None)
        if root:
            env.append(("SystemRoot", root))
    return env


def environment_block(environment: Iterable[tuple[str, str]]) -> str:
    """A CREATE_UNICODE_ENVIRONMENT block: NAME=value\\0..., sorted case-insensitively, \\0-terminated."""
    items = sorted(environment, key=lambda kv: kv[0].upper())
    for name, value in items:
        if "=" in name or "\0" in name or "\0" in value or not name:
            raise ValueError(f"invalid environment variable {name!r}")
    return "".join(f"{k}={v}\0" for k, v in items) + "\0"


def outcome_for(
    exit_code: int | None, *, timed_out: bool, memory_limit_hit: bool,
    process_limit_hit: bool = False, timeout_seconds: float | None = None,
) -> tuple[Outcome, str | None]:
    """Map how the job ended to an Outcome and an error message."""
    if timed_out:
        return Outcome.TIMEOUT, f"wall timeout of {timeout_seconds:g}s exceeded; the job was terminated"
    if exit_code == 0:
        return Outcome.OK, None
    if exit_code is None:
        return Outcome.SANDBOX_ERROR, "the exit code could not be read"
    code = exit_code & 0xFFFFFFFF
    if code in MEMORY_STATUSES or memory_limit_hit:
        return Outcome.OOM, f"the job memory limit was hit (exit code {code:#010x})"
    hint = "; the job's active-process limit was hit" if process_limit_hit else ""
    if code >= 0xC0000000:
        name = _KNOWN_STATUSES.get(code, "NTSTATUS error")
        return Outcome.KILLED, f"terminated by {name} ({code:#010x}){hint}"
    return Outcome.ERROR, f"exit code {code}{hint}"


def resource_usage_from(
    accounting: JOBOBJECT_BASIC_AND_IO_ACCOUNTING_INFORMATION,
    extended: JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    *, wall_seconds: float, processes_peak: int,
) -> ResourceUsage:
    """ResourceUsage from the job's accounting (times are in 100 ns units)."""
    basic = accounting.BasicInfo
    return ResourceUsage(
        wall_seconds=wall_seconds,
        cpu_user_seconds=basic.TotalUserTime / 1e7,
        cpu_system_seconds=basic.TotalKernelTime / 1e7,
        memory_peak_bytes=int(extended.PeakJobMemoryUsed),
        processes_peak=processes_peak or int(basic.TotalProcesses),
        io_read_bytes=int(accounting.IoInfo.ReadTransferCount),
        io_write_bytes=int(accounting.IoInfo.WriteTransferCount),
    )


def isolation_report(
    config: SandboxConfig, limits: JobLimits, not_enforced: tuple[str, ...], *, restricted_token: bool
) -> IsolationReport:
    """The IsolationReport of a Windows run."""
    return IsolationReport(
        backend="windows",
        namespaces=(),
        rootfs="host file system (not isolated)",
        uid=None,
        gid=None,
        capabilities=(),
        no_new_privs=False,
        seccomp="off",
        cgroup="job object",
        limits=limits.describe(config)
        + (("restricted token (DISABLE_MAX_PRIVILEGE)",) if restricted_token else ()),
        not_enforced=not_enforced,
    )


# ---------------------------------------------------------------- the ctypes boundary


class Win32Api:
    """The only code that calls kernel32/advapi32. Every failure raises OSError
    carrying the call's name and GetLastError (via ctypes.WinError on Windows).

    Tests pass fake `kernel32`/`advapi32` objects with the same function names.
    """

    def __init__(self, kernel32: Any, advapi32: Any, *, get_last_error: Any = None) -> None:
        self.k = kernel32
        self.a = advapi32
        self._get_last_error = get_last_error or getattr(ctypes, "get_last_error", lambda: 0)

    @classmethod
    def load(cls) -> Win32Api:
        """The real DLLs (Windows only)."""
        if sys.platform != "win32":
            raise UnsupportedError("windows backend", f"kernel32 exists only on Windows, not {sys.platform}")
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
        _declare_prototypes(kernel32, advapi32)
        return cls(kernel32, advapi32, get_last_error=ctypes.get_last_error)

    def _fail(self, call: str) -> OSError:
        code = int(self._get_last_error())
        return OSError(code, f"{call} failed (Win32 error {code})")

    def _check(self, call: str, ok: Any) -> None:
        if not ok:
            raise self._fail(call)

    # -- job
    def create_job(self) -> int:
        handle = self.k.CreateJobObjectW(None, None)
        self._check("CreateJobObjectW", handle)
        return int(handle)

    def set_job_info(self, job: int, info_class: int, info: ctypes.Structure) -> None:
        self._check(f"SetInformationJobObject(class {info_class})",
                    self.k.SetInformationJobObject(job, info_class, ctypes.byref(info), ctypes.sizeof(info)))

    def query_job_info(self, job: int, info_class: int, info: ctypes.Structure) -> None:
        self._check(f"QueryInformationJobObject(class {info_class})",
                    self.k.QueryInformationJobObject(job, info_class, ctypes.byref(info),
                                                     ctypes.sizeof(info), None))

    def associate_completion_port(self, job: int) -> int:
        port = self.k.CreateIoCompletionPort(INVALID_HANDLE_VALUE, None, 0, 1)
        self._check("CreateIoCompletionPort", port)
        info = JOBOBJECT_ASSOCIATE_COMPLETION_PORT(CompletionKey=job, CompletionPort=port)
        try:
            self.set_job_info(job, JobObjectAssociateCompletionPortInformation, info)
        except OSError:
            self.close(int(port))
            raise
        return int(port)

    def drain_job_messages(self, port: int) -> list[int]:
        """Job messages queued on the port (non-blocking)."""
        messages = []
        message, key, overlapped = DWORD(), ctypes.c_size_t(), ctypes.c_void_p()
        while self.k.GetQueuedCompletionStatus(port, ctypes.byref(message), ctypes.byref(key),
                                               ctypes.byref(overlapped), 0):
            messages.append(int(message.value))
        return messages

    def assign(self, job: int, process: int) -> None:
        self._check("AssignProcessToJobObject", self.k.AssignProcessToJobObject(job, process))

    def terminate_job(self, job: int, exit_code: int) -> None:
        self._check("TerminateJobObject", self.k.TerminateJobObject(job, exit_code))

    # -- token
    def restricted_token(self) -> int | None:
        """A restricted copy of this process's token, or None when not possible."""
        token = HANDLE()
        if not self.a.OpenProcessToken(self.k.GetCurrentProcess(),
                                       TOKEN_DUPLICATE | TOKEN_ASSIGN_PRIMARY | TOKEN_QUERY,
                                       ctypes.byref(token)):
            return None
        restricted = HANDLE()
        try:
            ok = self.a.CreateRestrictedToken(token, DISABLE_MAX_PRIVILEGE, 0, None, 0, None, 0, None,
                                              ctypes.byref(restricted))
        finally:
            self.close(token.value or 0)
        return int(restricted.value or 0) if ok and restricted.value else None

    # -- pipes and processes
    def create_pipe(self) -> tuple[int, int]:
        """An inheritable pipe (read, write)."""
        read, write = HANDLE(), HANDLE()
        attrs = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), None, 1)
        self._check("CreatePipe", self.k.CreatePipe(ctypes.byref(read), ctypes.byref(write),
                                                    ctypes.byref(attrs), 0))
        return int(read.value or 0), int(write.value or 0)

    def set_inheritable(self, handle: int, inheritable: bool) -> None:
        self._check("SetHandleInformation", self.k.SetHandleInformation(
            handle, HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT if inheritable else 0))

    def create_suspended_process(
        self, command_line: str, environment: str, cwd: str | None,
        stdio: tuple[int, int, int], token: int | None,
    ) -> PROCESS_INFORMATION:
        startup = STARTUPINFOW()
        startup.cb = ctypes.sizeof(STARTUPINFOW)
        startup.dwFlags = STARTF_USESTDHANDLES
        startup.hStdInput, startup.hStdOutput, startup.hStdError = stdio
        info = PROCESS_INFORMATION()
        cmd = ctypes.create_unicode_buffer(command_line)
        env = (ctypes.c_wchar * len(environment))(*environment)
        args = (None, cmd, None, None, 1, CREATION_FLAGS, env, cwd, ctypes.byref(startup), ctypes.byref(info))
        if token is not None:
            self._check("CreateProcessAsUserW", self.a.CreateProcessAsUserW(token, *args))
        else:
            self._check("CreateProcessW", self.k.CreateProcessW(*args))
        return info

    def resume(self, thread: int) -> None:
        if self.k.ResumeThread(thread) == 0xFFFFFFFF:
            raise self._fail("ResumeThread")

    def terminate_process(self, process: int, exit_code: int) -> None:
        self.k.TerminateProcess(process, exit_code)

    def wait(self, process: int, timeout_ms: int) -> bool:
        """True when the process ended, False on timeout."""
        result = self.k.WaitForSingleObject(process, timeout_ms)
        if result == WAIT_OBJECT_0:
            return True
        if result == WAIT_TIMEOUT:
            return False
        raise self._fail("WaitForSingleObject")

    def exit_code(self, process: int) -> int | None:
        code = DWORD()
        if not self.k.GetExitCodeProcess(process, ctypes.byref(code)):
            return None
        return int(code.value)

    def read(self, handle: int, size: int) -> bytes:
        """Up to `size` bytes; b"" at end of file (broken pipe)."""
        buf = ctypes.create_string_buffer(size)
        done = DWORD()
        if not self.k.ReadFile(handle, buf, size, ctypes.byref(done), None):
            return b""  # ERROR_BROKEN_PIPE: every writer has closed
        return buf.raw[: done.value]

    def write(self, handle: int, data: bytes) -> int:
        done = DWORD()
        if not self.k.WriteFile(handle, data, len(data), ctypes.byref(done), None):
            raise self._fail("WriteFile")
        return int(done.value)

    def close(self, handle: int) -> None:
        if handle:
            self.k.CloseHandle(handle)


def _declare_prototypes(kernel32: Any, advapi32: Any) -> None:
    """argtypes/restype for the real DLLs (64-bit handles must not be truncated)."""
    from ctypes import POINTER, c_bool, c_int, c_void_p, c_wchar_p

    def proto(fn: Any, restype: Any, *argtypes: Any) -> None:
        fn.restype, fn.argtypes = restype, list(argtypes)

    k = kernel32
    proto(k.CreateJobObjectW, HANDLE, c_void_p, c_wchar_p)
    proto(k.SetInformationJobObject, c_bool, HANDLE, c_int, c_void_p, DWORD)
    proto(k.QueryInformationJobObject, c_bool, HANDLE, c_int, c_void_p, DWORD, c_void_p)
    proto(k.AssignProcessToJobObject, c_bool, HANDLE, HANDLE)
    proto(k.TerminateJobObject, c_bool, HANDLE, ctypes.c_uint)
    proto(k.CreateIoCompletionPort, HANDLE, HANDLE, HANDLE, ctypes.c_size_t, DWORD)
    proto(k.GetQueuedCompletionStatus, c_bool, HANDLE, POINTER(DWORD), POINTER(ctypes.c_size_t),
          POINTER(c_void_p), DWORD)
    proto(k.GetCurrentProcess, HANDLE)
    proto(k.CreatePipe, c_bool, POINTER(HANDLE), POINTER(HANDLE), c_void_p, DWORD)
    proto(k.SetHandleInformation, c_bool, HANDLE, DWORD, DWORD)
    process_args = (c_wchar_p, c_void_p, c_void_p, c_void_p, c_bool, DWORD, c_void_p, c_wchar_p,
                    c_void_p, c_void_p)
    proto(k.CreateProcessW, c_bool, *process_args)
    proto(k.ResumeThread, DWORD, HANDLE)
    proto(k.TerminateProcess, c_bool, HANDLE, ctypes.c_uint)
    proto(k.WaitForSingleObject, DWORD, HANDLE, DWORD)
    proto(k.GetExitCodeProcess, c_bool, HANDLE, POINTER(DWORD))
    proto(k.ReadFile, c_bool, HANDLE, c_void_p, DWORD, POINTER(DWORD), c_void_p)
    proto(k.WriteFile, c_bool, HANDLE, ctypes.c_char_p, DWORD, POINTER(DWORD), c_void_p)
    proto(k.CloseHandle, c_bool, HANDLE)
    a = advapi32
    proto(a.OpenProcessToken, c_bool, HANDLE, DWORD, POINTER(HANDLE))
    proto(a.CreateRestrictedToken, c_bool, HANDLE, DWORD, DWORD, c_void_p, DWORD, c_void_p, DWORD,
          c_void_p, POINTER(HANDLE))
    proto(a.CreateProcessAsUserW, c_bool, HANDLE, *process_args)


# ---------------------------------------------------------------- running

# Serialises "create inheritable pipe ends -> CreateProcess -> close them" so two
# concurrent runs cannot inherit each other's pipe ends.
_SPAWN_LOCK = threading.Lock()


class _Reader(threading.Thread):
    def __init__(self, api: Win32Api, handle: int) -> None:
        super().__init__(daemon=True)
        self.api, self.handle, self.data = api, handle, bytearray()

    def run(self) -> None:
        while chunk := self.api.read(self.handle, 65536):
            if len(self.data) < MAX_CAPTURE_BYTES:
                self.data += chunk[: MAX_CAPTURE_BYTES - len(self.data)]


class _Writer(threading.Thread):
    def __init__(self, api: Win32Api, handle: int, data: bytes) -> None:
        super().__init__(daemon=True)
        self.api, self.handle, self.data = api, handle, data

    def run(self) -> None:
        view = memoryview(self.data)
        try:
            while view:
                view = view[self.api.write(self.handle, bytes(view[:65536])):]
        except OSError:
            pass  # the payload closed its stdin
        finally:
            self.api.close(self.handle)


def run_command_windows(
    argv: Sequence[str],
    config: SandboxConfig,
    *,
    stdin: bytes | None = None,
    cwd: str | None = None,
    allow_unenforced: Iterable[str] = (),
    api: Win32Api | None = None,
) -> SandboxResult:
    """Run `argv` in a fresh Job Object with `config`'s limits; wait; report.

    Fails closed: raises UnsupportedError when the config requests a protection
    Windows cannot enforce and it is not listed in `allow_unenforced` (names from
    WINDOWS_UNENFORCEABLE). A failure while building the job returns a
    SANDBOX_ERROR result; the payload never runs outside the job.
    `api` is for tests (fake DLLs); by default the real kernel32/advapi32 are used.
    """
    if not argv:
        raise ValueError("argv must not be empty")
    allowed = tuple(allow_unenforced)
    check_enforceable(config, allowed)  # fail before touching the OS
    win = api or Win32Api.load()
    limits = job_limits_for(config, os.cpu_count() or 1)
    handles: list[int] = []
    job = 0
    port = 0
    token: int | None = None
    try:
        token = win.restricted_token()
        if token is not None:
            handles.append(token)
        not_enforced = check_enforceable(config, allowed, restricted_token=token is not None)
        report = isolation_report(config, limits, not_enforced, restricted_token=token is not None)
        try:
            job = win.create_job()
            win.set_job_info(job, JobObjectExtendedLimitInformation, extended_limit_info(limits))
            if limits.cpu_rate is not None:
                win.set_job_info(job, JobObjectCpuRateControlInformation, cpu_rate_info(limits.cpu_rate))
            win.set_job_info(job, JobObjectBasicUIRestrictions,
                             JOBOBJECT_BASIC_UI_RESTRICTIONS(limits.ui_restrictions))
        except OSError as e:
            return _setup_failed("job object", e, report)
        try:
            port = win.associate_completion_port(job)
        except OSError:
            port = 0  # only OOM/process-peak detail is lost; the limits hold
        env = environment_block(windows_environment(config.environment, os.environ))
        command_line = subprocess.list2cmdline(list(argv))
        return _run_in_job(win, job, port, token, command_line, env, cwd, stdin, config, limits, report)
    finally:
        if port:
            win.close(port)
        if job:
            win.close(job)  # KILL_ON_JOB_CLOSE: nothing in the job outlives this call
        for handle in handles:
            win.close(handle)


def _setup_failed(stage: str, error: OSError, report: IsolationReport) -> SandboxResult:
    message = str(SetupError(stage, str(error), error.errno or 0))
    return SandboxResult(outcome=Outcome.SANDBOX_ERROR, error=message, isolation=report)


def _run_in_job(
    win: Win32Api, job: int, port: int, token: int | None, command_line: str, env: str,
    cwd: str | None, stdin: bytes | None, config: SandboxConfig, limits: JobLimits,
    report: IsolationReport,
) -> SandboxResult:
    open_handles: list[int] = []  # closed in `finally`, in this order
    info: PROCESS_INFORMATION | None = None
    readers: list[_Reader] = []
    try:
        with _SPAWN_LOCK:
            child_ends: list[int] = []
            try:
                # stdin: the child reads; stdout, stderr: the child writes.
                for child_reads in (True, False, False):
                    read_end, write_end = win.create_pipe()
                    child_ends.append(read_end if child_reads else write_end)
                    open_handles.append(write_end if child_reads else read_end)
                for handle in open_handles:
                    win.set_inheritable(handle, False)
                info = win.create_suspended_process(command_line, env, cwd,
                                                    (child_ends[0], child_ends[1], child_ends[2]), token)
            except OSError as e:
                return _setup_failed("create process", e, report)
            finally:
                for handle in child_ends:
                    win.close(handle)
        in_w, out_r, err_r = open_handles
        process = int(info.hProcess or 0)
        try:
            win.assign(job, process)
        except OSError as e:
            win.terminate_process(process, 1)  # still suspended: it never ran
            return _setup_failed("assign to job", e, report)
        start = time.monotonic()
        win.resume(int(info.hThread or 0))
        readers = [_Reader(win, out_r), _Reader(win, err_r)]
        for reader in readers:
            reader.start()
        open_handles.remove(in_w)
        if stdin:
            _Writer(win, in_w, stdin).start()  # closes in_w when done
        else:
            win.close(in_w)  # the payload reads end of file at once
        timeout_ms = INFINITE if config.timeout_seconds is None else int(config.timeout_seconds * 1000)
        ended = win.wait(process, timeout_ms)
        wall = time.monotonic() - start
        # On timeout this is the kill; otherwise it ends what the payload left running.
        # If it fails, closing the job handle (KILL_ON_JOB_CLOSE) is the backstop.
        with contextlib.suppress(OSError):
            win.terminate_job(job, 1 if ended else TIMEOUT_EXIT_CODE)
        accounting = JOBOBJECT_BASIC_AND_IO_ACCOUNTING_INFORMATION()
        extended = JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
        win.query_job_info(job, JobObjectBasicAndIoAccountingInformation, accounting)
        win.query_job_info(job, JobObjectExtendedLimitInformation, extended)
        for reader in readers:
            reader.join(timeout=5.0)
        messages = win.drain_job_messages(port) if port else []
        exit_code = win.exit_code(process) if ended else None
        outcome, error = outcome_for(
            exit_code, timed_out=not ended,
            memory_limit_hit=bool({JOB_OBJECT_MSG_JOB_MEMORY_LIMIT, JOB_OBJECT_MSG_PROCESS_MEMORY_LIMIT}
                                  & set(messages)),
            process_limit_hit=JOB_OBJECT_MSG_ACTIVE_PROCESS_LIMIT in messages,
            timeout_seconds=config.timeout_seconds,
        )
        return SandboxResult(
            outcome=outcome,
            exit_code=exit_code,
            error=error,
            stdout=bytes(readers[0].data),
            stderr=bytes(readers[1].data),
            resource_usage=resource_usage_from(accounting, extended, wall_seconds=wall,
                                               processes_peak=processes_peak(messages)),
            isolation=report,
        )
    finally:
        for handle in open_handles:
            win.close(handle)
        if info is not None:
            win.close(int(info.hThread or 0))
            win.close(int(info.hProcess or 0))


def processes_peak(messages: Iterable[int]) -> int:
    """The most processes alive at once, from the job's NEW/EXIT messages."""
    alive = peak = 0
    for message in messages:
        if message == JOB_OBJECT_MSG_NEW_PROCESS:
            alive += 1
            peak = max(peak, alive)
        elif message in (JOB_OBJECT_MSG_EXIT_PROCESS, JOB_OBJECT_MSG_ABNORMAL_EXIT_PROCESS):
            alive = max(0, alive - 1)
    return peak
