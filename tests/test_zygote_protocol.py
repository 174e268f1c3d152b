"""The manager's end of the zygote protocol (launch/start_methods.py) at the moments a
real zygote cannot be made to reach on cue: it exits with requests unread, it stops
taking requests while its answers are still queued, it refuses a launch. The zygote's
end is a SOCK_SEQPACKET socket this test holds and speaks for (real kernel sockets,
a scripted peer); tests/test_template.py covers the same with real zygotes.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
from typing import Any

import msgpack
import pytest

from api_helpers import async_wait_until, run
from neural_doc_flow_security.sandbox import SandboxConfig
from neural_doc_flow_security.sandbox.errors import SandboxError
from neural_doc_flow_security.sandbox.launch.launcher import LaunchRequest
from neural_doc_flow_security.sandbox.launch.python_worker import PythonWorkerPayload
from neural_doc_flow_security.sandbox.launch.start_methods import ZygoteGone, ZygoteStarter, _Zygote
from neural_doc_flow_security.sandbox.result import IsolationReport, Outcome, SandboxResult

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux", reason="SOCK_SEQPACKET")


@pytest.fixture
def loop_errors() -> list[dict[str, Any]]:
    """What the event loop's exception handler saw (a callback that raised)."""
    return []


def _stand_in(zygote: _Zygote, errors: list[dict[str, Any]]) -> socket.socket:
    """Wire `zygote` to a socket pair as start() would; returns the zygote's end."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.settimeout(10)  # a test waiting for a request that never comes fails
    zygote.sock = ours
    loop.add_reader(ours.fileno(), zygote._on_readable)
    return theirs


def _unwire(*zygotes: _Zygote) -> None:
    for zygote in zygotes:
        if zygote.sock is not None:
            if zygote.dead is None:
                asyncio.get_running_loop().remove_reader(zygote.sock.fileno())
            zygote.sock.close()


def _say(theirs: socket.socket, message: dict[str, Any]) -> None:
    theirs.send(msgpack.packb(message, use_bin_type=True))


async def _heard(theirs: socket.socket) -> dict[str, Any]:
    message: dict[str, Any] = pickle.loads(await asyncio.to_thread(theirs.recv, 1 << 20))
    return message


def test_results_sent_before_a_zygote_exited_arrive_though_it_left_requests_unread(
        loop_errors: list[dict[str, Any]]) -> None:
    # A unix socket whose peer closed with data unread reports ECONNRESET once, ahead of
    # what the peer had sent: the results are still read, and that is no error.
    async def scenario() -> tuple[str, str | None]:
        starter = ZygoteStarter(count=1)
        zygote = starter._zygotes[0]
        theirs = _stand_in(zygote, loop_errors)
        zygote.running.add(7)
        ended = starter.exit_future(7)
        try:
            await zygote.send({"op": "kill", "id": 7}, [])  # never read
            _say(theirs, {"op": "exited", "id": 7, "result": SandboxResult(Outcome.KILLED).to_dict()})
            theirs.close()
            result = await asyncio.wait_for(ended, 10)
            await async_wait_until(lambda: zygote.dead is not None, timeout=10)
            return result.outcome.value, zygote.dead
        finally:
            _unwire(zygote)

    assert run(scenario()) == ("killed", "the zygote exited")
    assert not loop_errors, loop_errors


def test_a_send_refused_by_a_closing_zygote_loses_none_of_its_queued_results(
        loop_errors: list[dict[str, Any]]) -> None:
    # A zygote that stops taking requests (shutdown SHUT_RD) has sent results still to
    # be read: the send that fails must not fail them.
    async def scenario() -> tuple[bool, str, str]:
        starter = ZygoteStarter(count=1)
        zygote = starter._zygotes[0]
        theirs = _stand_in(zygote, loop_errors)
        zygote.running.add(7)
        ended = starter.exit_future(7)
        try:
            _say(theirs, {"op": "exited", "id": 7, "result": SandboxResult(Outcome.KILLED).to_dict()})
            theirs.shutdown(socket.SHUT_RD)
            try:
                await zygote.send({"op": "stats", "id": 7, "req": 1}, [])
                refused = False
            except ZygoteGone:
                refused = True
            result = await asyncio.wait_for(ended, 10)
            theirs.close()
            await async_wait_until(lambda: zygote.dead is not None, timeout=10)
            return refused, result.outcome.value, zygote.refusing
        finally:
            _unwire(zygote)

    refused, outcome, refusing = run(scenario())
    assert refused and outcome == "killed" and refusing
    assert not loop_errors, loop_errors


def test_a_launch_refused_by_a_zygote_whose_template_died_goes_to_the_other(
        loop_errors: list[dict[str, Any]]) -> None:
    # The launch reached the zygote before it stopped taking requests and was refused
    # there (nothing started): the other zygote starts it; no call fails.
    async def scenario() -> tuple[int, bool, str, list[str]]:
        starter = ZygoteStarter(count=2)
        first, second = starter._zygotes
        first_end, second_end = _stand_in(first, loop_errors), _stand_in(second, loop_errors)
        second.running.add(100)  # busier: the launch goes to the first
        devnull = os.open(os.devnull, os.O_RDONLY)
        request = LaunchRequest(SandboxConfig(), PythonWorkerPayload())
        try:
            launch = asyncio.create_task(starter.spawn(1, request, {0: devnull}))
            sent = await _heard(first_end)
            _say(first_end, {"op": "refusing", "why": "the template process is gone"})
            first_end.shutdown(socket.SHUT_RD)
            _say(first_end, {"op": "failed", "id": 1, "error": "the template process is gone", "elsewhere": True,
                             "req": sent["req"]})
            resent = await _heard(second_end)
            _say(second_end, {"op": "started", "id": 1, "pid": 4242, "isolation": IsolationReport().to_dict(),
                              "counters": [], "req": resent["req"]})
            pid = await asyncio.wait_for(launch, 10)
            return pid, starter._owner[1] is second, first.refusing, [sent["op"], resent["op"]]
        finally:
            os.close(devnull)
            _unwire(first, second)

    pid, placed_on_second, why, ops = run(scenario())
    assert (pid, placed_on_second, why, ops) == (4242, True, "the template process is gone", ["spawn", "spawn"])
    assert not loop_errors, loop_errors


@pytest.mark.timeout(30)
def test_a_zygote_that_is_not_running_is_passed_over() -> None:
    # One whose socket is gone but that is not yet marked dead (while it is closed) must
    # not be picked again and again: the launch says why none can start it.
    async def scenario() -> None:
        starter = ZygoteStarter(count=1)  # never started: no socket
        await starter.spawn(1, LaunchRequest(SandboxConfig(), PythonWorkerPayload()), {})

    with pytest.raises(SandboxError, match="the zygote is not running$"):
        run(scenario())
