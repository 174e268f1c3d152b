"""`ndf-sandbox demo --cluster dask|ray`: the demo's pipeline spread over a local
cluster of two workers.

The same rows as `ndf-sandbox demo` (demo.build_pipeline: six good plugins, six
hostile ones, each with its own limits) run as tasks of a LocalCluster with two
worker processes talking TCP over 127.0.0.1 (Dask, through the SandboxPlugin;
rows assigned to the workers in turn) or of a local Ray instance with two CPUs
(through @sandboxed), every task in its own sandbox. The program row
(pdftotext) runs the program inside a Python task's sandbox. The verdicts are
the demo's own (demo.judge): the host checks the decoy secret, the marker file,
its loopback listener and the kernel's counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import demo_plugins as plugins
from .config import SandboxConfig
from .demo import (
    EXIT_FAILED,
    GOOD_CONFIG,
    HostEvidence,
    PluginRun,
    _everything_said,
    _evidence_lines,
    _plain_line,
    build_pipeline,
    host_evidence,
    judge,
    plan_runs,
    report_to_dict,
    verdict,
)
from .result import Outcome, SandboxResult

ENGINES = ("dask", "ray")
WORKERS = 2
TASK_WAIT_SECONDS = 120.0  # every row has its own, shorter, sandbox timeout: this only bounds a wedged cluster


@contextlib.contextmanager
def loopback_listener(evidence: HostEvidence) -> Iterator[None]:
    """A listener on 127.0.0.1 that counts what reaches it (in a thread: the cluster
    clients block)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    evidence.port = server.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            evidence.connections += 1
            with conn, contextlib.suppress(OSError):
                conn.settimeout(1.0)
                evidence.bytes_received += len(conn.recv(4096))

    thread = threading.Thread(target=accept, name="ndf-demo-listener", daemon=True)
    thread.start()
    try:
        yield
    finally:
        time.sleep(0.2)  # let it take anything already queued
        stop.set()
        thread.join()
        server.close()


def row_call(run: PluginRun) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The task of a row: its plugin function and arguments (a program row runs the
    program from a Python task, the document on its stdin)."""
    spec = run.spec
    if spec.command:
        return plugins.run_program, (list(spec.command), spec.args[0])
    assert spec.function is not None
    return spec.function, spec.args


def _as_row_result(run: PluginRun, result: SandboxResult) -> SandboxResult:
    """A program row's text is its stdout, as in the demo."""
    if run.spec.command and isinstance(result.output, bytes):
        return dataclasses.replace(result, stdout=result.output, output=None)
    return result


def _failed_to_run(error: BaseException) -> SandboxResult:
    return SandboxResult(outcome=Outcome.SANDBOX_ERROR, error=f"{type(error).__name__}: {error}")


def run_on_dask(runs: list[PluginRun]) -> dict[str, Any]:
    """Every row as a task of a two-worker LocalCluster; returns the cluster's facts."""
    import dask
    from dask.distributed import Client, LocalCluster

    from .integrations.dask import SandboxPlugin, sandbox_task

    active = [run for run in runs if run.status != "skipped"]
    placed: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="ndf-demo-dask-") as scratch, \
            dask.config.set({"temporary-directory": scratch}), \
            LocalCluster(n_workers=WORKERS, processes=True, threads_per_worker=max(1, len(active)),
                         host="127.0.0.1", protocol="tcp", dashboard_address=None, worker_dashboard_address=None,
                         local_directory=scratch, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.register_plugin(SandboxPlugin(GOOD_CONFIG))
        workers = sorted(client.scheduler_info()["workers"])
        futures = []
        with dask.annotate(executor="sandbox"):
            for index, run in enumerate(active):
                function, args = row_call(run)
                worker = workers[index % len(workers)]
                placed[id(run)] = worker
                run.status = "running"
                futures.append((run, client.submit(sandbox_task(function, config=run.config, return_result=True),
                                                   *args, workers=[worker], pure=False)))
        for run, future in futures:
            try:
                run.result = _as_row_result(run, future.result(timeout=TASK_WAIT_SECONDS))
            except Exception as error:  # noqa: BLE001 - a task that could not run is the row's result
                run.result = _failed_to_run(error)
    return {"engine": "dask", "workers": workers, "placement": placed}


def _ray_row(function: Callable[..., Any], config: SandboxConfig | None, args: tuple[Any, ...]
             ) -> tuple[int, SandboxResult]:
    """One row in a Ray worker: (the worker's pid, the SandboxResult)."""
    from .integrations.ray import sandboxed

    return os.getpid(), sandboxed(function, config=config, return_result=True)(*args)


def run_on_ray(runs: list[PluginRun]) -> dict[str, Any]:
    """Every row as a task of a local Ray instance with two CPUs; returns the cluster's facts."""
    import ray

    from .linux.cgroups import remove_stale_cgroups

    active = [run for run in runs if run.status != "skipped"]
    placed: dict[int, str] = {}
    session_dir = tempfile.mkdtemp(prefix="ndf-demo-ray-")  # Ray's logs and sockets, removed afterwards
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             _temp_dir=session_dir)
    try:
        remote = ray.remote(_ray_row)
        refs = []
        for run in active:
            function, args = row_call(run)
            run.status = "running"
            refs.append((run, remote.remote(function, run.config, args)))
        for run, ref in refs:
            try:
                pid, result = ray.get(ref, timeout=TASK_WAIT_SECONDS)
            except Exception as error:  # noqa: BLE001 - a task that could not run is the row's result
                run.result = _failed_to_run(error)
                continue
            placed[id(run)] = f"pid {pid}"
            run.result = _as_row_result(run, result)
    finally:
        ray.shutdown()
        # Ray SIGKILLs its workers' children (the zygotes): their sandboxes' empty cgroups stay behind.
        with contextlib.suppress(Exception):
            remove_stale_cgroups()
        shutil.rmtree(session_dir, ignore_errors=True)
    return {"engine": "ray", "workers": sorted(set(placed.values())), "placement": placed}


