"""Seccomp allow-lists, denied-syscall reports and learn mode (issue 18 items 2 and 3).

The sandbox's init holds the filter's user-notification listener: it answers each
refused call with the errno the rule stands for and counts it; the result carries
the counts as `security_events`. Host-side evidence: a host sentinel is not traced,
a mount over a writable bind did not happen (the payload's marker file lands in the
host directory), the host process's CPU stays small while a payload floods refused
calls. Hostile payloads stay harmless if the sandbox were broken: they aim at a
sentinel and a directory the test made, with arguments that do nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import api_helpers
from api_helpers import LeakTracker, make_host_dir, method, rw_bind_config  # noqa: F401 - fixtures
from conftest import SandboxCaller
from neural_doc_flow_security.sandbox import SandboxConfig, SecurityEvent
from neural_doc_flow_security.sandbox.errors import ConfigError
from neural_doc_flow_security.sandbox.linux import seccomp
from test_escape import SYSCALL_PRELUDE, out, python
from test_seccomp import nr, raw_syscall, run_in_child

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux" or os.uname().machine != "x86_64",
                                reason="x86_64 Linux syscall numbers")
no_leaks = api_helpers.no_leaks

PTRACE_ATTACH = 16
KEYCTL_JOIN_SESSION_KEYRING = 1
CLONE_NEWUSER = 0x10000000
SAMPLES = Path(seccomp.__file__).parents[1] / "samples"


@pytest.fixture(params=["deny-list", "allow-list"])
def seccomp_profile(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def kinds_targets_counts(events: tuple[SecurityEvent, ...]) -> set[tuple[str, str, int]]:
    return {(e.kind, e.target, e.count) for e in events}


# ------------------------------------------------------------------------------ the filters


def test_allow_list_refuses_unlisted_and_future_syscalls_with_enosys() -> None:
    def probe() -> dict[str, list[int]]:
        return {name: list(raw_syscall(number, 0, 0, 0, 0)) for name, number in
                (("io_setup", nr("io_setup")), ("after_newest", 470), ("far_future", 1000))}

    _, allowed = run_in_child(probe, seccomp.compile_profile("allow-list"))
    assert allowed == {name: [-1, errno.ENOSYS] for name in ("io_setup", "after_newest", "far_future")}
    _, denied_only = run_in_child(probe, seccomp.compile_profile("deny-list"))
    assert denied_only["io_setup"] == [-1, errno.EFAULT]  # the deny-list lets it through (a NULL context)


def test_allow_list_covers_what_the_payload_kinds_were_measured_to_use() -> None:
    # strace -f of the Python payload (threads, subprocesses, sockets, cloudpickle, msgpack),
    # pdftotext and pdftoppm (benchmarks/syscall_usage.py); clone3 keeps its ENOSYS (libc falls back).
    measured = {
        "accept4", "access", "arch_prctl", "bind", "brk", "chdir", "chmod", "clock_gettime", "clock_nanosleep",
        "clone", "close", "close_range", "connect", "dup2", "epoll_create1", "epoll_ctl", "epoll_wait",
        "execve", "exit", "exit_group", "faccessat2", "fadvise64", "fcntl", "fstatfs", "futex", "getcwd",
        "getdents64", "getegid", "geteuid", "getgid", "getpeername", "getpgrp", "getpid", "getppid",
        "getrandom", "getrusage", "getsockname", "gettid", "getuid", "ioctl", "kill", "link", "listen",
        "lseek", "madvise", "mkdir", "mmap", "mprotect", "munmap", "newfstatat", "openat", "pipe2", "poll",
        "pread64", "prlimit64", "pselect6", "read", "readlink", "recvfrom", "rename", "rmdir", "rseq",
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sched_getaffinity", "sendto", "set_robust_list",
        "set_tid_address", "socket", "socketpair", "sysinfo", "times", "uname", "unlink", "unlinkat", "vfork",
        "wait4", "write", "memfd_create", "sendmsg", "recvmsg",
    }
    assert measured <= seccomp.ALLOW_LIST
    assert not seccomp.ALLOW_LIST & {name for name, how in seccomp._DEFAULT_DENY.items() if how == "always"}


def _install_with_listener(program: seccomp.SeccompProgram) -> int:
    """Install `program`'s reporting filter in this (forked) process with a new
    listener (SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER); its fd."""
    insns = program.reported_bpf
    buf = ctypes.create_string_buffer(insns, len(insns))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(insns) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    listener = int(libc.syscall(ctypes.c_long(nr("seccomp")), ctypes.c_long(1), ctypes.c_long(8),
                                ctypes.byref(fprog)))
    assert listener >= 0, ctypes.get_errno()
    return listener


def test_refused_calls_fail_closed_when_the_listener_is_gone() -> None:
    program = seccomp.compile_profile("deny-list")
    assert program.reports

    def without_listener() -> dict[str, list[int]]:
        listener = _install_with_listener(program)
        os.close(listener)  # nobody answers any more
        return {"ptrace": list(raw_syscall(nr("ptrace"), PTRACE_ATTACH, 0x3FFFFFFF, 0, 0)),
                "getppid": list(raw_syscall(nr("getppid")))}

    _, found = run_in_child(without_listener, None)
    assert found["ptrace"] == [-1, errno.ENOSYS]  # the kernel's answer without a listener: still refused
    assert found["getppid"][0] > 0


def test_allowed_calls_never_reach_the_listener() -> None:
    program = seccomp.compile_profile("allow-list")

    def unanswered() -> list[Any]:
        listener = _install_with_listener(program)
        # A call referred to the listener would wait forever: nobody answers it here.
        fd = os.open("/dev/null", os.O_RDONLY)
        os.close(fd)
        import socket
        socket.socket(socket.AF_UNIX).close()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        import select
        pending = select.select([listener], [], [], 0)[0]
        return [os.getpid() > 0, pending]

    _, found = run_in_child(unanswered, None)
    assert found == [True, []]


# ------------------------------------------------------------------------------ reports


def _attempts(sentinel: int, directory: str) -> dict[str, Any]:
    """In the sandbox: refused calls, then a marker in `directory` (on the host's file
    system unless the mount over it had worked)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(number: int, *args: Any) -> int:
        ctypes.set_errno(0)
        return -1 if libc.syscall(ctypes.c_long(number), *args) == -1 and ctypes.get_errno() else 0

    errnos: dict[str, list[int]] = {"ptrace": [], "mount": [], "keyctl": [], "unshare": []}
    for _ in range(3):
        call(101, ctypes.c_long(PTRACE_ATTACH), ctypes.c_long(sentinel), ctypes.c_long(0), ctypes.c_long(0))
        errnos["ptrace"].append(ctypes.get_errno())
    call(165, b"none", directory.encode(), b"tmpfs", ctypes.c_long(0), ctypes.c_long(0))
    errnos["mount"].append(ctypes.get_errno())
    for _ in range(2):
        call(250, ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), b"ndf-test-keyring")
        errnos["keyctl"].append(ctypes.get_errno())
    call(272, ctypes.c_long(CLONE_NEWUSER))
    errnos["unshare"].append(ctypes.get_errno())
    with open(os.path.join(directory, "marker"), "w") as f:
        f.write("written after the mount attempt\n")
    return errnos


