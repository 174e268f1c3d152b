"""`ndf-sandbox` as a command: exit statuses, --json-result, stdio, signals, options,
profiles, `check`, and what --net, --bind, --ro-bind, --env and --cap change.

Tests that exercise the sandbox itself run twice (root and uid 4242, the
`sandbox_caller` fixture); pure command-line parsing runs once, as root.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import (
    NDF_SANDBOX,
    SANDBOX_IDS,
    SandboxCaller,
    accepted_connections,
    cgroups_of,
    ndf_host_env,
    processes_with_argument,
    remove_cgroups_of,
    wait_until,
)

PY = ("--python",)


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    return (f"exit {result.returncode}\nstdout:\n{result.stdout.decode(errors='replace')}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')}")


def ndf(*args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    """Run `ndf-sandbox ARGS` as root (for parsing and `check`)."""
    return subprocess.run([NDF_SANDBOX, *args], capture_output=True, cwd="/tmp", env=ndf_host_env(),
                          timeout=60, check=False, **kwargs)  # type: ignore[call-overload]


# --- exit statuses -------------------------------------------------------------

def test_exit_status_is_the_programs_own_code(sandbox_caller: SandboxCaller) -> None:
    for code in (0, 1, 42, 125, 255):
        result = sandbox_caller.run([], ["sh", "-c", f"exit {code}"])
        assert result.returncode == code, describe(result)


def test_a_callers_restrictive_umask_is_the_programs_and_does_not_break_the_root(
        sandbox_caller: SandboxCaller) -> None:
    # With umask 027 the root's directories (made by root) were 0750: the sandbox's uid
    # could not search them, and every run failed at the landlock stage (EACCES).
    result = sandbox_caller.run([], ["sh", "-c", "umask; touch /tmp/made; stat -c %a /tmp/made"],
                                preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.split() == [b"0027", b"640"]


def test_killed_by_signal_exits_128_plus_n(sandbox_caller: SandboxCaller) -> None:
    result = sandbox_caller.run([], ["sh", "-c", "kill -USR1 $$"])
    assert result.returncode == 128 + signal.SIGUSR1 == 138, describe(result)


def test_timeout_exits_124(sandbox_caller: SandboxCaller, sleep_marker: str) -> None:
    result = sandbox_caller.run(["--timeout", "1"], ["sleep", sleep_marker])
    assert result.returncode == 124, describe(result)
    assert b"timeout" in result.stderr
    assert wait_until(lambda: not processes_with_argument(sleep_marker), timeout=10)


def test_missing_bind_source_exits_126_naming_the_path(sandbox_caller: SandboxCaller,
                                                        request: pytest.FixtureRequest) -> None:
    missing = f"/nonexistent-{secrets.token_hex(6)}"
    for _ in range(20):  # the setup failure races the parent's release: every attempt must be clean
        result = sandbox_caller.run(["--ro-bind", missing], ["true"])
        assert result.returncode == 126, describe(result)
        assert missing.encode() in result.stderr
        assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("program", ["/no/such/program-{token}", "no-such-command-{token}"])
def test_unknown_command_exits_127_like_a_shell(sandbox_caller: SandboxCaller, program: str) -> None:
    program = program.format(token=secrets.token_hex(4))
    result = sandbox_caller.run([], [program])
    assert result.returncode == 127, describe(result)  # was 126, which means a protection failed
    assert program.encode() in result.stderr


def test_a_file_that_cannot_be_executed_exits_126(sandbox_caller: SandboxCaller) -> None:
    result = sandbox_caller.run([], ["/etc/hostname"])  # exists, not executable: the shell's 126 too
    assert result.returncode == 126, describe(result)
    result = sandbox_caller.run(["--cwd", f"/no/such/dir-{secrets.token_hex(4)}"], ["true"])
    assert result.returncode == 126, describe(result)  # a missing --cwd is a set-up failure, not 127


def test_json_result_reports_outcome_usage_and_isolation(sandbox_caller: SandboxCaller,
                                                          shared_host_dir: Path) -> None:
    report = shared_host_dir / "result.json"
    result = sandbox_caller.run(["--json-result", str(report)], ["sh", "-c", "echo hi; exit 3"])
    assert result.returncode == 3, describe(result)
    assert result.stdout == b"hi\n"
    data = json.loads(report.read_text())
    assert data["outcome"] == "error"
    assert data["exit_code"] == 3
    assert data["signal"] is None
    usage = data["resource_usage"]
    for key in ("wall_seconds", "cpu_user_seconds", "cpu_system_seconds", "memory_peak_bytes"):
        assert isinstance(usage[key], (int, float)) and usage[key] >= 0, key
    assert usage["wall_seconds"] > 0
    assert usage["memory_peak_bytes"] > 0
    isolation = data["isolation"]
    assert set(isolation["namespaces"]) >= {"pid", "net", "mnt", "uts", "ipc", "cgroup"}
    assert ("user" in isolation["namespaces"]) == (not sandbox_caller.is_root)
    assert isolation["uid"] in SANDBOX_IDS if sandbox_caller.is_root else isolation["uid"] == 65534
    assert isolation["capabilities"] == []
    assert isolation["no_new_privs"] is True
    assert isolation["seccomp"] and isolation["seccomp"] != "off"


def test_json_result_reports_signal_and_timeout(root_caller: SandboxCaller, shared_host_dir: Path,
                                                sleep_marker: str) -> None:
    report = shared_host_dir / "signal.json"
    root_caller.run(["--json-result", str(report)], ["sh", "-c", "kill -USR1 $$"])
    data = json.loads(report.read_text())
    assert (data["outcome"], data["signal"]) == ("killed", signal.SIGUSR1)
    report = shared_host_dir / "timeout.json"
    root_caller.run(["--timeout", "1", "--json-result", str(report)], ["sleep", sleep_marker])
    assert json.loads(report.read_text())["outcome"] == "timeout"


# --- stdio and signals -------------------------------------------------------------

def test_stdin_stdout_stderr_pass_through(sandbox_caller: SandboxCaller) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    result = sandbox_caller.run([], ["cat"], input=payload)
    assert result.returncode == 0, describe(result)
    assert result.stdout == payload
    result = sandbox_caller.run([], ["sh", "-c", "cat >&2; echo out"], input=b"to stderr\n")
    assert (result.stdout, result.stderr) == (b"out\n", b"to stderr\n")


def test_sigterm_reaches_the_sandbox_and_the_tree_is_gone(sandbox_caller: SandboxCaller,
                                                         sleep_marker: str) -> None:
    script = (f"trap 'echo got-term; exit 7' TERM; sleep {sleep_marker} & "
              "echo ready; wait; echo wait-returned")
    proc = sandbox_caller.popen([], ["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert wait_until(lambda: processes_with_argument(sleep_marker), timeout=30)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert b"got-term" in stdout, stderr
    assert proc.returncode == 7, stderr
    # the tree is gone when the command returns (no polling: it must already be gone)
    assert not processes_with_argument(sleep_marker)


def test_sigterm_ignoring_payload_is_killed_after_the_grace(root_caller: SandboxCaller,
                                                            sleep_marker: str) -> None:
    script = f"trap '' TERM; echo ready; sleep {sleep_marker}"
    proc = root_caller.popen(["--timeout", "20"], ["sh", "-c", script],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert not processes_with_argument(sleep_marker)
    # stopped by the host after the grace: killed, not a wall timeout
    assert proc.returncode != 124, stderr
    assert proc.returncode in (128 + signal.SIGKILL, 128 + signal.SIGTERM), stderr


# --- invalid options ---------------------------------------------------------------

@pytest.mark.parametrize(("options", "expected"), [
    (["--memory", "-5"], "memory_limit_mb"),
    (["--memory", "abc"], "memory_limit_mb: must be a size like 256M or 1G, got 'abc'"),
    (["--cap", "CAP_DAC_OVERIDE"], "unknown capability CAP_DAC_OVERIDE (did you mean CAP_DAC_OVERRIDE?)"),
    (["--ambient-cap", "CAP_NET_BIND_SERVCE"], "did you mean CAP_NET_BIND_SERVICE?"),
    (["--pids", "many"], "max_processes"),
    (["--pids", "1"], "max_processes"),
    (["--timeout", "soon"], "timeout_seconds"),
    (["--timeout", "-1"], "timeout_seconds: must be > 0"),
    (["--timeout", "2592000"], "timeout_seconds: must be at most 604800"),  # 30 days: a zygote's poll overflowed
    (["--timeout", "1e12"], "timeout_seconds: must be at most 604800"),
    (["--timeout", "inf"], "timeout_seconds: must be a finite number"),
    (["--timeout", "nan"], "timeout_seconds: must be a finite number"),  # was: no timeout at all
    (["--timeout", "ten"], "timeout_seconds: must be a number of seconds"),
    (["--memory", "99999999999999G"], "memory_limit_mb: must be at most"),
    (["--pids", "99999999"], "max_processes: must be at most"),
    (["--nofile", "99999999"], "max_open_files: must be at most"),
    (["--tmpfs-size", "0"], "filesystem.tmp_size_mb"),
    (["--hostname", "bad_name!"], "hostname"),
    (["--env", "NOEQUALS"], "environment"),
    (["--ro-bind", "relative/path"], "filesystem.read_only_binds"),
    (["--bind", "/tmp/../etc"], "filesystem.binds"),
    (["--nofile", "2"], "max_open_files"),
    (["--seccomp", "relative.toml"], "seccomp"),
    (["--io-read-bps", "fast"], "io_read_bps"),
])
def test_invalid_option_exits_2_naming_the_field(options: list[str], expected: str,
                                                 shared_host_dir: Path) -> None:
    marker = shared_host_dir / "ran"
    result = ndf("run", *options, "--", "touch", str(marker))
    assert result.returncode == 2, describe(result)
    assert expected in result.stderr.decode(), describe(result)
    assert not marker.exists()


def test_missing_command_exits_2() -> None:
    result = ndf("run", "--")
    assert result.returncode == 2
    assert b"missing command" in result.stderr


def test_unknown_option_exits_2() -> None:
    result = ndf("run", "--no-such-option", "--", "true")
    assert result.returncode == 2
    assert b"--no-such-option" in result.stderr


# --- profiles ----------------------------------------------------------------------

def test_profile_file_is_loaded(sandbox_caller: SandboxCaller, shared_host_dir: Path) -> None:
    profile = shared_host_dir / "profile.toml"
    profile.write_text('hostname = "fromprofile"\ntimeout_seconds = 50\n'
                       '[environment]\nPATH = "/usr/bin:/bin"\nGREETING = "hello from toml"\n'
                       '[filesystem]\ntmp_size_mb = 2\n')
    profile.chmod(0o644)
    result = sandbox_caller.run(["--profile", str(profile)],
                                ["sh", "-c", "hostname; echo \"$GREETING\"; df -k /tmp | tail -1"])
    assert result.returncode == 0, describe(result)
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "fromprofile"
    assert lines[1] == "hello from toml"
    assert int(lines[2].split()[1]) == 2048  # the 2 MiB /tmp of the profile


def test_command_line_overrides_profile(root_caller: SandboxCaller, shared_host_dir: Path) -> None:
    profile = shared_host_dir / "profile.toml"
    profile.write_text('hostname = "fromprofile"\n')
    result = root_caller.run(["--profile", str(profile), "--hostname", "fromcli"], ["hostname"])
    assert result.stdout == b"fromcli\n", describe(result)


@pytest.mark.parametrize(("text", "expected"), [
    ("memory_limit_mb = -5\n", "memory_limit_mb: must be > 0, got -5"),
    ("hostnme = \"x\"\n", "hostnme: unknown field (did you mean hostname?)"),
    ("[namespaces]\nnett = false\n", "namespaces.nett: unknown field (did you mean net?)"),
    ("[namespaces]\nnet = \"yes\"\n", "namespaces.net: must be true or false"),
    ("[capabilities]\nallowed = [\"CAP_DAC_OVERIDE\"]\n",
     "capabilities.allowed: unknown capability CAP_DAC_OVERIDE (did you mean CAP_DAC_OVERRIDE?)"),
    ("[filesystem]\nbinds = [\"relative\"]\n", "filesystem.binds"),
    ("[filesystem]\ntmp_size_mb = 0\n", "filesystem.tmp_size_mb: must be > 0, got 0"),
    ("timeout_seconds = [\n", "is not valid TOML"),
])
def test_bad_profile_exits_2_naming_the_field(tmp_path: Path, text: str, expected: str) -> None:
    profile = tmp_path / "bad.toml"
    profile.write_text(text)
    result = ndf("run", "--profile", str(profile), "--", "true")
    assert result.returncode == 2, describe(result)
    assert expected in result.stderr.decode(), describe(result)


def test_missing_profile_exits_2_naming_the_file(tmp_path: Path) -> None:
    result = ndf("run", "--profile", str(tmp_path / "absent.toml"), "--", "true")
    assert result.returncode == 2, describe(result)
    assert b"absent.toml" in result.stderr


# --- check -------------------------------------------------------------------------

def test_check_reports_what_the_host_enforces() -> None:
    result = ndf("check")
    assert result.returncode == 0, describe(result)
    text = result.stdout.decode()
    for word in ("kernel", "namespace user", "namespace pid", "namespace net", "seccomp", "landlock"):
        assert word in text, word
    assert os.uname().release in text


def test_check_json_reports_what_the_host_enforces() -> None:
    result = ndf("check", "--json")
    assert result.returncode == 0, describe(result)
    data = json.loads(result.stdout)
    features = data["features"]
    assert data["default_profile_missing"] == []
    assert features["kernel_release"] == os.uname().release
    names = {ns["name"]: ns["creatable"] for ns in features["namespaces"]}
    assert set(names) >= {"user", "pid", "net", "mnt", "uts", "ipc", "cgroup"}
    assert all(names.values())
    assert features["seccomp"] is True
    assert isinstance(features["landlock_abi"], int)


def test_check_runs_unprivileged() -> None:
    result = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "--",
                             NDF_SANDBOX, "check", "--json"], capture_output=True, cwd="/tmp",
                            env=ndf_host_env(), timeout=60, check=False)
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout)["features"]["euid"] == 4242


def test_check_names_a_missing_cap_net_admin_and_run_agrees() -> None:
    """Root without CAP_NET_ADMIN (a container's default capability set) can unshare a
    network namespace but not bring its loopback up: `check` must say so, since `run`
    fails there (it said "fully enforced" while every run exited 126)."""
    if os.geteuid() != 0:
        pytest.skip("drops a capability from root")
    drop = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]
    check = subprocess.run([*drop, NDF_SANDBOX, "check", "--json"], capture_output=True, cwd="/tmp",
                           env=ndf_host_env(), timeout=60, check=False)
    assert check.returncode == 1, describe(check)
    missing = json.loads(check.stdout)["default_profile_missing"]
    assert any(m.startswith("namespaces.net:") and "CAP_NET_ADMIN" in m for m in missing), missing
    run = subprocess.run([*drop, NDF_SANDBOX, "run", "--", "/bin/true"], capture_output=True, cwd="/tmp",
                         env=ndf_host_env(), timeout=60, check=False)
    assert run.returncode == 126, describe(run)
    assert b"CAP_NET_ADMIN" in run.stderr, describe(run)
    # With the network namespace switched off, nothing else is missing and the run works.
    run = subprocess.run([*drop, NDF_SANDBOX, "run", "--net", "--", "/bin/true"], capture_output=True,
                         cwd="/tmp", env=ndf_host_env(), timeout=60, check=False)
    assert run.returncode == 0, describe(run)


# --- network -----------------------------------------------------------------------

CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("CONNECTED")
except OSError as e:
    print("REFUSED", e.errno)
"""


def test_net_option_shares_the_host_network(sandbox_caller: SandboxCaller,
                                            loopback_listener: socket.socket) -> None:
    port = str(loopback_listener.getsockname()[1])
    shared = sandbox_caller.run([*PY, "--net"], ["python3", "-c", CONNECT, port])
    assert shared.stdout == b"CONNECTED\n", describe(shared)
    assert accepted_connections(loopback_listener) == 1
    default = sandbox_caller.run(list(PY), ["python3", "-c", CONNECT, port])
    assert default.stdout.startswith(b"REFUSED"), describe(default)
    assert accepted_connections(loopback_listener) == 0


# --- binds -------------------------------------------------------------------------

def test_bind_makes_a_host_dir_writable(sandbox_caller: SandboxCaller, shared_host_dir: Path) -> None:
    marker = shared_host_dir / "from-sandbox"
    result = sandbox_caller.run(["--bind", str(shared_host_dir)], ["sh", "-c", f"echo written > {marker}"])
    assert result.returncode == 0, describe(result)
    assert marker.read_text() == "written\n"
    assert sandbox_caller.payload_uid_ok(marker.stat().st_uid)


def test_bind_to_another_target(root_caller: SandboxCaller, shared_host_dir: Path) -> None:
    result = root_caller.run(["--bind", f"{shared_host_dir}:/work"], ["sh", "-c", "echo x > /work/m"])
    assert result.returncode == 0, describe(result)
    assert (shared_host_dir / "m").read_text() == "x\n"


def test_ro_bind_is_readable_but_not_writable(sandbox_caller: SandboxCaller, shared_host_dir: Path) -> None:
    data = shared_host_dir / "data.txt"
    data.write_text("visible content\n")
    data.chmod(0o644)
    marker = shared_host_dir / "from-sandbox"
    result = sandbox_caller.run(["--ro-bind", str(shared_host_dir)],
                                ["sh", "-c", f"cat {data}; echo x > {marker} || echo WRITE-FAILED; "
                                             f"rm {data} || echo RM-FAILED"])
    assert result.stdout == b"visible content\nWRITE-FAILED\nRM-FAILED\n", describe(result)
    assert b"Read-only file system" in result.stderr
    assert not marker.exists()
    assert data.exists()


# --- environment -------------------------------------------------------------------

def test_env_sets_a_variable_and_the_host_environment_does_not_leak(sandbox_caller: SandboxCaller) -> None:
    token = secrets.token_hex(12)
    result = sandbox_caller.run(["--env", "GREETING=hello world", "--env", "EMPTY="], ["env"],
                                env=ndf_host_env(NDF_HOST_SECRET=token, AWS_SECRET_ACCESS_KEY=token))
    assert result.returncode == 0, describe(result)
    variables = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert variables["GREETING"] == "hello world"
    assert variables["EMPTY"] == ""
    assert token not in result.stdout.decode()
    assert "NDF_HOST_SECRET" not in variables
    assert set(variables) <= {"PATH", "HOME", "LANG", "GREETING", "EMPTY", "PWD", "SHLVL", "_"}


# --- capabilities ------------------------------------------------------------------

BIND_80 = """
import errno, socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 80))
    print("BOUND")
except OSError as e:
    print("REFUSED", errno.errorcode[e.errno])
"""


def test_ambient_net_bind_service_lets_a_non_root_payload_bind_port_80(sandbox_caller: SandboxCaller) -> None:
    caps = ["--cap", "CAP_NET_BIND_SERVICE", "--ambient-cap", "CAP_NET_BIND_SERVICE"]
    granted = sandbox_caller.run([*PY, *caps], ["python3", "-c", "import os; print(os.getuid())\n" + BIND_80])
    uid, bound = granted.stdout.decode().split("\n", 1)
    assert int(uid) in SANDBOX_IDS if sandbox_caller.is_root else uid == "65534", describe(granted)
    assert bound == "BOUND\n", describe(granted)
    default = sandbox_caller.run(list(PY), ["python3", "-c", BIND_80])
    assert default.stdout == b"REFUSED EACCES\n", describe(default)


def test_ambient_cap_is_the_only_capability(root_caller: SandboxCaller) -> None:
    result = root_caller.run(["--cap", "CAP_NET_BIND_SERVICE", "--ambient-cap", "CAP_NET_BIND_SERVICE"],
                             ["cat", "/proc/self/status"])
    status = dict(line.split(":\t", 1) for line in result.stdout.decode().splitlines() if ":\t" in line)
    bit = 1 << 10  # CAP_NET_BIND_SERVICE
    for cap_set in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap_set], 16) == bit, (cap_set, status[cap_set])
    assert int(status["CapInh"], 16) in (0, bit)
    assert status["NoNewPrivs"].strip() == "1"


