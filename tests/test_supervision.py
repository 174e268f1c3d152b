"""A manager that runs for weeks: supervised zygotes, the manager's own deadlines,
nothing kept per call, values that must not take a zygote down, and faults.

Host-side evidence throughout: zygote and sandbox processes (alive, stopped, gone),
the manager's object and fd counts, cgroup directories. Every helper process is
started by the test and killed by pid only.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil
import pytest

import api_helpers
from api_helpers import LeakTracker, alive, async_wait_until, make_host_dir, run, sandbox_cgroups, tree_of
from conftest import wait_until
from neural_doc_flow_security.sandbox import ManagerStats, SandboxConfig, SandboxManager
from neural_doc_flow_security.sandbox.api import SandboxHandle
from neural_doc_flow_security.sandbox.errors import ConfigError, SandboxError
from neural_doc_flow_security.sandbox.launch import start_methods
from neural_doc_flow_security.sandbox.launch.launcher import LaunchRequest
from neural_doc_flow_security.sandbox.launch.payload import ExecPayload
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

no_leaks = api_helpers.no_leaks
pytestmark = [pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox"),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, namespaces)"),
              pytest.mark.usefixtures("no_leaks")]


def _sleeper(seconds: float) -> None:
    time.sleep(seconds)


def _fails() -> None:
    raise ValueError("as planned")


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _unchecked(**changes: Any) -> SandboxConfig:
    """A config carrying values validation would refuse (as a bug in it would let through)."""
    config = SandboxConfig()
    for name, value in changes.items():
        object.__setattr__(config, name, value)
    return config


# --- no value a caller can pass takes a zygote down ---------------------------------

@pytest.mark.parametrize("value", [0, -1, 2592000, 1e12, math.inf, -math.inf, math.nan, "10", True])
@pytest.mark.parametrize("sent_by", ["manager", "starter"])
def test_a_timeout_validation_missed_fails_its_call_and_the_zygotes_go_on(value: object, sent_by: str) -> None:
    # 30 days (or 1e12, inf) made the zygote's poll() raise OverflowError: the zygote
    # exited, and with it every later call. The manager checks a call's config again,
    # and so does the zygote (here sent to it directly).
    async def scenario() -> tuple[str, set[int], set[int], object]:
        async with SandboxManager(status_interval=None) as m:
            before = set(m._starter.pids)
            config = _unchecked(timeout_seconds=value)
            try:
                if sent_by == "manager":
                    result = await m.with_options(sandbox_config=config).execute_sandboxed("bad", lambda: 1)
                else:
                    await m._starter.spawn(10**6, LaunchRequest(config, ExecPayload(("/bin/true",))), {})
                    result = SandboxResult(Outcome.SANDBOX_ERROR, error="it was started")
                what = f"returned {result.outcome.value}: {result.error}"
            except SandboxError as e:
                what = str(e)
            await asyncio.sleep(0.2)  # a zygote that dies of it would be seen by now
            alive_after = {z.process.pid for z in m._starter._zygotes if z.process and z.process.poll() is None}
            return what, before, alive_after, (await m.execute_sandboxed("after", lambda: 2)).output

    what, before, alive_after, output = run(scenario())
    assert "timeout_seconds" in what, what
    assert alive_after == before, "a zygote died of the request"
    assert output == 2


@pytest.mark.parametrize("value", [0, -1, 2592000, 1e12, math.inf, math.nan, "10", True])
def test_every_boundary_timeout_is_a_config_error_and_the_manager_keeps_working(value: object) -> None:
    async def scenario() -> tuple[str, object]:
        async with SandboxManager(status_interval=None) as m:
            with pytest.raises(ConfigError) as info:
                bad = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=value))  # type: ignore[arg-type]
                await bad.execute_sandboxed("bad", lambda: 1)
            return info.value.field, (await m.execute_sandboxed("after", lambda: 2)).output

    assert run(scenario()) == ("timeout_seconds", 2)


def test_a_sandbox_config_of_the_wrong_type_is_a_config_error_naming_it() -> None:
    async def scenario() -> tuple[str, object]:
        async with SandboxManager(status_interval=None) as m:
            with pytest.raises(ConfigError) as info:
                bad = m.with_options(sandbox_config={"timeout_seconds": 5})  # type: ignore[arg-type]
                await bad.execute_sandboxed("bad", lambda: 1)
            return info.value.field, (await m.execute_sandboxed("after", lambda: 2)).output

    assert run(scenario()) == ("sandbox_config", 2)


# --- nothing kept per call --------------------------------------------------------

async def _calls(m: SandboxManager, count: int, in_flight: int = 8) -> list[str]:
    slots = asyncio.Semaphore(in_flight)

    async def one(i: int) -> str:
        async with slots:
            result = await m.execute_sandboxed("flat", _fails if i % 5 == 0 else abs, -i)
            return result.outcome.value

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _settled(m: SandboxManager) -> tuple[int, int]:
    """The manager's gc-tracked objects and fds once its background work is done."""
    await m.wait_pool_ready()
    await async_wait_until(lambda: not m.list_sandboxes(), timeout=30)
    await asyncio.sleep(0.2)
    gc.collect()
    return len(gc.get_objects()), _fd_count()


