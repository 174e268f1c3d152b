"""spawn() handles and IPC: data both ways (inline and memfd), progress, logs,
status samples, pause/resume with CPU-time evidence, stop escalation, and
plugins that break the protocol (flooding, garbage on fd 3).

Every test runs under both start methods and ends with the `no_leaks` check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from typing import Any

import pytest

import api_helpers
from api_helpers import (
    alive,
    linux_only,
    needs_root,
    run,
    tree_of,
)
from neural_doc_flow_security.sandbox import PluginContext
from neural_doc_flow_security.sandbox.api import Health, SandboxHandle
from neural_doc_flow_security.sandbox.config import SandboxConfig
from neural_doc_flow_security.sandbox.errors import SandboxError
from neural_doc_flow_security.sandbox.ipc.limits import DecodeLimits
from neural_doc_flow_security.sandbox.ipc.messages import ControlMessage, IpcMessage, MessageKind
from neural_doc_flow_security.sandbox.result import Outcome, ResourceUsage, SandboxResult

no_leaks = api_helpers.no_leaks  # the fixtures, used by every test below
method = api_helpers.method
manager = api_helpers.manager
describe = api_helpers.describe

pytestmark = [linux_only, needs_root, pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(300)]


async def next_of_kind(handle: SandboxHandle, kind: MessageKind, timeout: float = 60.0) -> IpcMessage:
    """The next message of `kind` (others are skipped); fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await handle.receive(timeout=max(0.1, deadline - time.monotonic()))
        if message is None:
            if handle.health is Health.EXITED:
                break
            continue
        if message.kind is kind:
            return message
    raise AssertionError(f"no {kind.value} message arrived (health {handle.health.value})")


# --- plugins (each takes ctx) ------------------------------------------------------

def echo_plugin(ctx: PluginContext) -> str:
    """Answers every data message: tag 'reverse' -> reversed bytes, else a sha256 digest."""
    import hashlib

    while True:
        message = ctx.receive()
        if message is None:  # the host is gone or asked us to stop
            return "host went away"
        data = bytes(message.content)
        if message.tag == "end":
            return "done"
        if message.tag == "reverse":
            ctx.send(data[::-1], tag="reversed")
        else:
            ctx.send(hashlib.sha256(data).digest(), tag="sha256")


def busy_until_stopped(ctx: PluginContext) -> int:
    loops = 0
    while not ctx.stop_requested:
        for _ in range(20_000):
            loops += 1
    return loops


# --- data, progress, logs ------------------------------------------------------------

def test_data_messages_both_ways(method: str) -> None:
    async def scenario() -> tuple[list[IpcMessage], SandboxResult]:
        async with manager(method) as m:
            handle = await m.spawn("echo", echo_plugin)
            await handle.send(IpcMessage.data(b"abc", tag="reverse"))
            first = await next_of_kind(handle, MessageKind.DATA)
            await m.send_message("echo", IpcMessage.data(b"hello", tag="hash"))
            second = await next_of_kind(handle, MessageKind.DATA)
            await handle.send(IpcMessage.data(b"", tag="end"))
            return [first, second], await handle.wait()

    (first, second), result = run(scenario())
    assert (first.tag, bytes(first.content)) == ("reversed", b"cba")
    assert (second.tag, bytes(second.content)) == ("sha256", hashlib.sha256(b"hello").digest())
    assert result.outcome is Outcome.OK and result.output == "done", describe(result)


def test_5_mb_payload_each_way_goes_by_memfd(method: str) -> None:
    payload = os.urandom(5 * 1024 * 1024)

    async def scenario() -> tuple[IpcMessage, IpcMessage, SandboxResult]:
        async with manager(method) as m:
            handle = await m.spawn("echo", echo_plugin)
            await handle.send(IpcMessage.data(payload, tag="reverse"))
            back = await next_of_kind(handle, MessageKind.DATA)
            await handle.send(IpcMessage.data(payload, tag="hash"))
            digest = await next_of_kind(handle, MessageKind.DATA)
            await handle.send(IpcMessage.data(b"", tag="end"))
            return back, digest, await handle.wait()

    back, digest, result = run(scenario())
    assert back.tag == "reversed"
    assert len(back.content) == len(payload)
    assert bytes(back.content) == payload[::-1]
    assert bytes(digest.content) == hashlib.sha256(payload).digest()
    assert result.outcome is Outcome.OK, describe(result)


