"""Dask integration: a real LocalCluster (two worker processes, TCP on 127.0.0.1)
with the SandboxPlugin registered; annotated tasks run each in a fresh sandbox.

Isolation is judged on the host: the sandboxed task's pid and network namespaces
against the worker's, read from the host's /proc; a loopback listener that must
get no connection; a marker file that must not appear; a sentinel process that
must stay alive. The same task without the annotation does each of those, so the
checks would see a sandbox that was not there.
"""

from __future__ import annotations

import contextlib
import os
import pickle
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

from api_helpers import sandbox_cgroups
from cluster_tasks import (
    eat_memory,
    fail,
    hostile,
    killed_the_first_time,
    pid_namespace,
    probe,
    sleep_for,
    word_count,
    write_marker_async,
)
from conftest import accepted_connections, unique_marker, wait_until
from neural_doc_flow_security.sandbox import BindMount, FilesystemConfig, OutcomeError, SandboxConfig, SandboxResult

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
from dask.distributed import Client, LocalCluster  # noqa: E402

from neural_doc_flow_security.sandbox.integrations.dask import SandboxPlugin, sandbox_task, task_usage  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cluster tests run as root (cgroup limits)")

MEMORY_LIMIT_MB = 128
TIMEOUT_SECONDS = 4.0
WAIT = 120.0  # generous: the machine is noisy


# -- the cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dir() -> Iterator[str]:
    """A host dir bound writable into every sandbox (the retried task's memory)."""
    path = tempfile.mkdtemp(prefix="ndf-dask-state-")
    os.chmod(path, 0o777)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


@pytest.fixture(scope="module")
def cluster(state_dir: str) -> Iterator[tuple[LocalCluster, Client]]:
    config = SandboxConfig(memory_limit_mb=MEMORY_LIMIT_MB, timeout_seconds=TIMEOUT_SECONDS,
                           filesystem=FilesystemConfig(binds=(BindMount(state_dir, read_only=False),)))
    scratch = tempfile.mkdtemp(prefix="ndf-dask-scratch-")  # the cluster's scratch space, removed afterwards
    try:
        with dask.config.set({"temporary-directory": scratch}), \
                LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", protocol="tcp",
                             dashboard_address=None, worker_dashboard_address=None,
                             local_directory=scratch) as local, Client(local) as client:
            client.register_plugin(SandboxPlugin(config))
            yield local, client
    finally:
        subprocess.run(["rm", "-rf", scratch], check=False)


@pytest.fixture
def client(cluster: tuple[LocalCluster, Client]) -> Client:
    return cluster[1]


def worker_namespaces(client: Client) -> dict[str, tuple[str, str]]:
    """Each worker's (pid ns, net ns), read on the host from /proc/<worker pid>."""
    pids = client.run(os.getpid)
    return {address: (os.readlink(f"/proc/{pid}/ns/pid"), os.readlink(f"/proc/{pid}/ns/net"))
            for address, pid in pids.items()}


def run_on_each_worker(client: Client, function: Any, *args: Any, sandboxed: bool) -> dict[str, Any]:
    """function(*args) once on every worker, sandboxed or not; {worker address: value}."""
    futures = {}
    for address in client.scheduler_info()["workers"]:
        with dask.annotate(executor="sandbox" if sandboxed else "default"):
            futures[address] = client.submit(function, *args, workers=[address], pure=False)
    return {address: future.result(timeout=WAIT) for address, future in futures.items()}


@pytest.fixture
def host_marker() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="ndf-dask-host-")
    yield os.path.join(directory, "MARKER")
    subprocess.run(["rm", "-rf", directory], check=False)


# -- isolation -------------------------------------------------------------------


def test_annotated_tasks_run_isolated_and_others_do_not(client: Client, host_marker: str) -> None:
    Path(host_marker).write_text("host only\n")
    workers = worker_namespaces(client)
    sandboxed = run_on_each_worker(client, probe, host_marker, sandboxed=True)
    plain = run_on_each_worker(client, probe, host_marker, sandboxed=False)
    for address, (pid_ns, net_ns) in workers.items():
        seen = sandboxed[address]
        assert seen["pid_ns"] != pid_ns and seen["net_ns"] != net_ns, seen
        assert seen["interfaces"] == ["lo"], seen
        assert int(seen["cap_eff"], 16) == 0, seen
        assert seen["sees_marker"] is False
        assert plain[address]["pid_ns"] == pid_ns and plain[address]["net_ns"] == net_ns
        assert plain[address]["sees_marker"] is True
        assert int(plain[address]["cap_eff"], 16) != 0  # the worker runs as root


