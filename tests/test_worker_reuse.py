"""Sandboxed workers that serve many calls (WorkerPool, max_tasks_per_child): issue #16.

Host-side evidence throughout: which process served a call is read on the host
(the worker's init pid from manager.list_sandboxes(), its pid namespace inode
from /proc/<pid>/ns/pid), never taken from what the sandbox says; a worker that
must be gone is checked with psutil; the no_leaks fixture checks that no
process, fd or cgroup outlives each test.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Hashable
from typing import Any

import psutil
import pytest

import api_helpers
from api_helpers import linux_only, needs_root, run
from neural_doc_flow_security.sandbox import Outcome, SandboxConfig, SandboxError, SandboxResult
from neural_doc_flow_security.sandbox.api import SandboxManager
from neural_doc_flow_security.sandbox.executor import SandboxExecutor

no_leaks = api_helpers.no_leaks

pytestmark = [linux_only, needs_root, pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(300)]


# --- the calls ---------------------------------------------------------------------------

def echo_slowly(value: int, token: str) -> tuple[int, str, int]:
    time.sleep(random.random() / 200)
    return value, token, value * value


def ok(value: int = 0) -> int:
    return value


def fail(message: str) -> None:
    raise ValueError(message)


def die_by_signal() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def break_protocol() -> int:
    os.write(3, b"\xfe not a record")  # raw bytes on the channel, then a valid result
    return 1


def burn_cpu(seconds: float) -> float:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


def fork_sleepers(count: int) -> int:
    """Start up to `count` children that sleep (they outlive the call); how many started."""
    started = 0
    for _ in range(count):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        started += 1
    return started


def hog_memory(megabytes: int) -> int:
    block = b"x" * (megabytes << 20)  # every page written: counted by the cgroup
    return len(block)


def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def write_tmp(name: str) -> None:
    with open(f"/tmp/{name}", "w") as marker:
        marker.write("left by an earlier call")


def tmp_has(name: str) -> bool:
    return os.path.exists(f"/tmp/{name}")


# --- host-side evidence -------------------------------------------------------------------

class Workers:
    """What the host sees of the worker that served each call."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self.pid: dict[int, int] = {}  # worker id -> its init's host pid
        self.process: dict[int, tuple[int, float]] = {}  # worker id -> (pid, start time): pids are recycled
        self.pid_ns: dict[int, int] = {}  # worker id -> inode of its pid namespace (recycled once freed)

    def record(self, result: SandboxResult) -> SandboxResult:
        """Note the worker of a call that has just returned (it must still be alive)."""
        worker_id = result.isolation.worker_id
        assert worker_id is not None, f"not run by a worker: {api_helpers.describe(result)}"
        if worker_id not in self.pid:
            [pid] = [s.pid for s in self.manager.list_sandboxes() if s.sandbox_id == worker_id]
            self.pid[worker_id] = pid
            self.process[worker_id] = (pid, psutil.Process(pid).create_time())
            self.pid_ns[worker_id] = os.stat(f"/proc/{pid}/ns/pid").st_ino
        return result


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- the tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", api_helpers.START_METHODS)
def test_results_match_inputs_under_concurrency(method: str) -> None:
    async def main() -> None:
        async with api_helpers.manager(method) as manager, \
                manager.worker_pool(max_workers=2, max_tasks_per_child=None) as pool:
            tokens = [f"call-{i}-{random.randrange(10**9)}" for i in range(120)]
            results = await asyncio.gather(*(pool.execute_sandboxed("echo", echo_slowly, i, token)
                                             for i, token in enumerate(tokens)))
            assert [r.output for r in results] == [(i, t, i * i) for i, t in enumerate(tokens)], \
                [api_helpers.describe(r) for r in results if not r.ok]
            workers = {r.isolation.worker_id for r in results}
            assert len(workers) <= 2
            served = sorted(r.isolation.worker_call for r in results)
            assert served[-1] > 1, "no worker served a second call"
            for worker_id in workers:  # each worker numbered its calls 1, 2, 3... without a gap
                calls = sorted(r.isolation.worker_call for r in results if r.isolation.worker_id == worker_id)
                assert calls == list(range(1, len(calls) + 1))
    run(main())


