"""`ndf-sandbox serve`: `run` calls handed by the native client to a warm server
(cli_server.py) behave as the Python CLI's own, stay isolated, take the caller's
signals, fall back for callers in another context, and leave nothing behind.

Which path ran a call is told by the host: the audit log's host_pid is the
process that ran the CLI's main(), the client itself (exec keeps the pid) or the
server's child that was waiting for the call."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from api_helpers import sandbox_cgroups
from conftest import (
    NDF_SANDBOX,
    kill_processes_with_argument,
    ndf_host_env,
    processes_with_argument,
    remove_cgroup_dirs,
    unique_marker,
    wait_until,
)

PYTHON_CLI = str(Path(sys.executable).with_name("ndf-sandbox-py"))

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the native client and its server are Linux-only"),
    pytest.mark.skipif(not os.path.exists(PYTHON_CLI), reason="installed without the native client"),
    pytest.mark.skipif(os.geteuid() != 0, reason="run as root (the sandbox tests' setting)"),
]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    socket: str

    def env(self, **extra: str) -> dict[str, str]:
        return ndf_host_env(NDF_SANDBOX_SOCKET=self.socket, **extra)

    def waiting_children(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.process.pid).children()}

    def family(self) -> set[int]:
        """The server and its descendants (waiting children, their spares), now."""
        with contextlib.suppress(psutil.NoSuchProcess):
            server = psutil.Process(self.process.pid)
            return {self.process.pid} | {p.pid for p in server.children(recursive=True)}
        return set()


def start_server(directory: Path) -> Server:
    path = str(directory / "cli.sock")
    process = subprocess.Popen([PYTHON_CLI, "serve", "--socket", path], stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, start_new_session=True, env=ndf_host_env())
    assert process.stderr is not None
    line = process.stderr.readline().decode()
    assert "listening on" in line, line + process.stderr.read().decode()
    server = Server(process, path)
    assert wait_until(lambda: server.waiting_children(), timeout=60), "no child waits for a call"
    return server


def end_servers(*servers: Server | None) -> None:
    """Cleanup: kill the servers a test started (if still running) and reap them."""
    for server in servers:
        if server is None:
            continue
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=60)
        if server.process.stderr is not None:
            server.process.stderr.close()


@pytest.fixture
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("ndf-serve")
    directory.chmod(0o700)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def server(server_dir: Path) -> Iterator[Server]:
    started = start_server(server_dir)
    family = started.family()
    yield started
    family |= started.family()
    if started.process.poll() is None:
        started.process.terminate()
    started.process.wait(timeout=60)
    assert started.process.stderr is not None
    started.process.stderr.close()
    assert wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                                      for pid in family), timeout=60)
    left = sandbox_cgroups(family)
    remove_cgroup_dirs(left)
    assert not left, f"cgroups left by the server's children: {left}"
    assert not os.path.exists(started.socket), "the socket outlived its server"


def run_cli(program: str, args: list[str], env: dict[str, str], cwd: Path, stdin: bytes = b"",
            **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([program, *args], input=stdin, capture_output=True, env=env, cwd=cwd, timeout=120,
                          check=False, **kwargs)  # type: ignore[call-overload]


def host_pid_of_run(audit_log: Path) -> int:
    hosts = {int(event["host_pid"]) for event in map(json.loads, audit_log.read_text().splitlines())}
    audit_log.unlink()
    [host_pid] = hosts
    return host_pid


CASES = {
    "output": (["run", "--", "sh", "-c", "echo out; echo err >&2"], b""),
    "status": (["run", "--", "sh", "-c", "exit 7"], b""),
    "stdin": (["run", "--", "cat"], b"a document\n"),
    "not found": (["run", "--", "/no/such/program"], b""),
    "bad option": (["run", "--no-such-option", "--", "true"], b""),
    "non-ASCII output": (["run", "--no-such-\u00fc", "--", "sh", "-c", "echo \u00e9t\u00e9"], b""),
    "help": (["run", "--help"], b""),
    "bad value": (["run", "--memory", "lots", "--", "true"], b""),
    "killed": (["run", "--", "sh", "-c", "kill -9 $$"], b""),
    "timeout": (["run", "--timeout", "1", "--", "sleep", "30"], b""),
}


@pytest.mark.parametrize("case", CASES)
def test_a_served_run_is_the_python_clis_run(case: str, server: Server, tmp_path: Path) -> None:
    args, stdin = CASES[case]
    python = run_cli(PYTHON_CLI, args, ndf_host_env(), tmp_path, stdin)
    waiting = server.waiting_children()
    served = run_cli(NDF_SANDBOX, [*args[:1], "--audit-log", str(tmp_path / "audit.jsonl"), *args[1:]],
                     server.env(), tmp_path, stdin)
    assert (served.returncode, served.stdout, served.stderr) == (python.returncode, python.stdout, python.stderr)
    if (tmp_path / "audit.jsonl").exists():  # the run was started (not refused while parsing)
        assert host_pid_of_run(tmp_path / "audit.jsonl") in waiting, "not run by the server's waiting child"


def test_a_served_run_writes_its_files_where_the_caller_is(server: Server, tmp_path: Path) -> None:
    served = run_cli(NDF_SANDBOX, ["run", "--json-result", "result.json", "--", "true"], server.env(), tmp_path)
    assert served.returncode == 0, served.stderr
    assert json.loads((tmp_path / "result.json").read_text())["outcome"] == "ok"


def test_a_served_run_is_fenced(server: Server, tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    served = run_cli(NDF_SANDBOX, ["run", "--", "sh", "-c", f"echo x > {marker}"], server.env(), tmp_path)
    assert served.returncode != 0
    assert not marker.exists(), "a served run wrote into a host directory it was not given"


def test_the_callers_limits_and_umask_reach_the_served_program(server: Server, tmp_path: Path) -> None:
    def with_cpu_limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (77, 77))
        os.umask(0o027)

    args = ["run", "--", "sh", "-c", "ulimit -t; umask"]
    python = run_cli(PYTHON_CLI, args, ndf_host_env(), tmp_path, preexec_fn=with_cpu_limit)
    served = run_cli(NDF_SANDBOX, args, server.env(), tmp_path, preexec_fn=with_cpu_limit)
    assert python.stdout.split() == [b"77", b"0027"], python
    assert served.stdout == python.stdout, served


@pytest.mark.parametrize("how", ["SIGTERM to the client", "SIGKILL of the client"])
def test_a_served_sandbox_takes_the_callers_signals(how: str, server: Server, tmp_path: Path) -> None:
    marker = unique_marker()
    statuses = []
    try:
        for program, env in ((PYTHON_CLI, ndf_host_env()), (NDF_SANDBOX, server.env())):
            client = subprocess.Popen([program, "run", "--", "sleep", marker], env=env, cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert wait_until(lambda: processes_with_argument(marker), timeout=60), "the sandbox never ran"
            client.send_signal(signal.SIGTERM if how == "SIGTERM to the client" else signal.SIGKILL)
            statuses.append(client.wait(timeout=60))
            assert wait_until(lambda: not processes_with_argument(marker), timeout=60), \
                f"{program}: the sandbox outlived its caller ({how})"
    finally:
        kill_processes_with_argument(marker)
    assert statuses[0] == statuses[1], statuses


@pytest.mark.parametrize("wrapper", [["unshare", "--mount"], ["setpriv", "--no-new-privs"], ["nice", "-n", "5"],
                                     ["ionice", "-c", "3"], ["taskset", "-c", "0"]],
                         ids=["another mount namespace", "no_new_privs", "niceness", "I/O class", "CPU affinity"])
def test_a_caller_in_another_context_is_not_served(wrapper: list[str], server: Server, tmp_path: Path) -> None:
    if not shutil.which(wrapper[0]):
        pytest.skip(f"{wrapper[0]} is not installed")
    audit = tmp_path / "audit.jsonl"
    client = subprocess.Popen([*wrapper, NDF_SANDBOX, "run", "--audit-log", str(audit), "--", "sh", "-c", "exit 5"],
                              env=server.env(), cwd=tmp_path)
    assert client.wait(timeout=120) == 5
    assert host_pid_of_run(audit) == client.pid, "run by the server for a caller in another context"


def test_the_server_ends_with_nothing_left(server_dir: Path, tmp_path: Path) -> None:
    first = start_server(server_dir)
    try:
        second = subprocess.run([PYTHON_CLI, "serve", "--socket", first.socket], capture_output=True,
                                timeout=120, check=False, env=ndf_host_env())
        assert second.returncode != 0 and b"another ndf-sandbox serve" in second.stderr
        assert run_cli(NDF_SANDBOX, ["run", "--", "true"], first.env(), tmp_path).returncode == 0
        assert wait_until(lambda: first.waiting_children(), timeout=60)
        family = first.family()
        assert len(family) >= 2  # the server, its waiting child (and, as root, that child's spare)
        first.process.kill()  # no clean-up of its own: its children go with it
        first.process.wait(timeout=60)
        assert wait_until(lambda: not any(psutil.pid_exists(p) for p in family), timeout=60), \
            [p for p in family if psutil.pid_exists(p)]
        cleanup = run_cli(PYTHON_CLI, ["cleanup"], ndf_host_env(), tmp_path)
        assert cleanup.returncode == 0, cleanup.stderr
        assert not sandbox_cgroups(family)
        # A dead server's socket does not stop the next one.
        again = start_server(server_dir)
        again.process.terminate()
        assert again.process.wait(timeout=60) == 0
        assert not os.path.exists(again.socket)
    finally:
        end_servers(first, locals().get("again"))


def test_a_call_under_way_outlives_its_stopped_server(server_dir: Path, tmp_path: Path) -> None:
    # The call is the server child's alone: it goes on, and holds nothing of the
    # server's (the lock: a new server starts meanwhile).
    first = start_server(server_dir)
    marker = unique_marker()
    client = subprocess.Popen([NDF_SANDBOX, "run", "--", "sh", "-c", f"sleep {marker}; exit 4"],
                              env=first.env(), cwd=tmp_path)
    try:
        assert wait_until(lambda: processes_with_argument(marker), timeout=60), "the sandbox never ran"
        [sandboxed] = processes_with_argument(marker)
        waiting = first.waiting_children() - {p.pid for p in sandboxed.parents()}
        first.process.terminate()
        assert first.process.wait(timeout=60) == 0
        assert processes_with_argument(marker), "stopping the server ended a call under way"
        # Its waiting children end with it, whatever the call's child holds.
        assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in waiting), timeout=60), waiting
        second = start_server(server_dir)
        second.process.terminate()
        assert second.process.wait(timeout=60) == 0
        kill_processes_with_argument(marker)
        assert client.wait(timeout=60) == 4  # its sleep ended: the call ends as its program does
    finally:
        kill_processes_with_argument(marker)
        if client.poll() is None:
            client.kill()
        client.wait(timeout=60)
        end_servers(first, locals().get("second"))


@pytest.mark.parametrize("how", ["mode 0755", "another user's", "a symlink to a private one"])
def test_the_server_will_not_listen_in_a_directory_not_its_own(how: str, server_dir: Path) -> None:
    directory = server_dir / "sockets"
    if how == "a symlink to a private one":
        directory.symlink_to(server_dir)
    else:
        directory.mkdir(mode=0o755 if how == "mode 0755" else 0o700)
        if how == "another user's":
            os.chown(directory, 65534, 65534)
    refused = subprocess.run([PYTHON_CLI, "serve", "--socket", str(directory / "cli.sock")], capture_output=True,
                             timeout=120, check=False, env=ndf_host_env())
    assert refused.returncode != 0
    assert str(directory) in refused.stderr.decode() and "0700" in refused.stderr.decode()
    assert not (server_dir / "cli.sock").exists() and not os.path.lexists(directory / "cli.sock")