EXPECTED_EVENTS = {("denied_syscall", "ptrace", 3), ("denied_syscall", "mount", 1),
                   ("denied_syscall", "keyctl", 2), ("denied_syscall", "unshare", 1)}
EXPECTED_ERRNOS = {"ptrace": [errno.EPERM] * 3, "mount": [errno.EPERM], "keyctl": [errno.EPERM] * 2,
                   "unshare": [errno.EPERM]}


def _host_evidence(sentinel: subprocess.Popen[bytes], directory: Path) -> None:
    assert sentinel.poll() is None
    status = api_helpers.proc_status_fields(Path(f"/proc/{sentinel.pid}/status").read_text())
    assert status["TracerPid"] == "0"
    # The marker went to the host directory: nothing was mounted over it.
    assert (directory / "marker").read_text() == "written after the mount attempt\n"
    assert str(directory) not in Path("/proc/self/mountinfo").read_text()


@api_helpers.linux_only
@api_helpers.needs_root
def test_callable_refused_syscalls_are_reported_and_had_no_effect(
        method: str, seccomp_profile: str, no_leaks: LeakTracker,  # noqa: F811
        sentinel_process: subprocess.Popen[bytes], audit_events: list[dict[str, Any]]) -> None:
    directory = make_host_dir(no_leaks)

    async def main() -> tuple[Any, float, float]:
        async with api_helpers.manager(method) as m:
            config = rw_bind_config(directory, seccomp=seccomp_profile)
            before = time.time()
            result = await m.with_options(sandbox_config=config).execute_sandboxed(
                "attempts", _attempts, sentinel_process.pid, str(directory))
            return result, before, time.time()

    result, before, after = api_helpers.run(main())
    assert result.outcome.value == "ok", api_helpers.describe(result)
    assert result.output == EXPECTED_ERRNOS
    assert kinds_targets_counts(result.security_events) == EXPECTED_EVENTS, result.security_events
    assert all(before <= e.first_seen <= after for e in result.security_events), (before, after)
    firsts = {e.target: e.first_seen for e in result.security_events}
    assert firsts["ptrace"] <= firsts["mount"] <= firsts["keyctl"] <= firsts["unshare"]  # the order of the calls
    assert result.isolation.seccomp.startswith(f"{seccomp_profile}:")
    _host_evidence(sentinel_process, directory)
    # The audit log has them too, from the manager (each event validated against the schema).
    audited = {(e["event"], e["target"], e["count"]) for e in audit_events if e["event"] == "denied_syscall"}
    assert audited == EXPECTED_EVENTS