def run_cluster_pipeline(engine: str) -> tuple[list[PluginRun], dict[str, Any], dict[str, Any]]:
    """Run every row on the cluster; returns the judged rows, the host's evidence and the cluster's facts."""
    with host_evidence() as evidence, loopback_listener(evidence):
        runs = plan_runs(build_pipeline(evidence))
        cluster = run_on_dask(runs) if engine == "dask" else run_on_ray(runs)
        for run in runs:
            judge(run, evidence)
        report = evidence.to_dict()
        report["secret"]["leaked"] = any(evidence.secret in _everything_said(r.result)
                                         for r in runs if r.result is not None)
    for run in runs:  # with every host observation in (the listener has stopped)
        judge(run, evidence)
    report["listener"] = evidence.to_dict()["listener"]
    report["marker"]["exists_after_cleanup"] = os.path.lexists(evidence.marker_path)
    return runs, report, cluster


def run_cluster_demo(engine: str, json_output: bool = False) -> int:
    """`ndf-sandbox demo --cluster ENGINE`: print the rows (or the JSON report with
    `json_output`, which adds `cluster` and each row's `worker`); the exit status
    is the demo's."""
    if engine not in ENGINES:
        raise ValueError(f"--cluster: must be one of {', '.join(ENGINES)}, got {engine!r}")
    try:
        __import__("distributed" if engine == "dask" else "ray")
    except ImportError:
        message = f"--cluster {engine} needs the {engine} extra: pip install 'neural-doc-flow-security[{engine}]'"
        if json_output:
            print(json.dumps({"ok": False, "exit_status": EXIT_FAILED, "reason": message}))
        else:
            print(f"ndf-sandbox demo: {message}")
        return EXIT_FAILED
    started = time.monotonic()
    if not json_output:
        print(f"ndf-sandbox demo --cluster {engine}: the pipeline over a local cluster of {WORKERS} workers, "
              "every task in its own sandbox", flush=True)
    runs, evidence, cluster = run_cluster_pipeline(engine)
    status, reason = verdict(runs, evidence)
    seconds = time.monotonic() - started
    placement = cluster.pop("placement")
    if json_output:
        report = report_to_dict(runs, evidence, status, reason, seconds)
        report["cluster"] = cluster
        for run, row in zip(runs, report["plugins"], strict=True):
            row["worker"] = placement.get(id(run))
        print(json.dumps(report, indent=2))
        return status
    for run in runs:
        print(_plain_line(run))
        if id(run) in placement:
            print(f"       worker: {placement[id(run)]}")
    for line in _evidence_lines(runs, evidence):
        print(line)
    label = {0: "PASS", EXIT_FAILED: "FAIL"}.get(status, "INCOMPLETE")
    print(f"{label}: {reason} ({seconds:.1f} s, {len(cluster['workers'])} workers)")
    return status
