"""Shared fixtures and helpers for the test suite.

Keep this file small and generic: each group of fixtures is clearly named after
what it provides. Helpers for running the `ndf-sandbox` CLI live in the
"ndf-sandbox CLI" section below.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import _cgroup_helpers
from neural_doc_flow_security.sandbox.config import DEFAULT_ID_RANGE

# The host ids sandboxes started by root run as (each its own, linux/ids.py).
SANDBOX_IDS = range(DEFAULT_ID_RANGE[0], DEFAULT_ID_RANGE[0] + DEFAULT_ID_RANGE[1])

# ---------------------------------------------------------------------------
# ndf-sandbox CLI: run it (as root or as an unprivileged user), find processes
# ---------------------------------------------------------------------------

NDF_SANDBOX = str(Path(sys.executable).with_name("ndf-sandbox"))
UNPRIVILEGED_UID = 4242
UNPRIVILEGED_NAME = "ndftest"
CLI_TIMEOUT = 60.0  # generous: the machine is noisy


def _ensure_unprivileged_user() -> None:
    try:
        pwd.getpwuid(UNPRIVILEGED_UID)
        return
    except KeyError:
        pass
    if os.geteuid() == 0 and shutil.which("useradd"):
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", "-u", str(UNPRIVILEGED_UID), UNPRIVILEGED_NAME],
                       check=False, capture_output=True)
    # setpriv takes the numeric uid either way; the user entry only makes logs nicer.


@dataclass(frozen=True)
class SandboxCaller:
    """Who starts `ndf-sandbox`: root, or an unprivileged user through setpriv;
    `program` is the CLI (tests/spare_runner.py: the same, from a spare sandbox)."""

    name: str
    prefix: tuple[str, ...]
    uid: int
    program: tuple[str, ...] = (NDF_SANDBOX,)

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def payload_uid_ok(self, uid: int) -> bool:
        """Whether `uid` (seen from the host) is what a payload of this caller runs as:
        a sandbox id of its own (root), or the caller's own uid (a user namespace)."""
        return uid in SANDBOX_IDS if self.is_root else uid == self.uid

    def argv(self, options: Sequence[str], command: Sequence[str]) -> list[str]:
        """The full host command line for `ndf-sandbox run OPTIONS -- COMMAND`."""
        return [*self.prefix, *self.program, "run", *options, "--", *command]

    def run(self, options: Sequence[str], command: Sequence[str], *, input: bytes | None = None,
            env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT,
            **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        """Run `ndf-sandbox run OPTIONS -- COMMAND` to the end, capturing its output."""
        return subprocess.run(self.argv(options, command), input=input, capture_output=True,
                              env=env if env is not None else ndf_host_env(), cwd="/tmp",
                              timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]

    def popen(self, options: Sequence[str], command: Sequence[str],
              **kwargs: object) -> subprocess.Popen[bytes]:
        """Start `ndf-sandbox run OPTIONS -- COMMAND` without waiting."""
        kwargs.setdefault("env", ndf_host_env())
        kwargs.setdefault("cwd", "/tmp")
        return subprocess.Popen(self.argv(options, command), **kwargs)  # type: ignore[call-overload]


ROOT_CALLER = SandboxCaller("root", (), 0)
# As root, the sandbox started from a spare made ahead (as a zygote does when idle).
ROOT_SPARE_CALLER = SandboxCaller("root, from a spare", (), 0,
                                  (sys.executable, str(Path(__file__).with_name("spare_runner.py"))))
UNPRIVILEGED_CALLER = SandboxCaller(
    "unprivileged",
    ("setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_UID}", "--clear-groups", "--"),
    UNPRIVILEGED_UID,
)


def ndf_host_env(**extra: str) -> dict[str, str]:
    """A small host environment for the CLI (no pytest variables), plus `extra`."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


@pytest.fixture(params=["root", "unprivileged", "root-spare"])
def sandbox_caller(request: pytest.FixtureRequest) -> SandboxCaller:
    """Runs each test three times: `ndf-sandbox` started by root, by uid 4242, and by
    root with the sandbox started from a spare."""
    if os.geteuid() != 0:
        pytest.skip("the CLI tests start the sandbox as root and as uid 4242: run them as root")
    if request.param == "root":
        return ROOT_CALLER
    if request.param == "root-spare":
        return ROOT_SPARE_CALLER
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    _ensure_unprivileged_user()
    return UNPRIVILEGED_CALLER


@pytest.fixture
def root_caller() -> SandboxCaller:
    """`ndf-sandbox` started by root only."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return ROOT_CALLER


def unique_marker() -> str:
    """A `sleep` argument nobody else uses: 1000.<random digits> seconds."""
    return f"1000.{secrets.randbelow(10**9):09d}"


def processes_with_argument(argument: str, program: str | None = "sleep") -> list[psutil.Process]:
    """Every live (non-zombie) host process whose command line contains `argument`
    and, unless `program` is None, whose argv[0] has that base name."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if (argument in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and (program is None or os.path.basename(cmdline[0]) == program)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; return its last truth."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def kill_processes_with_argument(argument: str) -> None:
    """Cleanup: SIGKILL the processes this test started (found by their unique marker)."""
    for proc in processes_with_argument(argument, program=None):
        with contextlib.suppress(psutil.Error):
            proc.kill()


@pytest.fixture
def sleep_marker() -> Iterator[str]:
    """A unique `sleep` duration; any process still carrying it is killed at teardown."""
    marker = unique_marker()
    yield marker
    kill_processes_with_argument(marker)


@pytest.fixture
def sentinel_process() -> Iterator[subprocess.Popen[bytes]]:
    """A host `sleep` the sandbox must not be able to see or signal."""
    proc = subprocess.Popen(["sleep", unique_marker()], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def shared_host_dir() -> Iterator[Path]:
    """A host directory under /tmp that every uid may read and write (so an
    unprivileged caller could reach it if the sandbox leaked the host /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="ndf-host-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# Host-side network listeners a sandbox must (or, with --net, may) reach
# ---------------------------------------------------------------------------

@pytest.fixture
def loopback_listener() -> Iterator[socket.socket]:
    """A non-blocking TCP listener on 127.0.0.1:<random port> in the host's netns."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def abstract_unix_listener() -> Iterator[tuple[socket.socket, str]]:
    """A non-blocking listener on an abstract unix socket; yields (socket, name without NUL)."""
    name = f"ndf-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + name)
    sock.listen(8)
    sock.setblocking(False)
    yield sock, name
    sock.close()


def accepted_connections(listener: socket.socket, grace: float = 1.0) -> int:
    """Drain `listener` with non-blocking accept() for `grace` seconds; return how many came."""
    count = 0
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            time.sleep(0.02)
            continue
        conn.close()
        count += 1
    return count


# ---------------------------------------------------------------------------
# cgroups left behind by an ndf-sandbox the test SIGKILLed
# ---------------------------------------------------------------------------

def cgroups_of(owner_pid: int) -> list[str]:
    """Sandbox cgroup directories named after the manager `owner_pid` (ndf-<pid>-*)."""
    prefix = f"ndf-{owner_pid}-"
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        for name in list(dirs):
            if name.startswith("ndf-"):
                dirs.remove(name)  # never descend into sandbox cgroups
                if name.startswith(prefix):
                    found.append(os.path.join(top, name))
        if top.count("/") >= 7:
            dirs.clear()
    return found


def remove_cgroups_of(owner_pid: int) -> None:
    """Cleanup: remove the (empty) cgroups a SIGKILLed ndf-sandbox `owner_pid` left."""
    remove_cgroup_dirs(cgroups_of(owner_pid))


def remove_cgroup_dirs(paths: Iterable[str], timeout: float = 10) -> list[str]:
    """Cleanup: remove each cgroup of `paths` and the cgroups below it, deepest first,
    waiting up to `timeout` seconds each for the processes in it to be gone (a cgroup
    directory can only be removed empty). Returns the paths still there."""
    return [path for path in paths if not wait_until(functools.partial(_remove_cgroup_tree, path), timeout=timeout)]


def _remove_cgroup_tree(path: str) -> bool:
    try:
        for top, dirs, _ in os.walk(path, topdown=False):
            for name in dirs:
                os.rmdir(os.path.join(top, name))
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------
# cgroup I/O tests (v1 on the host, v2 in the guest VM)
# ---------------------------------------------------------------------------

@pytest.fixture
def io_target() -> Iterator[tuple[str, str, int]]:
    """(path, "MAJ:MIN" of its whole disk, offset) for O_DIRECT writes.

    NDF_TEST_RAW_DISK=/dev/vdX names a scratch disk the test may overwrite (the guest
    VM); otherwise a temp file on the disk under NDF_TEST_IO_DIR or /var/tmp.
    """
    raw = os.environ.get("NDF_TEST_RAW_DISK")
    if raw:
        dev = _cgroup_helpers.whole_disk_of(raw)
        assert dev, f"{raw} is not a block device"
        yield raw, dev, 0
        return
    base = tempfile.mkdtemp(prefix="ndf-io-", dir=os.environ.get("NDF_TEST_IO_DIR", "/var/tmp"))
    try:
        dev = _cgroup_helpers.whole_disk_of(base)
        if dev is None:
            pytest.skip(f"{base} is not on a block device (set NDF_TEST_RAW_DISK)")
        yield os.path.join(base, "data"), dev, 0
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------------------
# Audit log: every event any test produces is validated against the schema
# ---------------------------------------------------------------------------

class AuditEventCheck(logging.Handler):
    """Keeps every audit event emitted in this process, and the schema errors of
    those that do not validate against the package's audit.schema.json."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        from neural_doc_flow_security.sandbox import audit

        with open(audit.schema_path()) as f:
            schema = json.load(f)
        try:
            import jsonschema
        except ImportError:  # a venv set up before it joined the test extra: test_audit.py fails on it
            self.validator: Any = None
            warnings.warn("jsonschema is not installed (pip install '.[test]'): audit events are not "
                          "validated against audit.schema.json", stacklevel=2)
        else:
            jsonschema.Draft202012Validator.check_schema(schema)
            self.validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        self.events: list[dict[str, object]] = []
        self.keep = False  # keep the events (a test asked for them): a leak test makes thousands
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "audit_event", None)
        if event is None:
            self.errors.append(f"an audit record that is not an event: {record.getMessage()!r}")
            return
        if json.loads(record.getMessage()) != event:
            self.errors.append(f"the record's JSON line differs from its event: {record.getMessage()!r}")
        for error in self.validator.iter_errors(event) if self.validator is not None else ():
            self.errors.append(f"{event.get('event')}: {error.message} at {list(error.absolute_path)}: {event}")
        if self.keep:
            self.events.append(event)


_AUDIT_CHECK: list[AuditEventCheck] = []


@pytest.fixture(autouse=True)
def _audit_schema_check() -> Iterator[AuditEventCheck]:
    """Every audit event a test produces in this process must validate against the
    schema (else the test errors). Events are kept only for `audit_events`."""
    from neural_doc_flow_security.sandbox.audit import LOGGER_NAME

    if not _AUDIT_CHECK:
        _AUDIT_CHECK.append(AuditEventCheck())
        logger = logging.getLogger(LOGGER_NAME)
        logger.addHandler(_AUDIT_CHECK[0])
        logger.setLevel(logging.INFO)
    check = _AUDIT_CHECK[0]
    check.errors.clear()
    yield check
    check.keep = False
    check.events.clear()
    errors = list(check.errors)
    check.errors.clear()
    assert not errors, "audit events that do not match audit.schema.json:\n" + "\n".join(errors)


@pytest.fixture
def audit_events(_audit_schema_check: AuditEventCheck) -> list[dict[str, object]]:
    """The audit events this test produces in this process, in order (each validated)."""
    _audit_schema_check.keep = True
    return _audit_schema_check.events
