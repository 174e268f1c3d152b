"""Fixtures and helpers for the SandboxManager API suites (test_api*.py).

The `no_leaks` fixture (used by every API test) checks, after the test, the
host-side evidence that nothing outlived it:

- no process of ours is left: no child (or grandchild) of this test process,
  no zombie among them, no zygote started by this process and no process
  forked from such a zygote (their command line names the zygote module and
  ends with our pid), no process forked by the `fork` start method (same
  command line as this test process);
- no file descriptor leaked in this test process (/proc/self/fd);
- no sandbox cgroup (ndf-<owner pid>-...) owned by this process or by a zygote
  it started, in any hierarchy (the v1 controllers under /sys/fs/cgroup/* and
  the memory hierarchy below our own memory cgroup);
- every temporary directory the test made with `host_dir` is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from conftest import remove_cgroup_dirs, wait_until  # noqa: F401 - also re-exported to the API test modules
from neural_doc_flow_security.sandbox.api import SandboxManager
from neural_doc_flow_security.sandbox.config import BindMount, FilesystemConfig, SandboxConfig
from neural_doc_flow_security.sandbox.launch import start_methods
from neural_doc_flow_security.sandbox.result import SandboxResult

T = TypeVar("T")

START_METHODS = ("zygote", "fork")
ZYGOTE_MODULE = "neural_doc_flow_security.sandbox.launch.zygote"
RUN_TIMEOUT = 180.0  # the whole asyncio.run of one test; generous: the machine is noisy
CGROUP_ROOT = "/sys/fs/cgroup"
TMP_PREFIX = "ndf-api-"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, namespaces)")
linux_only = pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox")


def run(coro: Coroutine[Any, Any, T], timeout: float = RUN_TIMEOUT) -> T:
    """asyncio.run with an overall (generous) timeout, so a hang fails instead of stalling."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def async_wait_until(predicate: Callable[[], object], timeout: float = 30.0,
                           interval: float = 0.05) -> bool:
    """wait_until for coroutines (does not block the event loop)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------

def alive(proc: psutil.Process) -> bool:
    """True while `proc` (the same process, not a recycled pid) runs and is not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree_of(pid: int) -> list[psutil.Process]:
    """`pid` and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def zygote_family(owner_pid: int) -> list[psutil.Process]:
    """Zygotes started by `owner_pid` and every process forked from them (same cmdline)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if ZYGOTE_MODULE in cmdline and cmdline[-1:] == [str(owner_pid)]:
            found.append(proc)
    return found


def forked_copies_of_self() -> list[psutil.Process]:
    """Processes other than us with our exact command line, started after us
    (sandboxes of the `fork` start method never exec)."""
    me = psutil.Process()
    cmdline, started = me.cmdline(), me.create_time()
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        if (proc.pid != me.pid and proc.info["cmdline"] == cmdline
                and (proc.info["create_time"] or 0) >= started):
            found.append(proc)
    return found


def our_leftover_processes(baseline_children: set[int]) -> list[str]:
    """Descriptions of every process this test left behind (empty when clean)."""
    me = psutil.Process()
    left: dict[int, str] = {}
    for child in me.children(recursive=True):
        if child.pid in baseline_children:
            continue
        with contextlib.suppress(psutil.Error):
            left[child.pid] = f"child {child.pid} {child.status()} {child.cmdline()[:6]}"
    for proc in zygote_family(me.pid) + forked_copies_of_self():
        with contextlib.suppress(psutil.Error):
            left.setdefault(proc.pid, f"sandbox-side {proc.pid} {proc.status()} ppid={proc.ppid()}")
    return sorted(left.values())


def kill_pids(pids: list[int] | set[int]) -> None:
    """Cleanup after a failure: SIGKILL exactly these pids (processes this test started)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# cgroups
# ---------------------------------------------------------------------------

def _own_memory_cgroup() -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return None


def cgroup_search_roots() -> list[str]:
    """Every cgroup hierarchy root, plus our own memory cgroup (the memory
    hierarchy's sandboxes live below it on this machine)."""
    roots = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(CGROUP_ROOT)):
            path = os.path.join(CGROUP_ROOT, name)
            if os.path.isdir(path) and not os.path.islink(path):
                roots.append(path)
    own = _own_memory_cgroup()
    if own and own != "/":
        roots.append(os.path.join(CGROUP_ROOT, "memory", own.lstrip("/")))
    return roots


