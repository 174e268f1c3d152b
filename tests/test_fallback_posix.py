"""The posix fallback backend (rlimits + a process group), run for real on Linux
through the unchanged SandboxManager API (`start_method="posix"`).

Every test that runs a sandbox uses the `manager` fixture, which accepts every
gap (`allow_unenforced=("all",)`); the refusal tests use the default starter.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import cloudpickle
import psutil
import pytest

from conftest import UNPRIVILEGED_UID, _ensure_unprivileged_user, wait_until
from neural_doc_flow_security.sandbox import (
    IpcMessage,
    Outcome,
    PluginContext,
    SandboxConfig,
    SandboxManager,
    UnsupportedError,
)
from neural_doc_flow_security.sandbox.fallback.posix import (
    POSIX_UNENFORCEABLE,
    PosixStarter,
    check_enforceable,
    plan_posix_rlimits,
    unenforced_protections,
)
from neural_doc_flow_security.sandbox.ipc.messages import MessageKind

# The plugins below run in a fresh interpreter under another uid: send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")

CONFIG = SandboxConfig(timeout_seconds=30.0)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every test leaves no child process and no open fd behind."""
    fds_before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()
    yield
    assert wait_until(lambda: not psutil.Process().children(recursive=True), timeout=10.0), \
        psutil.Process().children(recursive=True)
    if fds_before:
        leaked = set(os.listdir("/proc/self/fd")) - fds_before
        assert not leaked, [os.readlink(f"/proc/self/fd/{fd}") for fd in leaked
                            if os.path.exists(f"/proc/self/fd/{fd}")]


def posix_manager(config: SandboxConfig = CONFIG, **kwargs: Any) -> SandboxManager:
    kwargs.setdefault("allow_unenforced", ("all",))
    return SandboxManager(config, start_method="posix", status_interval=None, **kwargs)


RUN_TIMEOUT = 180.0  # a hang fails the test instead of stalling the suite


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, RUN_TIMEOUT))


def asyncio_test(body: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Turn `async def test_x()` into a plain test (no pytest-asyncio here)."""
    def test() -> None:
        run(body())
    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


def with_manager(body: Callable[[SandboxManager], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Turn `async def test_x(manager)` into a plain test run inside a posix manager."""
    async def go() -> None:
        async with posix_manager() as manager:
            await body(manager)
    test = asyncio_test(go)
    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


# ---------------------------------------------------------------- fail closed


def test_default_config_is_refused_naming_every_missing_protection() -> None:
    async def go() -> None:
        async with SandboxManager(start_method="posix") as m:
            with pytest.raises(UnsupportedError) as caught:
                await m.execute_sandboxed("p", lambda: 1)
        message = str(caught.value)
        for name in ("namespaces.pid", "namespaces.net", "namespaces.mnt", "filesystem", "seccomp"):
            assert name in message
    run(go())


def test_allowing_some_gaps_still_refuses_the_others() -> None:
    config = SandboxConfig(memory_limit_mb=256, cpu_quota_percent=50)
    allowed = [n for n in POSIX_UNENFORCEABLE if n not in ("seccomp", "cpu_quota_percent")]
    with pytest.raises(UnsupportedError) as caught:
        check_enforceable(config, allowed)
    assert caught.value.protection == "seccomp, cpu_quota_percent"


def test_memory_limit_is_only_an_approximation_that_must_be_allowed() -> None:
    config = SandboxConfig(memory_limit_mb=256)
    allowed = [n for n in POSIX_UNENFORCEABLE if n != "memory_limit_mb"]
    with pytest.raises(UnsupportedError, match="approximated by RLIMIT_AS"):
        check_enforceable(config, allowed, platform="linux")
    with pytest.raises(UnsupportedError, match="does not enforce RLIMIT_AS"):
        check_enforceable(config, allowed, platform="darwin")


def test_no_new_privs_is_a_gap_on_macos_only() -> None:
    names = {n for n, _, requested in unenforced_protections(SandboxConfig(), platform="darwin") if requested}
    assert "no_new_privs" in names
    names = {n for n, _, _ in unenforced_protections(SandboxConfig(), platform="linux")}
    assert "no_new_privs" not in names


def test_process_limit_for_root_is_refused_because_rlimit_nproc_does_not_bind_root() -> None:
    config = SandboxConfig(max_processes=8, uid=0, gid=0)
    allowed = [n for n in POSIX_UNENFORCEABLE if n != "max_processes"]
    with pytest.raises(UnsupportedError, match="RLIMIT_NPROC does not apply to root"):
        check_enforceable(config, allowed, euid=0, egid=0)
    check_enforceable(config.replace(uid=4242, gid=4242), allowed, euid=0, egid=0)


def test_unknown_allow_name_is_refused() -> None:
    with pytest.raises(UnsupportedError, match="unknown protection"):
        PosixStarter(allow_unenforced=("namespace.pid",))


# ---------------------------------------------------------------- callables


@with_manager
async def test_callable_result_and_honest_isolation_report(manager: SandboxManager) -> None:
    result = await manager.execute_sandboxed("p", lambda a, b: {"sum": a + b, "uid": os.getuid()}, 40, 2)
    assert result.outcome is Outcome.OK, result.error
    assert result.output == {"sum": 42, "uid": CONFIG.uid_or_nobody}
    iso = result.isolation
    assert iso.backend == "posix" and iso.namespaces == () and iso.seccomp == "off"
    gaps = " ".join(iso.not_enforced)
    for name in ("namespaces.pid", "namespaces.net", "filesystem", "seccomp", "cpu_quota_percent"):
        assert name in gaps
    assert result.resource_usage.wall_seconds > 0


@with_manager
async def test_callable_exception_is_an_error(manager: SandboxManager) -> None:
    def fails() -> None:
        raise ValueError("bad document")

    result = await manager.execute_sandboxed("p", fails)
    assert result.outcome is Outcome.ERROR
    assert "ValueError: bad document" in (result.error or "")


@asyncio_test
async def test_timeout_kills_the_whole_process_group() -> None:
    def sleeper(ctx: PluginContext) -> None:
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "300"])
        ctx.send(str(child.pid).encode())
        time.sleep(300)

    async with posix_manager(CONFIG) as m:
        # A spawned plugin has no wall timeout unless its own config sets one.
        handle = await m.with_options(sandbox_config=CONFIG.replace(timeout_seconds=2.0)).spawn("sleeper", sleeper)
        message = await handle.receive(timeout=30)
        assert message is not None and message.kind is MessageKind.DATA
        grandchild = int(bytes(message.content))
        result = await handle.wait()
    assert result.outcome is Outcome.TIMEOUT
    assert wait_until(lambda: gone(grandchild))
    assert group_members(handle.pid) == []