def test_hostile_task_is_contained_on_the_host(client: Client, host_marker: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sentinel = subprocess.Popen(["sleep", unique_marker()], start_new_session=True)
        try:
            with dask.annotate(executor="sandbox"):
                got_out = client.submit(hostile, port, host_marker, sentinel.pid, pure=False).result(timeout=WAIT)
            assert got_out == []
            assert accepted_connections(listener) == 0
            assert not os.path.lexists(host_marker)
            assert sentinel.poll() is None, "the sentinel was signalled"
            # the same task outside the sandbox: every check above would have seen it
            assert client.submit(hostile, port, host_marker, sentinel.pid, pure=False).result(timeout=WAIT) == [
                "connected", "wrote", "signalled"]
            assert accepted_connections(listener) == 1
            assert os.path.exists(host_marker)
            assert sentinel.wait(timeout=WAIT) == -signal.SIGTERM
        finally:
            if sentinel.poll() is None:
                sentinel.kill()
            sentinel.wait(timeout=WAIT)


def test_annotated_coroutine_task_is_refused_not_run_unsandboxed(client: Client, host_marker: str) -> None:
    with dask.annotate(executor="sandbox"):
        refused = client.submit(write_marker_async, host_marker, pure=False)
    with pytest.raises(RuntimeError, match="is a coroutine function"):
        refused.result(timeout=WAIT)
    assert not os.path.lexists(host_marker)
    assert client.submit(write_marker_async, host_marker, pure=False).result(timeout=WAIT) == "ran"
    assert os.path.exists(host_marker)  # unannotated, it runs on the worker: the check above would see that


# -- outcomes, retries, usage ----------------------------------------------------------


def _outcome_error(future: Any) -> OutcomeError:
    with pytest.raises(OutcomeError) as caught:
        future.result(timeout=WAIT)
    return caught.value


def test_exception_oom_and_timeout_arrive_as_outcome_errors(client: Client) -> None:
    with dask.annotate(executor="sandbox"):
        raised = client.submit(fail, "bad document", pure=False)
        oom = client.submit(eat_memory, 4 * MEMORY_LIMIT_MB, pure=False)
        slow = client.submit(sleep_for, 60.0, pure=False)
    error = _outcome_error(raised)
    assert error.outcome == "error" and error.error_type == "ValueError"
    assert error.result is not None and "bad document" in (error.result.error_message or "")
    error = _outcome_error(oom)
    assert error.outcome == "oom"
    assert error.result is not None
    assert 0 < error.result.resource_usage.memory_peak_bytes <= MEMORY_LIMIT_MB << 20
    error = _outcome_error(slow)
    assert error.outcome == "timeout"
    assert error.result is not None and error.result.resource_usage.wall_seconds >= TIMEOUT_SECONDS - 0.5


def test_retries_rerun_a_killed_task(client: Client, state_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(state_dir, "attempted"))
    with dask.annotate(executor="sandbox"):
        once = client.submit(killed_the_first_time, state_dir, pure=False)
    error = _outcome_error(once)
    assert error.outcome == "killed" and error.result is not None and error.result.signal == signal.SIGKILL
    os.unlink(os.path.join(state_dir, "attempted"))
    with dask.annotate(executor="sandbox"):
        retried = client.submit(killed_the_first_time, state_dir, retries=1, pure=False)
    assert retried.result(timeout=WAIT) == "second attempt"
    assert os.path.exists(os.path.join(state_dir, "attempted"))  # the first attempt ran, and was killed


def test_usage_of_every_task_is_kept_on_its_worker(client: Client) -> None:
    with dask.annotate(executor="sandbox"):
        futures = client.map(word_count, ["one two", "three four five"], pure=False)
    assert client.gather(futures) == [2, 3]
    usage = task_usage(client)
    for future in futures:
        assert usage[future.key].wall_seconds > 0
        assert usage[future.key].memory_peak_bytes > 0


def test_delayed_and_bag_run_one_sandbox_per_task(client: Client) -> None:
    import dask.bag as db

    worker_pid_ns = {pid_ns for pid_ns, _ in worker_namespaces(client).values()}
    with dask.annotate(executor="sandbox"):
        first = dask.delayed(word_count)("a b c")
        total = dask.delayed(sum)([first, dask.delayed(word_count)("d e")])
        assert total.compute() == 5
        namespaces = db.from_sequence(range(6), npartitions=3).map_partitions(
            lambda part: [pid_namespace(part)]).compute()
    assert len(namespaces) == 3
    assert len(set(namespaces)) == 3, "one sandbox per partition"
    assert not set(namespaces) & worker_pid_ns


def test_sandbox_task_has_its_own_config_and_returns_the_result(client: Client) -> None:
    roomy = SandboxConfig(memory_limit_mb=4 * MEMORY_LIMIT_MB, timeout_seconds=30)
    with dask.annotate(executor="sandbox"):
        result = client.submit(sandbox_task(eat_memory, config=roomy, return_result=True), 2 * MEMORY_LIMIT_MB,
                               pure=False).result(timeout=WAIT)
        oom = client.submit(sandbox_task(eat_memory, return_result=True), 2 * MEMORY_LIMIT_MB,
                            pure=False).result(timeout=WAIT)
        nested = dask.delayed(sandbox_task(sum, config=roomy))([dask.delayed(word_count)("a b"), 1]).compute()
    assert isinstance(result, SandboxResult) and result.ok and result.output == 2 * MEMORY_LIMIT_MB
    assert result.resource_usage.memory_peak_bytes > MEMORY_LIMIT_MB << 20  # above the plugin's limit
    assert isinstance(oom, SandboxResult) and oom.outcome == "oom"  # the plugin's limit, as a value
    assert nested == 3


def test_sandbox_task_refuses_to_run_unsandboxed(client: Client) -> None:
    with pytest.raises(RuntimeError, match="is a sandbox task: run it on a sandbox executor"):
        client.submit(sandbox_task(word_count), "not sandboxed", pure=False).result(timeout=WAIT)


# -- the cluster's life ---------------------------------------------------------------


def test_worker_joining_later_gets_the_executor(cluster: tuple[LocalCluster, Client], host_marker: str) -> None:
    local, client = cluster
    before = set(client.scheduler_info()["workers"])
    local.scale(3)
    try:
        client.wait_for_workers(3, timeout=WAIT)
        (joined,) = set(client.scheduler_info()["workers"]) - before
        with dask.annotate(executor="sandbox"):
            seen = client.submit(probe, host_marker, workers=[joined], pure=False).result(timeout=WAIT)
        worker_pid = client.run(os.getpid, workers=[joined])[joined]
        assert seen["pid_ns"] != os.readlink(f"/proc/{worker_pid}/ns/pid")
        assert seen["interfaces"] == ["lo"]
    finally:
        local.scale(2)
        assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=WAIT)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_worker_restart_leaves_no_sandbox_processes_or_cgroups(client: Client) -> None:
    """Runs last: it restarts the workers (the plugin is set up again on the new ones)."""
    with dask.annotate(executor="sandbox"):
        sleepers = [client.submit(sleep_for, 3.0, pure=False, workers=[address])
                    for address in client.scheduler_info()["workers"]]
    assert len(sleepers) == 2  # held: a released future's task would be cancelled
    worker_pids = set(client.run(os.getpid).values())
    assert wait_until(lambda: len(sandbox_cgroups({p.pid for w in worker_pids for p in _descendants(w)})) >= 2,
                      timeout=WAIT), "the sleeping tasks' sandboxes have cgroups"
    family = [p for pid in worker_pids for p in _descendants(pid)]
    owners = worker_pids | {p.pid for p in family}
    assert sandbox_cgroups(owners)
    client.restart(timeout=WAIT)
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family),
                      timeout=WAIT), [p for p in family if p.is_running()]
    assert wait_until(lambda: not sandbox_cgroups(owners), timeout=WAIT), sandbox_cgroups(owners)
    # the new workers have the executor again
    with dask.annotate(executor="sandbox"):
        assert client.submit(word_count, "after the restart", pure=False).result(timeout=WAIT) == 3


