"""The cgroup v1 backend against the real kernel (hybrid hosts; needs root)."""

from __future__ import annotations

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
    direct_writer,
    fork_bomb,
    forker,
    memory_hog,
    ndf_leftovers,
    process_state,
    wait_for,
)
from neural_doc_flow_security.sandbox.errors import UnsupportedError
from neural_doc_flow_security.sandbox.linux.cgroups import (
    CgroupLimits,
    V1Cgroup,
    _files,
    create_sandbox_cgroup,
    probe_cgroups,
    remove_stale_cgroups,
)


def _v1_usable() -> str:
    if os.geteuid() != 0:
        return "needs root (creates cgroups in the v1 hierarchies)"
    support = probe_cgroups()
    missing = [n for n in ("memory", "cpu", "cpuacct", "pids", "freezer")
               if not ((c := support.get(n)) and c.usable and c.version == "v1")]
    return f"v1 controllers not usable here: {missing}" if missing else ""


pytestmark = [pytest.mark.root, pytest.mark.skipif(bool(_v1_usable()), reason=_v1_usable() or "-")]

MiB = 1 << 20


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
def make_cgroup() -> Iterator[Callable[[CgroupLimits], V1Cgroup]]:
    made: list[V1Cgroup] = []

    def make(limits: CgroupLimits) -> V1Cgroup:
        cg = create_sandbox_cgroup("test", limits)
        assert isinstance(cg, V1Cgroup)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.destroy()


def run_inside(cg: V1Cgroup, spawn: Callable[[Body], Child], body: Body) -> Child:
    child = spawn(body)
    cg.add_process(child.pid)
    for d in cg.paths.values():
        assert child.pid in _files.procs(d)
    child.release()
    return child


def test_memory_hog_is_oom_killed(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                  spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(memory_bytes=64 * MiB))
    mem = cg.paths["memory"]
    assert _files.read_int(f"{mem}/memory.limit_in_bytes") == 64 * MiB
    if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
        assert _files.read_int(f"{mem}/memory.memsw.limit_in_bytes") == 64 * MiB
    child = run_inside(cg, spawn, memory_hog)
    status = child.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    stats = cg.stats()
    assert stats.oom_kills >= 1
    assert _files.read_keyed(f"{mem}/memory.oom_control")["oom_kill"] >= 1
    assert 0 < stats.memory_peak_bytes <= 64 * MiB


def test_fork_bomb_stops_at_pids_max(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                     spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(max_processes=5))
    assert _files.read_text(f"{cg.paths['pids']}/pids.max") == "5"
    child = run_inside(cg, spawn, fork_bomb(40))
    said = child.hear()
    assert said is not None
    forked, refused = map(int, said.split())
    assert forked == 4 and refused == 36  # the bomb itself is the fifth
    stats = cg.stats()
    assert stats.pids_current == 5
    assert stats.pids_peak <= 5
    assert stats.pids_limit_hits >= refused
    child.release()
    assert os.WEXITSTATUS(child.wait()) == 0


def test_cpu_spinner_is_throttled(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                  spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(cpu_quota_percent=25))
    cpu = cg.paths["cpu"]
    assert _files.read_int(f"{cpu}/cpu.cfs_quota_us") == 25_000
    assert _files.read_int(f"{cpu}/cpu.cfs_period_us") == 100_000
    child = run_inside(cg, spawn, cpu_spinner)
    assert child.hear() == "spinning"
    # Both counters: the throttled time is added when a throttled period ends, so the
    # count can be seen a moment before the time on a loaded machine.
    assert wait_for(lambda: cg.stats().cpu_nr_throttled > 0 and cg.stats().cpu_throttled_usec > 0)
    stats = cg.stats()
    assert stats.cpu_usage_usec > 0
    cg.kill()


def test_freeze_stops_cpu_time(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                               spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits())
    child = run_inside(cg, spawn, cpu_spinner)
    assert child.hear() == "spinning"
    cg.freeze()
    assert cg.stats().frozen
    assert _files.read_text(f"{cg.paths['freezer']}/freezer.state") == "FROZEN"
    before = cg.stats().cpu_usage_usec
    time.sleep(0.5)
    assert cg.stats().cpu_usage_usec == before
    assert process_state(child.pid) in "DS"  # frozen tasks sleep in the freezer
    cg.thaw()
    assert wait_for(lambda: cg.stats().cpu_usage_usec > before)
    assert not cg.stats().frozen


