"""The native `ndf-sandbox` program (cli_client.c, issue #20 item 3): without a CLI
server it is the Python CLI, `ndf-sandbox-py` (same pid, same argv, same exit
status); for `run` it hands the call to a server of its own build over a unix
socket, only in a directory of the user's own that nobody else may enter. The
servers here are fakes speaking the protocol, in the test process."""

from __future__ import annotations

import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from neural_doc_flow_security.sandbox._build_id import BUILD_ID

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the native client is built on Linux only")

CLIENT = Path(sys.executable).with_name("ndf-sandbox")
TIMEOUT = 60.0  # generous: the machine is noisy
# magic, build id, umask, argc, envc, body length, 16 x (cur, max)
HEADER = struct.Struct("<4s16sIIII32Q")
N_RLIMITS = 16
EXIT_7 = ["run", "--", "sh", "-c", "exit 7"]  # a real sandboxed run, through the Python CLI
NO_ANSWER = b"ndf-sandbox: the CLI server ended without an answer\n"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The client's environment: no server settings, and a runtime dir with no server."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDF_SANDBOX_")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A 0700 directory of the test's own with a short path (sun_path holds 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ndf-cc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeServer:
    """A listening socket; the test accepts and answers in its own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)

    def accept_from(self, proc: subprocess.Popen[bytes]) -> socket.socket:
        """The client's connection; fails if the client ends without connecting."""
        pidfd = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([self.listener, pidfd], [], [], TIMEOUT)
        finally:
            os.close(pidfd)
        assert self.listener in ready, "the client did not connect to the server"
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        return conn

    def connection_pending(self) -> bool:
        """Whether a client connected (a connection stays queued until accepted)."""
        self.listener.setblocking(False)
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server(socket_dir: Path) -> Iterator[FakeServer]:
    fake = FakeServer(socket_dir / "s.sock")
    yield fake
    fake.close()


@dataclass
class Request:
    magic: bytes
    build_id: bytes
    umask: int
    argv: list[bytes]
    env: list[bytes]
    rlimits: list[tuple[int, int]]
    fds: list[int]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def read_request(conn: socket.socket) -> Request:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
    while len(data) < HEADER.size:
        chunk = conn.recv(1 << 16)
        assert chunk, "the request ended inside its header"
        data += chunk
    magic, build_id, umask, argc, envc, body_len, *limits = HEADER.unpack_from(data)
    while len(data) < HEADER.size + body_len:
        chunk = conn.recv(1 << 16)
        assert chunk, "the request ended inside its body"
        data += chunk
    assert len(data) == HEADER.size + body_len, "more than the request before any answer"
    strings = data[HEADER.size:].split(b"\0")
    assert strings[-1] == b"" and len(strings) == argc + envc + 1
    rlimits = list(zip(limits[::2], limits[1::2], strict=True))
    return Request(magic, build_id, umask, strings[:argc], strings[argc:-1], rlimits, fds)


def answer_exit(conn: socket.socket, status: int) -> None:
    conn.sendall(b"X" + struct.pack("<i", status))


def start(argv: Sequence[str], env: dict[str, str], program: Path = CLIENT,
          **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(program), *argv], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


# ---------------------------------------------------------------------------
# Without a server: the Python CLI, exec'd in place
# ---------------------------------------------------------------------------

# Stands in for ndf-sandbox-py next to a copy of the client: its pid, the signals it
# ignores (its own /proc entry, read by the shell itself), then its argv, NUL-separated.
FAKE_PYTHON_CLI = """#!/bin/sh
while read -r key value; do [ "$key" = SigIgn: ] && ignored=$value; done < /proc/$$/status
printf '%s\\n%s\\n' "$$" "$ignored"
printf '%s\\0' "$0" "$@"
"""


@pytest.fixture
def client_copy(tmp_path: Path) -> Path:
    """A copy of the installed client with a fake Python CLI beside it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2(CLIENT, bin_dir / "ndf-sandbox")
    fake = bin_dir / "ndf-sandbox-py"
    fake.write_text(FAKE_PYTHON_CLI)
    fake.chmod(0o755)
    return bin_dir / "ndf-sandbox"


def fake_cli_output(out: bytes) -> tuple[int, str, list[bytes]]:
    pid, ignored, args = out.split(b"\n", 2)
    return int(pid), ignored.decode(), args.split(b"\0")[:-1]


def test_a_run_without_a_server_is_the_python_clis(env: dict[str, str]) -> None:
    assert finish(start(EXIT_7, env))[0] == 7


def test_help_names_ndf_sandbox_not_the_python_cli(env: dict[str, str]) -> None:
    status, out, _ = finish(start(["--help"], env))
    assert status == 0 and out.startswith(b"usage: ndf-sandbox ")
    status, out, _ = finish(start(["run", "--help"], env))
    assert status == 0 and out.startswith(b"usage: ndf-sandbox run ")


ARGS = [["run", "--", "prog", "a b", "", "'\"q", "--x=y z", "\u00fc\t\n"], ["check", ""], ["runx"], []]


@pytest.mark.parametrize("args", ARGS, ids=["run", "check", "runx", "none"])
def test_the_python_cli_keeps_the_pid_and_gets_the_argv(client_copy: Path, env: dict[str, str],
                                                         args: list[str]) -> None:
    proc = start(args, env, program=client_copy)
    status, out, err = finish(proc)
    assert (status, err) == (0, b"")
    pid, _, argv = fake_cli_output(out)
    assert pid == proc.pid
    assert argv == [str(client_copy.with_name("ndf-sandbox-py")).encode(), *(a.encode() for a in args)]


def test_the_python_cli_is_found_beside_the_program_not_the_link(client_copy: Path, env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    link = tmp_path / "elsewhere" / "ndf-sandbox"
    link.parent.mkdir()
    link.symlink_to(client_copy)
    status, out, _ = finish(start(["check"], env, program=link))
    assert status == 0
    assert fake_cli_output(out)[2][0] == str(client_copy.with_name("ndf-sandbox-py")).encode()


def test_a_missing_python_cli_is_an_error_126(client_copy: Path, env: dict[str, str]) -> None:
    python_cli = client_copy.with_name("ndf-sandbox-py")
    python_cli.unlink()
    status, out, err = finish(start(["run", "--", "true"], env, program=client_copy))
    assert (status, out) == (126, b"")
    assert err == f"ndf-sandbox: cannot run the Python CLI {python_cli}: No such file or directory\n".encode()


@pytest.mark.parametrize("value", ["off", "0", "no"])
def test_server_off_never_connects(client_copy: Path, env: dict[str, str], server: FakeServer,
                                   value: str) -> None:
    env |= {"NDF_SANDBOX_SOCKET": str(server.path), "NDF_SANDBOX_SERVER": value}
    proc = start(["run", "--", "true"], env, program=client_copy)
    assert finish(proc)[0] == 0
    assert not server.connection_pending()


# ---------------------------------------------------------------------------
# With a (fake) server
# ---------------------------------------------------------------------------

def _rlimit(value: int) -> int:
    return value & (2**64 - 1)  # RLIM_INFINITY: -1 in Python, all ones on the wire


def test_the_request_carries_argv_env_umask_rlimits_cwd_and_fds(env: dict[str, str], server: FakeServer,
                                                                 tmp_path: Path) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", BUILD_ID), f"the installed build has no build id: {BUILD_ID!r}"
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    core = (4096, 8192) if hard == resource.RLIM_INFINITY or hard >= 8192 else (hard, hard)

    def preexec() -> None:
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_CORE, core)

    args = ["run", "--memory", "64M", "--", "prog", "a b", "", "'\"q"]
    env |= {"NDF_SANDBOX_SOCKET": str(server.path), "NDF_TEST_VALUE": "a b=c"}
    proc = subprocess.Popen([str(CLIENT), *args], env=env, cwd=tmp_path, preexec_fn=preexec,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with server.accept_from(proc) as conn:
        request = read_request(conn)
        try:
            assert (request.magic, request.build_id, request.umask) == (b"NDF1", BUILD_ID.encode(), 0o027)
            assert request.argv == [a.encode() for a in args]
            assert b"NDF_TEST_VALUE=a b=c" in request.env
            assert sorted(request.env) == sorted(f"{k}={v}".encode() for k, v in env.items())
            expected = [tuple(_rlimit(v) for v in resource.getrlimit(r)) for r in range(N_RLIMITS)]
            expected[resource.RLIMIT_CORE] = core
            assert request.rlimits == expected
            assert len(request.fds) == 4
            stdin, stdout, stderr, cwd = request.fds
            assert proc.stdin and proc.stderr
            assert os.fstat(stdin).st_ino == os.fstat(proc.stdin.fileno()).st_ino
            assert os.fstat(stderr).st_ino == os.fstat(proc.stderr.fileno()).st_ino
            here, there = os.fstat(cwd), os.stat(tmp_path)
            assert (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
            os.write(stdout, b"marker from the server\n")
        finally:
            request.close()
        answer_exit(conn, 42)
        assert finish(proc) == (42, b"marker from the server\n", b"")


def test_the_default_socket_is_in_the_runtime_dir_named_by_the_build(env: dict[str, str]) -> None:
    directory = Path(env["XDG_RUNTIME_DIR"], f"ndf-sandbox-{os.geteuid()}")
    directory.mkdir(mode=0o700)
    fake = FakeServer(directory / f"{BUILD_ID}.sock")
    try:
        proc = start(["run", "--", "true"], env)
        with fake.accept_from(proc) as conn:
            read_request(conn).close()
            answer_exit(conn, 3)
            assert finish(proc) == (3, b"", b"")
    finally:
        fake.close()


def test_fall_back_answer_runs_the_python_cli(env: dict[str, str], server: FakeServer) -> None:
    env["NDF_SANDBOX_SOCKET"] = str(server.path)
    proc = start(EXIT_7, env)
    with server.accept_from(proc) as conn:
        read_request(conn).close()
        conn.sendall(b"F")
        assert finish(proc)[0] == 7


def test_fall_back_leaves_the_signal_dispositions_as_found(client_copy: Path, env: dict[str, str],
                                                           server: FakeServer) -> None:
    direct = subprocess.run([str(client_copy.with_name("ndf-sandbox-py"))], env=env, capture_output=True,
                            timeout=TIMEOUT, check=True)
    env["NDF_SANDBOX_SOCKET"] = str(server.path)
    proc = start(["run", "--", "true"], env, program=client_copy)
    with server.accept_from(proc) as conn:
        read_request(conn).close()
        conn.sendall(b"F")
        status, out, _ = finish(proc)
    assert status == 0
    assert fake_cli_output(out)[1] == fake_cli_output(direct.stdout)[1]  # SIGPIPE not left ignored


def test_a_server_that_ends_without_an_answer_is_an_error_126(env: dict[str, str], server: FakeServer) -> None:
    env["NDF_SANDBOX_SOCKET"] = str(server.path)
    proc = start(["run", "--", "true"], env)
    with server.accept_from(proc) as conn:
        read_request(conn).close()
    assert finish(proc) == (126, b"", NO_ANSWER)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_are_forwarded_to_the_server(env: dict[str, str], server: FakeServer, sig: int) -> None:
    env["NDF_SANDBOX_SOCKET"] = str(server.path)
    proc = start(["run", "--", "true"], env)
    with server.accept_from(proc) as conn:
        read_request(conn).close()  # the handlers are in place before the client connects
        proc.send_signal(sig)
        assert conn.recv(2, socket.MSG_WAITALL) == b"S" + bytes([sig])
        answer_exit(conn, 128 + sig)
        assert finish(proc) == (128 + sig, b"", b"")


def test_a_signal_the_server_got_before_falling_back_is_the_clients_again(
        client_copy: Path, env: dict[str, str], server: FakeServer) -> None:
    env["NDF_SANDBOX_SOCKET"] = str(server.path)
    proc = start(["run", "--", "true"], env, program=client_copy)
    with server.accept_from(proc) as conn:
        read_request(conn).close()
        proc.send_signal(signal.SIGTERM)
        assert conn.recv(2, socket.MSG_WAITALL) == b"S" + bytes([signal.SIGTERM])
        conn.sendall(b"F")  # the server did nothing: the client ends as SIGTERM would have ended it
        assert finish(proc) == (-signal.SIGTERM, b"", b"")  # the Python CLI never ran


# ---------------------------------------------------------------------------
# Only a directory of the user's own that nobody else may enter
# ---------------------------------------------------------------------------

def _unsafe(kind: str, env: dict[str, str], server: FakeServer) -> Path | None:
    """Make the server's socket unsafe in the way `kind` says; the client's cwd."""
    directory = server.path.parent
    if kind == "group-and-others-may-enter":
        directory.chmod(0o755)
    elif kind == "owned-by-another-user":
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(directory, 65534, 65534)
    elif kind == "symlink":
        link = directory.with_name(directory.name + "-link")
        link.symlink_to(directory)
        env["NDF_SANDBOX_SOCKET"] = str(link / server.path.name)
        return None
    elif kind == "relative":
        env["NDF_SANDBOX_SOCKET"] = server.path.name
        return directory
    elif kind == "default-path-symlink":
        default = Path(env["XDG_RUNTIME_DIR"], f"ndf-sandbox-{os.geteuid()}")
        default.symlink_to(directory)  # a link to a good dir is as bad: lstat sees the link
        server.path.rename(directory / f"{BUILD_ID}.sock")
        server.path = directory / f"{BUILD_ID}.sock"
        return None
    env["NDF_SANDBOX_SOCKET"] = str(server.path)
    return None


UNSAFE = ["group-and-others-may-enter", "owned-by-another-user", "symlink", "relative",
          "default-path-symlink"]


@pytest.mark.parametrize("kind", UNSAFE)
def test_a_socket_in_an_unsafe_directory_is_never_used(env: dict[str, str], server: FakeServer, kind: str) -> None:
    cwd = _unsafe(kind, env, server)
    try:
        assert finish(start(EXIT_7, env, cwd=cwd))[0] == 7  # run for real, by the Python CLI
        assert not server.connection_pending()
    finally:
        link = server.path.parent.with_name(server.path.parent.name + "-link")
        if link.is_symlink():
            link.unlink()