def test_the_manager_keeps_nothing_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # It kept a SandboxResult, ResourceUsage, IsolationReport and a Future per call
    # (the start method's exit futures): ~2 KiB of RSS per call, forever.
    calls = 1000
    # The audit events are made (and validated by conftest's handler), but pytest's
    # log capture, which keeps every record of the test, does not see them.
    monkeypatch.setattr(logging.getLogger("neural_doc_flow_security.audit"), "propagate", False)

    async def scenario() -> tuple[list[str], tuple[int, int], tuple[int, int], ManagerStats]:
        async with SandboxManager(status_interval=None) as m:
            await _calls(m, 100)  # warm up: caches, lazily imported modules
            await _settled(m)
            outcomes = await _calls(m, calls)
            after_n = await _settled(m)
            outcomes += await _calls(m, calls)
            after_2n = await _settled(m)
            return outcomes, after_n, after_2n, m.stats()

    outcomes, (objects_n, fds_n), (objects_2n, fds_2n), stats = run(scenario(), timeout=600)
    assert outcomes.count("ok") == 2 * calls * 4 // 5 and outcomes.count("error") == 2 * calls // 5
    assert objects_2n - objects_n < calls // 4, f"{objects_2n - objects_n} more objects after {calls} more calls"
    assert fds_2n <= fds_n, f"{fds_2n - fds_n} more fds after {calls} more calls"
    assert stats.calls["ok"] >= 2 * calls * 4 // 5 and stats.calls["error"] >= 2 * calls // 5


def test_spawned_plugins_with_new_names_are_not_kept_once_ended() -> None:
    # SandboxManager._by_plugin kept every spawned handle (and its captured output) forever.
    spawns = 150

    async def scenario() -> tuple[int, int]:
        async with SandboxManager(status_interval=None) as m:
            for i in range(spawns):
                handle = await m.spawn(f"plugin-{i}", lambda: print("x" * 10000))
                await handle.wait()
            del handle
            await _settled(m)
            kept = sum(isinstance(o, SandboxHandle) for o in gc.get_objects())
            return kept, len(m._by_plugin)

    kept, by_name = run(scenario(), timeout=600)
    assert by_name <= 64 and kept <= 64 + 2, (kept, by_name)


# --- supervision ---------------------------------------------------------------------

def test_killed_zygotes_are_replaced_and_their_calls_fail_naming_them(
        caplog: pytest.LogCaptureFixture, audit_events: list[dict[str, Any]]) -> None:
    caplog.set_level(logging.WARNING, logger="neural_doc_flow_security")
    caplog.set_level(logging.INFO, logger="neural_doc_flow_security.audit")

    async def scenario() -> tuple[str, set[int], set[int], list[object], ManagerStats]:
        async with SandboxManager(status_interval=None) as m:
            handle = await m.with_options(context=True).spawn("victim", lambda ctx: ctx.wait_for_stop())
            old = set(m._starter.pids)
            for pid in old:
                os.kill(pid, signal.SIGKILL)  # zygotes this test's manager started
            try:
                await asyncio.wait_for(handle.wait(), 60)
                error = "no error"
            except SandboxError as e:
                error = str(e)
            # Once both deaths are known (a launch sent in the moment between a zygote's
            # death and its EOF fails like the calls that were running in it).
            await async_wait_until(lambda: m.stats().zygotes_restarted >= len(old), timeout=60)
            outputs = [(await m.execute_sandboxed("after", lambda i=i: i)).output for i in range(4)]
            await async_wait_until(lambda: len(m._starter.pids) == len(old)
                                   and m.stats().zygotes_alive == len(old), timeout=60)
            return error, old, set(m._starter.pids), outputs, m.stats()

    error, old, new, outputs, stats = run(scenario())
    assert "zygote" in error and "exited" in error and any(str(pid) in error for pid in old), error
    assert outputs == [0, 1, 2, 3]
    assert not old & new and stats.zygotes_restarted >= len(old) and stats.zygotes_alive == len(old)
    restarts = [r.getMessage() for r in caplog.records if "replaced by" in r.getMessage()]
    assert len(restarts) >= len(old), restarts
    assert "killed by signal 9" in restarts[0]
    audited = [e for e in audit_events if e["event"] == "zygote_restart"]
    assert len(audited) >= len(old), audited
    assert {e["old_pid"] for e in audited} >= old and "killed by signal 9" in str(audited[0]["status"])


