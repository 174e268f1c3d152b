"""Calling conventions (issue 21) and misuse that used to hang (issue 14): a
plugin id taken twice, a str argv, subprocess.run's keywords, spawn's own
default timeout, the context and per-call options that collide with the
callable's arguments, a manager used from another event loop or restarted."""

from __future__ import annotations

import asyncio
import threading
import warnings
from typing import Any

import pytest

import api_helpers
from api_helpers import (
    describe,
    linux_only,
    manager,
    needs_root,
    run,
)
from conftest import processes_with_argument, wait_until
from neural_doc_flow_security.sandbox import PluginContext
from neural_doc_flow_security.sandbox.api import Health, SandboxManager
from neural_doc_flow_security.sandbox.config import SandboxConfig
from neural_doc_flow_security.sandbox.errors import OutcomeError, SandboxError
from neural_doc_flow_security.sandbox.executor import SandboxExecutor
from neural_doc_flow_security.sandbox.result import Outcome

no_leaks = api_helpers.no_leaks  # the fixture, used by every test below

pytestmark = [linux_only, needs_root, pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(300)]

MISUSE_TIMEOUT = 60.0  # a misuse must fail at once; this only bounds a hang on a broken build


def wait_for_stop(ctx: PluginContext) -> str:
    ctx.wait_for_stop()
    return "stopped"


# --- spawn ---------------------------------------------------------------------------------

def test_spawning_a_second_plugin_under_a_live_id_raises() -> None:
    async def scenario() -> None:
        async with manager("zygote") as m:
            first = await m.spawn("ocr", wait_for_stop)
            with pytest.raises(SandboxError, match="'ocr' is still running"):
                await m.spawn("ocr", wait_for_stop)
            assert m.get_handle("ocr") is first
            assert [s.plugin_id for s in m.list_sandboxes()] == ["ocr"]
            assert (await first.stop()).output == "stopped"
            second = await m.spawn("ocr", wait_for_stop)  # the name is free once it ended
            assert m.get_handle("ocr") is second
            await second.stop()

    run(scenario())


def test_spawned_plugins_have_no_wall_timeout_by_default(sleep_marker: str) -> None:
    def long_running(ctx: PluginContext, marker: str) -> str:
        import subprocess

        sleeper = subprocess.Popen(["sleep", marker])
        ctx.wait_for_stop()
        sleeper.kill()
        return "stopped"

    async def scenario() -> None:
        # The manager's calls time out after 1 s; a spawned plugin is not one of them.
        async with manager("zygote", config=SandboxConfig(timeout_seconds=1)) as m:
            handle = await m.spawn("service", long_running, sleep_marker)
            assert await _async_wait(lambda: processes_with_argument(sleep_marker))
            await asyncio.sleep(3)  # three times the calls' timeout
            assert handle.health is Health.RUNNING
            assert processes_with_argument(sleep_marker), "the spawned plugin was killed by the call timeout"
            result = await handle.stop()
            assert result.output == "stopped", describe(result)
            short = await m.execute_sandboxed("call", __import__("time").sleep, 300)
            assert short.outcome is Outcome.TIMEOUT

    run(scenario())


def test_spawn_timeout_can_be_set_for_the_manager() -> None:
    async def scenario() -> None:
        async with SandboxManager(spawn_timeout_seconds=1, status_interval=None) as m:
            handle = await m.spawn("service", wait_for_stop)
            result = await handle.wait()
            assert result.outcome is Outcome.TIMEOUT, describe(result)

    run(scenario())


async def _async_wait(predicate: Any, timeout: float = 60.0) -> bool:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: wait_until(predicate, timeout))


# --- execute_command -----------------------------------------------------------------------

def test_a_str_argv_is_a_type_error() -> None:
    async def scenario() -> None:
        async with manager("zygote") as m:
            with pytest.raises(TypeError, match=r"\['/bin/echo', 'hi'\]"):
                await m.execute_command("echo", "/bin/echo hi")  # type: ignore[arg-type]
            assert not m.list_sandboxes()

    run(scenario())


def test_execute_command_takes_subprocess_run_keywords(sleep_marker: str) -> None:
    async def scenario() -> None:
        async with manager("zygote") as m:
            timed = await m.execute_command("sleep", ["sleep", sleep_marker], timeout=1)
            assert timed.outcome is Outcome.TIMEOUT, describe(timed)
            assert not processes_with_argument(sleep_marker)
            env = await m.execute_command("env", ["/bin/sh", "-c", "echo $GREETING"], env={"GREETING": "hallo"})
            assert env.stdout == b"hallo\n", describe(env)
            with pytest.raises(OutcomeError) as raised:
                await m.execute_command("false", ["false"], check=True)
            assert raised.value.result is not None and raised.value.result.exit_code == 1
            assert (await m.execute_command("true", ["true"], check=True)).ok
            echoed = await m.execute_command("cat", ["cat"], stdin="grüße", encoding="latin-1")
            assert echoed.stdout == "grüße".encode("latin-1") and echoed.stdout_text == "grüße"
            with pytest.raises(TypeError, match="stdin is a str"):
                await m.execute_command("cat", ["cat"], stdin="text")

    run(scenario())


