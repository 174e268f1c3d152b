"""Each live sandbox has a host uid/gid of its own (issue 23 item 12, linux/ids.py).

Per-uid kernel limits (inotify instances, RLIMIT_NPROC, ucounts) were shared by
every sandbox when all ran as uid 65534: one payload took all inotify instances
and its siblings got EMFILE. As root each sandbox now takes an id of the range
(a flock'ed file under /run/ndf-sandbox/ids), given back when it ends or when its
holder dies. The evidence is read on the host: /proc/<pid>/status and fds of the
payload processes, and the lock files.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import (
    CLI_TIMEOUT,
    SANDBOX_IDS,
    SandboxCaller,
    ndf_host_env,
    processes_with_argument,
    remove_cgroups_of,
    wait_until,
)

ID_LOCKS = Path("/run/ndf-sandbox/ids")

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox")


def _held(uid: int) -> bool:
    """Whether a live process holds the lock file of sandbox id `uid`."""
    try:
        fd = os.open(ID_LOCKS / str(uid), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _payload(marker: str, program: str = "sleep") -> psutil.Process:
    """The sandboxed process with `marker` among its arguments (not the CLI's own)."""

    def found() -> list[psutil.Process]:
        return [p for p in processes_with_argument(marker, program) if "run" not in p.cmdline()]

    assert wait_until(found, timeout=CLI_TIMEOUT)
    (payload,) = found()
    return payload


def _ids_of(process: psutil.Process) -> tuple[list[str], list[str]]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
    return status["Uid"].split(), status["Gid"].split()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=CLI_TIMEOUT)


def test_two_live_sandboxes_run_as_different_host_ids(root_caller: SandboxCaller, sleep_marker: str) -> None:
    second_marker = sleep_marker + "1"
    first = root_caller.popen([], ["sleep", sleep_marker], stdout=subprocess.DEVNULL)
    second = root_caller.popen([], ["sleep", second_marker], stdout=subprocess.DEVNULL)
    try:
        seen = [_ids_of(_payload(marker)) for marker in (sleep_marker, second_marker)]
        for uids, gids in seen:
            assert int(uids[0]) in SANDBOX_IDS and uids == [uids[0]] * 4 and gids == [uids[0]] * 4, seen
            assert _held(int(uids[0]))  # its lock file is held while it lives
        assert seen[0][0][0] != seen[1][0][0], f"two live sandboxes share host uid {seen[0][0][0]}"
    finally:
        _stop(first)
        _stop(second)
        for marker in (sleep_marker, second_marker):
            for process in processes_with_argument(marker, None):
                process.kill()


TAKE_ALL_INOTIFY = textwrap.dedent("""
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    taken = []
    for _ in range(int(sys.argv[1])):
        fd = libc.inotify_init()
        if fd < 0:
            break
        taken.append(fd)
    print("HOLDING", len(taken), os.strerror(ctypes.get_errno()), flush=True)
    time.sleep(float(sys.argv[2]))
""")

ONE_INOTIFY = textwrap.dedent("""
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init()
    print("INOTIFY", "OK" if fd >= 0 else os.strerror(ctypes.get_errno()))
""")


def _inotify_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
        except FileNotFoundError:
            pass
    return count


def test_a_sandbox_that_takes_every_inotify_instance_leaves_its_siblings_theirs(
        root_caller: SandboxCaller, sleep_marker: str) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    if limit > 1000:
        pytest.skip(f"fs.inotify.max_user_instances is {limit}: too many fds to take in a test")
    hog = root_caller.popen(["--python", "--nofile", str(limit + 64), "--timeout", "120"],
                            ["python3", "-c", TAKE_ALL_INOTIFY, str(limit + 8), sleep_marker],
                            stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None
        line = hog.stdout.readline().decode()  # the hog's timeout bounds the wait
        assert line.startswith("HOLDING"), line
        payload = _payload(sleep_marker, "python3")
        # Host side: the hog holds the instances it took, and stopped at its uid's limit.
        assert 0 < _inotify_fds(payload.pid) == int(line.split()[1]) <= limit, line
        assert line.split()[2:] == ["Too", "many", "open", "files"], line
        sibling = root_caller.run(["--python"], ["python3", "-c", ONE_INOTIFY])
        assert sibling.stdout.decode().strip() == "INOTIFY OK", sibling
        assert _inotify_fds(payload.pid) == int(line.split()[1])  # still held while the sibling ran
    finally:
        _stop(hog)
        for process in processes_with_argument(sleep_marker, None):
            process.kill()


def test_the_id_is_free_again_after_the_sandbox_ends(root_caller: SandboxCaller, sleep_marker: str) -> None:
    proc = root_caller.popen([], ["sleep", sleep_marker], stdout=subprocess.DEVNULL)
    try:
        uid = int(_ids_of(_payload(sleep_marker))[0][0])
        assert _held(uid)
    finally:
        _stop(proc)
    assert wait_until(lambda: not _held(uid), timeout=CLI_TIMEOUT)


def test_the_id_is_free_again_after_the_cli_is_killed(root_caller: SandboxCaller, sleep_marker: str) -> None:
    proc = root_caller.popen([], ["sleep", sleep_marker], stdout=subprocess.DEVNULL)
    try:
        payload = _payload(sleep_marker)
        uid = int(_ids_of(payload)[0][0])
        assert _held(uid)
        proc.kill()  # the holder dies: the kernel drops its lock, the sandbox dies with it
        proc.wait(timeout=CLI_TIMEOUT)
        assert wait_until(lambda: not _held(uid), timeout=CLI_TIMEOUT)
        assert wait_until(lambda: not processes_with_argument(sleep_marker), timeout=CLI_TIMEOUT)
    finally:
        for process in processes_with_argument(sleep_marker, None):
            process.kill()
        remove_cgroups_of(proc.pid)


def _processes_of(uid: int) -> list[int]:
    return [p.info["pid"] for p in psutil.process_iter(["pid", "uids"])
            if p.info["uids"] and p.info["uids"].real == uid]


MANAGER = textwrap.dedent("""
    import asyncio, os, time
    from neural_doc_flow_security.sandbox.api import SandboxManager

    def hold(ctx, seconds):
        ctx.send(str(os.getuid()).encode())
        time.sleep(seconds)

    async def main():
        async with SandboxManager() as manager:
            await manager.with_options(context=True).spawn("hold", hold, 600.0)
            message = await manager.receive_message("hold", timeout=60)
            print("UID", bytes(message.content).decode(), flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
""")


def test_the_id_is_free_again_after_a_manager_is_killed(root_caller: SandboxCaller, tmp_path: Path) -> None:
    script = tmp_path / "manager.py"
    script.write_text(MANAGER)
    manager = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=ndf_host_env(),
                               cwd=tmp_path, start_new_session=True)
    try:
        assert manager.stdout is not None
        line = manager.stdout.readline().decode()
        assert line.startswith("UID"), line
        uid = int(line.split()[1])
        assert uid in SANDBOX_IDS and _held(uid)
        manager.kill()  # its zygote follows (parent-death signal), and the sandbox with it
        manager.wait(timeout=CLI_TIMEOUT)
        assert wait_until(lambda: not _held(uid), timeout=CLI_TIMEOUT)
        assert wait_until(lambda: not _processes_of(uid), timeout=CLI_TIMEOUT)
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait(timeout=CLI_TIMEOUT)
        manager.stdout.close()  # type: ignore[union-attr]
