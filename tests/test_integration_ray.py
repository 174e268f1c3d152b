"""Ray integration: a real local Ray instance (ray.init(num_cpus=2)); remote
functions decorated with @sandboxed run each call in a fresh sandbox inside the
Ray worker process.

Isolation is judged on the host: the sandboxed call's namespaces against its Ray
worker's, read from the host's /proc; a loopback listener, a marker file and a
sentinel process that the same function, unsandboxed, does reach.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import cluster_tasks
from api_helpers import ZYGOTE_MODULE, sandbox_cgroups
from cluster_tasks import eat_memory, fail, hostile, probe, sleep_for, word_count
from conftest import accepted_connections, unique_marker, wait_until
from neural_doc_flow_security.sandbox import OutcomeError, SandboxConfig, SandboxExecutor, SandboxResult

ray = pytest.importorskip("ray")

from neural_doc_flow_security.sandbox.integrations.ray import process_executor, sandboxed  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cluster tests run as root (cgroup limits)")

MEMORY_LIMIT_MB = 128
TIMEOUT_SECONDS = 4.0
CONFIG = SandboxConfig(memory_limit_mb=MEMORY_LIMIT_MB, timeout_seconds=TIMEOUT_SECONDS)
WAIT = 120.0  # generous: the machine is noisy


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # The workers cannot import the tests' modules: their functions travel by value.
    modules = (cluster_tasks, sys.modules[__name__])
    for module in modules:
        ray.cloudpickle.register_pickle_by_value(module)
    session_dir = tempfile.mkdtemp(prefix="ndf-ray-")  # Ray's logs and sockets, removed afterwards
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=session_dir)
    try:
        yield
    finally:
        ray.shutdown()
        for module in modules:
            ray.cloudpickle.unregister_pickle_by_value(module)
        shutil.rmtree(session_dir, ignore_errors=True)


def _probe_here_and_sandboxed(marker: str) -> dict[str, Any]:
    return {"worker_pid": os.getpid(), "plain": probe(marker), "sandboxed": sandboxed(probe, config=CONFIG)(marker)}


def _hostile_both(port: int, marker: str, sentinel_pid: int, sandbox: bool) -> list[str]:
    return sandboxed(hostile, config=CONFIG)(port, marker, sentinel_pid) if sandbox else hostile(
        port, marker, sentinel_pid)


@pytest.fixture
def host_marker() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="ndf-ray-host-")
    yield os.path.join(directory, "MARKER")
    subprocess.run(["rm", "-rf", directory], check=False)


def test_sandboxed_calls_run_isolated_in_the_ray_worker(ray_local: None, host_marker: str) -> None:
    Path(host_marker).write_text("host only\n")
    seen = ray.get(ray.remote(_probe_here_and_sandboxed).remote(host_marker), timeout=WAIT)
    pid_ns = os.readlink(f"/proc/{seen['worker_pid']}/ns/pid")
    net_ns = os.readlink(f"/proc/{seen['worker_pid']}/ns/net")
    inside, plain = seen["sandboxed"], seen["plain"]
    assert inside["pid_ns"] != pid_ns and inside["net_ns"] != net_ns, inside
    assert inside["interfaces"] == ["lo"] and int(inside["cap_eff"], 16) == 0
    assert inside["sees_marker"] is False
    assert (plain["pid_ns"], plain["net_ns"]) == (pid_ns, net_ns)
    assert plain["sees_marker"] is True and int(plain["cap_eff"], 16) != 0


def test_decorated_remote_function_is_contained_on_the_host(ray_local: None, host_marker: str) -> None:
    remote = ray.remote(_hostile_both)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sentinel = subprocess.Popen(["sleep", unique_marker()], start_new_session=True)
        try:
            assert ray.get(remote.remote(port, host_marker, sentinel.pid, True), timeout=WAIT) == []
            assert accepted_connections(listener) == 0
            assert not os.path.lexists(host_marker)
            assert sentinel.poll() is None, "the sentinel was signalled"
            assert ray.get(remote.remote(port, host_marker, sentinel.pid, False), timeout=WAIT) == [
                "connected", "wrote", "signalled"]
            assert accepted_connections(listener) == 1 and os.path.exists(host_marker)
            assert sentinel.wait(timeout=WAIT) == -signal.SIGTERM
        finally:
            if sentinel.poll() is None:
                sentinel.kill()
            sentinel.wait(timeout=WAIT)


def _outcome_error(ref: Any) -> OutcomeError:
    with pytest.raises(OutcomeError) as caught:  # Ray's RayTaskError(OutcomeError) is one
        ray.get(ref, timeout=WAIT)
    return caught.value


def test_exception_oom_and_timeout_arrive_as_outcome_errors(ray_local: None) -> None:
    refs = [ray.remote(sandboxed(fail, config=CONFIG)).options(max_retries=0).remote("bad document"),
            ray.remote(sandboxed(eat_memory, config=CONFIG)).options(max_retries=0).remote(4 * MEMORY_LIMIT_MB),
            ray.remote(sandboxed(sleep_for, config=CONFIG)).options(max_retries=0).remote(60.0)]
    raised, oom, slow = (_outcome_error(ref) for ref in refs)
    assert raised.outcome == "error" and raised.error_type == "ValueError"
    assert oom.outcome == "oom" and oom.result is not None
    assert 0 < oom.result.resource_usage.memory_peak_bytes <= MEMORY_LIMIT_MB << 20
    assert slow.outcome == "timeout" and slow.result is not None
    assert slow.result.resource_usage.wall_seconds >= TIMEOUT_SECONDS - 0.5


def test_return_result_gives_the_usage(ray_local: None) -> None:
    remote = ray.remote(sandboxed(word_count, config=CONFIG, return_result=True))
    result = ray.get(remote.remote("three little words"), timeout=WAIT)
    assert isinstance(result, SandboxResult) and result.ok and result.output == 3
    assert result.resource_usage.memory_peak_bytes > 0 and result.isolation.namespaces


def _executors_used(_: int) -> tuple[int, int]:
    first = sandboxed(word_count, config=CONFIG)("a b")
    second = sandboxed(word_count)("c d e")
    return os.getpid(), id(process_executor()) if first + second == 5 else 0


def test_one_executor_per_worker_process(ray_local: None) -> None:
    seen = ray.get([ray.remote(_executors_used).remote(i) for i in range(4)], timeout=WAIT)
    by_pid: dict[int, set[int]] = {}
    for pid, executor in seen:
        by_pid.setdefault(pid, set()).add(executor)
    assert all(len(executors) == 1 and 0 not in executors for executors in by_pid.values()), by_pid


def test_fork_start_method_is_refused() -> None:
    with pytest.raises(ValueError, match="start_method: 'fork' forks the Ray worker"):
        sandboxed(word_count, start_method="fork")  # type: ignore[call-overload]


def _sandbox_processes() -> list[psutil.Process]:
    """Our descendants in a pid namespace of their own: the sandboxes (their init and payload)."""
    own = os.readlink("/proc/self/ns/pid")
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/pid") != own:
                found.append(proc)
        except OSError:
            continue
    return found


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_shutdown_leaves_no_sandbox_processes_or_cgroups(ray_local: None) -> None:
    """Runs last: stops Ray while sandboxes run in its workers."""
    long_config = CONFIG.replace(timeout_seconds=WAIT)
    sleepers = [ray.remote(sandboxed(sleep_for, config=long_config)).remote(WAIT / 2) for _ in range(2)]
    assert wait_until(lambda: len(_sandbox_processes()) >= 2, timeout=WAIT)
    family = psutil.Process().children(recursive=True)  # Ray's processes, the zygotes, the sandboxes
    owners = {p.pid for p in family}
    sandboxes = _sandbox_processes()
    zygotes = [p for p in family if ZYGOTE_MODULE in _cmdline(p)]
    assert zygotes and sandbox_cgroups(owners)
    ray.shutdown()
    assert len(sleepers) == 2
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sandboxes),
                      timeout=WAIT), sandboxes
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in zygotes),
                      timeout=WAIT), zygotes
    # Ray SIGKILLs a worker's children when the worker exits (RAY_kill_child_processes_on_worker_exit),
    # so the zygotes cannot remove their cgroups; the next manager on the host does, at its start.
    SandboxExecutor().shutdown()
    assert not sandbox_cgroups(owners)
