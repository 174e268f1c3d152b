"""Lifetimes: cancellation kills the sandbox before it completes, leaving
`async with` kills every sandbox, a SIGKILLed manager takes its zygote and
sandboxes with it, and the next manager removes the cgroups it left.

Every test runs under both start methods and ends with the `no_leaks` check.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from api_helpers import (
    LeakTracker,
    alive,
    async_wait_until,
    linux_only,
    make_host_dir,
    needs_root,
    remove_cgroup_dirs,
    run,
    rw_bind_config,
    sandbox_cgroups,
    tree_of,
    wait_until,
)
from neural_doc_flow_security.sandbox import PluginContext
from neural_doc_flow_security.sandbox.api import Health
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

no_leaks = api_helpers.no_leaks  # the fixtures, used by every test below
method = api_helpers.method
manager = api_helpers.manager
describe = api_helpers.describe

pytestmark = [linux_only, needs_root, pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(300)]


def describe_processes(processes: list[psutil.Process]) -> list[str]:
    described = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} ppid={proc.ppid()} {proc.status()} {proc.cmdline()[-3:]}")
    return described


def kill_survivors(processes: list[psutil.Process]) -> None:
    """Cleanup after a failure: SIGKILL the processes we watched that still run
    (psutil checks the start time, so a recycled pid is never hit)."""
    for proc in processes:
        if alive(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def sleeper_writing_marker(path: str) -> None:
    """Write a marker file (in a read-write bind) once running, then sleep."""
    import time

    with open(path, "w") as f:
        f.write("running")
    time.sleep(600)


def sleeper(ctx: PluginContext) -> None:
    import time

    ctx.send(b"", tag="ready")
    time.sleep(600)


async def wait_ready(handle: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = await handle.receive(timeout=1)
        if message is not None and message.tag == "ready":
            return
    raise AssertionError("the plugin never said it was ready")


# --- cancellation ------------------------------------------------------------------

def test_cancelling_the_awaiting_task_kills_the_sandbox(method: str, no_leaks: LeakTracker) -> None:
    directory = make_host_dir(no_leaks)
    marker = directory / "running"

    async def scenario() -> list[psutil.Process]:
        async with manager(method) as m:
            task = asyncio.create_task(m.with_options(sandbox_config=rw_bind_config(directory)).execute_sandboxed(
                "sleeper", sleeper_writing_marker, str(marker)))
            assert await async_wait_until(marker.exists, timeout=60), "the plugin never started"
            listed = [info for info in m.list_sandboxes() if info.plugin_id == "sleeper"]
            assert len(listed) == 1
            tree = tree_of(listed[0].pid)
            assert len(tree) >= 2 and all(alive(p) for p in tree)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The promise: the tree is gone before the cancellation completes.
            still = [p.pid for p in tree if alive(p)]
            assert not still, f"alive after cancellation: {still}"
            assert m.list_sandboxes() == []
            # The manager keeps working after a cancellation.
            after = await m.execute_sandboxed("after", lambda: "ok")
            assert after.output == "ok", describe(after)
            return tree

    run(scenario())


def test_wait_for_timeout_on_execute_kills_the_sandbox(method: str) -> None:
    def spin() -> None:
        while True:
            pass

    async def scenario() -> None:
        async with manager(method) as m:
            task = asyncio.ensure_future(m.execute_sandboxed("spin", spin))
            assert await async_wait_until(lambda: any(len(tree_of(i.pid)) >= 2 for i in m.list_sandboxes()),
                                          timeout=60)
            tree = tree_of(m.list_sandboxes()[0].pid)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(task, 0.5)
            still = [p.pid for p in tree if alive(p)]
            assert not still, f"alive after asyncio.wait_for timed out: {still}"

    run(scenario())


def test_handle_kill_ends_the_tree(method: str) -> None:
    async def scenario() -> tuple[SandboxResult, list[psutil.Process]]:
        async with manager(method) as m:
            handle = await m.spawn("sleeper", sleeper)
            await wait_ready(handle)
            tree = tree_of(handle.pid)
            result = await handle.kill()
            assert not [p.pid for p in tree if alive(p)]
            assert handle.health is Health.EXITED
            return result, tree

    result, tree = run(scenario())
    assert len(tree) >= 2
    assert result.outcome is Outcome.KILLED, describe(result)


def quick(n: int) -> int:
    return n + 1


def test_no_process_of_a_sandbox_is_left_once_its_result_is_in(method: str) -> None:
    # Init reports the payload's end and exits right after: the result must wait for
    # that exit, or whoever holds it may still find init running (a pool's close()
    # did, under load). Many rounds: the window was a scheduling gap.
    async def scenario() -> list[str]:
        left: list[str] = []
        async with manager(method) as m:
            for round_ in range(40):
                handle = await m.spawn("quick", quick, round_)
                result = await handle.wait()
                assert result.ok and result.output == round_ + 1, describe(result)
                with contextlib.suppress(psutil.NoSuchProcess):
                    status = psutil.Process(handle.pid).status()
                    if status != psutil.STATUS_ZOMBIE:
                        left.append(f"round {round_}: init {handle.pid} is {status}")
        return left

    assert run(scenario()) == []


def test_a_command_ends_with_its_tree_and_inits_report(method: str) -> None:
    # The result is taken from init's report of the program's end, before init is
    # reaped: init first kills and reaps every other process of the sandbox (here a
    # background sleep), so none is left when the call returns, and their CPU counts.
    from conftest import processes_with_argument, unique_marker

    marker = unique_marker()
    # The shell itself only sleeps; the CPU is burnt by a background loop that it leaves
    # behind, once the loop has used 0.2 s of CPU by its own /proc stat (utime, in ticks):
    # however slow the machine, the CPU to be counted is there before the shell exits.
    ticks = 2 * os.sysconf("SC_CLK_TCK") // 10
    script = (f"sleep {marker} & (while :; do :; done) & loop=$!; "
              f"while [ $(cut -d' ' -f14 /proc/$loop/stat) -lt {ticks} ]; do sleep 0.05; done; exit 3")

    async def scenario() -> tuple[SandboxResult, bool, bool]:
        async with manager(method) as m:
            result = await m.execute_command("busy", ["sh", "-c", script])
            gone = not processes_with_argument(marker)  # at once, not a moment later
            later = await m.execute_command("after", ["true"])  # the manager goes on
            return result, gone, later.exit_code == 0

    result, gone, later_ok = run(scenario())
    assert result.outcome is Outcome.ERROR and result.exit_code == 3, describe(result)
    # Counted only because init reaped the loop before reporting (else: the shell's ~0 s).
    assert result.resource_usage.cpu_user_seconds + result.resource_usage.cpu_system_seconds > 0.1, describe(result)
    assert gone and later_ok


def answer_then_keep_writing(path: str, marker: str) -> None:
    """Send the result by hand, then append to `path` (in a writable bind) forever,
    and so does a shell started with `marker` in its argv."""
    import subprocess

    from neural_doc_flow_security.sandbox.ipc.channel import SyncChannel
    from neural_doc_flow_security.sandbox.ipc.messages import IpcMessage

    subprocess.Popen(["sh", "-c", f"while :; do echo sh >> {path}; done", marker])
    with open(path, "a") as f:
        f.write("python\n")
        f.flush()
        SyncChannel.from_fd(3).send(IpcMessage.result("answered"))
        while True:
            f.write("python\n")
            f.flush()


@pytest.mark.parametrize("pooled", [False, True], ids=["cold", "pooled"])
def test_a_call_returns_only_once_its_tree_is_dead(method: str, pooled: bool, no_leaks: LeakTracker) -> None:
    # A callable that answers early and keeps going: when the call returns, nothing
    # of its sandbox may run any more (issue 23 item 14: it went on writing for ~4 ms).
    from conftest import processes_with_argument, unique_marker

    directory = make_host_dir(no_leaks)
    config = rw_bind_config(directory)
    marker = unique_marker()

    async def scenario() -> list[tuple[str, int, int, list[str]]]:
        seen = []
        async with manager(method, config=config, pool_size=1 if pooled else 0) as m:
            for n in range(5):
                path = directory / f"written-{n}"
                if pooled:
                    await m.wait_pool_ready()
                result = await m.execute_sandboxed("writer", answer_then_keep_writing, str(path), marker)
                size_at_return = path.stat().st_size if path.exists() else 0
                left = describe_processes(processes_with_argument(marker, program=None))
                await asyncio.sleep(0.2)
                seen.append((describe(result) if result.output != "answered" else "", size_at_return,
                             path.stat().st_size if path.exists() else 0, left))
        return seen

    try:
        seen = run(scenario())
    finally:
        from conftest import kill_processes_with_argument

        kill_processes_with_argument(marker)
    for failed, at_return, later, left in seen:
        assert not failed, failed
        assert later == at_return, f"the file grew from {at_return} to {later} bytes after the call returned"
        assert not left, f"processes of the sandbox alive after the call returned: {left}"


def test_many_sandboxes_ending_at_once_leave_the_zygotes_running() -> None:
    # A sandbox's report and its init's exit often arrive in the same batch of events.
    async def scenario() -> tuple[list[object], bool]:
        async with manager("zygote", max_concurrent=40) as m:
            results = await asyncio.gather(*(m.execute_command(f"c{i}", ["true"]) for i in range(400)),
                                           *(m.execute_sandboxed(f"f{i}", lambda: 1) for i in range(40)))
            alive_after = all(z.dead is None for z in m._starter._zygotes)
            return [r.outcome.value for r in results], alive_after

    outcomes, zygotes_alive = run(scenario())
    assert outcomes == ["ok"] * 440 and zygotes_alive


def test_a_launch_goes_to_a_zygote_that_is_not_making_a_spare() -> None:
    # A zygote says when it starts and ends making a spare (it cannot be interrupted):
    # the manager sends launches to another one meanwhile, if one is as free.
    async def scenario() -> list[bool]:
        async with manager("zygote", status_interval=None) as m:
            zygotes = m._starter._zygotes
            if len(zygotes) < 2:
                pytest.skip("one zygote on a machine with one CPU")
            placed = []
            for preparing in zygotes[:2]:
                await asyncio.sleep(0.3)  # both have made what they make ahead, and said so
                preparing.preparing = True  # as if it had just said so
                handle = await m.with_options(context=True).spawn("p", lambda ctx: ctx.wait_for_stop())
                placed.append(m._starter._owner[handle.sandbox_id] is not preparing)
                await handle.kill()
                await handle.wait()
                preparing.preparing = False
            return placed

    assert run(scenario()) == [True, True]


@pytest.mark.timeout(900)
def test_hundreds_of_requests_at_once_are_all_carried_out() -> None:
    # More requests than the zygotes' sockets hold: senders queue for the socket to drain
    # (the event loop has one writer callback per fd; every queued request must still go).
    def idle(ctx: PluginContext) -> None:
        ctx.wait_for_stop()

    async def scenario() -> tuple[int, int]:
        async with manager("zygote", max_concurrent=400, status_interval=None) as m:
            # Generous: 300 launches at once on a loaded 2-core machine took over 120 s once.
            handles = await asyncio.wait_for(asyncio.gather(*(m.spawn(f"p{i}", idle) for i in range(300))), 400)
            alive_now = sum(alive(psutil.Process(h.pid)) for h in handles)
            results = await asyncio.wait_for(asyncio.gather(*(h.kill() for h in handles)), 400)
            return alive_now, sum(r.outcome is Outcome.KILLED for r in results)

    assert run(scenario()) == (300, 300)


# --- leaving `async with` -------------------------------------------------------------

def test_leaving_async_with_kills_live_sandboxes(method: str) -> None:
    handles: list[Any] = []

    async def scenario() -> tuple[list[psutil.Process], list[Any]]:
        async with manager(method) as m:
            handles.extend([await m.spawn(f"sleeper-{i}", sleeper) for i in range(3)])
            for handle in handles:
                await wait_ready(handle)
            trees = [p for h in handles for p in tree_of(h.pid)]
            assert len(trees) >= 6
        # Left the block: every sandbox is gone now, not eventually.
        still = [p.pid for p in trees if alive(p)]
        assert not still, f"alive after the manager closed: {still}"
        return trees, handles

    run(scenario())  # and no_leaks: the handles' fds are closed though nobody awaited them


def test_handles_report_killed_after_manager_shutdown(method: str, request: pytest.FixtureRequest) -> None:
    handles: list[Any] = []

    async def scenario() -> list[Any]:
        async with manager(method) as m:
            handles.extend([await m.spawn(f"sleeper-{i}", sleeper) for i in range(2)])
            for handle in handles:
                await wait_ready(handle)
        outcomes = []
        for handle in handles:
            try:
                outcomes.append((await handle.wait()).outcome)
            except Exception as exc:  # noqa: BLE001 - reported below
                outcomes.append(f"{type(exc).__name__}: {exc}")
        return outcomes

    assert run(scenario()) == [Outcome.KILLED, Outcome.KILLED]


def test_execute_in_flight_at_shutdown_ends_cleanly(method: str, request: pytest.FixtureRequest) -> None:

    async def scenario() -> tuple[object, int, int]:
        fds_before = len(os.listdir("/proc/self/fd"))
        m = manager(method)
        await m.start()
        task = asyncio.ensure_future(m.execute_sandboxed("spin", lambda: [0 for _ in iter(int, 1)]))
        assert await async_wait_until(lambda: any(len(tree_of(i.pid)) >= 2 for i in m.list_sandboxes()),
                                      timeout=60)
        tree = tree_of(m.list_sandboxes()[0].pid)
        await m.shutdown()
        try:
            outcome: object = (await asyncio.wait_for(task, 60)).outcome
        except Exception as exc:  # noqa: BLE001
            outcome = type(exc).__name__
        assert not [p.pid for p in tree if alive(p)]
        return outcome, fds_before, len(os.listdir("/proc/self/fd"))

    outcome, fds_before, fds_after = run(scenario())
    assert outcome is Outcome.KILLED, outcome
    assert fds_after <= fds_before, "the shut-down sandbox's channel socket is still open"


# --- the manager dies --------------------------------------------------------------

MANAGER_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, time
    from neural_doc_flow_security.sandbox.api import SandboxManager
    from neural_doc_flow_security.sandbox.config import BindMount, FilesystemConfig, SandboxConfig

    method, directory = sys.argv[1], sys.argv[2]

    def sleeper(path):
        import time
        with open(path, "w") as f:
            f.write("running")
        time.sleep(600)

    async def main():
        config = SandboxConfig(timeout_seconds=600, memory_limit_mb=256, filesystem=FilesystemConfig(
            binds=(BindMount(directory, read_only=False),)))
        async with SandboxManager(start_method=method) as m:
            handle = await m.with_options(sandbox_config=config).spawn("victim", sleeper,
                                                                      os.path.join(directory, "running"))
            zygotes = list(getattr(m._starter, "pids", None) or [])
            print(handle.pid, ",".join(map(str, zygotes)) or "-", flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
""")