@asyncio_test
async def test_memory_hog_fails_under_rlimit_as() -> None:
    def hog() -> int:
        return len(bytearray(1024 * 1024 * 1024))

    async with posix_manager(CONFIG.replace(memory_limit_mb=256)) as m:
        result = await m.execute_sandboxed("hog", hog)
    assert result.outcome in (Outcome.ERROR, Outcome.KILLED)
    if result.outcome is Outcome.ERROR:
        assert "MemoryError" in (result.error or "")
    assert any("rlimit as=" in line for line in result.isolation.limits)
    assert any("approximated by RLIMIT_AS" in line for line in result.isolation.not_enforced)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to the test uid")
@asyncio_test
async def test_fork_bomb_is_stopped_by_rlimit_nproc() -> None:
    _ensure_unprivileged_user()

    def fork_bomb() -> dict[str, Any]:
        import time

        made, refused = [], 0
        for _ in range(40):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                time.sleep(300)
                os._exit(0)
            made.append(pid)
        return {"made": made, "refused": refused}

    limit = 6
    config = CONFIG.replace(uid=UNPRIVILEGED_UID, gid=UNPRIVILEGED_UID, max_processes=limit)
    async with posix_manager(config) as m:
        result = await m.execute_sandboxed("bomb", fork_bomb)
    assert result.outcome is Outcome.OK, result.error
    assert result.isolation.uid == UNPRIVILEGED_UID
    assert len(result.output["made"]) < limit
    assert result.output["refused"] > 0
    # The children outlived the callable, but not the sandbox.
    children: list[int] = result.output["made"]
    assert wait_until(lambda: all(gone(pid) for pid in children))


@with_manager
async def test_open_files_are_capped(manager: SandboxManager) -> None:
    def open_many() -> int:
        opened = []
        try:
            for _ in range(1000):
                opened.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        return len(opened)

    few_files = manager.with_options(sandbox_config=CONFIG.replace(max_open_files=16))
    result = await few_files.execute_sandboxed("files", open_many)
    assert result.outcome is Outcome.OK, result.error
    assert result.output < 16


@with_manager
async def test_only_mapped_fds_and_a_clean_environment(manager: SandboxManager) -> None:
    def look() -> dict[str, Any]:
        return {"fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")), "env": dict(os.environ)}

    result = await manager.execute_sandboxed("look", look)
    assert result.outcome is Outcome.OK, result.error
    assert set(result.output["fds"]) - {0, 1, 2, 3} <= {max(result.output["fds"])}  # + listdir's own fd
    assert len(result.output["fds"]) <= 5
    assert result.output["env"] == dict(CONFIG.environment)


@with_manager
async def test_unknown_program_is_a_sandbox_error(manager: SandboxManager) -> None:
    result = await manager.execute_command("missing", ["/nonexistent/program"])
    assert result.outcome is Outcome.SANDBOX_ERROR
    assert "exec" in (result.error or "")


# ---------------------------------------------------------------- programs


@with_manager
async def test_execute_command_with_stdin_and_stdout(manager: SandboxManager) -> None:
    result = await manager.execute_command("tr", ["tr", "a-z", "A-Z"], stdin=b"hello sandbox")
    assert result.outcome is Outcome.OK, result.error
    assert result.stdout == b"HELLO SANDBOX"

    result = await manager.execute_command("env", ["env"])
    assert sorted(result.stdout.decode().split()) == sorted(f"{k}={v}" for k, v in CONFIG.environment)

    result = await manager.execute_command("fail", ["sh", "-c", "echo oops >&2; exit 3"])
    assert result.outcome is Outcome.ERROR and result.exit_code == 3 and result.stderr == b"oops\n"