def test_progress_and_log_messages_arrive(method: str) -> None:
    def reporter(ctx: PluginContext) -> str:
        ctx.report_progress(0.25, "quarter")
        ctx.log("halfway there", "warning")
        ctx.report_progress(1.0, "done")
        return "reported"

    async def scenario() -> tuple[list[IpcMessage], SandboxResult]:
        async with manager(method, status_interval=None) as m:
            handle = await m.spawn("reporter", reporter)
            result = await handle.wait()
            messages = []
            while (message := await handle.receive(timeout=1)) is not None:
                messages.append(message)
            return messages, result

    messages, result = run(scenario())
    assert result.outcome is Outcome.OK and result.output == "reported", describe(result)
    progress = [(m.fraction, m.note) for m in messages if m.kind is MessageKind.PROGRESS]
    logs = [(m.level, m.text) for m in messages if m.kind is MessageKind.LOG]
    assert progress == [(0.25, "quarter"), (1.0, "done")]
    assert logs == [("warning", "halfway there")]


def test_status_messages_carry_health_heartbeat_and_usage(method: str) -> None:
    async def scenario() -> tuple[IpcMessage, IpcMessage, list[Any], SandboxResult]:
        async with manager(method, status_interval=0.2) as m:
            handle = await m.spawn("busy", busy_until_stopped)
            sampled = await handle.next_status(timeout=60)
            assert sampled is not None, "no status sample arrived"
            direct = await handle.status()
            listed = m.list_sandboxes()
            result = await handle.stop()
            return sampled, direct, listed, result

    sampled, direct, listed, result = run(scenario())
    for status in (sampled, direct):
        assert status.health == "running"
        assert status.heartbeat_age >= 0
        # One vocabulary: the names of ResourceUsage, plus the live values.
        assert {f.name for f in dataclasses.fields(ResourceUsage)} <= set(status.usage)
        assert {"memory_current_bytes", "processes_current", "frozen"} <= set(status.usage)
        assert status.usage["memory_current_bytes"] > 0 and status.usage["processes_current"] >= 1
        assert status.usage["frozen"] == 0.0
        with pytest.warns(DeprecationWarning, match="cpu_seconds"):
            assert status.usage["cpu_seconds"] == (status.usage["cpu_user_seconds"]
                                                   + status.usage["cpu_system_seconds"])
    assert [(i.plugin_id, i.health, i.kind) for i in listed] == [("busy", Health.RUNNING, "callable")]
    assert listed[0].pid > 0
    assert result.outcome is Outcome.OK, describe(result)


def sends_then_spins(ctx: PluginContext) -> int:
    for i in range(3):
        ctx.send(b"chunk %d" % i, tag="data")
    return busy_until_stopped(ctx)


def test_status_samples_are_apart_from_data_and_never_stale_after_resume(method: str) -> None:
    """Samples have their own latest-value slot: receive() yields only what the plugin
    sent, and a sample taken while paused is not delivered once resumed."""
    async def drain(handle: SandboxHandle) -> list[IpcMessage]:
        received = []
        while (message := await handle.receive(timeout=1.0)) is not None:
            received.append(message)
        return received

    async def scenario() -> tuple[list[IpcMessage], IpcMessage | None, list[IpcMessage],
                                  IpcMessage | None, SandboxResult]:
        async with manager(method, status_interval=0.05) as m:
            handle = await m.spawn("busy", sends_then_spins)
            before = await drain(handle)
            await handle.pause()
            while_paused = await handle.next_status(timeout=60)
            await asyncio.sleep(0.5)  # more samples are taken while it is paused
            await handle.resume()
            after = await drain(handle)
            after_resume = await handle.next_status(timeout=60)
            return before, while_paused, after, after_resume, await handle.stop()

    before, while_paused, after, after_resume, result = run(scenario())
    assert [(m.kind, bytes(m.content)) for m in before] == [
        (MessageKind.DATA, b"chunk %d" % i) for i in range(3)]
    assert after == [], [m.kind for m in after]
    assert while_paused is not None and while_paused.health == "paused"
    assert while_paused.usage["frozen"] == 1.0
    assert after_resume is not None and after_resume.health == "running"
    assert result.outcome is Outcome.OK, describe(result)


def test_health_is_exited_once_receive_returned_none(method: str) -> None:
    async def scenario() -> tuple[list[Health], IpcMessage | None, SandboxResult]:
        healths = []
        async with manager(method, status_interval=0.05) as m:
            for i in range(5):  # the channel closes just before the exit is seen: race it
                handle = await m.with_options(context=True).spawn(f"quick{i}", lambda ctx: "bye")
                while await handle.receive(timeout=60) is not None:
                    pass
                healths.append(handle.health)
            status = await handle.next_status(timeout=5)
            return healths, status, await handle.wait()

    healths, status, result = run(scenario())
    assert healths == [Health.EXITED] * 5
    assert status is None
    assert result.output == "bye", describe(result)