@pytest.mark.parametrize("kill_zygote_too", [False, True], ids=["manager", "manager+zygote"])
def test_sigkilled_manager_takes_its_sandboxes_along(method: str, kill_zygote_too: bool,
                                                     no_leaks: LeakTracker) -> None:
    if kill_zygote_too and method != "zygote":
        pytest.skip("only the zygote start method has a zygote")
    directory = make_host_dir(no_leaks)
    script = directory / "manager.py"
    script.write_text(MANAGER_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), method, str(directory)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    owners: set[int] = {process.pid}
    watched: list[psutil.Process] = []
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line, f"the manager script failed: {process.stderr.read().decode() if process.stderr else ''}"
        sandbox_field, zygote_field = line.split()
        sandbox_pid = int(sandbox_field)
        zygote_pids = [] if zygote_field == "-" else [int(x) for x in zygote_field.split(",")]
        assert wait_until((directory / "running").exists, timeout=60), "the plugin never started"
        watched += tree_of(sandbox_pid)
        assert len(watched) >= 2
        owners.update(zygote_pids)
        watched += [psutil.Process(pid) for pid in zygote_pids]
        assert sandbox_cgroups(owners), "the sandbox had no cgroup (a memory limit was set)"

        if kill_zygote_too:
            for pid in zygote_pids:
                os.kill(pid, signal.SIGKILL)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)

        assert wait_until(lambda: not any(alive(p) for p in watched), timeout=60), \
            f"alive after the manager died: {describe_processes([p for p in watched if alive(p)])}"
        # Let the owners be reaped (the orphaned zygote by pid 1): a zombie owner is
        # the subject of test_stale_cgroups_of_a_zombie_manager_are_removed.
        assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in owners), timeout=60)

        # A new manager removes whatever cgroup the dead one left behind.
        async def fresh_manager() -> None:
            async with manager(method):
                pass

        run(fresh_manager())
        left = sandbox_cgroups(owners)
        assert not left, f"stale cgroups of the dead manager survived a new start(): {left}"
    finally:
        _end_manager_script(process, watched, owners)


