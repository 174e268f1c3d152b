"""The warm pool (`SandboxManager(pool_size=N)`): a pooled call returns the
plugin's output with usage read from the kernel, every pooled sandbox is used
once, the wall timeout runs from the call (not while the sandbox waits in the
pool), and cancelling a pooled call kills its sandbox.

Every test runs under both start methods and ends with the `no_leaks` check.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import api_helpers
from api_helpers import alive, linux_only, needs_root, run, tree_of
from neural_doc_flow_security.sandbox.api import Health, SandboxManager
from neural_doc_flow_security.sandbox.config import SandboxConfig
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

no_leaks = api_helpers.no_leaks  # the fixtures, used by every test below
method = api_helpers.method
manager = api_helpers.manager
describe = api_helpers.describe

pytestmark = [linux_only, needs_root, pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(300)]


def pooled_ids(m: SandboxManager) -> set[int]:
    """The sandboxes waiting in the pool (they run under the plugin id "pool")."""
    return {s.sandbox_id for s in m.list_sandboxes() if s.plugin_id == "pool" and s.health is Health.RUNNING}


def test_pooled_call_returns_output_and_the_kernels_usage(method: str) -> None:
    def allocate() -> int:
        kept = bytearray(b"\x01") * (48 << 20)
        return len(kept)

    async def scenario() -> list[tuple[SandboxResult, set[int], set[int]]]:
        async with manager(method, pool_size=2) as m:
            calls = []
            for _ in range(3):
                await m.wait_pool_ready()
                before = pooled_ids(m)
                result = await m.execute_sandboxed("alloc", allocate)
                calls.append((result, before, pooled_ids(m)))
            return calls

    for result, before, after in run(scenario()):
        assert len(before) == 2, "the pool was not full"
        assert len(before - after) == 1, "the call did not take a sandbox from the pool"
        assert result.outcome is Outcome.OK, describe(result)
        assert result.output == 48 << 20
        usage = result.resource_usage
        assert usage.memory_peak_bytes >= 48 << 20  # the cgroup's counter, not a figure the plugin sent
        assert usage.processes_peak >= 1
        assert 0 < usage.wall_seconds < 30
        assert "memory" in result.isolation.cgroup


def test_a_pooled_sandbox_is_used_once(method: str) -> None:
    def leave_a_mark() -> bool:
        import os

        seen = os.path.exists("/tmp/mark")
        with open("/tmp/mark", "w") as f:
            f.write("an earlier call was here")
        return seen

    async def scenario() -> tuple[list[SandboxResult], list[set[int]]]:
        async with manager(method, pool_size=1) as m:
            results, pools = [], []
            for _ in range(3):
                await m.wait_pool_ready()
                pools.append(pooled_ids(m))
                results.append(await m.execute_sandboxed("mark", leave_a_mark))
            return results, pools

    results, pools = run(scenario())
    for result in results:
        assert result.outcome is Outcome.OK, describe(result)
        assert result.output is False, "a sandbox saw what an earlier call left"
    assert all(len(p) == 1 for p in pools)
    assert len(set.union(*pools)) == 3, f"a pooled sandbox served two calls: {pools}"


def test_pooled_call_is_bound_by_the_wall_timeout(method: str) -> None:
    def sleep_long() -> None:
        import time

        time.sleep(60)

    async def scenario() -> tuple[SandboxResult, float, set[int]]:
        async with manager(method, config=SandboxConfig(timeout_seconds=1), pool_size=1) as m:
            await m.wait_pool_ready()
            waiting = pooled_ids(m)
            await asyncio.sleep(1.5)  # longer than the timeout: no wall clock runs in the pool
            assert pooled_ids(m) == waiting, "the pooled sandbox did not survive its wait"
            started = time.monotonic()
            result = await m.execute_sandboxed("sleepy", sleep_long)
            return result, time.monotonic() - started, waiting

    result, took, _ = run(scenario())
    assert result.outcome is Outcome.TIMEOUT, describe(result)
    assert 0.9 < took < 10


def test_cancelling_a_pooled_call_kills_its_sandbox(method: str) -> None:
    def spin() -> None:
        while True:
            pass

    async def scenario() -> list[int]:
        async with manager(method, pool_size=1) as m:
            await m.wait_pool_ready()
            (sandbox,) = [s for s in m.list_sandboxes() if s.plugin_id == "pool"]
            tree = tree_of(sandbox.pid)
            task = asyncio.create_task(m.execute_sandboxed("spin", spin))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return [p.pid for p in tree if alive(p)]

    assert run(scenario()) == [], "processes of the cancelled pooled sandbox are alive"


def test_back_to_back_pooled_calls_never_lose_their_result(method: str) -> None:
    # A pooled sandbox taken before its heartbeat had been read once lost its
    # answer: the channel reader stopped at the heartbeat after answer() had
    # already decided not to read (issue 23 item 15; 5 of 30 runs).
    async def scenario() -> list[SandboxResult]:
        async with manager(method, pool_size=2) as m:
            return [await m.execute_sandboxed("quick", int, n) for n in range(200)]

    results = run(scenario())
    lost = [(n, describe(r)) for n, r in enumerate(results) if r.outcome is not Outcome.OK or r.output != n]
    assert lost == [], f"{len(lost)} of 200 pooled calls lost their result: {lost[:3]}"