def test_kill_empties_the_cgroup(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                 spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(max_processes=20))
    child = run_inside(cg, spawn, fork_bomb(6))
    assert child.hear() == "6 0"
    assert len(_files.procs(cg.paths["pids"])) == 7
    cg.kill()
    for d in cg.paths.values():
        assert _files.procs(d) == []
    assert os.WTERMSIG(child.wait()) == signal.SIGKILL


def test_a_tree_that_dies_of_sigkill_is_never_frozen(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                                     spawn: Callable[[Body], Child],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # v1 frozen tasks do not die of SIGKILL: a killer SIGKILLed between its freeze and its
    # thaw (a manager cleaning up after a dead zygote) left the tree frozen for good.
    cg = make_cgroup(CgroupLimits(max_processes=20))
    child = run_inside(cg, spawn, fork_bomb(6))
    assert child.hear() == "6 0"
    freezes: list[object] = []
    monkeypatch.setattr(cg, "freeze", lambda *args, **kwargs: freezes.append(args))
    cg.kill()
    assert freezes == []
    for d in cg.paths.values():
        assert _files.procs(d) == []
    assert os.WTERMSIG(child.wait()) == signal.SIGKILL


def test_kill_ends_a_tree_a_dead_killer_left_frozen(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                                    spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(max_processes=20))
    child = run_inside(cg, spawn, fork_bomb(6))
    assert child.hear() == "6 0"
    cg.freeze()  # as a killer that died before its thaw left it
    cg.kill()
    for d in cg.paths.values():
        assert _files.procs(d) == []
    assert os.WTERMSIG(child.wait()) == signal.SIGKILL
    assert _files.read_text(f"{cg.paths['freezer']}/freezer.state") == "THAWED"


def test_update_changes_limits_while_running(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                             spawn: Callable[[Body], Child]) -> None:
    cg = make_cgroup(CgroupLimits(memory_bytes=64 * MiB, max_processes=1, cpu_quota_percent=50))
    child = run_inside(cg, spawn, forker)
    child.release()
    assert child.hear() == "EAGAIN"
    cg.update(CgroupLimits(memory_bytes=128 * MiB, max_processes=4, cpu_quota_percent=150))
    assert _files.read_text(f"{cg.paths['pids']}/pids.max") == "4"
    assert _files.read_int(f"{cg.paths['memory']}/memory.limit_in_bytes") == 128 * MiB
    assert _files.read_int(f"{cg.paths['cpu']}/cpu.cfs_quota_us") == 150_000
    child.release()
    assert child.hear() == "ok"
    # Lowering memory below memsw and lifting limits both work in the kernel's order.
    cg.update(CgroupLimits(memory_bytes=32 * MiB, cpu_quota_percent=None))
    assert _files.read_int(f"{cg.paths['memory']}/memory.limit_in_bytes") == 32 * MiB
    assert _files.read_int(f"{cg.paths['cpu']}/cpu.cfs_quota_us") == -1
    assert _files.read_text(f"{cg.paths['pids']}/pids.max") == "max"


def test_destroy_removes_every_directory(spawn: Callable[[Body], Child]) -> None:
    cg = create_sandbox_cgroup("gone", CgroupLimits(memory_bytes=64 * MiB, cpu_quota_percent=50))
    assert isinstance(cg, V1Cgroup)
    paths = cg.paths
    assert set(paths) == {"memory", "cpu", "cpuacct", "pids", "freezer"}  # no blkio: not asked
    child = run_inside(cg, spawn, cpu_spinner)
    assert child.hear() == "spinning"
    cg.destroy()
    for d in paths.values():
        assert not os.path.exists(d)
    assert os.WTERMSIG(child.wait()) == signal.SIGKILL
    for c in probe_cgroups().controllers:
        # The shared parent goes too, unless another live manager has sandboxes in it.
        if c.usable and os.path.isdir(c.parent):
            assert os.listdir(c.parent) and any(e.startswith("ndf-") for e in os.listdir(c.parent))
    cg.destroy()  # idempotent


def test_missing_limit_support_fails_closed() -> None:
    with pytest.raises(UnsupportedError) as e:
        create_sandbox_cgroup("x", CgroupLimits(memory_high_bytes=64 * MiB))
    assert e.value.protection == "memory_high_bytes"


def test_direct_writes_are_throttled(make_cgroup: Callable[[CgroupLimits], V1Cgroup],
                                     spawn: Callable[[Body], Child],
                                     io_target: tuple[str, str, int]) -> None:
    path, dev, offset = io_target
    size = 1 * MiB
    cg = make_cgroup(CgroupLimits(io_write_bps=16 * 1024, io_devices=(dev,)))
    blkio = cg.paths["io"]
    assert _files.read_text(f"{blkio}/blkio.throttle.write_bps_device") == f"{dev} {16 * 1024}"
    child = run_inside(cg, spawn, direct_writer(path, size, offset))
    assert child.hear() == "start"
    # At 16 KiB/s the 1 MiB write needs over a minute: the writer sits in uninterruptible
    # I/O wait for bios the throttle holds back. (v1 counts bytes when a bio is submitted,
    # not when the throttle lets it through, so the counter cannot show the hold-back.)
    assert wait_for(lambda: process_state(child.pid) == "D")
    assert not child.has_said()
    assert cg.stats().io_write_bytes <= size
    cg.update(CgroupLimits(io_devices=(dev,)))  # lift: the write completes
    assert _files.read_text(f"{blkio}/blkio.throttle.write_bps_device") == ""
    assert child.hear() == f"done {size}"
    assert child.wait() == 0
    assert cg.stats().io_write_bytes >= size


def test_stale_cgroup_of_dead_owner_is_removed(spawn: Callable[[Body], Child]) -> None:
    dead = spawn(lambda c: 0)
    dead_start = _files.process_start_time(dead.pid)
    assert dead_start is not None
    dead.release()
    dead.wait()  # reaped: the pid no longer names a process with that start time
    mine = create_sandbox_cgroup("alive", CgroupLimits(max_processes=5))
    assert isinstance(mine, V1Cgroup)
    stale_name = f"ndf-{dead.pid}-{dead_start}-1-ndftest"
    stale = {c: os.path.join(os.path.dirname(d), stale_name) for c, d in mine.paths.items()}
    for d in stale.values():
        os.mkdir(d)
    leftover = spawn(cpu_spinner)  # a process the dead manager left behind
    V1Cgroup(stale_name, stale, {}).add_process(leftover.pid)
    leftover.release()
    assert leftover.hear() == "spinning"
    try:
        removed = remove_stale_cgroups()
        assert sorted(set(stale.values())) == sorted(d for d in removed if stale_name in d)
        assert all(not os.path.exists(d) for d in stale.values())
        assert os.WTERMSIG(leftover.wait()) == signal.SIGKILL
        assert all(os.path.isdir(d) for d in mine.paths.values())  # owner alive: kept
    finally:
        V1Cgroup(stale_name, stale, {}).destroy()
        mine.destroy()


# -------------------------------------------------------------------- spare cgroups (made ahead)


def test_spare_cgroup_takes_the_sandbox_name_and_its_limits() -> None:
    from neural_doc_flow_security.sandbox.config import SandboxConfig
    from neural_doc_flow_security.sandbox.launch import resources
    from neural_doc_flow_security.sandbox.launch.plan import plan_launch

    resources.make_spare_cgroup()
    spare = resources._spare
    assert spare is not None
    spare_dirs = spare.paths
    config = SandboxConfig(memory_limit_mb=64)
    cgroup = resources.create_cgroup(config, "spare-test", plan_launch(config))
    try:
        assert cgroup is spare and resources._spare is None
        assert all(not os.path.exists(d) for d in spare_dirs.values())  # renamed, not copied
        memory_dir = cgroup.paths["memory"]
        assert "spare-test" in os.path.basename(memory_dir)
        with open(os.path.join(memory_dir, "memory.limit_in_bytes")) as f:
            assert int(f.read()) == 64 * MiB
    finally:
        assert cgroup is not None
        cgroup.destroy()


def test_spare_cgroup_without_a_needed_controller_is_replaced() -> None:
    from neural_doc_flow_security.sandbox.config import SandboxConfig
    from neural_doc_flow_security.sandbox.launch import resources
    from neural_doc_flow_security.sandbox.launch.plan import plan_launch

    resources.make_spare_cgroup()
    spare = resources._spare
    assert spare is not None and "cpu" not in spare.paths
    spare_dirs = spare.paths
    config = SandboxConfig(cpu_quota_percent=50)
    cgroup = resources.create_cgroup(config, "cpu-test", plan_launch(config))
    try:
        assert cgroup is not None and cgroup is not spare and "cpu" in cgroup.paths
        assert all(not os.path.exists(d) for d in spare_dirs.values())  # the spare was removed
    finally:
        assert cgroup is not None
        cgroup.destroy()


def test_discarding_the_spare_removes_it() -> None:
    from neural_doc_flow_security.sandbox.launch import resources

    resources.make_spare_cgroup()
    spare = resources._spare
    assert spare is not None
    resources.discard_spare_cgroup()
    assert resources._spare is None
    assert all(not os.path.exists(d) for d in spare.paths.values())
