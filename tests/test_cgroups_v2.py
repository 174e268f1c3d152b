"""The cgroup v2 backend against the real kernel.

Limit tests need a unified hierarchy with memory, pids and cpu (the cgroup2-only guest
VM: `pytest -m cgroup_v2`); they skip elsewhere. The core tests (freeze, kill,
clone_into_fd, destroy) also run on a hybrid host's controller-less unified hierarchy.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from _cgroup_helpers import (
    Body,
    Child,
    children,
    cpu_spinner,
    devnull_fds,
    direct_writer,
    fork_bomb,
    forker,
    memory_hog,
    ndf_leftovers,
    process_state,
    start_memory_hog,
    wait_for,
)
from neural_doc_flow_security.sandbox.linux import cgroups
from neural_doc_flow_security.sandbox.linux.cgroups import (
    CgroupLimits,
    V2Cgroup,
    _files,
    create_sandbox_cgroup,
    probe_cgroups,
    remove_stale_cgroups,
)

MiB = 1 << 20


def _full_v2() -> str:
    if os.geteuid() != 0:
        return "needs root"
    support = probe_cgroups()
    missing = [n for n in ("memory", "pids", "cpu")
               if not ((c := support.get(n)) and c.usable and c.version == "v2")]
    return f"cgroup v2 controllers not usable here: {missing}" if missing else ""


def _unified_parent() -> str | None:
    """<own cgroup>/neural-doc-flow in the unified hierarchy, if we may create there."""
    unified = next((m for m in cgroups._cgroup_mounts() if m.fstype == "cgroup2"), None)
    own = cgroups._own_cgroups().get("")
    if unified is None or own is None or os.geteuid() != 0:
        return None
    own_dir = cgroups._own_dir(unified, own)
    return None if own_dir is None else os.path.join(own_dir, cgroups.PARENT_NAME)


FULL_REASON = _full_v2()
needs_controllers = pytest.mark.skipif(bool(FULL_REASON), reason=FULL_REASON or "-")
pytestmark = [pytest.mark.cgroup_v2, pytest.mark.root,
              pytest.mark.skipif(_unified_parent() is None, reason="no writable cgroup2 hierarchy")]


@pytest.fixture(autouse=True)
def no_leftover_cgroups() -> Iterator[None]:
    assert ndf_leftovers() == []
    yield
    assert ndf_leftovers() == [], "a test left sandbox cgroups behind"


@pytest.fixture
def spawn() -> Iterator[Callable[[Body], Child]]:
    with children() as s:
        yield s


@pytest.fixture
def make_cgroup() -> Iterator[Callable[[CgroupLimits], V2Cgroup]]:
    """Through the factory when the host is v2; else a controller-less cgroup in the
    hybrid host's unified hierarchy (core features only)."""
    made: list[V2Cgroup] = []

    def make(limits: CgroupLimits) -> V2Cgroup:
        if FULL_REASON:
            parent = _unified_parent()
            assert parent is not None
            cg = V2Cgroup.create(cgroups.cgroup_for_sandbox_name("core"), parent, limits)
        else:
            made_cg = create_sandbox_cgroup("test", limits)
            assert isinstance(made_cg, V2Cgroup)
            cg = made_cg
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.destroy()


def run_inside(cg: V2Cgroup, spawn: Callable[[Body], Child], body: Body) -> Child:
    child = spawn(body)
    cg.add_process(child.pid)
    assert _files.procs(cg.path) == [child.pid]
    child.release()
    return child


# ---- core features (any cgroup2 hierarchy) -----------------------------------------

def test_freeze_stops_cpu_time(make_cgroup: Callable[[CgroupLimits], V2Cgroup],
                               spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits())
    child = run_inside(cg, spawn, cpu_spinner)
    assert child.hear() == "spinning"
    assert wait_for(lambda: cg.stats().cpu_usage_usec > 0)
    cg.freeze()
    assert cg.stats().frozen
    assert _files.read_keyed(f"{cg.path}/cgroup.events")["frozen"] == 1
    before = cg.stats().cpu_usage_usec
    time.sleep(0.5)
    assert cg.stats().cpu_usage_usec == before
    cg.thaw()
    assert wait_for(lambda: cg.stats().cpu_usage_usec > before)
    assert not cg.stats().frozen


def test_kill_empties_the_cgroup(make_cgroup: Callable[[CgroupLimits], V2Cgroup],
                                 spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits())
    child = run_inside(cg, spawn, fork_bomb(6))
    assert child.hear() == "6 0"
    assert len(_files.procs(cg.path)) == 7
    cg.kill()
    assert _files.procs(cg.path) == []
    assert _files.read_keyed(f"{cg.path}/cgroup.events")["populated"] == 0
    assert os.WTERMSIG(child.wait()) == signal.SIGKILL


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


