"""Live limits (SandboxHandle.update_limits): the host changes a running sandbox's
cgroup limits. Evidence is host-side: the cgroup's own control files, what the
plugin could allocate or fork after the change, the kernel's OOM kill, and the
manager's audit events. The v2 behaviour runs in the cgroup-v2 guest
(`pytest -m cgroup_v2`, tests/vm/run-cgroup-v2-tests.sh)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from api_helpers import describe, run
from neural_doc_flow_security.sandbox import IpcMessage, LimitUpdateError, PluginContext, SandboxConfig
from neural_doc_flow_security.sandbox.api import SandboxHandle, SandboxManager
from neural_doc_flow_security.sandbox.errors import ConfigError, ProtocolViolation
from neural_doc_flow_security.sandbox.ipc.messages import MessageKind
from neural_doc_flow_security.sandbox.linux.cgroups import probe_cgroups
from neural_doc_flow_security.sandbox.result import Outcome

MiB = 1 << 20
Event = dict[str, Any]


def _memory_version() -> str:
    if os.geteuid() != 0:
        return ""
    support = probe_cgroups().get("memory")
    return support.version if support is not None and support.usable else ""


needs_v1 = pytest.mark.skipif(_memory_version() != "v1", reason="needs root and a cgroup v1 memory controller")
needs_v2 = pytest.mark.skipif(_memory_version() != "v2", reason="needs root and a cgroup v2 memory controller")
needs_cgroup = pytest.mark.skipif(not _memory_version(), reason="needs root and a usable cgroup memory controller")


def control_file(handle: SandboxHandle, v1: tuple[str, str], v2: str) -> str:
    """The path of one of the sandbox's cgroup control files, from its isolation report."""
    # The manager's view of the sandbox's cgroup, as its launcher reported it.
    description = handle._starter.isolation[handle.sandbox_id].cgroup
    if description.startswith("cgroup v1: "):
        dirs = dict(part.split("=", 1) for part in description[len("cgroup v1: "):].split(", "))
        return os.path.join(dirs[v1[0]], v1[1])
    path = description[len("cgroup v2: "):].rsplit(" (", 1)[0]
    return os.path.join(path, v2)


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def memory_limit_file(handle: SandboxHandle) -> str:
    return control_file(handle, ("memory", "memory.limit_in_bytes"), "memory.max")


def pids_limit_file(handle: SandboxHandle) -> str:
    return control_file(handle, ("pids", "pids.max"), "pids.max")


def allocate_when_told(ctx: PluginContext, size: int) -> int:
    ctx.send(b"ready")
    if ctx.receive(timeout=120) is None:
        return -1
    block = bytearray(size)
    for i in range(0, size, 4096):
        block[i] = 1
    return len(block)


def hold_memory(ctx: PluginContext, size: int) -> int:
    block = bytearray(size)
    for i in range(0, size, 4096):
        block[i] = 1
    ctx.send(b"holding")
    ctx.wait_for_stop(120)
    return len(block)


def fork_when_told(ctx: PluginContext, count: int) -> list[int]:
    import signal

    ctx.send(b"ready")
    if ctx.receive(timeout=120) is None:
        return []
    children, refused = [], 0
    for _ in range(count):
        try:
            pid = os.fork()
        except OSError:
            refused += 1
            continue
        if pid == 0:
            signal.pause()
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)  # its own children, in its own pid namespace
        os.waitpid(pid, 0)
    return [len(children), refused]


async def _started(m: SandboxManager, name: str, config: SandboxConfig, fn: Any, *args: Any) -> SandboxHandle:
    handle = await m.with_options(sandbox_config=config, context=True).spawn(name, fn, *args)
    message = await handle.receive(timeout=120)
    assert message is not None, describe(await handle.wait())
    return handle