COMMAND_ATTEMPTS = SYSCALL_PRELUDE + """
import sys
sentinel, directory = int(sys.argv[1]), sys.argv[2]
for _ in range(3):
    report("ptrace", *sys_call(101, 16, sentinel, 0, 0))
strings = [ctypes.create_string_buffer(text) for text in (b"none", directory.encode(), b"tmpfs")]
report("mount", *sys_call(165, *(ctypes.addressof(text) for text in strings), 0, 0))
for _ in range(2):
    report("keyctl", *sys_call(250, 1, 0, 0, 0))
report("unshare", *sys_call(272, 0x10000000))
with open(directory + "/marker", "w") as f:
    f.write("written after the mount attempt\\n")
print("DONE", flush=True)
"""


def test_command_refused_syscalls_are_reported_in_the_json_result(
        root_caller: SandboxCaller, seccomp_profile: str, sentinel_process: subprocess.Popen[bytes],
        tmp_path: Path) -> None:
    directory = tmp_path / "bind"
    directory.mkdir()
    directory.chmod(0o777)
    result_file = tmp_path / "result.json"
    before = time.time()
    ran = root_caller.run(["--python", "--seccomp", seccomp_profile, "--bind", str(directory),
                           "--json-result", str(result_file)],
                          [*python(COMMAND_ATTEMPTS), str(sentinel_process.pid), str(directory)])
    after = time.time()
    assert ran.returncode == 0 and "DONE" in out(ran), ran
    for line in out(ran).splitlines():
        if line.startswith("PROBE "):
            assert line.endswith("errno=EPERM"), line
    data = json.loads(result_file.read_text())
    events = tuple(SecurityEvent(**e) for e in data["security_events"])
    assert kinds_targets_counts(events) == EXPECTED_EVENTS, events
    assert all(before <= e.first_seen <= after for e in events)
    assert data["isolation"]["seccomp"].startswith(f"{seccomp_profile}:")
    _host_evidence(sentinel_process, directory)


@api_helpers.linux_only
@api_helpers.needs_root
def test_execute_command_reports_refused_syscalls_through_the_zygote() -> None:
    code = SYSCALL_PRELUDE + "report('ptrace', *sys_call(101, 16, 1, 0, 0))\nreport('bpf', *sys_call(321, 0, 0, 0))\n"

    async def main() -> Any:
        async with api_helpers.manager("zygote") as m:
            return await m.execute_command("attempts", ["python3", "-c", code])

    result = api_helpers.run(main())
    assert result.outcome.value == "ok", api_helpers.describe(result)
    assert kinds_targets_counts(result.security_events) == {("denied_syscall", "ptrace", 1),
                                                            ("denied_syscall", "bpf", 1)}
    assert result.isolation.seccomp.startswith("deny-list:")  # "default": the deny-list for programs