def test_a_zygote_that_keeps_dying_at_start_is_given_up_not_restarted_in_a_loop(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="neural_doc_flow_security")
    monkeypatch.setattr(start_methods, "RESTART_BACKOFF", 0.01)

    async def scenario() -> tuple[str, ManagerStats, int]:
        async with SandboxManager(status_interval=None) as m:
            assert (await m.execute_sandboxed("before", lambda: 1)).output == 1
            # From now on a zygote's interpreter exits at once (it runs in isolated mode:
            # no variable of its environment can break it).
            monkeypatch.setattr(start_methods, "zygote_command",
                                lambda fd: [sys.executable, "-I", "-c", "raise SystemExit(1)", str(fd)])
            slots = len(m._starter._zygotes)
            for pid in m._starter.pids:
                os.kill(pid, signal.SIGKILL)
            await async_wait_until(lambda: m.stats().zygotes_given_up == slots, timeout=120)
            with pytest.raises(SandboxError) as info:
                await m.execute_sandboxed("after", lambda: 2)
            return str(info.value), m.stats(), slots

    error, stats, slots = run(scenario())
    assert "not restarted" in error, error
    assert stats.zygotes_given_up == slots and stats.zygotes_alive == 0
    # Restarted, but not in a loop: at most MAX_FAILED_STARTS per slot (how many depends
    # on whether the machine took more than STABLE_AFTER to get here).
    assert slots <= stats.zygotes_restarted <= slots * start_methods.MAX_FAILED_STARTS
    assert any("not restarted" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_a_zygote_whose_template_was_killed_is_replaced() -> None:
    async def scenario() -> tuple[int, set[int], list[object]]:
        async with SandboxManager(status_interval=None) as m:
            first = m._starter._zygotes[0]
            assert first.process is not None
            assert wait_until(lambda: psutil.Process(first.process.pid).children(), timeout=30)  # type: ignore[union-attr]
            template = psutil.Process(first.process.pid).children()[0]
            os.kill(template.pid, signal.SIGKILL)  # the template of a zygote of this test's manager
            outputs = [(await m.execute_sandboxed("after", lambda: 2)).output for _ in range(3)]
            await async_wait_until(lambda: m.stats().zygotes_restarted >= 1
                                   and m.stats().zygotes_alive == len(m._starter._zygotes), timeout=60)
            return first.process.pid, set(m._starter.pids), outputs

    old, new, outputs = run(scenario())
    assert outputs == [2] * 3 and old not in new


# --- faults: sandboxes, stopped zygotes, a dead manager -------------------------------

def test_sigkill_of_a_sandboxs_init_or_payload_ends_its_call_and_nothing_else() -> None:
    async def scenario() -> list[object]:
        async with SandboxManager(status_interval=None) as m:
            seen: list[object] = []
            for target in ("init", "payload"):
                handle = await m.with_options(context=True).spawn("victim", lambda ctx: ctx.wait_for_stop())
                init = psutil.Process(handle.pid)
                assert wait_until(init.children, timeout=30)
                victim = handle.pid if target == "init" else init.children()[0].pid
                os.kill(victim, signal.SIGKILL)  # a process of this test's sandbox
                result = await asyncio.wait_for(handle.wait(), 60)
                seen.append((target, result.outcome.value))
            seen.append((await m.execute_sandboxed("after", lambda: 2)).output)
            return seen

    seen = run(scenario())
    assert seen[0] == ("init", "killed") and seen[1][0] == "payload" and seen[1][1] in ("killed", "error")
    assert seen[2] == 2


def test_calls_on_a_stopped_zygote_end_at_their_timeout_and_new_calls_go_elsewhere() -> None:
    # With its zygote SIGSTOPped, a call with a short timeout waited for the zygote to be
    # continued, and new calls were still sent to it. The manager kills through the
    # sandbox's pidfd at its own deadline and takes the zygote out of rotation.
    async def scenario() -> tuple[list[str], bool, list[object], ManagerStats, list[psutil.Process]]:
        async with SandboxManager(status_interval=None) as m:
            if len(m._starter._zygotes) < 2:
                pytest.skip("one zygote on a machine with one CPU")
            config = SandboxConfig(timeout_seconds=2)
            calls = [asyncio.create_task(m.with_options(sandbox_config=config).execute_sandboxed("slow", _sleeper, 120))
                     for _ in range(4)]
            await async_wait_until(lambda: len(m.list_sandboxes()) == 4, timeout=60)
            zygote = m._starter._zygotes[0]
            assert zygote.process is not None and zygote.running, "no call runs in the first zygote"
            sandboxes = [p for i in zygote.running for h in [m._handles.get(i)] if h for p in tree_of(h.pid)]
            os.kill(zygote.process.pid, signal.SIGSTOP)  # a zygote of this test's manager
            try:
                outcomes = [r.outcome.value for r in await asyncio.wait_for(asyncio.gather(*calls), 60)]
                still_stopped = psutil.Process(zygote.process.pid).status() == psutil.STATUS_STOPPED
                after = [(await asyncio.wait_for(m.execute_sandboxed("after", lambda: 3), 60)).output
                         for _ in range(4)]
                stats = m.stats()
                gone = [p for p in sandboxes if alive(p)]  # killed (zombies until their zygote reaps them)
            finally:
                os.kill(zygote.process.pid, signal.SIGCONT)
            return outcomes, still_stopped, after, stats, gone

    outcomes, still_stopped, after, stats, left = run(scenario())
    assert outcomes == ["timeout"] * 4
    assert still_stopped, "the calls ended only once the zygote was continued"
    assert after == [3] * 4
    assert stats.zygotes_stalled == 1
    assert not left, left


MANAGER_UNDER_LOAD = textwrap.dedent("""
    import asyncio, sys
    from neural_doc_flow_security.sandbox.api import SandboxManager
    from neural_doc_flow_security.sandbox.config import SandboxConfig

    def sleeper():
        import time
        time.sleep(600)

    async def main():
        config = SandboxConfig(timeout_seconds=600, memory_limit_mb=256)  # a cgroup each
        async with SandboxManager(status_interval=None) as m:
            handles = [await m.with_options(sandbox_config=config).spawn(f"load-{i}", sleeper) for i in range(8)]
            print(",".join(str(h.pid) for h in handles), ",".join(map(str, m._starter.pids)), flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
""")


@pytest.mark.parametrize("kill_zygotes_too", [False, True], ids=["manager", "manager+zygotes"])
def test_a_sigkilled_manager_under_load_leaves_nothing(kill_zygotes_too: bool, no_leaks: LeakTracker) -> None:
    # The zygotes' SIGTERM handler raised SystemExit wherever they were, even in their
    # shutdown: cgroups were left in 5 of 6 runs. Killed zygotes cannot clean up: then
    # `ndf-sandbox cleanup` removes what they left.
    directory = make_host_dir(no_leaks)
    script = directory / "manager.py"
    script.write_text(MANAGER_UNDER_LOAD)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    watched: list[psutil.Process] = []
    owners = {process.pid}
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line, f"the manager script failed: {process.stderr.read().decode() if process.stderr else ''}"
        sandbox_field, zygote_field = line.split()
        zygotes = [int(pid) for pid in zygote_field.split(",")]
        owners.update(zygotes)
        for pid in sandbox_field.split(","):
            watched += tree_of(int(pid))
        watched += [psutil.Process(pid) for pid in zygotes]
        assert len(sandbox_cgroups(owners)) >= 8
        if kill_zygotes_too:
            # All stopped first: a manager that saw its zygotes die would remove their
            # cgroups itself (it does, in a thread), and nothing would be left to clean.
            for pid in (process.pid, *zygotes):
                os.kill(pid, signal.SIGSTOP)  # the manager this test started and its zygotes
            for pid in zygotes:
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait(timeout=60)
        assert wait_until(lambda: not any(alive(p) for p in watched), timeout=60), \
            [p.pid for p in watched if alive(p)]
        assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in zygotes), timeout=60)
        if kill_zygotes_too:
            assert sandbox_cgroups(owners), "killed zygotes cannot remove their cgroups"
            cleanup = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ndf-sandbox"), "cleanup"],
                                     capture_output=True, timeout=120, check=False)
            assert cleanup.returncode == 0, cleanup.stderr.decode()
            assert "leftover cgroup directories removed" in cleanup.stdout.decode()
        left = sandbox_cgroups(owners)
        assert not left, f"left after the manager died: {left}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        api_helpers.kill_pids({p.pid for p in watched if alive(p)})
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        api_helpers.remove_cgroup_dirs(sandbox_cgroups(owners))


