"""Spare sandboxes (launch/spare.py): an init cloned ahead, launched later.

Each test drives a Launcher in this process, as a zygote does, and checks what
the host can see: /proc of the sandbox's processes, its namespaces, its cgroup
files, the fds it holds. The escape suite also runs every threat through a spare
(tests/spare_runner.py, the "root-spare" caller).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import msgpack
import pytest

from _cgroup_helpers import devnull_fds, ndf_leftovers, start_memory_hog
from api_helpers import proc_status_fields
from conftest import SANDBOX_IDS, wait_until
from neural_doc_flow_security.sandbox.config import BindMount, FilesystemConfig, NamespaceConfig, SandboxConfig
from neural_doc_flow_security.sandbox.ipc.channel import SyncChannel
from neural_doc_flow_security.sandbox.ipc.messages import ChannelRole, MessageKind
from neural_doc_flow_security.sandbox.launch import launcher as launcher_module
from neural_doc_flow_security.sandbox.launch import spare as spare_sandbox
from neural_doc_flow_security.sandbox.launch import zygote
from neural_doc_flow_security.sandbox.launch.bootstrap import ExecPayload
from neural_doc_flow_security.sandbox.launch.launcher import Launcher, LaunchRequest
from neural_doc_flow_security.sandbox.launch.plan import plan_launch
from neural_doc_flow_security.sandbox.launch.python_worker import PythonWorkerPayload
from neural_doc_flow_security.sandbox.linux import network
from neural_doc_flow_security.sandbox.linux import syscalls as sc
from neural_doc_flow_security.sandbox.linux.cgroups import V1Cgroup

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="spares are made as root")]

NAMESPACES = ("mnt", "net", "pid", "uts", "ipc", "cgroup")


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    assert ndf_leftovers() == []
    made = Launcher(spares=True)
    yield made
    made.shutdown()
    assert ndf_leftovers() == [], "a spare or its sandbox left cgroups behind"


def _with_spare(launcher: Launcher) -> spare_sandbox.Spare:
    while not launcher._spares and launcher.prepare_next():
        pass
    assert launcher._spares
    return launcher._spares[0]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_sandbox_from_a_spare_is_confined_like_a_cold_one(launcher: Launcher) -> None:
    spare = _with_spare(launcher)
    fds = devnull_fds()
    spawned = launcher.start(1, LaunchRequest(SandboxConfig(), ExecPayload(("sleep", "30")), "spare", fds))
    os.close(fds[0][1])
    try:
        assert spawned.pid == spare.pid and spare not in launcher._spares  # the spare itself, used once
        assert wait_until(lambda: _children(spawned.pid), timeout=10)
        program = _children(spawned.pid)[0]
        with open(f"/proc/{program}/status") as f:
            status = proc_status_fields(f.read())
        uid = status["Uid"].split()[0]
        assert int(uid) in SANDBOX_IDS and status["Uid"].split() == [uid] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        for ns in NAMESPACES:  # every namespace is its own, none the host's
            assert os.readlink(f"/proc/{program}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        with open(f"/proc/{program}/mountinfo") as f:
            root = next(line.split() for line in f if line.split()[4] == "/")
        assert "ro" in root[5].split(",") and "tmpfs" in root  # a read-only tmpfs root
        assert spawned.cgroup is not None
        with open(f"/proc/{program}/cgroup") as f:
            memory_line = next(line for line in f if ":memory:" in line)
        assert os.path.basename(spawned.cgroup.paths["memory"]) in memory_line  # in its own cgroup
    finally:
        launcher.kill(1)
        wait_until(lambda: _gone(spawned.pid), timeout=10)
        result = launcher.finish(1)
    assert result.outcome.value == "killed", result
    assert _gone(program)


def test_a_spare_joins_its_cgroup_before_any_launch(launcher: Launcher) -> None:
    spare = _with_spare(launcher)
    assert isinstance(spare.cgroup, V1Cgroup), "this host's cgroups are v1 (the v2 guest clones into the cgroup)"
    paths = spare.cgroup.paths

    def joined() -> bool:
        with open(f"/proc/{spare.pid}/cgroup") as f:
            text = f.read()
        return all(os.path.basename(d) in text for d in paths.values())

    assert wait_until(joined, timeout=10)  # written by the spare itself: the launcher never waited for it


def test_a_spare_holds_none_of_its_launchers_fds(launcher: Launcher) -> None:
    read_end, write_end = os.pipe()  # open here before the spare is cloned
    try:
        spare = _with_spare(launcher)

        def held() -> set[str]:
            targets = set()
            for fd in os.listdir(f"/proc/{spare.pid}/fd"):
                with contextlib.suppress(FileNotFoundError):  # closed since the listing (its cgroup files)
                    targets.add(os.readlink(f"/proc/{spare.pid}/fd/{fd}"))
            return targets

        ours = os.readlink(f"/proc/self/fd/{write_end}")
        # Once it has joined its cgroup (and closed those files): its three pipes and its launch socket.
        assert wait_until(lambda: len(held()) == 4, timeout=10), held()
        assert ours not in held()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_spare_applies_the_limits_of_its_launch(launcher: Launcher) -> None:
    spare = _with_spare(launcher)
    spawned = start_memory_hog(launcher, 1)
    assert spawned.pid == spare.pid
    assert wait_until(lambda: _gone(spawned.pid), timeout=30)
    result = launcher.finish(1)
    assert result.outcome.value == "oom", result  # from the cgroup's OOM counter
    assert result.resource_usage.memory_peak_bytes <= 70 << 20


def test_a_spare_that_does_not_fit_stays_and_the_launch_goes_cold(launcher: Launcher) -> None:
    spare = _with_spare(launcher)
    config = SandboxConfig(namespaces=NamespaceConfig(net=False))
    fds = devnull_fds()
    spawned = launcher.start(1, LaunchRequest(config, ExecPayload(("true",)), "cold", fds))
    os.close(fds[0][1])
    assert spawned.pid != spare.pid and spare in launcher._spares
    assert wait_until(lambda: _gone(spawned.pid), timeout=10)
    assert launcher.finish(1).outcome.value == "ok"


def test_a_dead_spare_is_reaped_and_the_launch_goes_cold(launcher: Launcher) -> None:
    spare = _with_spare(launcher)
    sc.pidfd_send_signal(spare.pidfd, signal.SIGKILL)
    assert wait_until(lambda: _gone(spare.pid), timeout=10)
    fds = devnull_fds()
    spawned = launcher.start(1, LaunchRequest(SandboxConfig(), ExecPayload(("true",)), "cold", fds))
    os.close(fds[0][1])
    assert spawned.pid != spare.pid
    assert not os.path.exists(f"/proc/{spare.pid}")  # reaped, not left a zombie
    assert wait_until(lambda: _gone(spawned.pid), timeout=10)
    assert launcher.finish(1).outcome.value == "ok"


def test_a_callable_from_a_spare_answers_over_its_channel(launcher: Launcher) -> None:
    spare = _with_spare(launcher)
    host_end, sandbox_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = devnull_fds() + ((3, sandbox_end.fileno()),)
    call = cloudpickle.dumps((lambda: sorted(os.listdir("/")) + [str(os.getuid())], (), {}))
    spawned = launcher.start(1, LaunchRequest(SandboxConfig(), PythonWorkerPayload(call=call), "call", fds))
    os.close(fds[0][1])
    sandbox_end.close()
    assert spawned.pid == spare.pid
    with SyncChannel(host_end, role=ChannelRole.HOST) as channel:
        reply = channel.receive(timeout=30)
    assert reply is not None and reply.kind is MessageKind.RESULT, reply
    assert int(reply.value[-1]) in SANDBOX_IDS and "root" not in reply.value and "home" not in reply.value
    assert wait_until(lambda: _gone(spawned.pid), timeout=10)
    assert launcher.finish(1).outcome.value == "ok"


def _start_sleeper(launcher: Launcher, sandbox_id: int, config: SandboxConfig) -> tuple[int, int]:
    """Start `sleep 30` in a sandbox; (init's pid, the program's pid)."""
    fds = devnull_fds()
    spawned = launcher.start(sandbox_id, LaunchRequest(config, ExecPayload(("sleep", "30")), "sleeper", fds))
    os.close(fds[0][1])
    assert wait_until(lambda: _children(spawned.pid), timeout=10)
    return spawned.pid, _children(spawned.pid)[0]


def _end(launcher: Launcher, sandbox_id: int, pid: int) -> None:
    launcher.kill(sandbox_id)
    assert wait_until(lambda: _gone(pid), timeout=10)
    assert launcher.finish(sandbox_id).outcome.value == "killed"


def _mount_table(pid: int) -> list[tuple[str, ...]]:
    """What /proc/<pid>/mountinfo says of each mount but its ids and peer groups:
    root, mount point, mount options, file system type, super options."""
    rows = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1:]
            rows.append((fields[3], fields[4], fields[5], tail[0], tail[2]))
    return sorted(rows)


def _with_spare_for(launcher: Launcher, config: SandboxConfig) -> spare_sandbox.Spare:
    """Idle time until the spare has a fresh root for `config`'s launches."""
    wanted = plan_launch(config).rootfs

    def ready() -> spare_sandbox.Spare | None:
        return next((s for s in launcher._spares if s.rootfs == wanted and not spare_sandbox.root_stale(s)), None)

    while ready() is None and launcher.prepare_next():
        pass
    spare = ready()
    assert spare is not None
    return spare