# -- without a cluster ------------------------------------------------------------------


def test_outcome_error_survives_pickling_with_its_result() -> None:
    from distributed.core import error_message
    from distributed.protocol import pickle as dask_pickle

    from neural_doc_flow_security.sandbox import ResourceUsage, SandboxResult
    from neural_doc_flow_security.sandbox.result import Outcome

    result = SandboxResult(Outcome.OOM, signal=9, error="out of memory",
                           resource_usage=ResourceUsage(wall_seconds=1.5, memory_peak_bytes=123 << 20))
    with pytest.raises(OutcomeError) as caught:
        result.raise_for_outcome()
    for copy in (pickle.loads(pickle.dumps(caught.value)),
                 dask_pickle.loads(error_message(caught.value)["exception"].data)):
        assert isinstance(copy, OutcomeError)
        assert copy.outcome == "oom" and str(copy) == str(caught.value)
        assert copy.result == result and copy.result.resource_usage.memory_peak_bytes == 123 << 20


def test_fork_start_method_is_refused() -> None:
    with pytest.raises(ValueError, match="start_method: 'fork' forks the Dask worker"):
        SandboxPlugin(start_method="fork")
    with pytest.raises(TypeError, match="unknown executor option"):
        SandboxPlugin(sandbox_config=SandboxConfig())


def test_the_core_never_imports_dask_or_ray() -> None:
    code = ("import sys\n"
            "from neural_doc_flow_security.sandbox import SandboxExecutor\n"
            "with SandboxExecutor() as executor:\n"
            "    assert executor.submit(sum, [1, 2]).result() == 3\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'ray')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True,
                         cwd="/")
    assert out.stdout.strip() == "[]", out.stdout
