"""Tests of the Windows Job Object backend (sandbox.fallback.windows).

THESE ARE MOCK TESTS. Windows cannot run on this (Linux) machine, so nothing
here proves that a real Job Object enforces anything. What is tested:
- the pure logic for real: the limit structures built from a SandboxConfig (and
  their byte layout against the 64-bit Windows sizes), the CPU-rate mapping,
  the fail-closed list of what Windows cannot enforce, outcome mapping;
- the ctypes boundary (Win32Api + run_command_windows) against fake kernel32 /
  advapi32 objects that record every call: the order (suspended -> job ->
  resume), the flags and structures passed, timeout handling, and that every
  handle opened is closed.
Run these again on Windows with the real DLLs before trusting the backend.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import pytest

from neural_doc_flow_security.sandbox.config import CapabilityConfig, NamespaceConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import UnsupportedError
from neural_doc_flow_security.sandbox.fallback import windows as w
from neural_doc_flow_security.sandbox.result import Outcome

ALL = w.WINDOWS_UNENFORCEABLE
is_64bit = struct.calcsize("P") == 8


# ------------------------------------------------------------------ pure logic


def test_module_imports_on_linux_and_refuses_to_load_dlls() -> None:
    with pytest.raises(UnsupportedError, match="only on Windows"):
        w.Win32Api.load()


@pytest.mark.skipif(not is_64bit, reason="sizes are those of 64-bit Windows")
def test_structures_have_the_64bit_windows_layout() -> None:
    assert ctypes.sizeof(w.JOBOBJECT_BASIC_LIMIT_INFORMATION) == 64
    assert ctypes.sizeof(w.IO_COUNTERS) == 48
    assert ctypes.sizeof(w.JOBOBJECT_EXTENDED_LIMIT_INFORMATION) == 144
    assert w.JOBOBJECT_EXTENDED_LIMIT_INFORMATION.JobMemoryLimit.offset == 120
    assert w.JOBOBJECT_EXTENDED_LIMIT_INFORMATION.PeakJobMemoryUsed.offset == 136
    assert ctypes.sizeof(w.JOBOBJECT_BASIC_AND_IO_ACCOUNTING_INFORMATION) == 96
    assert ctypes.sizeof(w.JOBOBJECT_CPU_RATE_CONTROL_INFORMATION) == 8
    assert ctypes.sizeof(w.STARTUPINFOW) == 104
    assert ctypes.sizeof(w.PROCESS_INFORMATION) == 24
    assert ctypes.sizeof(w.SECURITY_ATTRIBUTES) == 24


@pytest.mark.parametrize(("percent", "cpus", "rate"), [
    (100, 1, 10000), (50, 4, 1250), (100, 2, 5000), (400, 4, 10000), (1000, 2, 10000), (1, 128, 1),
])
def test_cpu_rate_is_a_share_of_the_whole_machine(percent: int, cpus: int, rate: int) -> None:
    assert w.cpu_rate_for(percent, cpus) == rate


def test_job_limits_from_config() -> None:
    config = SandboxConfig(memory_limit_mb=256, max_processes=8, cpu_quota_percent=50)
    limits = w.job_limits_for(config, cpu_count=2)
    assert limits.limit_flags & w.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    assert limits.limit_flags & w.JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION
    assert limits.limit_flags & w.JOB_OBJECT_LIMIT_JOB_MEMORY
    assert limits.limit_flags & w.JOB_OBJECT_LIMIT_ACTIVE_PROCESS
    assert not limits.limit_flags & (w.JOB_OBJECT_LIMIT_BREAKAWAY_OK | w.JOB_OBJECT_LIMIT_SILENT_BREAKAWAY_OK)
    assert limits.cpu_rate == 2500
    info = w.extended_limit_info(limits)
    assert info.JobMemoryLimit == 256 * 1024 * 1024
    assert info.BasicLimitInformation.ActiveProcessLimit == 8
    assert info.BasicLimitInformation.LimitFlags == limits.limit_flags
    rate = w.cpu_rate_info(limits.cpu_rate)
    assert rate.ControlFlags == w.JOB_OBJECT_CPU_RATE_CONTROL_ENABLE | w.JOB_OBJECT_CPU_RATE_CONTROL_HARD_CAP
    assert limits.ui_restrictions == 0xFF  # all eight JOB_OBJECT_UILIMIT_* bits


def test_no_limits_means_no_limit_flags_but_still_kill_on_close() -> None:
    limits = w.job_limits_for(SandboxConfig(memory_limit_mb=None, max_processes=None), cpu_count=2)
    assert limits.limit_flags == (w.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
                                  | w.JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION)
    assert limits.cpu_rate is None


def test_the_default_profile_is_bounded_by_the_job() -> None:
    limits = w.job_limits_for(SandboxConfig(), cpu_count=2)
    assert (limits.job_memory_bytes, limits.active_processes) == (512 << 20, 128)


def test_breakaway_is_never_built() -> None:
    limits = w.JobLimits(limit_flags=w.JOB_OBJECT_LIMIT_BREAKAWAY_OK)
    with pytest.raises(ValueError, match="breakaway"):
        w.extended_limit_info(limits)


def test_default_config_fails_closed_naming_every_gap() -> None:
    with pytest.raises(UnsupportedError) as info:
        w.check_enforceable(SandboxConfig())
    for name in ("namespaces.net", "namespaces.pid", "namespaces.mnt", "namespaces.user", "seccomp",
                 "no_new_privs", "uid", "max_open_files"):
        assert name in info.value.protection
    assert "no network isolation" in str(info.value)
    assert "allow_unenforced" in str(info.value)


def test_explicitly_allowed_gaps_run_and_are_reported() -> None:
    not_enforced = w.check_enforceable(SandboxConfig(), ALL)
    assert any(line.startswith("namespaces.net: no network isolation") for line in not_enforced)
    assert any(line.startswith("namespaces.mnt: no file system isolation") for line in not_enforced)
    assert any(line.startswith("seccomp:") for line in not_enforced)


def test_only_requested_gaps_fail() -> None:
    config = SandboxConfig(namespaces=NamespaceConfig(net=False), seccomp="off")
    allowed = ALL - {"namespaces.net", "seccomp"}
    not_enforced = w.check_enforceable(config, allowed)  # not requested: no error
    assert any(line.startswith("namespaces.net:") for line in not_enforced)  # still reported


def test_io_limits_fail_closed() -> None:
    with pytest.raises(UnsupportedError, match="io_read_bps"):
        w.check_enforceable(SandboxConfig(io_read_bps=1 << 20), ALL - {"io_limits"})


def test_missing_restricted_token_fails_closed_for_capabilities() -> None:
    w.check_enforceable(SandboxConfig(), ALL - {"capabilities"}, restricted_token=True)
    with pytest.raises(UnsupportedError, match="capabilities"):
        w.check_enforceable(SandboxConfig(), ALL - {"capabilities"}, restricted_token=False)
    config = SandboxConfig(capabilities=CapabilityConfig(drop_all=False))
    w.check_enforceable(config, ALL - {"capabilities"}, restricted_token=False)


def test_unknown_allow_name_is_an_error() -> None:
    with pytest.raises(UnsupportedError, match="unknown protection"):
        w.check_enforceable(SandboxConfig(), {"namespaces.network"})


@pytest.mark.parametrize(("code", "timed_out", "mem", "outcome"), [
    (0, False, False, Outcome.OK),
    (0, False, True, Outcome.OK),  # hit the limit but coped with it
    (3, False, False, Outcome.ERROR),
    (3, False, True, Outcome.OOM),
    (0xC0000017, False, False, Outcome.OOM),
    (0xC0000005, False, False, Outcome.KILLED),
    (None, True, False, Outcome.TIMEOUT),
    (None, False, False, Outcome.SANDBOX_ERROR),
])
def test_outcome_mapping(code: int | None, timed_out: bool, mem: bool, outcome: Outcome) -> None:
    got, error = w.outcome_for(code, timed_out=timed_out, memory_limit_hit=mem, timeout_seconds=2)
    assert got is outcome
    assert (error is None) == (outcome is Outcome.OK)
    if code == 0xC0000005:
        assert error is not None and "STATUS_ACCESS_VIOLATION" in error


def test_environment_block() -> None:
    env = w.windows_environment([("PATH", "C:\\bin"), ("home", "x")], {"SystemRoot": "C:\\Windows"})
    assert ("SystemRoot", "C:\\Windows") in env
    block = w.environment_block(env)
    assert block == "home=x\0PATH=C:\\bin\0SystemRoot=C:\\Windows\0\0"
    assert w.environment_block([]) == "\0"
    with pytest.raises(ValueError):
        w.environment_block([("A=B", "c")])


def test_processes_peak() -> None:
    new, exit_, bad = w.JOB_OBJECT_MSG_NEW_PROCESS, w.JOB_OBJECT_MSG_EXIT_PROCESS, \
        w.JOB_OBJECT_MSG_ABNORMAL_EXIT_PROCESS
    assert w.processes_peak([new, new, exit_, new, new, bad, exit_]) == 3
    assert w.processes_peak([]) == 0


# ------------------------------------------------------------------ fake DLLs


class FakeKernel:
    """Stands in for kernel32 + advapi32: records calls, simulates one payload."""

    def __init__(self, *, stdout: bytes = b"", stderr: bytes = b"", exit_code: int = 0,
                 finishes: bool = True, messages: tuple[int, ...] = (), fail: str = "",
                 token_ok: bool = True) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.next_handle = 100
        self.open: set[int] = set()
        self.pipes: dict[int, bytearray] = {}  # read handle -> data
        self.pipe_of_writer: dict[int, int] = {}
        self.job_info: dict[int, bytes] = {}
        self.stdin = bytearray()
        self.stdin_handle = 0
        self.stdout, self.stderr = stdout, stderr
        self.exit_code, self.finishes = exit_code, finishes
        self.messages = list(messages)
        self.fail, self.token_ok = fail, token_ok

    def _handle(self) -> int:
        self.next_handle += 1
        self.open.add(self.next_handle)
        return self.next_handle

    def _log(self, name: str, detail: Any = None) -> None:
        self.calls.append((name, detail))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    # kernel32
    def CreateJobObjectW(self, attrs: Any, name: Any) -> int:  # noqa: N802
        self._log("CreateJobObjectW")
        return self._handle()

    def SetInformationJobObject(self, job: int, cls: int, info: Any, size: int) -> int:  # noqa: N802
        self._log("SetInformationJobObject", cls)
        assert ctypes.sizeof(info._obj) == size
        self.job_info[cls] = bytes(info._obj)
        return 0 if self.fail == "set_info" else 1

    def QueryInformationJobObject(self, job: int, cls: int, info: Any, size: int, ret: Any) -> int:  # noqa: N802
        self._log("QueryInformationJobObject", cls)
        obj = info._obj
        if cls == w.JobObjectBasicAndIoAccountingInformation:
            obj.BasicInfo.TotalUserTime = 15_000_000  # 1.5 s
            obj.BasicInfo.TotalKernelTime = 2_500_000
            obj.BasicInfo.TotalProcesses = 4
            obj.IoInfo.ReadTransferCount = 1000
            obj.IoInfo.WriteTransferCount = 2000
        elif cls == w.JobObjectExtendedLimitInformation:
            obj.PeakJobMemoryUsed = 123 * 1024 * 1024
        return 1

    def CreateIoCompletionPort(self, file: int, existing: Any, key: int, threads: int) -> int:  # noqa: N802
        self._log("CreateIoCompletionPort")
        return self._handle()

    def GetQueuedCompletionStatus(self, port: int, msg: Any, key: Any, ov: Any, timeout: int) -> int:  # noqa: N802
        if not self.messages:
            return 0
        msg._obj.value = self.messages.pop(0)
        return 1

    def AssignProcessToJobObject(self, job: int, process: int) -> int:  # noqa: N802
        self._log("AssignProcessToJobObject", process)
        return 0 if self.fail == "assign" else 1

    def TerminateJobObject(self, job: int, code: int) -> int:  # noqa: N802
        self._log("TerminateJobObject", code)
        return 1

    def GetCurrentProcess(self) -> int:  # noqa: N802
        return -1

    def CreatePipe(self, read: Any, write: Any, attrs: Any, size: int) -> int:  # noqa: N802
        assert attrs._obj.bInheritHandle == 1
        read._obj.value, write._obj.value = self._handle(), self._handle()
        self.pipes[read._obj.value] = bytearray()
        self.pipe_of_writer[write._obj.value] = read._obj.value
        return 1

    def SetHandleInformation(self, handle: int, mask: int, flags: int) -> int:  # noqa: N802
        self._log("SetHandleInformation", (handle, flags))
        return 1

    def CreateProcessW(self, app: Any, cmd: Any, pa: Any, ta: Any, inherit: int, flags: int,  # noqa: N802
                       env: Any, cwd: Any, startup: Any, info: Any) -> int:
        si = startup._obj
        self._log("CreateProcessW", {"cmd": cmd.value, "flags": flags, "env": env[:], "cwd": cwd,
                                     "inherit": inherit, "stdflags": si.dwFlags})
        self.pipes[self.pipe_of_writer[si.hStdOutput]] += self.stdout
        self.pipes[self.pipe_of_writer[si.hStdError]] += self.stderr
        self.stdin_handle = next(k for k, v in self.pipe_of_writer.items() if v == si.hStdInput)
        info._obj.hProcess, info._obj.hThread = self._handle(), self._handle()
        return 1

    def ResumeThread(self, thread: int) -> int:  # noqa: N802
        self._log("ResumeThread", thread)
        return 1

    def TerminateProcess(self, process: int, code: int) -> int:  # noqa: N802
        self._log("TerminateProcess", code)
        return 1

    def WaitForSingleObject(self, handle: int, ms: int) -> int:  # noqa: N802
        self._log("WaitForSingleObject", ms)
        return w.WAIT_OBJECT_0 if self.finishes else w.WAIT_TIMEOUT

    def GetExitCodeProcess(self, process: int, code: Any) -> int:  # noqa: N802
        code._obj.value = self.exit_code
        return 1

    def ReadFile(self, handle: int, buf: Any, size: int, done: Any, ov: Any) -> int:  # noqa: N802
        data = self.pipes[handle]
        if not data:
            return 0  # ERROR_BROKEN_PIPE
        chunk = bytes(data[:size])
        del data[:size]
        ctypes.memmove(buf, chunk, len(chunk))
        done._obj.value = len(chunk)
        return 1

    def WriteFile(self, handle: int, data: bytes, size: int, done: Any, ov: Any) -> int:  # noqa: N802
        assert handle == self.stdin_handle
        self.stdin += data[:size]
        done._obj.value = size
        return 1

    def CloseHandle(self, handle: int) -> int:  # noqa: N802
        assert handle in self.open, f"closing unknown or closed handle {handle}"
        self.open.discard(handle)
        return 1

    # advapi32
    def OpenProcessToken(self, process: int, access: int, token: Any) -> int:  # noqa: N802
        token._obj.value = self._handle()
        return 1

    def CreateRestrictedToken(self, token: int, flags: int, *rest: Any) -> int:  # noqa: N802
        self._log("CreateRestrictedToken", flags)
        if not self.token_ok:
            return 0
        rest[-1]._obj.value = self._handle()
        return 1

    def CreateProcessAsUserW(self, token: int, *args: Any) -> int:  # noqa: N802
        self._log("CreateProcessAsUserW", token)
        return self.CreateProcessW(*args)


def run(fake: FakeKernel, config: SandboxConfig | None = None, **kwargs: Any) -> Any:
    api = w.Win32Api(fake, fake, get_last_error=lambda: 5)
    kwargs.setdefault("allow_unenforced", ALL)
    return w.run_command_windows(["prog.exe", "an arg"], config or SandboxConfig(), api=api, **kwargs)


def test_fake_run_ok_order_flags_and_usage() -> None:
    fake = FakeKernel(stdout=b"hello", stderr=b"warn", messages=(w.JOB_OBJECT_MSG_NEW_PROCESS,) * 2)
    config = SandboxConfig(memory_limit_mb=64, max_processes=4, cpu_quota_percent=100, timeout_seconds=5)
    result = run(fake, config, cwd="C:\\work")
    assert result.outcome is Outcome.OK and result.exit_code == 0
    assert result.stdout == b"hello" and result.stderr == b"warn"
    names = fake.names()
    # The payload is created suspended, put in the job, and only then resumed.
    assert names.index("CreateProcessAsUserW") < names.index("AssignProcessToJobObject") \
        < names.index("ResumeThread") < names.index("WaitForSingleObject")
    create = dict(fake.calls)["CreateProcessW"]
    assert create["flags"] & w.CREATE_SUSPENDED and create["flags"] & w.CREATE_NO_WINDOW
    assert create["flags"] & w.CREATE_NEW_PROCESS_GROUP
    assert create["cmd"] == 'prog.exe "an arg"'
    assert create["cwd"] == "C:\\work" and create["stdflags"] == w.STARTF_USESTDHANDLES
    assert create["env"].startswith("HOME=/tmp\0LANG=C.UTF-8\0PATH=") and create["env"].endswith("\0\0")
    assert dict(fake.calls)["CreateRestrictedToken"] == w.DISABLE_MAX_PRIVILEGE
    # The limit structures that reached the kernel.
    extended = w.JOBOBJECT_EXTENDED_LIMIT_INFORMATION.from_buffer_copy(
        fake.job_info[w.JobObjectExtendedLimitInformation])
    assert extended.JobMemoryLimit == 64 * 1024 * 1024
    assert extended.BasicLimitInformation.ActiveProcessLimit == 4
    rate = w.JOBOBJECT_CPU_RATE_CONTROL_INFORMATION.from_buffer_copy(
        fake.job_info[w.JobObjectCpuRateControlInformation])
    assert rate.CpuRate == w.cpu_rate_for(100, __import__("os").cpu_count() or 1)
    ui = w.JOBOBJECT_BASIC_UI_RESTRICTIONS.from_buffer_copy(fake.job_info[w.JobObjectBasicUIRestrictions])
    assert ui.UIRestrictionsClass == w.UI_RESTRICTIONS_ALL
    assert dict(fake.calls)["WaitForSingleObject"] == 5000
    usage = result.resource_usage
    assert usage.cpu_user_seconds == 1.5 and usage.cpu_system_seconds == 0.25
    assert usage.memory_peak_bytes == 123 * 1024 * 1024
    assert usage.io_read_bytes == 1000 and usage.io_write_bytes == 2000
    assert usage.processes_peak == 2
    iso = result.isolation
    assert iso.backend == "windows" and iso.namespaces == () and iso.seccomp == "off"
    assert any("no network isolation" in line for line in iso.not_enforced)
    assert any("restricted token" in line for line in iso.limits)
    assert fake.open == set(), "every handle must be closed"


def test_fake_default_config_fails_closed_before_any_call() -> None:
    fake = FakeKernel()
    with pytest.raises(UnsupportedError, match="namespaces.net"):
        run(fake, allow_unenforced=())
    assert fake.calls == []


def test_fake_timeout_terminates_the_job() -> None:
    fake = FakeKernel(finishes=False)
    result = run(fake, SandboxConfig(timeout_seconds=0.5))
    assert result.outcome is Outcome.TIMEOUT and result.exit_code is None
    assert ("TerminateJobObject", w.TIMEOUT_EXIT_CODE) in fake.calls
    assert dict(fake.calls)["WaitForSingleObject"] == 500
    assert fake.open == set()


def test_fake_assign_failure_never_resumes_the_payload() -> None:
    fake = FakeKernel(fail="assign")
    result = run(fake)
    assert result.outcome is Outcome.SANDBOX_ERROR
    assert "assign to job" in (result.error or "")
    assert "ResumeThread" not in fake.names() and "TerminateProcess" in fake.names()
    assert fake.open == set()


def test_fake_job_setup_failure_is_a_sandbox_error() -> None:
    fake = FakeKernel(fail="set_info")
    result = run(fake)
    assert result.outcome is Outcome.SANDBOX_ERROR and "job object" in (result.error or "")
    assert "CreateProcessW" not in fake.names()
    assert fake.open == set()


def test_fake_memory_limit_message_means_oom() -> None:
    fake = FakeKernel(exit_code=1, messages=(w.JOB_OBJECT_MSG_JOB_MEMORY_LIMIT,))
    result = run(fake, SandboxConfig(memory_limit_mb=16))
    assert result.outcome is Outcome.OOM


def test_fake_stdin_is_written_then_closed() -> None:
    fake = FakeKernel()
    result = run(fake, stdin=b"document bytes")
    assert result.ok
    assert bytes(fake.stdin) == b"document bytes"
    assert fake.open == set()


def test_fake_without_restricted_token_fails_closed_or_uses_create_process() -> None:
    fake = FakeKernel(token_ok=False)
    with pytest.raises(UnsupportedError, match="capabilities"):
        run(fake, allow_unenforced=ALL - {"capabilities"})
    assert "CreateProcessW" not in fake.names()
    assert fake.open == set()
    fake = FakeKernel(token_ok=False)
    result = run(fake)
    assert result.ok and "CreateProcessAsUserW" not in fake.names()
    assert any(line.startswith("capabilities:") for line in result.isolation.not_enforced)


def test_a_file_size_limit_is_refused_by_job_objects() -> None:
    with pytest.raises(UnsupportedError, match="max_file_size_mb"):
        w.check_enforceable(SandboxConfig(max_file_size_mb=10),
                            allow_unenforced=w.WINDOWS_UNENFORCEABLE - {"max_file_size_mb"})