def test_after_a_launch_the_next_spare_builds_its_root_ahead(launcher: Launcher) -> None:
    config = SandboxConfig()
    cold_init, cold_program = _start_sleeper(launcher, 1, config)  # no spare yet: a cold sandbox
    cold_mounts = _mount_table(cold_program)
    _end(launcher, 1, cold_init)
    spare = _with_spare(launcher)
    assert spare.rootfs is not None  # the latest launch's root, built before any launch asks for it

    def built() -> bool:  # seen from the host: the spare's mount namespace already has it
        return _mount_table(spare.pid) == cold_mounts

    assert wait_until(built, timeout=10), _mount_table(spare.pid)
    init, program = _start_sleeper(launcher, 2, config)
    try:
        assert init == spare.pid
        assert _mount_table(program) == cold_mounts  # the same root as a cold sandbox's
        with open(f"/proc/{program}/status") as f:
            assert proc_status_fields(f.read())["Seccomp"] == "2"
    finally:
        _end(launcher, 2, init)


def test_a_spare_never_builds_a_root_with_user_binds(launcher: Launcher, tmp_path: Path) -> None:
    bound = SandboxConfig(filesystem=FilesystemConfig(read_only_binds=(BindMount(str(tmp_path), "/data"),)))
    init, _ = _start_sleeper(launcher, 1, bound)
    _end(launcher, 1, init)
    spare = _with_spare(launcher)
    assert spare.rootfs is None  # a bind's source could change before the launch: bound at the launch
    init, program = _start_sleeper(launcher, 2, bound)
    try:
        assert init == spare.pid and "/data" in [row[1] for row in _mount_table(program)]
    finally:
        _end(launcher, 2, init)