def test_a_sandbox_lost_with_its_zygote_and_never_awaited_leaves_no_unretrieved_error() -> None:
    # "Future exception was never retrieved: SandboxError('the zygote exited')" at the
    # end of a test run: the exit future of a sandbox whose zygote died, failed while
    # nobody awaited it.
    errors: list[str] = []

    async def use_and_drop() -> None:
        async with SandboxManager(status_interval=None) as m:
            handle = await m.with_options(context=True).spawn("victim", lambda ctx: ctx.wait_for_stop())
            owner = m._starter._owner[handle.sandbox_id].process
            assert owner is not None
            del handle  # never awaited
            os.kill(owner.pid, signal.SIGKILL)  # a zygote of this test's manager
            await async_wait_until(lambda: not m.list_sandboxes(), timeout=60)

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context["message"]))
        await use_and_drop()
        gc.collect()  # the manager and everything it held
        await asyncio.sleep(0.1)

    run(scenario())
    assert not [e for e in errors if "never retrieved" in e], errors


def test_a_control_request_to_a_stopped_zygote_fails_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> tuple[str, int, bool, str]:
        async with SandboxManager(status_interval=None) as m:
            handle = await m.with_options(context=True).spawn("victim", lambda ctx: ctx.wait_for_stop())
            # Short only from here: the launch above may take longer on a loaded machine.
            monkeypatch.setattr(start_methods, "LAUNCH_ANSWER_WAIT", 1.0)
            zygote = m._starter._owner[handle.sandbox_id].process
            assert zygote is not None
            init = psutil.Process(handle.pid)
            os.kill(zygote.pid, signal.SIGSTOP)  # the zygote of this test's manager
            try:
                with pytest.raises(SandboxError) as info:
                    await asyncio.wait_for(handle.pause(), 60)
                stalled = m.stats().zygotes_stalled
                await asyncio.wait_for(m._starter.control("kill", handle.sandbox_id), 60)  # through the pidfd
                killed = wait_until(lambda: not alive(init), timeout=60)
            finally:
                os.kill(zygote.pid, signal.SIGCONT)
            outcome = (await asyncio.wait_for(handle.wait(), 60)).outcome.value
            return str(info.value), stalled, killed, outcome

    error, stalled, killed, outcome = run(scenario())
    assert "did not answer 'freeze'" in error and stalled == 1
    assert killed, "the sandbox's init outlived a kill sent while its zygote was stopped"
    assert outcome == "killed"


