"""The default profile is bounded (issue 23 item 13, issue 20 item 4).

`ndf-sandbox run -- CMD` and `SandboxManager()` limit a payload to 512 MiB and 128
processes without being asked: by cgroups as root, by rlimits for an unprivileged
user without a delegated cgroup (RLIMIT_NPROC in the sandbox's own user namespace,
so the kernel counts the sandbox's processes apart from the user's others). A
limit the user sets is refused there unless they opt into rlimits, and the error
names the config field they wrote. `max_file_size_mb` caps files in writable binds.

Evidence is host-side: the sandbox's processes counted in the host's /proc, the
size of a file on the host, the exit status and the kernel's figures in the result.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import api_helpers
from api_helpers import needs_root, run
from conftest import (
    UNPRIVILEGED_UID,
    SandboxCaller,
    processes_with_argument,
    unique_marker,
)
from neural_doc_flow_security.sandbox.result import Outcome

no_leaks = api_helpers.no_leaks  # the API test's leak check
pytestmark = [pytest.mark.timeout(300)]

# Tries to start 200 `sleep MARKER` processes (more than the default 128), says how
# many it started, then waits to be killed.
SPAWN_MANY = textwrap.dedent("""
    import subprocess, sys, time
    started = 0
    for _ in range(200):
        try:
            subprocess.Popen(["sleep", sys.argv[1]])
            started += 1
        except OSError:
            pass
    print("started", started, flush=True)
    time.sleep(600)
""")


def count_sandbox_processes(caller: SandboxCaller, marker: str, options: list[str]) -> tuple[int, str]:
    """Run SPAWN_MANY; once it has tried every fork, count its `sleep MARKER`
    processes on the host. Returns (count, what it printed)."""
    proc = caller.popen(options, ["python3", "-c", SPAWN_MANY, marker],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        count = len(processes_with_argument(marker))
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
    assert line.startswith("started"), f"the payload did not run: {line!r} {stderr[-2000:]!r}"
    return count, line.strip()


def run_json(caller: SandboxCaller, directory: Path, options: list[str],
             command: list[str]) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any]]:
    out = directory / f"result-{unique_marker()}.json"
    proc = caller.run(["--json-result", str(out), *options], command)
    result = json.loads(out.read_text()) if out.exists() else {}
    return proc, result


@pytest.fixture
def other_user_processes() -> Iterator[str]:
    """150 host processes of the unprivileged user, outside any sandbox: more than
    the sandbox's own limit. Killed at teardown."""
    marker = unique_marker()
    procs = [subprocess.Popen(["sleep", marker], user=UNPRIVILEGED_UID, group=UNPRIVILEGED_UID,
                              extra_groups=[], stdout=subprocess.DEVNULL) for _ in range(150)]
    yield marker
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def test_default_profile_stops_a_payload_at_128_processes(sandbox_caller: SandboxCaller,
                                                          sleep_marker: str) -> None:
    count, said = count_sandbox_processes(sandbox_caller, sleep_marker, [])
    # 128 in all, with the sandbox's init and the python that forks.
    assert 100 <= count <= 126, f"{count} processes of the sandbox alive on the host ({said})"


def test_rlimit_nproc_counts_the_sandbox_apart_from_the_users_other_processes(
        sandbox_caller: SandboxCaller, sleep_marker: str, other_user_processes: str) -> None:
    if sandbox_caller.is_root:
        pytest.skip("the rlimit stands in for the cgroup only for an unprivileged user")
    assert len(processes_with_argument(other_user_processes)) == 150
    # The user already runs more than 128 processes: a limit counted per host uid
    # would let the sandbox start none; counted in its own user namespace it caps the
    # sandbox alone.
    count, said = count_sandbox_processes(sandbox_caller, sleep_marker, [])
    assert 100 <= count <= 126, f"{count} processes of the sandbox alive on the host ({said})"
    assert len(processes_with_argument(other_user_processes)) == 150