def test_message_kind_is_exported() -> None:
    import neural_doc_flow_security.sandbox as sandbox

    assert sandbox.MessageKind is MessageKind and "MessageKind" in sandbox.__all__


def test_manager_level_messaging_and_unknown_plugin(method: str) -> None:
    async def scenario() -> None:
        async with manager(method) as m:
            await m.spawn("echo", echo_plugin)
            await m.send_message("echo", IpcMessage.data(b"xyz", tag="reverse"))
            message = await m.receive_message("echo", timeout=60)
            while message is not None and message.kind is not MessageKind.DATA:
                message = await m.receive_message("echo", timeout=60)
            assert message is not None and bytes(message.content) == b"zyx"
            with pytest.raises(SandboxError, match="nobody"):
                await m.send_message("nobody", IpcMessage.data(b"x"))
            # echo_plugin blocks in ctx.receive(): STOP ends its input (receive -> None),
            # so it finishes cooperatively with its own result, before any SIGTERM.
            await m.send_message("echo", IpcMessage.control(ControlMessage.STOP))
            result = await m.get_handle("echo").wait()
            assert result.outcome is Outcome.OK and result.output == "host went away", describe(result)

    run(scenario())


# --- pause / resume ----------------------------------------------------------------

def test_pause_stops_cpu_time_and_resume_restarts_it(method: str) -> None:
    async def cpu(handle: SandboxHandle) -> float:
        usage = (await handle.status()).usage
        return float(usage["cpu_user_seconds"] + usage["cpu_system_seconds"])

    async def scenario() -> tuple[float, float, float, SandboxResult, str]:
        async with manager(method) as m:
            handle = await m.spawn("busy", busy_until_stopped)
            seen = 0.0

            async def burned(minimum: float) -> bool:
                nonlocal seen
                seen = await cpu(handle)
                return seen >= minimum

            deadline = time.monotonic() + 60
            while not await burned(0.2) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert seen >= 0.2, "the plugin never burned CPU"
            await handle.pause()
            health = (await handle.status()).health
            paused_at = await cpu(handle)
            await asyncio.sleep(1.0)  # a paused tree must not accumulate any CPU meanwhile
            paused_later = await cpu(handle)
            await handle.resume()
            deadline = time.monotonic() + 60
            while not await burned(paused_later + 0.1) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            result = await handle.stop()
            return paused_at, paused_later, seen, result, health

    paused_at, paused_later, resumed, result, health = run(scenario())
    assert health == "paused"
    assert paused_later - paused_at < 0.01, (paused_at, paused_later)
    assert resumed >= paused_later + 0.1, (paused_later, resumed)
    assert result.outcome is Outcome.OK and result.output > 0, describe(result)


def test_control_messages_pause_and_resume(method: str) -> None:
    async def scenario() -> tuple[Health, Health, SandboxResult]:
        async with manager(method) as m:
            handle = await m.spawn("busy", busy_until_stopped)
            await m.send_message("busy", IpcMessage.control(ControlMessage.PAUSE))
            paused = handle.health
            await m.send_message("busy", IpcMessage.control(ControlMessage.RESUME))
            resumed = handle.health
            return paused, resumed, await handle.stop()

    paused, resumed, result = run(scenario())
    assert (paused, resumed) == (Health.PAUSED, Health.RUNNING)
    assert result.outcome is Outcome.OK, describe(result)


def test_stop_of_a_paused_plugin_still_ends_it(method: str) -> None:
    async def scenario() -> SandboxResult:
        async with manager(method) as m:
            handle = await m.spawn("busy", busy_until_stopped)
            await handle.pause()
            return await handle.stop(grace_seconds=5)

    result = run(scenario())
    assert result.outcome is Outcome.OK, describe(result)


# --- stop escalation --------------------------------------------------------------

def test_cooperative_plugin_returns_its_result_on_stop(method: str) -> None:
    def cooperative(ctx: PluginContext) -> dict[str, Any]:
        stopped = ctx.wait_for_stop(timeout=120)
        return {"stopped": stopped, "state": "saved"}

    async def scenario() -> SandboxResult:
        async with manager(method) as m:
            handle = await m.spawn("coop", cooperative)
            return await handle.stop(grace_seconds=30)

    result = run(scenario())
    assert result.outcome is Outcome.OK, describe(result)
    assert result.output == {"stopped": True, "state": "saved"}