# --- the context and per-call options --------------------------------------------------------

def render(ctx: dict[str, str], template: str) -> str:
    """A function whose first parameter is named ctx but is not ours."""
    return template.format(**ctx)


def takes_config(sandbox_config: str) -> str:
    return f"got {sandbox_config}"


def wait_for_stop_soon(ctx):  # type: ignore[no-untyped-def]
    """The deprecated form: a context only because the first parameter is named ctx."""
    return type(ctx).__name__


def test_options_never_collide_with_the_callables_arguments() -> None:
    async def scenario() -> None:
        async with manager("zygote") as m:
            calls = m.with_options(context=False, sandbox_config=SandboxConfig(timeout_seconds=20))
            result = await calls.execute_sandboxed("render", render, {"name": "Ada"}, "hello {name}")
            assert result.output == "hello Ada", describe(result)
            own = await m.with_options().execute_sandboxed("cfg", takes_config, sandbox_config="mine")
            assert own.output == "got mine", describe(own)

    run(scenario())


def test_executor_passes_every_keyword_to_the_callable() -> None:
    with pytest.warns(DeprecationWarning, match="named `ctx`") as named, SandboxExecutor() as executor:
        assert executor.submit(wait_for_stop_soon).result(timeout=120) == "PluginContext"
    assert {w.filename for w in named} == {__file__}
    with SandboxExecutor(context=False) as executor:
        assert executor.submit(takes_config, sandbox_config="mine").result(timeout=120) == "got mine"
        assert executor.submit(render, {"name": "Ada"}, "hi {name}").result(timeout=120) == "hi Ada"


def test_the_old_forms_still_work_and_warn() -> None:
    def legacy(ctx, x):  # type: ignore[no-untyped-def]
        return type(ctx).__name__, x

    def annotated(ctx: PluginContext, x: int) -> tuple[str, int]:
        return type(ctx).__name__, x

    async def scenario() -> None:
        async with manager("zygote") as m:
            with pytest.warns(DeprecationWarning, match="named `ctx`") as named:
                old = await m.execute_sandboxed("legacy", legacy, 1)
            assert old.output == ("PluginContext", 1), describe(old)  # a tuple comes back as one
            with pytest.warns(DeprecationWarning, match="with_options") as keyword:
                configured = await m.execute_sandboxed("cfg", lambda: 2, sandbox_config=SandboxConfig())
            assert configured.output == 2
            assert {w.filename for w in [*named, *keyword]} == {__file__}, "the warnings point at the caller"
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                new = await m.execute_sandboxed("annotated", annotated, 3)
            assert new.output == ("PluginContext", 3), describe(new)

    run(scenario())


# --- misuse: fail at once, never hang ----------------------------------------------------------

def test_a_manager_called_from_another_event_loop_raises() -> None:
    m = manager("zygote")
    home = asyncio.new_event_loop()
    try:
        home.run_until_complete(m.start())
        with pytest.raises(SandboxError, match="another event loop"):
            run(m.execute_sandboxed("p", lambda: 1), timeout=MISUSE_TIMEOUT)
        with pytest.raises(SandboxError, match="another event loop"):
            run(m.execute_command("p", ["true"]), timeout=MISUSE_TIMEOUT)

        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                run(m.execute_sandboxed("p", lambda: 1), timeout=MISUSE_TIMEOUT)
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(MISUSE_TIMEOUT * 2)
        assert len(errors) == 1 and isinstance(errors[0], SandboxError), errors
        assert home.run_until_complete(m.execute_sandboxed("p", lambda: 5)).output == 5  # its own loop works
    finally:
        home.run_until_complete(m.shutdown())
        home.close()


def test_a_spawned_handle_used_from_another_loop_raises() -> None:
    m = manager("zygote")
    home = asyncio.new_event_loop()
    try:
        home.run_until_complete(m.start())
        handle = home.run_until_complete(m.spawn("svc", wait_for_stop))
        with pytest.raises(SandboxError, match="another event loop"):
            run(handle.receive(timeout=1), timeout=MISUSE_TIMEOUT)
        assert home.run_until_complete(handle.stop()).output == "stopped"
    finally:
        home.run_until_complete(m.shutdown())
        home.close()


def test_a_closed_manager_cannot_be_entered_again() -> None:
    async def scenario() -> None:
        m = manager("zygote")
        async with m:
            pass
        with pytest.raises(SandboxError, match="shut down"):
            async with m:
                pass

    run(scenario())