# ---------------------------------------------------------------- long-running plugins


@with_manager
async def test_data_messages_round_trip(manager: SandboxManager) -> None:
    def echo(ctx: PluginContext) -> str:
        while (message := ctx.receive(timeout=30)) is not None:
            if bytes(message.content) == b"bye":
                return "done"
            ctx.send(bytes(message.content).upper(), tag="echo")
        return "host gone"

    handle = await manager.spawn("echo", echo)
    await manager.send_message("echo", IpcMessage.data(b"abc"))
    reply = await manager.receive_message("echo", timeout=30)
    assert reply is not None and bytes(reply.content) == b"ABC" and reply.tag == "echo"
    await manager.send_message("echo", IpcMessage.data(b"bye"))
    result = await handle.wait()
    assert result.outcome is Outcome.OK and result.output == "done"


@with_manager
async def test_pause_stops_cpu_time_and_resume_restarts_it(manager: SandboxManager) -> None:
    def spin() -> None:
        while True:
            pass

    handle = await manager.spawn("spin", spin)

    async def cpu() -> float:
        usage = (await handle.status()).usage
        return usage["cpu_user_seconds"] + usage["cpu_system_seconds"]

    while await cpu() < 0.2:
        await asyncio.sleep(0.05)
    await handle.pause()
    frozen = await cpu()
    assert (await handle.status()).usage["frozen"] == 1.0
    await asyncio.sleep(0.5)
    assert await cpu() == frozen
    await handle.resume()
    while await cpu() <= frozen:
        await asyncio.sleep(0.05)
    result = await handle.kill()
    assert result.outcome is Outcome.KILLED
    assert group_members(handle.pid) == []


@with_manager
async def test_stop_escalates_to_kill_when_the_plugin_ignores_it(manager: SandboxManager) -> None:
    def stubborn(ctx: PluginContext) -> None:
        import signal
        import time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ctx.send(b"ready")
        while True:
            time.sleep(0.1)

    handle = await manager.spawn("stubborn", stubborn)
    assert await handle.receive(timeout=30) is not None
    result = await handle.stop(grace_seconds=0.5)
    assert result.outcome is Outcome.KILLED and result.signal == 9


@with_manager
async def test_stop_message_ends_a_cooperative_plugin(manager: SandboxManager) -> None:
    def polite(ctx: PluginContext) -> str:
        ctx.send(b"ready")
        return "stopped cleanly" if ctx.wait_for_stop(timeout=60) else "never asked"

    handle = await manager.spawn("polite", polite)
    assert await handle.receive(timeout=30) is not None
    result = await handle.stop(grace_seconds=10)
    assert result.outcome is Outcome.OK and result.output == "stopped cleanly"


@with_manager
async def test_cancelling_a_call_kills_its_tree(manager: SandboxManager) -> None:
    def forever() -> None:
        import time

        time.sleep(300)

    task = asyncio.create_task(manager.execute_sandboxed("forever", forever))
    while not manager.list_sandboxes():
        await asyncio.sleep(0.01)
    pid = manager.list_sandboxes()[0].pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(pid) and group_members(pid) == []


@asyncio_test
async def test_leaving_the_manager_kills_running_sandboxes() -> None:
    def forever() -> None:
        import time

        time.sleep(300)

    async with posix_manager() as m:
        handle = await m.spawn("forever", forever)
    assert gone(handle.pid) and group_members(handle.pid) == []
    assert (await handle.wait()).outcome is Outcome.KILLED


@with_manager
async def test_concurrent_sandboxes_are_independent(manager: SandboxManager) -> None:
    results = await asyncio.gather(*(manager.execute_sandboxed(f"p{i}", lambda i=i: (i, os.getpid()))
                                     for i in range(4)))
    assert all(r.outcome is Outcome.OK for r in results), [r.error for r in results]
    assert [r.output[0] for r in results] == [0, 1, 2, 3]
    assert len({r.output[1] for r in results}) == 4


def test_default_memory_limit_stands_as_rlimit_as_and_a_set_one_is_refused() -> None:
    # The default profile is bounded here too (RLIMIT_AS on Linux); a memory limit the
    # user set is not a cgroup's, so it is refused unless allowed.
    gaps = {name: requested for name, _, requested in unenforced_protections(SandboxConfig(), platform="linux")}
    assert gaps["memory_limit_mb"] is False
    gaps = {name: requested for name, _, requested in
            unenforced_protections(SandboxConfig(memory_limit_mb=256), platform="linux")}
    assert gaps["memory_limit_mb"] is True
    assert ("RLIMIT_AS", 512 << 20, 512 << 20) in plan_posix_rlimits(SandboxConfig(), platform="linux")


def test_max_file_size_is_rlimit_fsize() -> None:
    assert ("RLIMIT_FSIZE", 2 << 20, 2 << 20) in plan_posix_rlimits(SandboxConfig(max_file_size_mb=2))