def _raise_memory_then_allocate(audit_events: list[Event], start_method: str = "zygote") -> None:
    async def scenario() -> tuple[str, str, Any, Any]:
        async with SandboxManager(status_interval=None, start_method=start_method) as m:  # type: ignore[arg-type]
            config = SandboxConfig(memory_limit_mb=64, timeout_seconds=120)
            handle = await _started(m, "grows", config, allocate_when_told, 150 * MiB)
            before = read(memory_limit_file(handle))
            update = await handle.update_limits(memory_limit_mb=256)
            after = read(memory_limit_file(handle))
            await handle.send(IpcMessage.data(b"go"))
            return before, after, update, await asyncio.wait_for(handle.wait(), 120)

    before, after, update, result = run(scenario())
    assert int(before) == 64 * MiB and int(after) == 256 * MiB  # the kernel's own limit, read back
    assert dict(update.previous) == {"memory_limit_mb": 64} and dict(update.applied) == {"memory_limit_mb": 256}
    assert result.outcome is Outcome.OK and result.output == 150 * MiB, describe(result)  # over the old limit
    [event] = [e for e in audit_events if e["event"] == "limits_updated"]
    assert event["plugin_id"] == "grows" and event["applied"] == {"memory_limit_mb": 256}
    assert event["host_pid"] == os.getpid()


@needs_cgroup
@pytest.mark.parametrize("start_method", ["zygote", "fork"])
def test_a_raised_memory_limit_lets_the_plugin_allocate_more(audit_events: list[Event], start_method: str) -> None:
    _raise_memory_then_allocate(audit_events, start_method)


@pytest.mark.cgroup_v2
@needs_v2
def test_a_raised_memory_limit_lets_the_plugin_allocate_more_v2(audit_events: list[Event]) -> None:
    _raise_memory_then_allocate(audit_events)


@needs_v1
def test_v1_refuses_a_memory_limit_below_what_it_cannot_reclaim(audit_events: list[Event]) -> None:
    async def scenario() -> tuple[LimitUpdateError, str, Any, Any]:
        async with SandboxManager(status_interval=None) as m:
            config = SandboxConfig(memory_limit_mb=256, timeout_seconds=120)
            handle = await _started(m, "holder", config, hold_memory, 100 * MiB)
            with pytest.raises(LimitUpdateError) as refused:
                await handle.update_limits(memory_limit_mb=32)
            limit = read(memory_limit_file(handle))
            status = await handle.status()
            return refused.value, limit, status, await asyncio.wait_for(handle.stop(), 120)

    error, limit, status, result = run(scenario())
    assert error.field == "memory_limit_mb" and "32" in str(error), error
    assert int(limit) == 256 * MiB  # unchanged
    assert status.health == "running" and status.usage["memory_current_bytes"] >= 100 * MiB
    assert result.outcome is Outcome.OK and result.output == 100 * MiB, describe(result)  # it kept running
    [event] = [e for e in audit_events if e["event"] == "limits_update_refused"]
    assert event["field"] == "memory_limit_mb" and event["changes"] == {"memory_limit_mb": 32}


@pytest.mark.cgroup_v2
@needs_v2
def test_v2_a_memory_limit_below_usage_ends_in_oom(audit_events: list[Event]) -> None:
    async def scenario() -> tuple[Any, str, Any]:
        async with SandboxManager(status_interval=None) as m:
            config = SandboxConfig(memory_limit_mb=256, timeout_seconds=120)
            handle = await _started(m, "holder", config, hold_memory, 100 * MiB)
            limit_file = memory_limit_file(handle)
            update = await handle.update_limits(memory_limit_mb=32)
            limit = read(limit_file) if os.path.exists(limit_file) else "gone"  # it may have ended already
            return update, limit, await asyncio.wait_for(handle.wait(), 120)

    update, limit, result = run(scenario())
    assert limit in ("gone", str(32 * MiB)) and update.oom_kills >= 1
    assert result.outcome is Outcome.OOM, describe(result)
    [event] = [e for e in audit_events if e["event"] == "limits_updated"]
    assert event["oom_kills"] >= 1
    assert [e["limit"] for e in audit_events if e["event"] == "limit_hit"] == ["memory"]