MANAGER_WITH_A_FULL_TMPDIR = textwrap.dedent("""
    import asyncio
    from neural_doc_flow_security.sandbox.api import SandboxManager

    async def main():
        async with SandboxManager(status_interval=None) as m:
            call = await m.execute_sandboxed("call", lambda: b"x" * (1 << 20))
            command = await m.execute_command("command", ["sh", "-c", "echo ok"])
            assert call.output == b"x" * (1 << 20), call
            assert command.stdout == b"ok\\n", command
        print("served", flush=True)

    asyncio.run(main())
""")


def test_a_manager_with_tmpdir_on_a_full_file_system_keeps_serving(no_leaks: LeakTracker) -> None:
    # TMPDIR on a full file system (a 16 KiB tmpfs, filled), in a mount namespace of
    # the test's own: the manager's temporary files (if any) must not be where it fails.
    directory = make_host_dir(no_leaks)
    script = directory / "manager.py"
    script.write_text(MANAGER_WITH_A_FULL_TMPDIR)
    full = directory / "full"
    full.mkdir()
    shell = (f"mount -t tmpfs -o size=16k tmpfs {full} && "
             f"(head -c 1M /dev/zero > {full}/filler 2>/dev/null; true) && "
             f"! (echo more > {full}/more) 2>/dev/null && "
             f"TMPDIR={full} exec {sys.executable} {script}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell],
                          capture_output=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout == b"served\n", done
