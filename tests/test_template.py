"""The template (launch/template.py): the zygote's frozen copy that clones every sandbox.

Evidence from the host: the template's fds and parent, the sandboxes' parent,
and what happens to calls when the template is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import psutil
import pytest

import api_helpers
from api_helpers import alive, async_wait_until, run
from conftest import wait_until
from neural_doc_flow_security.sandbox import SandboxManager

no_leaks = api_helpers.no_leaks  # the fixture: nothing of the template or its sandboxes is left
pytestmark = [pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox"),
              pytest.mark.usefixtures("no_leaks")]


def _ns_depth(proc: psutil.Process) -> int:
    """How many pid namespaces the process is in (0: it is gone)."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            return next(len(line.split()[1:]) for line in f if line.startswith("NSpid:"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def _templates(zygote_pid: int) -> list[psutil.Process]:
    """The zygote's children in its own pid namespace (sandboxes are in their own),
    once it has made its template (it starts while the manager goes on)."""
    def found() -> list[psutil.Process]:
        return [child for child in psutil.Process(zygote_pid).children() if _ns_depth(child) == 1]

    wait_until(found, timeout=30)
    return found()


def _held(pid: int) -> list[str]:
    """What the fds of `pid` are open on (one closed while this looks is left out)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return held


@pytest.fixture
def manager() -> Iterator[SandboxManager]:
    yield SandboxManager(status_interval=None)


def test_the_template_holds_only_its_socket_and_sandboxes_are_the_zygotes_children(
        manager: SandboxManager) -> None:
    async def scenario() -> tuple[list[str], int, set[int], object]:
        async with manager:
            zygote = manager._starter._zygotes[0].process
            assert zygote is not None
            templates = _templates(zygote.pid)
            assert len(templates) == 1, templates
            template = templates[0]
            # It closes what it inherited just after the fork: wait for that, not for a leak.
            await async_wait_until(lambda: len(_held(template.pid)) == 1, timeout=30)
            held = _held(template.pid)
            handle = await manager.with_options(context=True).spawn("idle", lambda ctx: ctx.wait_for_stop())
            parent = psutil.Process(handle.pid).ppid()
            await handle.stop()
            return held, parent, set(manager._starter.pids), (await handle.wait()).outcome.value

    held, parent, zygote_pids, outcome = run(scenario())
    assert len(held) == 1 and held[0].startswith("socket:"), held  # none of the zygote's fds
    assert parent in zygote_pids  # cloned by a template for its zygote, which reaps it
    assert outcome in ("ok", "killed")


def test_a_zygote_whose_template_died_starts_nothing_and_the_others_go_on(manager: SandboxManager) -> None:
    # Fail closed: the zygote's own memory holds earlier requests (their calls), so it
    # never clones sandboxes itself; it exits, and its sibling serves the calls.
    async def scenario() -> tuple[list[object], bool]:
        async with manager:
            assert (await manager.execute_sandboxed("before", lambda: 1)).output == 1
            first = manager._starter._zygotes[0]
            assert first.process is not None
            template = _templates(first.process.pid)[0]
            os.kill(template.pid, signal.SIGKILL)  # the template process this test started
            assert wait_until(lambda: not alive(template), timeout=10)
            outputs = []
            for _ in range(6):
                try:
                    result = await manager.execute_sandboxed("after", lambda: 2)
                    outputs.append(result.output)
                except Exception as e:  # noqa: BLE001 - the call that met the dead template
                    outputs.append(type(e).__name__)
            await async_wait_until(lambda: first.dead is not None, timeout=10)
            return outputs, first.dead is not None

    outputs, first_gone = run(scenario())
    assert first_gone
    # A launch that reached the zygote after its template died was refused there and
    # sent to the other zygote (nothing had started): no call fails.
    assert outputs == [2] * 6, outputs


def test_sandboxes_started_before_their_template_died_run_to_their_end(manager: SandboxManager) -> None:
    async def scenario() -> tuple[list[object], bool, str, bool]:
        async with manager:
            handle = await manager.with_options(context=True).spawn("started before", lambda ctx: ctx.wait_for_stop())
            owner = manager._starter._owner[handle.sandbox_id]
            assert owner.process is not None
            template = _templates(owner.process.pid)[0]
            os.kill(template.pid, signal.SIGKILL)  # the template process this test started
            assert wait_until(lambda: not alive(template), timeout=10)
            outputs = [(await manager.execute_sandboxed("after", lambda: 2)).output for _ in range(4)]
            await async_wait_until(lambda: owner.refusing, timeout=10)
            # Still serving the sandbox it started: the zygote and the sandbox are alive;
            # the template was reaped (no zombie left while it serves).
            both_alive = owner.process.poll() is None and psutil.pid_exists(handle.pid)
            assert wait_until(lambda: not psutil.pid_exists(template.pid), timeout=10)
            await handle.stop()
            outcome = (await handle.wait()).outcome.value
            await async_wait_until(lambda: owner.dead is not None and owner.process.poll() is not None,
                                   timeout=10)
            return outputs, both_alive, outcome, owner.process.returncode == 0

    outputs, both_alive, outcome, exited_cleanly = run(scenario())
    assert outputs == [2] * 4
    assert both_alive
    assert outcome == "ok"  # it saw the stop and returned: not killed with its zygote
    assert exited_cleanly


def test_the_template_dies_with_its_zygote(manager: SandboxManager) -> None:
    async def scenario() -> psutil.Process:
        async with manager:
            zygote = manager._starter._zygotes[0].process
            assert zygote is not None
            template = _templates(zygote.pid)[0]
            zygote.kill()  # the zygote this test started
            assert wait_until(lambda: not alive(template), timeout=10)
            return template

    template = run(scenario())
    assert not alive(template)
