"""Result values and limits (issue 21): what a callable returns comes back with its
type (tuple, set, datetime, Decimal, int keys, deep nesting), a harmless result is
never a protocol violation (too big or too deep is the plugin's error, naming the
limit), `decode_limits` really applies to results, and progress reported in a
tight loop is coalesced while a real flood still is a violation."""

from __future__ import annotations

import datetime
import decimal
import os
from typing import Any

import pytest

import api_helpers
from api_helpers import describe, linux_only, manager, needs_root, run
from neural_doc_flow_security.sandbox.ipc.limits import DecodeLimits, MiB
from neural_doc_flow_security.sandbox.ipc.messages import IpcMessage, MessageKind
from neural_doc_flow_security.sandbox.launch.python_worker import PluginContext
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

no_leaks = api_helpers.no_leaks  # the fixture, used by every test below

pytestmark = [linux_only, needs_root, pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(300)]


async def call(function: Any, *args: Any, **options: Any) -> SandboxResult:
    async with manager("zygote", **options) as m:
        return await m.execute_sandboxed("values", function, *args)


def common_values() -> dict[str, Any]:
    import dataclasses
    import datetime
    import decimal
    import functools

    # Made here, in the sandbox (a class of this module's string annotations could not be).
    Page = dataclasses.make_dataclass("Page", [("number", int), ("text", str)], frozen=True)  # noqa: N806

    return {
        "int_keys": {1: "a", -7: "b", 2**64 - 1: "c"},
        "mixed_keys": {None: 0, b"raw": 1, True: 2},
        "deep": functools.reduce(lambda inner, _: [inner], range(100), ["bottom"]),
        "tuple": (1, "two", (3.0, None)),
        "set": {"a", "b", 3},
        "frozenset": frozenset({b"x"}),
        "when": datetime.datetime(2026, 12, 4, 15, 30, tzinfo=datetime.UTC),
        "day": datetime.date(2026, 12, 4),
        "at": datetime.time(8, 0, 1),
        "price": decimal.Decimal("19.990"),
        "page": Page(1, "hello"),
    }


def test_common_value_types_come_back_with_their_types() -> None:
    result = run(call(common_values))
    assert result.outcome is Outcome.OK, describe(result)
    value = result.output
    assert value["int_keys"] == {1: "a", -7: "b", 2**64 - 1: "c"}
    assert value["mixed_keys"] == {None: 0, b"raw": 1, True: 2}
    deep = value["deep"]
    for _ in range(100):
        assert type(deep) is list and len(deep) == 1
        deep = deep[0]
    assert deep == ["bottom"]
    assert value["tuple"] == (1, "two", (3.0, None)) and type(value["tuple"][2]) is tuple
    assert value["set"] == {"a", "b", 3} and type(value["set"]) is set
    assert value["frozenset"] == frozenset({b"x"}) and type(value["frozenset"]) is frozenset
    assert value["when"] == datetime.datetime(2026, 12, 4, 15, 30, tzinfo=datetime.UTC)
    assert value["day"] == datetime.date(2026, 12, 4) and value["at"] == datetime.time(8, 0, 1)
    assert value["price"] == decimal.Decimal("19.990") and str(value["price"]) == "19.990"
    assert value["page"] == {"number": 1, "text": "hello"}  # a dataclass comes back as a dict


@pytest.mark.parametrize("source, reason", [
    ("lambda: object()", "builtins.object cannot be sent"),
    ("lambda: {(1, 2): 'tuple key'}", "map key or set item"),
    ("lambda: __import__('functools').reduce(lambda inner, _: [inner], range(300), [])", "max_depth=256"),
])
def test_a_result_the_host_would_refuse_is_the_plugins_error_not_a_violation(source: str, reason: str) -> None:
    result = run(call(eval(source)))  # noqa: S307 - test-defined lambdas, run in the sandbox
    assert result.outcome is Outcome.ERROR, describe(result)
    assert "the result cannot be sent" in (result.error or "") and reason in (result.error or ""), describe(result)


def big_result(size: int) -> bytes:
    return b"r" * size


def big_structured_result(size: int) -> list[bytes]:
    return [b"r" * size]


def test_structured_results_over_16_mib_pass_when_decode_limits_allow_them() -> None:
    size = 20 * MiB
    refused = run(call(big_structured_result, size))
    assert refused.outcome is Outcome.ERROR, describe(refused)
    assert f"max_frame_bytes={16 * MiB}" in (refused.error or ""), describe(refused)
    assert "decode_limits" in (refused.error or ""), describe(refused)
    allowed = run(call(big_structured_result, size, decode_limits=DecodeLimits(max_frame_bytes=32 * MiB)))
    assert allowed.outcome is Outcome.OK, describe(allowed)
    assert allowed.output == [b"r" * size]


def memfds_held() -> list[str]:
    """This process's memfd mappings and fds."""
    with open("/proc/self/maps") as f:
        held = [line for line in f if "memfd:" in line]
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            held.append(f"fd {name} -> {target}")
    return held


@pytest.mark.parametrize("method", api_helpers.START_METHODS)
def test_a_64_mib_bytes_result_comes_back_through_a_memfd(method: str) -> None:
    """Bounded by max_memfd_bytes (1 GiB by default), not by max_frame_bytes; the
    host keeps no mapping and no fd of it (and no_leaks: the fd table is back)."""
    size = 64 * MiB

    async def scenario() -> tuple[SandboxResult, SandboxResult, list[str]]:
        async with manager(method) as m:
            result = await m.execute_sandboxed("values", big_result, size)
            held = memfds_held()
            async with manager(method, decode_limits=DecodeLimits(max_memfd_bytes=32 * MiB)) as small:
                refused = await small.execute_sandboxed("values", big_result, size)
            return result, refused, held

    result, refused, held = run(scenario())
    assert result.outcome is Outcome.OK, describe(result)
    assert type(result.output) is bytes and result.output == b"r" * size
    assert held == []
    assert refused.outcome is Outcome.ERROR, describe(refused)
    assert f"exceeds max_memfd_bytes={32 * MiB}" in (refused.error or ""), describe(refused)


def test_progress_in_a_tight_loop_is_coalesced_not_a_violation() -> None:
    def report(ctx: PluginContext) -> int:
        for i in range(5000):
            ctx.report_progress((i + 1) / 5000, f"page {i + 1}")
        return 5000

    async def scenario() -> tuple[list[IpcMessage], SandboxResult]:
        async with manager("zygote", status_interval=None) as m:
            handle = await m.spawn("progress", report)
            result = await handle.wait()
            received = []
            while (message := await handle.receive(timeout=5)) is not None:
                received.append(message)
            return received, result

    received, result = run(scenario())
    assert result.outcome is Outcome.OK and result.output == 5000, describe(result)
    assert all(m.kind is MessageKind.PROGRESS for m in received)
    assert sum(m.reports for m in received) == 5000  # every report counted
    assert (received[-1].fraction, received[-1].note) == (1.0, "page 5000")  # the latest wins
    assert len(received) < 5000


def test_a_flood_of_raw_progress_messages_still_is_a_violation() -> None:
    def flood(ctx: PluginContext) -> None:
        from neural_doc_flow_security.sandbox.ipc.messages import IpcMessage

        while True:  # around the context's coalescing, straight onto the channel
            ctx._channel.send(IpcMessage.progress(0.5))

    result = run(call(flood))
    assert result.outcome is Outcome.PROTOCOL_VIOLATION, describe(result)
    assert "flooding" in (result.error or ""), describe(result)