def _end_manager_script(process: subprocess.Popen[bytes], watched: list[psutil.Process],
                        owners: set[int]) -> None:
    """Clean-up of the manager-script tests: reap the script, kill what it left, remove
    (empty) cgroups it owned, close its pipes."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=60)
    kill_survivors(watched)
    with contextlib.suppress(Exception):
        remove_cgroup_dirs(sandbox_cgroups(owners))
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def test_stale_cgroups_of_a_zombie_manager_are_removed(no_leaks: LeakTracker) -> None:
    """A SIGKILLed `fork` manager owns its sandbox cgroups itself; while it is a zombie
    (not yet reaped by its parent, here this test) it can never clean them up, so the
    next manager's start() must."""
    directory = make_host_dir(no_leaks)
    script = directory / "manager.py"
    script.write_text(MANAGER_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), "fork", str(directory)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    owners = {process.pid}
    watched: list[psutil.Process] = []
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line, f"the manager script failed: {process.stderr.read().decode() if process.stderr else ''}"
        sandbox_pid = int(line.split()[0])
        assert wait_until((directory / "running").exists, timeout=60)
        watched = tree_of(sandbox_pid)
        os.kill(process.pid, signal.SIGKILL)  # not reaped yet: a zombie
        assert wait_until(lambda: not any(alive(p) for p in watched), timeout=60)
        assert wait_until(lambda: psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE, timeout=60)
        stale = sandbox_cgroups(owners)
        assert stale, "expected the SIGKILLed fork manager to leave its cgroups"

        async def fresh_manager() -> None:
            async with manager("fork"):
                pass

        run(fresh_manager())
        assert not [p for p in stale if os.path.exists(p)]
    finally:
        _end_manager_script(process, watched, owners)