def test_worker_is_replaced_after_max_tasks_per_child_calls() -> None:
    async def main() -> None:
        async with SandboxManager() as manager, manager.worker_pool(max_workers=1, max_tasks_per_child=3) as pool:
            seen = Workers(manager)
            results = []
            for i in range(7):
                result = await pool.execute_sandboxed("ok", ok, i)
                assert result.output == i
                if result.isolation.worker_call < 3:  # its last call ends it
                    seen.record(result)
                results.append(result)
            assert [r.isolation.worker_call for r in results] == [1, 2, 3, 1, 2, 3, 1]
            ids = [r.isolation.worker_id for r in results]
            assert ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5] != ids[6]
            assert len({seen.process[i] for i in set(ids)}) == 3
            first_pid = seen.pid[ids[0]]
            assert api_helpers.wait_until(lambda: gone(first_pid)), "a worker outlived its last call"
    run(main())


@pytest.mark.parametrize(("call", "args", "outcome"), [
    (fail, ("bad document",), Outcome.ERROR),
    (die_by_signal, (), Outcome.KILLED),
    (break_protocol, (), Outcome.PROTOCOL_VIOLATION),
], ids=["raised", "signal", "protocol_violation"])
def test_worker_is_replaced_after_a_call_that_did_not_end_ok(call: Any, args: tuple[Any, ...],
                                                            outcome: Outcome) -> None:
    async def main() -> None:
        async with SandboxManager() as manager, manager.worker_pool(max_workers=1, max_tasks_per_child=None) as pool:
            seen = Workers(manager)
            first = seen.record(await pool.execute_sandboxed("p", ok, 1))
            failed = await pool.execute_sandboxed("p", call, *args)
            assert failed.outcome is outcome, api_helpers.describe(failed)
            assert failed.isolation.worker_id == first.isolation.worker_id
            assert failed.isolation.worker_call == 2
            after = seen.record(await pool.execute_sandboxed("p", ok, 3))
            assert after.ok and after.isolation.worker_call == 1
            assert after.isolation.worker_id != first.isolation.worker_id
            old_pid = seen.pid[first.isolation.worker_id]
            assert seen.pid[after.isolation.worker_id] != old_pid
            assert api_helpers.wait_until(lambda: gone(old_pid)), "the worker of a failed call lives on"
    run(main())


@pytest.mark.parametrize("max_workers", [1, 4])
def test_two_reuse_keys_never_share_a_worker(max_workers: int) -> None:
    async def main() -> None:
        async with SandboxManager() as manager, \
                manager.worker_pool(max_workers=max_workers, max_tasks_per_child=None) as pool:
            seen = Workers(manager)
            keys: dict[int, set[tuple[str, Hashable]]] = {}
            for round_ in range(6):
                for plugin_id, tenant in (("parse", "tenant-a"), ("parse", "tenant-b"), ("parse", None),
                                          ("ocr", "tenant-a")):
                    calls: Any = pool if tenant is None else pool.with_reuse_key(tenant)
                    result = seen.record(await calls.execute_sandboxed(plugin_id, ok, round_))
                    assert result.ok, api_helpers.describe(result)
                    keys.setdefault(result.isolation.worker_id, set()).add((plugin_id, tenant))
            assert all(len(k) == 1 for k in keys.values()), f"a worker served several keys: {keys}"
            by_key: dict[tuple[str, Hashable], set[int]] = {}
            for worker_id, [key] in ((w, list(k)) for w, k in keys.items()):
                by_key.setdefault(key, set()).add(worker_id)
            processes = {key: {seen.process[w] for w in ws} for key, ws in by_key.items()}
            for a in by_key:
                for b in by_key:
                    if a != b:
                        assert not processes[a] & processes[b], (a, b, processes)
            if max_workers == 4:
                # Room for one worker per key: each served all 6 calls of its key, and the four
                # (alive together: their namespace inodes cannot have been recycled) differ.
                assert all(len(ws) == 1 for ws in by_key.values()), by_key
                assert len({seen.pid_ns[w] for w in keys}) == 4
            else:  # one worker at a time: each call of another key ended the previous worker
                assert len(keys) == 24
    run(main())