def test_plugin_ignoring_stop_and_sigterm_is_killed_after_grace(method: str) -> None:
    def stubborn(ctx: PluginContext) -> str:
        import signal
        import time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ctx.send(b"ignoring", tag="ready")
        while True:
            time.sleep(0.05)  # never looks at ctx.stop_requested

    async def scenario() -> tuple[SandboxResult, list[Any]]:
        async with manager(method) as m:
            handle = await m.spawn("stubborn", stubborn)
            await next_of_kind(handle, MessageKind.DATA)  # SIG_IGN is installed
            tree = tree_of(handle.pid)
            result = await handle.stop(grace_seconds=0.5)
            assert not [p.pid for p in tree if alive(p)], "the stubborn tree survived stop()"
            return result, tree

    result, tree = run(scenario())
    assert len(tree) >= 2
    assert result.outcome is Outcome.KILLED, describe(result)
    assert result.output is None


def test_plugin_with_default_sigterm_ends_on_sigterm(method: str) -> None:
    def oblivious(ctx: PluginContext) -> str:
        import time

        ctx.send(b"", tag="ready")
        while True:
            time.sleep(0.05)

    async def scenario() -> SandboxResult:
        async with manager(method) as m:
            bounded = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=300))
            handle = await bounded.spawn("oblivious", oblivious)
            await next_of_kind(handle, MessageKind.DATA)
            return await handle.stop(grace_seconds=1)

    result = run(scenario())
    assert result.outcome is Outcome.KILLED, describe(result)
    assert result.signal == 15


def test_receive_returns_none_after_the_plugin_ended(method: str) -> None:
    async def scenario() -> tuple[SandboxResult, IpcMessage | None, Health]:
        async with manager(method, status_interval=None) as m:
            handle = await m.with_options(context=True).spawn("quick", lambda ctx: "bye")
            result = await handle.wait()
            return result, await handle.receive(timeout=5), handle.health

    result, message, health = run(scenario())
    assert result.output == "bye", describe(result)
    assert message is None and health is Health.EXITED


# --- protocol violations ---------------------------------------------------------------

def test_flooding_plugin_is_a_protocol_violation(method: str) -> None:
    def flood(ctx: PluginContext) -> None:
        while True:
            ctx.send(b"x")

    limits = DecodeLimits(max_messages_per_second=200.0, burst_messages=400)

    async def scenario() -> tuple[SandboxResult, SandboxResult]:
        async with manager(method, decode_limits=limits) as m:
            flooded = await m.execute_sandboxed("flood", flood)
            after = await m.execute_sandboxed("after", lambda: "host fine")
            return flooded, after

    flooded, after = run(scenario())
    assert flooded.outcome is Outcome.PROTOCOL_VIOLATION, describe(flooded)
    assert "flooding" in (flooded.error or "")
    assert after.outcome is Outcome.OK and after.output == "host fine"


def test_flooding_spawned_plugin_is_a_protocol_violation(method: str) -> None:
    def flood(ctx: PluginContext) -> None:
        while True:
            ctx.log("again")  # (progress reports would be coalesced)

    limits = DecodeLimits(max_messages_per_second=200.0, burst_messages=400)

    async def scenario() -> SandboxResult:
        async with manager(method, decode_limits=limits) as m:
            handle = await m.spawn("flood", flood)
            # Read like a busy host would: the inbox must not throttle the violation away.
            deadline = time.monotonic() + 120
            while handle.health is not Health.EXITED and time.monotonic() < deadline:
                await handle.receive(timeout=0.5)
            return await handle.wait()

    result = run(scenario())
    assert result.outcome is Outcome.PROTOCOL_VIOLATION, describe(result)


# Raw writes to the channel fd (3), each followed by a long sleep: the host must
# refuse the bytes and kill the sandbox.
RAW_PRELUDE = """
import array, os, socket, time, msgpack
def send_record(record, fds=()):
    sock = socket.socket(fileno=3)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([record], anc)
    sock.detach()
"""