# --- leftovers of a killed ndf-sandbox -----------------------------------------------

def test_a_run_without_limits_makes_no_cgroup(root_caller: SandboxCaller, tmp_path: Path) -> None:
    # The default profile has limits (a cgroup); with every one switched off, none is made.
    out = tmp_path / "result.json"
    assert root_caller.run(["--json-result", str(out), "--memory", "none", "--pids", "none"],
                           ["true"]).returncode == 0
    result = json.loads(out.read_text())
    assert result["isolation"]["cgroup"] == ""
    assert result["resource_usage"]["memory_peak_bytes"] > 0  # from the reaped tree's rusage


def test_cgroups_of_a_killed_cli_are_reclaimed_by_the_next_run(root_caller: SandboxCaller,
                                                               sleep_marker: str) -> None:
    proc = root_caller.popen(["--pids", "64"], ["sleep", sleep_marker],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: processes_with_argument(sleep_marker), timeout=30)
        assert cgroups_of(proc.pid), "a run with a limit has a cgroup"
        proc.kill()
        proc.wait(timeout=30)
        assert wait_until(lambda: not processes_with_argument(sleep_marker), timeout=30)
        assert root_caller.run([], ["true"]).returncode == 0
        assert cgroups_of(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        remove_cgroups_of(proc.pid)