def _flood(count: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    ptrace = libc.syscall
    answered = 0
    for _ in range(count):
        if ptrace(101, 0, 0, 0, 0) == -1:
            answered += 1
    return answered


def _trivial() -> str:
    return "still served"


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@api_helpers.linux_only
@api_helpers.needs_root
def test_a_flood_of_refused_calls_is_counted_and_burns_the_sandbox_cpu_not_the_hosts() -> None:
    count = 1_000_000
    host = psutil.Process()

    async def main() -> tuple[Any, Any, float, float]:
        async with api_helpers.manager("zygote") as m:
            await m.execute_sandboxed("warm", _trivial)
            ours = [host, *api_helpers.zygote_family(os.getpid())]
            cpu_before = _cpu_seconds(ours)
            flood = asyncio.create_task(m.with_options(sandbox_config=SandboxConfig(timeout_seconds=600))
                                        .execute_sandboxed("flood", _flood, count))
            await asyncio.sleep(1.0)
            served = await m.execute_sandboxed("trivial", _trivial)
            assert not flood.done(), "the flood ended before the concurrent call: make it longer"
            flooded = await flood
            return flooded, served, cpu_before, _cpu_seconds(ours)

    flooded, served, cpu_before, cpu_after = api_helpers.run(main(), timeout=900)
    assert served.outcome.value == "ok" and served.output == "still served"
    assert flooded.outcome.value == "ok", api_helpers.describe(flooded)
    assert flooded.output == count
    assert kinds_targets_counts(flooded.security_events) == {("denied_syscall", "ptrace", count)}
    sandbox_cpu = flooded.resource_usage.cpu_user_seconds + flooded.resource_usage.cpu_system_seconds
    host_cpu = cpu_after - cpu_before
    # init (the listener) runs in the sandbox's cgroup: the work is charged to the sandbox.
    assert host_cpu < sandbox_cpu / 4, (host_cpu, sandbox_cpu)


# ------------------------------------------------------------------------------ learn mode


def test_learn_writes_a_profile_that_runs_the_program(root_caller: SandboxCaller, tmp_path: Path) -> None:
    document = tmp_path / "report.pdf"
    document.write_bytes((SAMPLES / "report.pdf").read_bytes())
    tmp_path.chmod(0o755)
    profile = tmp_path / "pdftotext.toml"
    learned = root_caller.run(["--ro-bind", str(tmp_path), "--seccomp", "learn", "--seccomp-learn-output",
                               str(profile)], ["pdftotext", str(document), "-"])
    assert learned.returncode == 0, learned
    assert f"use --seccomp {profile}" in learned.stderr.decode()
    text = profile.read_text()
    assert 'extends = "minimal"' in text and '"mmap"' in text
    loaded = seccomp.load_profile_file(str(profile))
    assert loaded.allow is not None and "ptrace" not in loaded.allow and "socket" not in loaded.allow

    result_file = tmp_path / "result.json"
    tight = root_caller.run(["--ro-bind", str(tmp_path), "--seccomp", str(profile), "--json-result",
                             str(result_file)], ["pdftotext", str(document), "-"])
    plain = subprocess.run(["pdftotext", str(document), "-"], capture_output=True, check=True)
    assert tight.returncode == 0 and tight.stdout == plain.stdout == learned.stdout, tight
    data = json.loads(result_file.read_text())
    assert data["security_events"] == []
    assert data["isolation"]["seccomp"].startswith("pdftotext.toml: allow-list of ")

    # Another program under pdftotext's profile: what it needs beyond it is refused and reported.
    other = root_caller.run(["--seccomp", str(profile), "--json-result", str(result_file)],
                            ["/bin/sh", "-c", "echo hi > /tmp/x; ls /tmp"])
    events = json.loads(result_file.read_text())["security_events"]
    assert events and all(e["kind"] == "denied_syscall" for e in events), (other, events)


def test_learn_mode_records_a_python_payload(root_caller: SandboxCaller, tmp_path: Path) -> None:
    profile = tmp_path / "ls.toml"
    learned = root_caller.run(["--seccomp", "learn", "--seccomp-learn-output", str(profile)], ["/bin/ls", "/"])
    assert learned.returncode == 0 and b"proc" in learned.stdout, learned
    names = seccomp.load_profile_file(str(profile)).allow
    assert names is not None and {"getdents64", "execve", "openat"} <= names
    again = root_caller.run(["--seccomp", str(profile)], ["/bin/ls", "/"])
    assert again.returncode == 0 and again.stdout == learned.stdout, again


def test_learn_needs_its_output_file(root_caller: SandboxCaller, tmp_path: Path) -> None:
    alone = root_caller.run(["--seccomp", "learn"], ["/bin/true"])
    assert alone.returncode == 2 and b"--seccomp-learn-output" in alone.stderr, alone
    stray = root_caller.run(["--seccomp-learn-output", str(tmp_path / "x.toml")], ["/bin/true"])
    assert stray.returncode == 2 and not (tmp_path / "x.toml").exists(), stray


# ------------------------------------------------------------------------------ profiles


def test_allow_list_profile_files(tmp_path: Path) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text('extends = "allow-list"\nallow = ["io_setup"]\ndeny = ["flock"]\n')
    profile = seccomp.load_profile_file(str(extra))
    assert profile.allow is not None and "io_setup" in profile.allow and "flock" not in profile.allow
    assert profile.deny["flock"] == "always" and profile.deny["clone"] == "clone_new_flags"

    lifted = tmp_path / "lifted.toml"
    lifted.write_text('extends = "minimal"\nallow = ["read", "ptrace"]\n')
    with pytest.raises(ConfigError) as info:
        seccomp.load_profile_file(str(lifted))
    assert info.value.field == "seccomp" and "ptrace" in str(info.value) and "lifted.toml" in str(info.value)

    wrong = tmp_path / "wrong.toml"
    wrong.write_text('extends = "allowlist"\n')
    with pytest.raises(ConfigError, match="extends must be one of .*'allow-list'.* got 'allowlist'"):
        seccomp.load_profile_file(str(wrong))


def test_profile_names_in_the_config() -> None:
    for name in ("default", "allow-list", "deny-list", "learn", "off"):
        assert SandboxConfig(seccomp=name).seccomp == name
    with pytest.raises(ConfigError, match="'allow-list'.*got 'allowlist'"):
        SandboxConfig(seccomp="allowlist")
    assert seccomp.compile_profile("default") is seccomp.compile_profile("deny-list")


def test_an_allow_list_config_exports_as_an_oci_allow_list() -> None:
    from neural_doc_flow_security.sandbox.oci import spec_from_config

    exported = spec_from_config(SandboxConfig(seccomp="allow-list"))["linux"]["seccomp"]
    assert (exported["defaultAction"], exported["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", errno.ENOSYS)
    allowed, denied = exported["syscalls"]
    assert allowed["action"] == "SCMP_ACT_ALLOW" and set(allowed["names"]) == seccomp.ALLOW_LIST
    assert denied["action"] == "SCMP_ACT_ERRNO" and {"ptrace", "mount", "keyctl"} <= set(denied["names"])
    assert spec_from_config(SandboxConfig(seccomp="deny-list"))["linux"]["seccomp"]["defaultAction"] == \
        "SCMP_ACT_ALLOW"


# ------------------------------------------------------------------------------ killed sandboxes report too

KILLED_EVENTS = {("denied_syscall", "ptrace", 3), ("denied_syscall", "keyctl", 2), ("denied_syscall", "mount", 1)}


def _refuse_then_hang(directory: str) -> None:
    """Refused calls (harmless if they were let through: no such process, a keyring of
    this process, no such mount point), a marker once made, then a wait for the kill."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    for _ in range(3):
        libc.syscall(ctypes.c_long(101), ctypes.c_long(PTRACE_ATTACH), ctypes.c_long(0), ctypes.c_long(0),
                     ctypes.c_long(0))
    for _ in range(2):
        libc.syscall(ctypes.c_long(250), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), b"ndf-test-keyring")
    libc.syscall(ctypes.c_long(165), b"none", b"/ndf-no-such-mount-point", b"tmpfs", ctypes.c_long(0),
                 ctypes.c_long(0))
    with open(os.path.join(directory, "marker"), "w") as f:
        f.write("refused calls made\n")
    time.sleep(600)


def _assert_killed_report(result: Any, outcome: str, directory: Path, audit_events: list[dict[str, Any]]) -> None:
    assert result.outcome.value == outcome, api_helpers.describe(result)
    assert (directory / "marker").exists(), "the payload did not get to its refused calls"
    assert kinds_targets_counts(result.security_events) == KILLED_EVENTS, result.security_events
    audited = {(e["event"], e["target"], e["count"]) for e in audit_events if e["event"] == "denied_syscall"}
    assert audited == KILLED_EVENTS


@api_helpers.linux_only
@api_helpers.needs_root
def test_a_timed_out_callable_still_reports_its_refused_syscalls(
        method: str, no_leaks: LeakTracker, audit_events: list[dict[str, Any]]) -> None:  # noqa: F811
    directory = make_host_dir(no_leaks)

    async def main() -> Any:
        async with api_helpers.manager(method) as m:
            config = rw_bind_config(directory, timeout_seconds=4)
            return await m.with_options(sandbox_config=config).execute_sandboxed(
                "hangs", _refuse_then_hang, str(directory))

    _assert_killed_report(api_helpers.run(main()), "timeout", directory, audit_events)


@api_helpers.linux_only
@api_helpers.needs_root
def test_a_killed_plugin_still_reports_its_refused_syscalls(
        method: str, no_leaks: LeakTracker, audit_events: list[dict[str, Any]]) -> None:  # noqa: F811
    directory = make_host_dir(no_leaks)

    async def main() -> Any:
        async with api_helpers.manager(method) as m:
            handle = await m.with_options(sandbox_config=rw_bind_config(directory)).spawn(
                "hangs", _refuse_then_hang, str(directory))
            for _ in range(600):
                if (directory / "marker").exists():
                    break
                await asyncio.sleep(0.1)
            return await handle.kill()

    _assert_killed_report(api_helpers.run(main()), "killed", directory, audit_events)


@api_helpers.linux_only
@api_helpers.needs_root
def test_a_timed_out_worker_still_reports_its_refused_syscalls(
        no_leaks: LeakTracker, audit_events: list[dict[str, Any]]) -> None:  # noqa: F811
    directory = make_host_dir(no_leaks)

    async def main() -> Any:
        async with api_helpers.manager("zygote") as m, m.worker_pool(
                max_workers=1, max_tasks_per_child=5,
                sandbox_config=rw_bind_config(directory, timeout_seconds=4)) as pool:
            return await pool.execute_sandboxed("hangs", _refuse_then_hang, str(directory))

    result = api_helpers.run(main())
    assert result.isolation.worker_call == 1, result.isolation
    _assert_killed_report(result, "timeout", directory, audit_events)


COMMAND_REFUSES_THEN_HANGS = SYSCALL_PRELUDE + """
import sys, time
for _ in range(3):
    sys_call(101, 16, 0, 0, 0)
for _ in range(2):
    sys_call(250, 1, 0, 0, 0)
target = ctypes.create_string_buffer(b"/ndf-no-such-mount-point")
sys_call(165, 0, ctypes.addressof(target), 0, 0, 0)
open(sys.argv[1] + "/marker", "w").write("refused calls made\\n")
time.sleep(600)
"""


def test_a_timed_out_command_still_reports_its_refused_syscalls_in_the_json_result(
        root_caller: SandboxCaller, tmp_path: Path) -> None:
    directory = tmp_path / "bind"
    directory.mkdir()
    directory.chmod(0o777)
    result_file = tmp_path / "result.json"
    root_caller.run(["--python", "--timeout", "4", "--bind", str(directory), "--json-result", str(result_file)],
                    [*python(COMMAND_REFUSES_THEN_HANGS), str(directory)])
    data = json.loads(result_file.read_text())
    assert data["outcome"] == "timeout", data
    assert (directory / "marker").exists(), data
    events = tuple(SecurityEvent(**e) for e in data["security_events"])
    assert kinds_targets_counts(events) == KILLED_EVENTS, events


def _refuse_then_ask_init(directory: str) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    for _ in range(2):
        libc.syscall(ctypes.c_long(250), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), b"ndf-test-keyring")
    with open(os.path.join(directory, "marker"), "w") as f:
        f.write("refused calls made\n")
    try:
        os.kill(1, signal.SIGRTMAX)  # init's "report now": it may end the payload, not erase the counts
    except PermissionError:
        return "init is out of reach"
    time.sleep(600)
    return "not ended"


@api_helpers.linux_only
@api_helpers.needs_root
def test_a_payload_asking_its_init_to_report_cannot_erase_its_counts(
        method: str, no_leaks: LeakTracker) -> None:  # noqa: F811
    directory = make_host_dir(no_leaks)

    async def main() -> Any:
        async with api_helpers.manager(method) as m:
            config = rw_bind_config(directory, timeout_seconds=120)
            return await m.with_options(sandbox_config=config).execute_sandboxed(
                "asks", _refuse_then_ask_init, str(directory))

    result = api_helpers.run(main())
    # Either it cannot signal its init (another uid), or init ends it as its own SIGKILL would.
    assert ((result.outcome.value, result.output) == ("ok", "init is out of reach")
            or (result.outcome.value, result.signal) == ("killed", signal.SIGKILL)), api_helpers.describe(result)
    assert (directory / "marker").exists()
    assert kinds_targets_counts(result.security_events) == {("denied_syscall", "keyctl", 2)}, result.security_events