RAW_ATTACKS = {
    "garbage_header": ("os.write(3, b'\\xff' * 64)", "unknown record header"),
    "forbidden_kind": ("send_record(b'\\x01' + msgpack.packb({'kind': 'call', 'payload': b''}))",
                       "may not send 'call'"),
    "truncated_frame": ("send_record(b'\\x01\\x92\\x01')", "undecodable frame"),
    "oversized_record": ("send_record(b'\\x01' + b'\\x00' * (200 * 1024))", "max_inline_bytes"),
    "unsealed_memfd": (
        "fd = os.memfd_create('x', os.MFD_ALLOW_SEALING)\n"
        "os.write(fd, msgpack.packb({'kind': 'result', 'value': 1}))\n"
        "send_record(b'\\x02', [fd])", "seals"),
    "not_a_memfd": ("send_record(b'\\x02', [0])", "memfd"),
    "bad_message_shape": ("send_record(b'\\x01' + msgpack.packb({'kind': 'progress', 'fraction': 7.0, "
                          "'note': '', 'reports': 1}))", "fraction"),
    "ext_type": ("send_record(b'\\x01' + msgpack.packb(msgpack.ExtType(42, b'x')))", "ext type 42"),
}
SECOND_RESULT = ("send_record(b'\\x01' + msgpack.packb({'kind': 'result', 'value': 1}))\n"
                 "send_record(b'\\x01' + msgpack.packb({'kind': 'result', 'value': 2}))\n")


@pytest.mark.parametrize("attack", sorted(RAW_ATTACKS))
def test_raw_bytes_on_fd_3_are_a_protocol_violation(method: str, attack: str) -> None:
    code, expected = RAW_ATTACKS[attack]
    source = RAW_PRELUDE + code + "\ntime.sleep(600)\n"

    def hostile(source: str) -> None:
        exec(source, {})

    async def scenario() -> tuple[SandboxResult, SandboxResult]:
        async with manager(method) as m:
            bounded = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=120))
            bad = await bounded.execute_sandboxed(attack, hostile, source)
            after = await m.execute_sandboxed("after", lambda: "host fine")
            return bad, after

    bad, after = run(scenario())
    assert bad.outcome is Outcome.PROTOCOL_VIOLATION, describe(bad)
    assert expected in (bad.error or ""), describe(bad)
    assert after.outcome is Outcome.OK and after.output == "host fine"


def test_a_second_result_is_a_protocol_violation_for_a_spawned_plugin(method: str) -> None:
    source = RAW_PRELUDE + SECOND_RESULT + "time.sleep(600)\n"

    def hostile(source: str) -> None:
        exec(source, {})

    async def scenario() -> SandboxResult:
        async with manager(method) as m:
            bounded = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=120))
            handle = await bounded.spawn("twice", hostile, source)
            return await handle.wait()

    result = run(scenario())
    assert result.outcome is Outcome.PROTOCOL_VIOLATION, describe(result)
    assert "second result" in (result.error or ""), describe(result)


def test_execute_sandboxed_ends_with_the_first_answer(method: str) -> None:
    """The call returns with the first answer and the sandbox is killed then: a second
    one (which would be a protocol violation) cannot change what the host got."""
    source = RAW_PRELUDE + SECOND_RESULT + "time.sleep(600)\n"

    def hostile(source: str) -> None:
        exec(source, {})

    async def scenario() -> SandboxResult:
        async with manager(method) as m:
            bounded = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=120))
            return await bounded.execute_sandboxed("twice", hostile, source)

    result = run(scenario())
    assert result.outcome in (Outcome.OK, Outcome.PROTOCOL_VIOLATION), describe(result)
    if result.outcome is Outcome.OK:
        assert result.output == 1 and result.exit_code is None, describe(result)


def test_concurrent_control_requests_on_one_sandbox(method: str) -> None:
    # The status sampler runs while users call status(), pause() or stop(): concurrent
    # requests for one sandbox must each get their own reply.
    # Regression: before b08540a ZygoteStarter keyed pending replies by sandbox id, so a
    # second request overwrote the first one's future and its caller waited forever.
    async def scenario() -> list[Any]:
        async with manager(method, status_interval=None) as m:
            handle = await m.spawn("busy", busy_until_stopped)
            try:
                return list(await asyncio.wait_for(
                    asyncio.gather(handle.status(), handle.status(), handle.pause()), 30))
            finally:
                await handle.kill()

    first, second, _ = run(scenario())
    assert "cpu_seconds" in first.usage and "cpu_seconds" in second.usage


def _send_one_then_return(ctx: PluginContext) -> int:
    ctx.send(b"one")
    return 1


def test_receive_without_timeout_returns_none_once_the_plugin_ended(method: str) -> None:
    async def scenario() -> tuple[Any, Any, SandboxResult]:
        async with manager(method, status_interval=None) as m:
            handle = await m.spawn("once", _send_one_then_return)
            first = await asyncio.wait_for(handle.receive(), 60)
            second = await asyncio.wait_for(handle.receive(), 60)  # ended: None, not a hang
            return first, second, await handle.wait()

    first, second, result = run(scenario())
    assert first is not None and bytes(first.content) == b"one"
    assert second is None
    assert result.outcome is Outcome.OK and result.output == 1