CLONE_INTO_CGROUP = 0x200000000
SYS_CLONE3 = 435  # same number on x86_64 and arm64


def test_clone_into_fd_starts_child_inside(make_cgroup: Callable[[CgroupLimits], V2Cgroup]) -> None:
    cg = make_cgroup(CgroupLimits())
    fd = cg.clone_into_fd()
    assert fd is not None
    gate_r, gate_w = os.pipe()
    try:
        # PyDLL keeps the GIL across the call, so the child returns holding it.
        libc = ctypes.PyDLL(None, use_errno=True)
        args = _CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=fd)
        pid = libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
        if pid == 0:  # pragma: no cover - the child: wait for the parent, then leave
            os.read(gate_r, 1)
            os._exit(0)
        assert pid > 0, os.strerror(ctypes.get_errno())
        try:
            assert _files.procs(cg.path) == [pid]
            with open(f"/proc/{pid}/cgroup") as f:
                assert any(line.startswith("0::") and line.rstrip().endswith("/" + cg.name) for line in f)
        finally:
            os.write(gate_w, b"x")
            assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(fd)
        os.close(gate_r)
        os.close(gate_w)


def test_destroy_removes_the_directory(spawn: Callable[[Body], Child],
                                       make_cgroup: Callable[[CgroupLimits], V2Cgroup]) -> None:
    cg = make_cgroup(CgroupLimits())
    child = run_inside(cg, spawn, cpu_spinner)
    assert child.hear() == "spinning"
    cg.destroy()
    assert not os.path.exists(cg.path)
    assert os.WTERMSIG(child.wait()) == signal.SIGKILL
    parent = os.path.dirname(cg.path)
    # The shared parent goes too, unless another live manager has sandboxes in it.
    assert not os.path.isdir(parent) or any(e.startswith("ndf-") for e in os.listdir(parent))
    cg.destroy()  # idempotent


# ---- limits (a unified hierarchy with controllers) ---------------------------------

@needs_controllers
def test_memory_hog_is_oom_killed(make_cgroup: Callable[[CgroupLimits], V2Cgroup],
                                  spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(memory_bytes=64 * MiB))
    assert _files.read_int(f"{cg.path}/memory.max") == 64 * MiB
    if os.path.exists(f"{cg.path}/memory.swap.max"):
        assert _files.read_int(f"{cg.path}/memory.swap.max") == 0
    child = run_inside(cg, spawn, memory_hog)
    status = child.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert cg.stats().oom_kills >= 1
    assert _files.read_keyed(f"{cg.path}/memory.events")["oom_kill"] >= 1
    assert 0 < cg.stats().memory_peak_bytes <= 64 * MiB


@needs_controllers
def test_fork_bomb_stops_at_pids_max(make_cgroup: Callable[[CgroupLimits], V2Cgroup],
                                     spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(max_processes=5))
    assert _files.read_text(f"{cg.path}/pids.max") == "5"
    child = run_inside(cg, spawn, fork_bomb(40))
    said = child.hear()
    assert said is not None
    forked, refused = map(int, said.split())
    assert forked == 4 and refused == 36
    stats = cg.stats()
    assert stats.pids_current == 5
    assert stats.pids_peak <= 5
    assert _files.read_keyed(f"{cg.path}/pids.events")["max"] >= 1
    child.release()
    assert os.WEXITSTATUS(child.wait()) == 0


@needs_controllers
def test_cpu_spinner_is_throttled(make_cgroup: Callable[[CgroupLimits], V2Cgroup],
                                  spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(cpu_quota_percent=25))
    assert _files.read_text(f"{cg.path}/cpu.max") == "25000 100000"
    child = run_inside(cg, spawn, cpu_spinner)
    assert child.hear() == "spinning"
    assert wait_for(lambda: cg.stats().cpu_nr_throttled > 0)
    assert cg.stats().cpu_throttled_usec > 0
    cg.kill()


@needs_controllers
def test_update_changes_limits_while_running(make_cgroup: Callable[[CgroupLimits], V2Cgroup],
                                             spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(memory_bytes=64 * MiB, max_processes=1))
    child = run_inside(cg, spawn, forker)
    child.release()
    assert child.hear() == "EAGAIN"
    cg.update(CgroupLimits(memory_bytes=128 * MiB, memory_high_bytes=96 * MiB, max_processes=4,
                           cpu_quota_percent=150))
    assert _files.read_text(f"{cg.path}/pids.max") == "4"
    assert _files.read_int(f"{cg.path}/memory.max") == 128 * MiB
    assert _files.read_int(f"{cg.path}/memory.high") == 96 * MiB
    assert _files.read_text(f"{cg.path}/cpu.max") == "150000 100000"  # cpu enabled on demand
    child.release()
    assert child.hear() == "ok"
    cg.update(CgroupLimits())
    assert _files.read_text(f"{cg.path}/memory.max") == "max"
    assert _files.read_text(f"{cg.path}/cpu.max") == "max 100000"
    assert _files.read_text(f"{cg.path}/pids.max") == "max"