def test_spares_follow_the_roots_of_the_latest_launches(launcher: Launcher) -> None:
    # A pipeline that runs a program and a callable per document has two roots:
    # a spare for each; a third root replaces the older one's spare when idle.
    first, second, third = (SandboxConfig(filesystem=FilesystemConfig(tmp_size_mb=size)) for size in (64, 32, 16))
    init, _ = _start_sleeper(launcher, 1, first)
    _end(launcher, 1, init)
    first_spare = _with_spare_for(launcher, first)
    init, _ = _start_sleeper(launcher, 2, second)
    assert init != first_spare.pid and first_spare in launcher._spares  # it does not fit: the launch went cold
    _end(launcher, 2, init)
    second_spare = _with_spare_for(launcher, second)
    assert first_spare in launcher._spares and len(launcher._spares) == launcher_module.MAX_SPARES
    init, _ = _start_sleeper(launcher, 3, third)
    _end(launcher, 3, init)
    third_spare = _with_spare_for(launcher, third)
    assert launcher._spares == [second_spare, third_spare]
    assert not os.path.exists(f"/proc/{first_spare.pid}")  # killed and reaped
    init, _ = _start_sleeper(launcher, 4, second)
    try:
        assert init == second_spare.pid
    finally:
        _end(launcher, 4, init)


def test_a_root_built_long_ago_is_not_used_and_the_spare_is_replaced(launcher: Launcher) -> None:
    init, _ = _start_sleeper(launcher, 1, SandboxConfig())
    _end(launcher, 1, init)
    spare = _with_spare(launcher)
    assert spare.rootfs is not None
    deadline = launcher.next_deadline()  # an idle zygote wakes up then to replace it
    assert deadline is not None and deadline <= spare.made_at + spare_sandbox.ROOT_MAX_AGE
    spare.made_at -= spare_sandbox.ROOT_MAX_AGE  # as if it had waited that long
    init, _ = _start_sleeper(launcher, 2, SandboxConfig())
    assert init != spare.pid  # a file bound by itself may have been replaced since: cold
    _end(launcher, 2, init)
    replacement = _with_spare_for(launcher, SandboxConfig())
    assert replacement is not spare and not os.path.exists(f"/proc/{spare.pid}")


def _prepare_as_a_zygote(launcher: Launcher, *, request_waiting: bool) -> list[object]:
    """Run the zygote's idle step with `launcher`; what it told the manager."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, selectors.DefaultSelector() as selector:
        selector.register(ours, selectors.EVENT_READ)
        if request_waiting:
            theirs.send(b"a request")
        zygote._prepare_while_idle(ours, selector, launcher)
        theirs.setblocking(False)
        said: list[object] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                said.append(msgpack.unpackb(theirs.recv(4096)))
    return said


def test_an_idle_zygote_says_while_it_makes_its_spare(launcher: Launcher) -> None:
    assert _prepare_as_a_zygote(launcher, request_waiting=True) == [] and not launcher._spares  # it serves first
    said = _prepare_as_a_zygote(launcher, request_waiting=False)
    assert launcher._spares
    assert said == [{"op": "preparing", "busy": True}, {"op": "preparing", "busy": False}]


def test_the_next_network_namespace_is_started_as_a_spare_takes_the_last_one() -> None:
    launcher = Launcher(spares=True, netns_ahead=True)
    try:
        assert network.take() is None  # none made ahead yet
        assert launcher.prepare_next() and launcher._spares  # one call: the spare (it made its own)
        made_ahead = network.take()  # and, at once, the next spare's, not at the next idle moment
        assert made_ahead is not None
        assert os.readlink(f"/proc/self/fd/{made_ahead}") != os.readlink("/proc/self/ns/net")
        os.close(made_ahead)
    finally:
        launcher.shutdown()


def test_shutdown_removes_an_unused_spare(launcher: Launcher) -> None:
    spare = _with_spare(launcher)
    launcher.shutdown()
    assert launcher._spares == [] and not os.path.exists(f"/proc/{spare.pid}")
    assert ndf_leftovers() == []