def test_default_profile_stops_a_payload_at_512_mib(sandbox_caller: SandboxCaller, shared_host_dir: Path) -> None:
    touch = "b = bytearray(640 << 20); b[::4096] = b'x' * len(b[::4096]); print('touched')"
    proc, result = run_json(sandbox_caller, shared_host_dir, [], ["python3", "-c", touch])
    assert b"touched" not in proc.stdout, "the payload touched 640 MiB"
    limits = result["isolation"]["limits"]
    if sandbox_caller.is_root:
        assert proc.returncode == 125 and result["outcome"] == "oom", (proc.returncode, proc.stderr[-2000:])
        assert result["resource_usage"]["memory_peak_bytes"] <= 512 << 20  # the cgroup's own counter
        assert "memory_limit_mb=512: cgroup" in limits
    else:
        assert proc.returncode == 1 and b"MemoryError" in proc.stderr, (proc.returncode, proc.stderr[-2000:])
        assert "memory_limit_mb=512: rlimit RLIMIT_AS (per process)" in limits
        assert "max_processes=128: rlimit RLIMIT_NPROC (in the sandbox's user namespace)" in limits
    assert "filesystem.tmp_size_mb=64: tmpfs size of /tmp" in limits
    # What a document parser needs still fits.
    proc, _ = run_json(sandbox_caller, shared_host_dir, [],
                       ["python3", "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_limit_set_without_a_cgroup_is_refused_naming_its_field(sandbox_caller: SandboxCaller,
                                                                   shared_host_dir: Path) -> None:
    if sandbox_caller.is_root:
        pytest.skip("root has cgroups here")
    for options, field in ((["--memory", "256M"], "memory_limit_mb"), (["--pids", "64"], "max_processes"),
                           (["--cpu", "50"], "cpu_quota_percent"), (["--io-write-bps", "1M"], "io_write_bps")):
        proc = sandbox_caller.run(options, ["true"])
        stderr = proc.stderr.decode()
        assert proc.returncode == 126 and f"ndf-sandbox: {field}: cannot be enforced" in stderr, stderr
        assert "memory_bytes" not in stderr
    # Opted in: rlimits stand in, and the result says so.
    proc, result = run_json(sandbox_caller, shared_host_dir,
                            ["--rootless-limits", "rlimit", "--memory", "256M", "--pids", "64", "--cpu", "50"],
                            ["sh", "-c", "cat /proc/self/limits"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"memory_limit_mb=256: rlimit RLIMIT_AS (per process)",
            "max_processes=64: rlimit RLIMIT_NPROC (in the sandbox's user namespace)",
            "cpu_quota_percent=50: rlimit RLIMIT_CPU=15 s (per process, not a rate)",
            } <= set(result["isolation"]["limits"])
    assert result["isolation"]["cgroup"] == ""
    limits = {line[:26].strip(): line[26:].split()[:2] for line in proc.stdout.decode().splitlines()[1:]}
    assert limits["Max address space"] == [str(256 << 20)] * 2
    assert limits["Max processes"] == ["64", "64"]
    assert limits["Max cpu time"] == ["15", "15"]
    # An I/O limit has no rlimit: still refused, naming it.
    proc = sandbox_caller.run(["--rootless-limits", "rlimit", "--io-write-bps", "1M"], ["true"])
    assert proc.returncode == 126 and b"io_write_bps" in proc.stderr


def test_a_small_address_space_limit_starts_the_program_and_holds(sandbox_caller: SandboxCaller,
                                                                    shared_host_dir: Path) -> None:
    if sandbox_caller.is_root:
        pytest.skip("root has cgroups here")
    # 32 MiB is less than the address space of the sandbox's init (a copy of the CLI's
    # Python): the limit must be set in the program's own process, not in init.
    proc, result = run_json(sandbox_caller, shared_host_dir, ["--rootless-limits", "rlimit", "--memory", "32M"],
                            ["sh", "-c", "cat /proc/self/limits"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    limits = {line[:26].strip(): line[26:].split()[:2] for line in proc.stdout.decode().splitlines()[1:]}
    assert limits["Max address space"] == [str(32 << 20)] * 2
    assert "memory_limit_mb=32: rlimit RLIMIT_AS (per process)" in result["isolation"]["limits"]
    # It holds: 64 MiB cannot be had under it.
    proc = sandbox_caller.run(["--rootless-limits", "rlimit", "--memory", "32M"],
                              ["python3", "-c", "b = bytearray(64 << 20)"])
    assert proc.returncode != 0 and (b"MemoryError" in proc.stderr or b"failed to map" in proc.stderr), proc.stderr
    # A missing program is still a missing program.
    proc = sandbox_caller.run(["--rootless-limits", "rlimit", "--memory", "32M"], ["/nonexistent/program"])
    assert proc.returncode == 127, proc.stderr


def test_max_file_size_caps_a_file_in_a_writable_bind(sandbox_caller: SandboxCaller, shared_host_dir: Path) -> None:
    target = shared_host_dir / "big"
    proc = sandbox_caller.run(["--max-file-size", "1M", "--bind", f"{shared_host_dir}:/out"],
                              ["sh", "-c", "head -c 5000000 /dev/zero > /out/big"])
    assert proc.returncode != 0
    assert target.stat().st_size <= 1 << 20, "a file in the writable bind grew past max_file_size_mb"


@needs_root
def test_sandbox_manager_defaults_stop_a_callable_at_512_mib(no_leaks: api_helpers.LeakTracker) -> None:
    def touch_640_mib() -> int:
        b = bytearray(640 << 20)
        b[::4096] = b"x" * len(b[::4096])
        return len(b)

    async def scenario() -> Any:
        async with api_helpers.manager("zygote") as m:
            return await m.execute_sandboxed("hog", touch_640_mib)

    result = run(scenario())
    assert result.outcome is Outcome.OOM, api_helpers.describe(result)
    assert "memory_limit_mb=512: cgroup" in result.isolation.limits