@needs_cgroup
def test_lowered_max_processes_refuses_forks_and_is_a_limit_hit(audit_events: list[Event]) -> None:
    async def scenario() -> tuple[str, str, Any]:
        async with SandboxManager(status_interval=None) as m:
            config = SandboxConfig(max_processes=64, timeout_seconds=120)
            handle = await _started(m, "forker", config, fork_when_told, 20)
            before = read(pids_limit_file(handle))
            await m.send_message("forker", IpcMessage.update_limits(max_processes=6))  # the seed's form
            after = read(pids_limit_file(handle))
            await handle.send(IpcMessage.data(b"go"))
            return before, after, await asyncio.wait_for(handle.wait(), 120)

    before, after, result = run(scenario())
    assert (before, after) == ("64", "6")
    assert result.outcome is Outcome.OK, describe(result)
    forked, refused = result.output
    assert forked < 6 and refused == 20 - forked
    assert result.resource_usage.pids_limit_hits >= refused
    [hit] = [e for e in audit_events if e["event"] == "limit_hit" and e["limit"] == "pids"]
    assert hit["plugin_id"] == "forker" and hit["count"] >= refused


@needs_cgroup
def test_live_limits_are_checked_like_the_config() -> None:
    async def scenario() -> list[BaseException]:
        async with SandboxManager(status_interval=None) as m:
            handle = await m.with_options(context=True).spawn("idle", lambda ctx: ctx.wait_for_stop(120))
            errors: list[BaseException] = []
            for bad in ({"memory_limit_mb": 0}, {"max_processes": "8"}, {"cpu_quota_percent": -5}, {}):
                try:
                    await handle.update_limits(**bad)
                except ConfigError as e:
                    errors.append(e)
            with pytest.raises(TypeError):
                await handle.update_limits(timeout_seconds=5)  # type: ignore[call-arg]
            await handle.stop()
            with pytest.raises(LimitUpdateError) as ended:
                await handle.update_limits(max_processes=8)
            errors.append(ended.value)
            return errors

    errors = run(scenario())
    fields = [getattr(e, "field", None) for e in errors]
    assert fields == ["memory_limit_mb", "max_processes", "cpu_quota_percent", "update_limits", "max_processes"]
    assert "got 0" in str(errors[0]) and "has ended" in str(errors[-1])


def test_update_limits_never_travels_on_a_channel() -> None:
    with pytest.raises(ValueError, match="never sent"):
        IpcMessage.update_limits(memory_limit_mb=128).to_wire(inline_limit=0)
    # Nor is it taken from one (a sandbox cannot send control messages at all; not even the host's side).
    with pytest.raises(ProtocolViolation, match="unknown control command"):
        IpcMessage.from_wire({"kind": "control", "control": "update_limits"}, accept=frozenset(MessageKind),
                             resolve_blob=lambda *_: b"")


def spin_when_told(ctx: PluginContext, cpu_seconds: float) -> float:
    import time

    ctx.send(b"ready")
    if ctx.receive(timeout=120) is None:
        return -1.0
    start = time.process_time()
    while time.process_time() - start < cpu_seconds:
        pass
    return time.process_time() - start


@needs_cgroup
def test_a_lowered_cpu_quota_is_written_and_throttles(audit_events: list[Event]) -> None:
    async def scenario() -> tuple[str, str, Any]:
        async with SandboxManager(status_interval=None) as m:
            config = SandboxConfig(cpu_quota_percent=80, timeout_seconds=120)
            handle = await _started(m, "spinner", config, spin_when_told, 0.3)
            quota = control_file(handle, ("cpu", "cpu.cfs_quota_us"), "cpu.max")
            before = read(quota)
            await handle.update_limits(cpu_quota_percent=10)
            after = read(quota)
            await handle.send(IpcMessage.data(b"go"))
            return before, after, await asyncio.wait_for(handle.wait(), 120)

    before, after, result = run(scenario())
    assert before.split()[0] == "80000" and after.split()[0] == "10000"  # of a 100 ms period
    assert result.outcome is Outcome.OK and result.output >= 0.3, describe(result)
    assert result.resource_usage.cpu_throttled_periods > 0 and result.resource_usage.cpu_throttled_seconds > 0
    [hit] = [e for e in audit_events if e["event"] == "limit_hit" and e["limit"] == "cpu"]
    assert hit["count"] == result.resource_usage.cpu_throttled_periods


@pytest.mark.cgroup_v2
@needs_v2
def test_a_lowered_max_processes_refuses_forks_v2(audit_events: list[Event]) -> None:
    test_lowered_max_processes_refuses_forks_and_is_a_limit_hit(audit_events)