@needs_controllers
def test_direct_writes_are_throttled(make_cgroup: Callable[[CgroupLimits], V2Cgroup],
                                     spawn: Callable[[Body], Child],
                                     io_target: tuple[str, str, int]) -> None:
    path, dev, offset = io_target
    if not (c := probe_cgroups().get("io")) or not c.usable:
        pytest.skip("the io controller is not usable here")
    size = 1 * MiB
    cg = make_cgroup(CgroupLimits(io_write_bps=16 * 1024, io_devices=(dev,)))
    assert f"{dev} rbps=max wbps=16384 riops=max wiops=max" in _files.read_text(f"{cg.path}/io.max")
    child = run_inside(cg, spawn, direct_writer(path, size, offset))
    assert child.hear() == "start"
    # At 16 KiB/s the 1 MiB write needs over a minute: the writer waits uninterruptibly
    # for bios the throttle holds back.
    assert wait_for(lambda: process_state(child.pid) == "D")
    assert not child.has_said()
    assert cg.stats().io_write_bytes < size  # v2 io.stat counts a bio once it is let through
    cg.update(CgroupLimits(io_devices=(dev,)))
    assert child.hear() == f"done {size}"
    assert child.wait() == 0
    assert cg.stats().io_write_bytes >= size


@needs_controllers
def test_stale_cgroup_of_dead_owner_is_removed(spawn: Callable[[Body], Child]) -> None:
    dead = spawn(lambda c: 0)
    dead_start = _files.process_start_time(dead.pid)
    assert dead_start is not None
    dead.release()
    dead.wait()
    mine = create_sandbox_cgroup("alive", CgroupLimits(max_processes=5))
    assert isinstance(mine, V2Cgroup)
    stale_name = f"ndf-{dead.pid}-{dead_start}-1-ndftest"
    stale = os.path.join(os.path.dirname(mine.path), stale_name)
    os.mkdir(stale)
    leftover = spawn(cpu_spinner)
    V2Cgroup(stale_name, stale).add_process(leftover.pid)
    leftover.release()
    assert leftover.hear() == "spinning"
    try:
        assert remove_stale_cgroups() == [stale]
        assert not os.path.exists(stale)
        assert os.WTERMSIG(leftover.wait()) == signal.SIGKILL
        assert os.path.isdir(mine.path)
    finally:
        V2Cgroup(stale_name, stale).destroy()
        mine.destroy()


# -------------------------------------------------------------------- whole sandboxes on v2


@needs_controllers
def test_a_sandbox_cloned_into_its_cgroup_is_oom_killed_at_its_limit() -> None:
    # CLONE_INTO_CGROUP: the child is in its cgroup from its first instruction.
    from neural_doc_flow_security.sandbox.config import FilesystemConfig, SandboxConfig
    from neural_doc_flow_security.sandbox.launch.payload import ExecPayload
    from neural_doc_flow_security.sandbox.launch.supervise import run_sandboxed

    config = SandboxConfig(memory_limit_mb=64, max_processes=16, filesystem=FilesystemConfig(python=True))
    fds = devnull_fds()
    hog = ExecPayload(("python3", "-c", "x = bytearray(256 << 20); x[::4096] = b'1' * len(x[::4096])"))
    result = run_sandboxed(config, hog, fd_map=fds)
    os.close(fds[0][1])
    assert result.outcome.value == "oom", result
    assert "cgroup v2" in result.isolation.cgroup
    assert ndf_leftovers() == []


@needs_controllers
def test_a_spare_made_through_the_template_takes_the_limits_of_its_launch() -> None:
    # The zygote's way on v2: the template clones the spare into a cgroup made ahead.
    from neural_doc_flow_security.sandbox.launch.launcher import Launcher
    from neural_doc_flow_security.sandbox.launch.template import Template

    template = Template()
    launcher = Launcher(spares=True, template=template)
    try:
        while launcher.prepare_next():
            pass
        assert launcher._spares
        spare = launcher._spares[0]
        assert spare.cgroup is not None
        spawned = start_memory_hog(launcher, 1)
        assert spawned.pid == spare.pid
        assert wait_for(lambda: process_state(spawned.pid) == "Z", timeout=30)
        result = launcher.finish(1)
        assert result.outcome.value == "oom", result
    finally:
        launcher.shutdown()
        template.close()
    assert ndf_leftovers() == []