def test_oom_on_a_reused_worker_is_reported_and_the_next_call_gets_a_fresh_worker() -> None:
    config = SandboxConfig(memory_limit_mb=96)

    async def main() -> None:
        async with SandboxManager() as manager, \
                manager.worker_pool(max_workers=1, max_tasks_per_child=None, sandbox_config=config) as pool:
            seen = Workers(manager)
            results = []
            for call in range(1, 11):
                result = await pool.execute_sandboxed("img", hog_memory if call == 7 else ok,
                                                      512 if call == 7 else call)
                if result.ok:
                    seen.record(result)
                results.append(result)
            oom = results[6]
            assert oom.outcome is Outcome.OOM, api_helpers.describe(oom)
            assert oom.isolation.worker_call == 7
            assert [r.outcome for r in results[:6] + results[7:]] == [Outcome.OK] * 9
            assert [r.isolation.worker_call for r in results] == [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
            old, new = results[5].isolation.worker_id, results[7].isolation.worker_id
            assert oom.isolation.worker_id == old != new
            assert seen.process[old] != seen.process[new]
            assert gone(seen.pid[old])
            assert results[7].resource_usage.memory_peak_bytes < 96 << 20
    run(main())


def test_a_call_that_times_out_kills_its_worker() -> None:
    config = SandboxConfig(timeout_seconds=2.0)

    async def main() -> None:
        async with SandboxManager() as manager, \
                manager.worker_pool(max_workers=1, max_tasks_per_child=None, sandbox_config=config) as pool:
            seen = Workers(manager)
            first = seen.record(await pool.execute_sandboxed("p", ok, 1))
            late = await pool.execute_sandboxed("p", sleep_for, 600)
            assert late.outcome is Outcome.TIMEOUT, api_helpers.describe(late)
            assert late.isolation.worker_id == first.isolation.worker_id
            assert gone(seen.pid[first.isolation.worker_id])
            after = seen.record(await pool.execute_sandboxed("p", ok, 3))
            assert after.ok and after.isolation.worker_id != first.isolation.worker_id
    run(main())


@pytest.mark.parametrize("reset_tmp", [True, False])
def test_reset_tmp_empties_the_workers_tmp_between_calls(reset_tmp: bool) -> None:
    async def main() -> None:
        async with SandboxManager() as manager, \
                manager.worker_pool(max_workers=1, max_tasks_per_child=None, reset_tmp=reset_tmp) as pool:
            wrote = await pool.execute_sandboxed("p", write_tmp, "marker")
            looked = await pool.execute_sandboxed("p", tmp_has, "marker")
            assert wrote.ok and looked.ok, api_helpers.describe(looked)
            assert looked.isolation.worker_id == wrote.isolation.worker_id  # the same worker, a later call
            assert looked.isolation.worker_call == 2
            assert looked.output is (not reset_tmp)
    run(main())


def test_closing_the_pool_and_the_manager_leaves_nothing() -> None:
    async def main() -> None:
        async with SandboxManager() as manager:
            seen = Workers(manager)
            pool = manager.worker_pool(max_workers=3, max_tasks_per_child=None)
            for tenant in ("a", "b", "c"):
                seen.record(await pool.with_reuse_key(tenant).execute_sandboxed("p", ok, 1))
            assert len(manager.list_sandboxes()) == 3
            await pool.close()
            assert manager.list_sandboxes() == []
            assert all(gone(pid) for pid in seen.pid.values())
            with pytest.raises(SandboxError, match="closed"):
                await pool.execute_sandboxed("p", ok, 1)
            # A pool left open is closed by the manager's shutdown.
            manager.worker_pool(max_workers=1, max_tasks_per_child=None)
            other = manager.worker_pool(max_workers=1, max_tasks_per_child=5)
            seen.record(await other.execute_sandboxed("p", ok, 1))
        assert all(gone(pid) for pid in seen.pid.values())
    run(main())  # no_leaks: no process, fd or cgroup left


def test_execute_command_cannot_reuse_a_sandbox() -> None:
    async def main() -> None:
        async with SandboxManager() as manager, manager.worker_pool(max_tasks_per_child=10) as pool:
            with pytest.raises(SandboxError, match="execute_command cannot reuse a sandbox"):
                await pool.execute_command("t", ["/bin/true"])
    run(main())


def test_max_tasks_per_child_one_is_a_fresh_sandbox_per_call() -> None:
    async def main() -> None:
        async with SandboxManager() as manager, manager.worker_pool(max_workers=2) as pool:
            results = [await pool.execute_sandboxed("p", ok, i) for i in range(3)]
            assert [r.output for r in results] == [0, 1, 2]
            assert all(r.isolation.worker_id is None and r.isolation.worker_call == 0 for r in results)
    run(main())


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "3"])
def test_max_tasks_per_child_is_checked(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        SandboxExecutor(max_tasks_per_child=bad)


def test_executor_with_reused_workers() -> None:
    with SandboxExecutor(max_workers=2, max_tasks_per_child=4) as executor:
        futures = [executor.submit(echo_slowly, i, "t") for i in range(20)]
        assert [f.result(timeout=120) for f in futures] == [(i, "t", i * i) for i in range(20)]
        tenant = executor.with_reuse_key("tenant-a")
        results = [tenant.submit_for_result(ok, i).result(timeout=120) for i in range(5)]
        assert [r.output for r in results] == list(range(5))
        assert [r.isolation.worker_call for r in results] == [1, 2, 3, 4, 1]
        assert len({r.isolation.worker_id for r in results}) == 2
        with pytest.raises(ValueError, match="boom"):
            executor.submit(fail, "boom").result(timeout=120)


def test_usage_is_the_workers_cgroup_counters_over_the_call() -> None:
    async def main() -> None:
        async with SandboxManager() as manager, manager.worker_pool(max_workers=1, max_tasks_per_child=None) as pool:
            busy = await pool.execute_sandboxed("p", burn_cpu, 0.5)
            idle = await pool.execute_sandboxed("p", ok, 1)
            assert busy.ok and idle.ok and idle.isolation.worker_call == 2
            busy_cpu = busy.resource_usage.cpu_user_seconds + busy.resource_usage.cpu_system_seconds
            idle_cpu = idle.resource_usage.cpu_user_seconds + idle.resource_usage.cpu_system_seconds
            assert busy_cpu >= 0.4, busy.resource_usage  # the kernel's count for the worker's cgroup
            assert idle_cpu < 0.25, idle.resource_usage  # the increase over this call only
            assert busy.to_dict()["isolation"]["worker_call"] == 1
    run(main())


def test_the_process_limit_holds_across_the_calls_of_a_reused_worker() -> None:
    config = SandboxConfig(max_processes=8)

    async def main() -> None:
        async with SandboxManager() as manager, \
                manager.worker_pool(max_workers=1, max_tasks_per_child=None, sandbox_config=config) as pool:
            seen = Workers(manager)
            first = seen.record(await pool.execute_sandboxed("p", fork_sleepers, 5))
            second = seen.record(await pool.execute_sandboxed("p", fork_sleepers, 20))
            assert first.ok and second.ok, api_helpers.describe(second)
            assert second.isolation.worker_id == first.isolation.worker_id  # the first call's sleepers live on
            assert first.output == 5 and first.output + second.output < 8
            tree = psutil.Process(seen.pid[first.isolation.worker_id]).children(recursive=True)
            assert len(tree) <= 8, tree  # the worker's init is not in its cgroup's count; its payload is
            assert second.resource_usage.processes_peak <= 8
    run(main())


def test_a_workers_audit_events_say_which_call_it_served(tmp_path: Any) -> None:
    """The audit log's JSON lines of a reused worker carry `worker_call`, as its results do
    (0 at its start); a sandbox used once has none."""
    import json

    import jsonschema

    from neural_doc_flow_security.sandbox import audit

    log = tmp_path / "audit.jsonl"

    async def main() -> tuple[SandboxResult, SandboxResult, SandboxResult]:
        async with SandboxManager(audit_log=str(log)) as manager:
            async with manager.worker_pool(max_workers=1, max_tasks_per_child=2) as pool:
                first = await pool.execute_sandboxed("w", ok, 1)
                second = await pool.execute_sandboxed("w", ok, 2)  # its last: the worker ends
                failed = await pool.execute_sandboxed("w", fail, "bad document")  # ends the next one
            single = await manager.execute_sandboxed("single", ok, 3)
            assert first.ok and second.ok and single.ok and failed.outcome is Outcome.ERROR
            return first, failed, single

    first, failed, single = run(main())
    with open(audit.schema_path()) as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    for event in events:
        validator.validate(event)
    worker_a, worker_b = first.isolation.worker_id, failed.isolation.worker_id
    assert worker_a != worker_b and failed.isolation.worker_call == 1

    def calls(sandbox_id: int | None, kind: str) -> list[int | None]:
        return [e.get("worker_call") for e in events if e.get("sandbox_id") == sandbox_id and e["event"] == kind]

    assert calls(worker_a, "sandbox_start") == [0] and calls(worker_a, "sandbox_end") == [2]
    assert calls(worker_b, "sandbox_start") == [0]
    assert calls(worker_b, "kill") == [1] and calls(worker_b, "sandbox_end") == [1]
    workers = [e for e in events if e.get("plugin_id") == "w"]
    assert workers and all(isinstance(e.get("worker_call"), int) for e in workers), workers
    [single_id] = {e["sandbox_id"] for e in events if e.get("plugin_id") == "single"}
    assert calls(single_id, "sandbox_start") == [None] and calls(single_id, "sandbox_end") == [None]