def sandbox_cgroups(owner_pids: set[int] | None = None) -> list[str]:
    """ndf-* cgroup directories, optionally only those named after `owner_pids`
    (ndf-<owner pid>-...); searched a few levels deep, never inside ndf-* dirs."""
    found: set[str] = set()
    for root in cgroup_search_roots():
        base_depth = root.count("/")
        for top, dirs, _ in os.walk(root):
            for name in list(dirs):
                if name.startswith("ndf-"):
                    dirs.remove(name)
                    parts = name.split("-")
                    if owner_pids is None or (len(parts) > 1 and parts[1].isdigit()
                                              and int(parts[1]) in owner_pids):
                        found.add(os.path.join(top, name))
            if top.count("/") - base_depth >= 3:
                dirs.clear()
    return sorted(found)


# ---------------------------------------------------------------------------
# the leak check and temp dirs
# ---------------------------------------------------------------------------

class LeakTracker:
    """Records the zygotes started during a test and the temp dirs it made."""

    def __init__(self) -> None:
        self.zygote_pids: set[int] = set()
        self.temp_dirs: list[Path] = []

    def owners(self) -> set[int]:
        return {os.getpid()} | self.zygote_pids


def _fd_table() -> dict[int, str]:
    table = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return table


@pytest.fixture
def no_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[LeakTracker]:
    """After the test: no process, zombie, fd, cgroup or temp dir of ours is left."""
    tracker = LeakTracker()
    original_start = start_methods.ZygoteStarter.start

    async def recording_start(self: start_methods.ZygoteStarter) -> None:
        await original_start(self)
        pids = getattr(self, "pids", None)  # several zygotes (one per CPU) since b08540a
        tracker.zygote_pids.update(pids if pids is not None else [self.pid] if self.pid else [])

    monkeypatch.setattr(start_methods.ZygoteStarter, "start", recording_start)
    original_zygote_start = start_methods._Zygote.start

    def recording_zygote_start(self: start_methods._Zygote) -> None:  # replacements too
        original_zygote_start(self)
        if self.process is not None:
            tracker.zygote_pids.add(self.process.pid)

    monkeypatch.setattr(start_methods._Zygote, "start", recording_zygote_start)
    baseline_children = {p.pid for p in psutil.Process().children(recursive=True)}
    fds_before = _fd_table()
    yield tracker

    problems = []
    leftovers: list[str] = []
    if not wait_until(lambda: not our_leftover_processes(baseline_children), timeout=30):
        leftovers = our_leftover_processes(baseline_children)
        problems.append(f"processes left: {leftovers}")
        for proc in psutil.Process().children(recursive=True):
            if proc.pid not in baseline_children:
                kill_pids([proc.pid])
        kill_pids({p.pid for p in zygote_family(os.getpid()) + forked_copies_of_self()})
        for proc in psutil.Process().children():
            if proc.pid not in baseline_children:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, 0)
    fds_after = _fd_table()
    leaked = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    if leaked:
        problems.append(f"file descriptors leaked: {leaked}")
    cgroups_left: list[str] = []
    if not wait_until(lambda: not sandbox_cgroups(tracker.owners()), timeout=15):
        cgroups_left = sandbox_cgroups(tracker.owners())
        problems.append(f"cgroups left: {cgroups_left}")
        remove_cgroup_dirs(cgroups_left)
    for path in tracker.temp_dirs:
        shutil.rmtree(path, ignore_errors=True)
    left_dirs = [p for p in tracker.temp_dirs if p.exists()]
    if left_dirs:
        problems.append(f"temp dirs left: {left_dirs}")
    assert not problems, "; ".join(problems)


def make_host_dir(tracker: LeakTracker, mode: int = 0o777) -> Path:
    """A host temp dir (writable by the sandbox's uid 65534 when mode allows),
    removed by the no_leaks fixture."""
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    path.chmod(mode)
    tracker.temp_dirs.append(path)
    return path


def rw_bind_config(directory: Path, **changes: Any) -> SandboxConfig:
    """The default config plus a read-write bind of `directory` at the same path."""
    return SandboxConfig(filesystem=FilesystemConfig(binds=(BindMount(str(directory), read_only=False),)),
                         **changes)


def proc_status_fields(text: str) -> dict[str, str]:
    """Parse /proc/<pid>/status text into {field: value}."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


# --- shared by the API test modules -------------------------------------------------

@pytest.fixture(params=START_METHODS)
def method(request: pytest.FixtureRequest) -> str:
    """Every API test runs once per start method."""
    return str(request.param)


def manager(method: str, **kwargs: Any) -> SandboxManager:
    """A SandboxManager for tests: the given start method, fast status samples."""
    kwargs.setdefault("status_interval", 0.2)
    return SandboxManager(start_method=method, **kwargs)  # type: ignore[arg-type]


def describe(result: SandboxResult) -> str:
    """A result, shortened, for assertion messages."""
    return (f"outcome={result.outcome.value} output={result.output!r:.200} error={result.error!r:.2000} "
            f"stdout={result.stdout[-500:]!r} stderr={result.stderr[-2000:]!r}")

