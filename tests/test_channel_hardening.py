"""What a sandbox sends must not slow, fill or hang the host (issues 22 and 23.6).

Host-side evidence only: the manager's own /proc/self/maps, its fd table and
tracemalloc's peak, never what the sandboxed program says about itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tracemalloc
from typing import Any

import pytest

import api_helpers
from api_helpers import linux_only, needs_root, run
from conftest import remove_cgroup_dirs
from neural_doc_flow_security.sandbox.api import INBOX_BLOBS, INBOX_MESSAGES
from neural_doc_flow_security.sandbox.config import SandboxConfig
from neural_doc_flow_security.sandbox.errors import ProtocolViolation
from neural_doc_flow_security.sandbox.ipc import framing
from neural_doc_flow_security.sandbox.ipc.limits import DecodeLimits
from neural_doc_flow_security.sandbox.ipc.messages import MessageKind
from neural_doc_flow_security.sandbox.launch.python_worker import PluginContext
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult
from test_api_ipc import RAW_PRELUDE

no_leaks = api_helpers.no_leaks
method = api_helpers.method
manager = api_helpers.manager
describe = api_helpers.describe

pytestmark = [pytest.mark.timeout(300)]

MiB = 1024 * 1024


def memfd_mappings() -> list[str]:
    """The memfd mappings of this (the manager's) process, from /proc/self/maps."""
    with open("/proc/self/maps") as maps:
        return [line.strip() for line in maps if "/memfd:" in line]


def mapped_memfd_bytes() -> int:
    total = 0
    for line in memfd_mappings():
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        total += end - start
    return total


def hostile(source: str) -> None:
    exec(source, {})


# --- decode cost amplification (#22.1) -------------------------------------------------

def nested_array32_frame(levels: int = 1000) -> bytes:
    """~5 KB: array32 headers, each announcing 100,000 elements, nested `levels` deep."""
    return (b"\xdd" + struct.pack(">I", 100_000)) * levels


def test_amplifying_frame_is_refused_before_the_decoder_allocates() -> None:
    frame = nested_array32_frame()
    assert len(frame) == 5000
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolViolation):
            framing.decode(frame, DecodeLimits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Today's decoder allocates every level's list at its announced length first (~76 MiB).
    assert peak < 1 * MiB, f"refusing a 5 KB frame took {peak / MiB:.1f} MiB"


@pytest.mark.parametrize("header", [b"\xdd", b"\xdf"])  # array32, map32
def test_a_container_cannot_announce_more_elements_than_bytes_left(header: bytes) -> None:
    frame = header + struct.pack(">I", 5000) + b"\xc0" * 100
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolViolation, match="announces more than it holds"):
            framing.decode(frame, DecodeLimits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_the_decoder_accepts_what_the_encoder_makes() -> None:
    value = {"kind": "result", "value": [1, -1, 2**40, -(2**40), 1.5, "é" * 300, b"\x00" * 70_000,
                                         None, True, False, {"a": [[], {}]}, "x" * 40, 255, -33]}
    assert framing.decode(framing.encode(value), DecodeLimits()) == value


# --- memfds: holes (#23.6), released at once on a violation (#22.2) --------------------

SPARSE_MEMFD = """
import fcntl
fd = os.memfd_create('sparse', os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 512 * 1024 * 1024)  # no writes: all holes, nothing charged to this sandbox
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            | fcntl.F_SEAL_SEAL)
send_record(b'\\x01' + msgpack.packb({'kind': 'data', 'tag': 'sparse',
                                      'data': {'fd': 0, 'size': 512 * 1024 * 1024}}), [fd])
time.sleep(600)
"""


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_sparse_memfd_is_refused_and_never_mapped_by_the_host(method: str) -> None:
    async def scenario() -> tuple[Any, int, SandboxResult]:
        async with manager(method) as m:
            calls = m.with_options(sandbox_config=SandboxConfig(memory_limit_mb=64, timeout_seconds=120))
            handle = await calls.spawn("sparse", hostile, RAW_PRELUDE + SPARSE_MEMFD)
            message = await handle.receive(timeout=60)
            mapped = mapped_memfd_bytes()
            result = await asyncio.wait_for(handle.kill(), 60)
            return message, mapped, result

    message, mapped, result = run(scenario())
    # Today the host maps the 512 MiB of holes and hands them on; reading them
    # would allocate half a gigabyte on the host's account.
    assert mapped < 256 * MiB, f"the host mapped {mapped / MiB:.0f} MiB of the sandbox's memfd"
    assert message is None or message.kind is not MessageKind.DATA, message
    assert result.outcome is Outcome.PROTOCOL_VIOLATION, describe(result)
    assert "holes" in (result.error or ""), describe(result)


REFUSED_AFTER_MAPPING = """
import fcntl
def sealed(size):
    fd = os.memfd_create('blob', os.MFD_ALLOW_SEALING)
    os.write(fd, b'x' * size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                | fcntl.F_SEAL_SEAL)
    return fd
# a valid 8 MiB blob, then one fd too many: refused after the blob was mapped
send_record(b'\\x01' + msgpack.packb({'kind': 'data', 'tag': 'x', 'data': {'fd': 0, 'size': 8 << 20}}),
            [sealed(8 << 20), sealed(10)])
time.sleep(600)
"""


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_a_refused_memfd_is_unmapped_and_its_fd_closed_at_once(method: str) -> None:
    async def scenario() -> tuple[SandboxResult, int, list[str]]:
        async with manager(method) as m:
            calls = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=120))
            handle = await calls.spawn("refused", hostile, RAW_PRELUDE + REFUSED_AFTER_MAPPING)
            result = await asyncio.wait_for(handle.wait(), 120)
            # The manager and the handle (with its violation) are still alive here.
            fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}")]
            return result, mapped_memfd_bytes(), [t for t in fds if "memfd:" in t]

    result, mapped, memfd_fds = run(scenario())
    assert result.outcome is Outcome.PROTOCOL_VIOLATION, describe(result)
    assert "unexpected fd" in (result.error or ""), describe(result)
    assert mapped == 0, f"{mapped / MiB:.0f} MiB of a refused memfd still mapped: {memfd_mappings()}"
    assert not memfd_fds, memfd_fds
    assert not memfd_mappings()


# --- back-pressure never blocks ending a sandbox (#22.3), fds per queued blob (#22.4) --

def chatty_then_return(ctx: PluginContext, count: int) -> int:
    for i in range(count):
        ctx.log(f"line {i}")
    return 42


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_wait_returns_when_a_plugin_ended_with_more_unread_messages_than_the_inbox_holds(
        method: str) -> None:
    count = INBOX_MESSAGES + 60  # the rest waits in the socket, then the result

    async def scenario() -> tuple[SandboxResult, int]:
        async with manager(method, status_interval=None) as m:
            handle = await m.spawn("chatty", chatty_then_return, count)
            # Today the channel reader blocks on the full inbox and wait() on the reader: forever.
            result = await asyncio.wait_for(handle.wait(), 120)
            logs = 0
            while (message := await handle.receive(timeout=5)) is not None:
                logs += message.kind is MessageKind.LOG
            return result, logs

    result, logs = run(scenario())
    assert result.outcome is Outcome.OK and result.output == 42, describe(result)
    assert logs == count


def endless_logs(ctx: PluginContext) -> None:
    import time

    while True:
        ctx.log("x")
        time.sleep(0.002)  # under the rate limit: back-pressure, not a violation


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_kill_and_shutdown_complete_while_the_inbox_is_full(method: str) -> None:
    async def scenario() -> tuple[SandboxResult, int]:
        m = manager(method, status_interval=None)
        await m.start()
        try:
            calls = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=300))
            handle = await calls.spawn("endless", endless_logs)
            assert await api_helpers.async_wait_until(lambda: handle._inbox.qsize() >= INBOX_MESSAGES,
                                                      timeout=120)
            queued = handle._inbox.qsize()
            result = await asyncio.wait_for(handle.kill(), 60)
        finally:
            await asyncio.wait_for(m.shutdown(), 60)
        return result, queued

    result, queued = run(scenario())
    assert result.outcome is Outcome.KILLED, describe(result)
    assert queued == INBOX_MESSAGES  # the reader stopped at the bound


def blobs_then_sleep(ctx: PluginContext, count: int) -> None:
    import time

    for i in range(count):
        ctx.send(bytes([i % 256]) * (256 * 1024), tag=str(i))  # each by memfd
    time.sleep(600)


def memfd_fds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += "memfd:" in os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return count


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_queued_memfd_messages_hold_a_bounded_number_of_host_fds(method: str) -> None:
    count = 120

    async def scenario() -> tuple[int, int, list[int], int]:
        async with manager(method, status_interval=None) as m:
            calls = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=300))
            handle = await calls.spawn("blobs", blobs_then_sleep, count)
            assert await api_helpers.async_wait_until(lambda: handle._inbox.qsize() >= INBOX_BLOBS, timeout=120)
            await asyncio.sleep(1.0)  # a reader that did not stop would take more now
            held = memfd_fds()
            received = []
            for _ in range(count):  # reading makes room: every message still arrives, in order
                message = await handle.receive(timeout=60)
                assert message is not None and message.kind is MessageKind.DATA
                received.append(int(message.tag))
                del message
            await asyncio.wait_for(handle.kill(), 60)
            return held, memfd_fds(), received, handle.dropped_blobs

    held, after, received, dropped = run(scenario())
    # Python 3.11's mmap keeps one fd per mapping: today every queued blob holds one.
    assert held <= INBOX_BLOBS + 1, f"{held} memfd fds held for {count} unread messages"
    assert received == list(range(count))
    assert after == 0 and dropped == 0


# --- fds: every launch error path releases what it took (#22.5, #22.9) -------------------

FD_LIMIT_SCRIPT = r"""
import asyncio, json, os, resource, sys
from neural_doc_flow_security.sandbox import SandboxConfig, SandboxError, SandboxManager

soft, hard = (int(x) for x in sys.argv[1:3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

def fd_count():
    return len(os.listdir("/proc/self/fd"))

async def main():
    report = {"errors": [], "leaked": []}
    config = SandboxConfig(max_open_files=32)  # under the manager's hard limit
    async with SandboxManager(config, start_method=sys.argv[3], status_interval=None) as m:
        report["soft_after_start"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        report["first"] = (await m.execute_sandboxed("first", lambda: "ok")).output
        await m.wait_pool_ready()
        for free in range(0, 9):  # fail each step of the launch path in turn
            before = fd_count()
            filler = []
            try:
                while True:
                    filler.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            for fd in filler[:free]:
                os.close(fd)
            del filler[:free]
            try:
                result = await m.execute_sandboxed("squeezed", lambda: "ok")
                outcome = result.outcome.value
            except SandboxError as exc:
                outcome = type(exc).__name__ + ": " + str(exc)
            except Exception as exc:
                outcome = "NOT A SandboxError: " + type(exc).__name__ + ": " + str(exc)
            finally:
                for fd in filler:
                    os.close(fd)
            await m.wait_pool_ready()
            report["errors"].append(outcome)
            report["leaked"].append(fd_count() - before)
        report["last"] = (await m.execute_sandboxed("last", lambda: "ok")).output
    print(json.dumps(report))

asyncio.run(main())
"""


def run_under_fd_limit(method: str, soft: int, hard: int) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FD_LIMIT_SCRIPT, str(soft), str(hard), method],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_launch_failures_at_the_fd_limit_leak_nothing_and_are_sandbox_errors(method: str) -> None:
    report = run_under_fd_limit(method, 64, 64)
    assert report["first"] == "ok" and report["last"] == "ok", report
    assert not any(e.startswith("NOT A SandboxError") for e in report["errors"]), report["errors"]
    assert any(e.startswith("HostLimitError") and "file descriptors" in e for e in report["errors"]), report
    assert report["leaked"] == [0] * len(report["leaked"]), report


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_manager_raises_its_fd_soft_limit_to_the_hard_limit(method: str) -> None:
    report = run_under_fd_limit(method, 64, 4096)
    assert report["soft_after_start"] == 4096
    assert report["leaked"] == [0] * len(report["leaked"]), report




# --- hostile neighbours: a flood of amplifying frames starves no one (#14.7) -------------

AMPLIFYING = "send_record(b'\\x01' + (b'\\xdd' + (100000).to_bytes(4, 'big')) * 1000)\ntime.sleep(600)\n"


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_trivial_calls_are_served_while_neighbours_flood_amplifying_frames(method: str) -> None:
    async def scenario() -> tuple[list[SandboxResult], list[SandboxResult], int]:
        async with manager(method, status_interval=None) as m:
            await m.execute_sandboxed("warm", lambda: 0)
            stop = asyncio.Event()
            floods: list[SandboxResult] = []
            bounded = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=60))

            async def flooder() -> None:
                while not stop.is_set():
                    floods.append(await bounded.execute_sandboxed("flood", hostile, RAW_PRELUDE + AMPLIFYING))

            tracemalloc.start()
            try:
                tasks = [asyncio.ensure_future(flooder()) for _ in range(3)]
                assert await api_helpers.async_wait_until(lambda: len(floods) >= 3, timeout=120)
                calls = [await asyncio.wait_for(m.execute_sandboxed("trivial", lambda: 1), 120)
                         for _ in range(10)]
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            return floods, calls, peak

    floods, calls, peak = run(scenario())
    assert all(r.outcome is Outcome.PROTOCOL_VIOLATION for r in floods), [describe(r) for r in floods]
    assert all(r.outcome is Outcome.OK and r.output == 1 for r in calls), [describe(r) for r in calls]
    # Each amplifying frame made today's manager allocate ~76 MiB before refusing it.
    assert peak < 32 * MiB, f"the manager's traced peak was {peak / MiB:.0f} MiB during the flood"


# --- a plugin whose sandboxes violate the protocol waits before its next launch (#22 floor) ---

GARBAGE = "os.write(3, b'\\xff' * 64)\ntime.sleep(600)\n"


class FrozenClock:
    """The back-off's clock, moved only by the test: a throttled plugin stays throttled
    until the test says so, however slow the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_a_plugin_that_violated_the_protocol_waits_and_its_neighbours_do_not(method: str) -> None:
    from neural_doc_flow_security.sandbox.backoff import RelaunchBackoff

    clock = FrozenClock()

    async def scenario() -> tuple[SandboxResult, int, SandboxResult, list[str], bool, SandboxResult, int]:
        async with manager(method, status_interval=None, violation_backoff_seconds=5) as m:
            m._backoff = RelaunchBackoff(5, clock=clock)
            bounded = m.with_options(sandbox_config=SandboxConfig(timeout_seconds=60))
            violation = await bounded.execute_sandboxed("hostile", hostile, RAW_PRELUDE + GARBAGE)
            throttled = m.stats().plugins_throttled
            again = asyncio.ensure_future(m.execute_sandboxed("hostile", lambda: "second"))
            neighbour = await asyncio.wait_for(m.execute_sandboxed("neighbour", lambda: 1), 120)
            await asyncio.sleep(0.3)
            # Host-side: no sandbox of the throttled plugin was started while it waited.
            running = [info.plugin_id for info in m.list_sandboxes()]
            waited = not again.done()
            clock.now += 0.1  # its turn (0.1 s after a first violation)
            second = await asyncio.wait_for(again, 120)
            return violation, throttled, neighbour, running, waited, second, m.stats().plugins_throttled

    violation, throttled, neighbour, running, waited, second, throttled_after = run(scenario())
    assert violation.outcome is Outcome.PROTOCOL_VIOLATION, describe(violation)
    assert throttled == 1
    assert neighbour.outcome is Outcome.OK and neighbour.output == 1, describe(neighbour)
    assert waited and "hostile" not in running, running
    assert second.outcome is Outcome.OK and second.output == "second", describe(second)
    assert throttled_after == 0


def test_the_backoff_doubles_up_to_its_cap_and_forgets_after_a_quiet_minute() -> None:
    from neural_doc_flow_security.sandbox.backoff import FORGET_AFTER_SECONDS, RelaunchBackoff

    clock = FrozenClock()
    backoff = RelaunchBackoff(1.0, clock=clock)
    waits = []
    for _ in range(6):
        backoff.violated("p")
        waits.append(round(backoff.delay("p"), 6))
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.delay("other") == 0.0 and backoff.throttled() == 1
    clock.now += FORGET_AFTER_SECONDS + 1
    backoff.violated("p")
    assert round(backoff.delay("p"), 6) == 0.1  # a new streak
    disabled = RelaunchBackoff(None, clock=clock)
    disabled.violated("p")
    assert disabled.delay("p") == 0.0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 3601, "5", True])
def test_violation_backoff_seconds_is_validated(bad: Any) -> None:
    from neural_doc_flow_security.sandbox import ConfigError, SandboxManager

    with pytest.raises(ConfigError, match="violation_backoff_seconds"):
        SandboxManager(violation_backoff_seconds=bad)


# --- memory pressure: sandboxes are the OOM killer's first choice (#22.7) ---------------

def sleeper(ctx: PluginContext) -> None:
    ctx.wait_for_stop()


def oom_score_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


@linux_only
@needs_root
@pytest.mark.usefixtures("no_leaks")
def test_sandbox_processes_have_the_highest_oom_score_adj(method: str) -> None:
    from neural_doc_flow_security.sandbox.launch.spawn import SANDBOX_OOM_SCORE_ADJ
    from neural_doc_flow_security.sandbox.launch.zygote import HELPER_OOM_SCORE_ADJ

    async def scenario() -> tuple[dict[int, int], dict[int, int], int]:
        async with manager(method) as m:
            handle = await m.spawn("sleeper", sleeper)
            program = asyncio.ensure_future(m.execute_command("sleep", ["sleep", "30"]))
            assert await api_helpers.async_wait_until(lambda: len(m.list_sandboxes()) == 2, timeout=60)
            sandboxes = {p.pid: oom_score_adj(p.pid) for info in m.list_sandboxes()
                         for p in api_helpers.tree_of(info.pid)}
            helpers = {p.pid: oom_score_adj(p.pid) for p in api_helpers.zygote_family(os.getpid())
                       if p.ppid() == os.getpid()}  # the zygotes (the rest: templates, spares)
            await handle.stop()
            program.cancel()
            await asyncio.gather(program, return_exceptions=True)
            return sandboxes, helpers, oom_score_adj(os.getpid())

    sandboxes, helpers, own = run(scenario())
    assert len(sandboxes) >= 4  # init and payload of each
    assert set(sandboxes.values()) == {SANDBOX_OOM_SCORE_ADJ}, sandboxes
    assert own < HELPER_OOM_SCORE_ADJ < SANDBOX_OOM_SCORE_ADJ
    if method == "zygote":
        assert helpers and set(helpers.values()) == {HELPER_OOM_SCORE_ADJ}, helpers


OOM_SCRIPT = r"""
import asyncio, json, os, sys
with open(sys.argv[1], "w") as procs:  # into the limited cgroup before anything starts
    procs.write(str(os.getpid()))
from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager

async def main():
    config = SandboxConfig(memory_limit_mb=None, max_processes=None)  # no limits: no cgroup of its own
    async with SandboxManager(config, start_method=sys.argv[2]) as m:
        result = await m.execute_command("hog", ["tail", "-n", "1", "/dev/zero"])  # grows until killed
        print(json.dumps({"outcome": result.outcome.value, "error": result.error, "signal": result.signal}))

asyncio.run(main())
"""


@pytest.fixture
def limited_memory_cgroup() -> Any:
    """A memory cgroup of 300 MiB below this process's own (cgroup v1 memory or v2)."""
    own = api_helpers._own_memory_cgroup()
    v1 = own is not None and os.path.isdir("/sys/fs/cgroup/memory")
    base = (os.path.join("/sys/fs/cgroup/memory", own.lstrip("/")) if v1 and own
            else os.path.join("/sys/fs/cgroup", _own_unified_path().lstrip("/")))
    path = os.path.join(base, f"oomtest-{os.getpid()}")
    try:
        os.mkdir(path)
        limit = str(300 * MiB)
        with open(os.path.join(path, "memory.limit_in_bytes" if v1 else "memory.max"), "w") as f:
            f.write(limit)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        pytest.skip(f"cannot make a limited memory cgroup below our own: {exc}")
    yield path
    assert not remove_cgroup_dirs([path], timeout=30), f"cgroup {path} left"


def _own_unified_path() -> str:
    with open("/proc/self/cgroup") as f:
        return next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), "/")


@linux_only
@needs_root
def test_a_sandbox_killed_by_a_parent_cgroups_oom_killer_is_reported_as_oom(
        method: str, limited_memory_cgroup: str) -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", OOM_SCRIPT, os.path.join(limited_memory_cgroup, "cgroup.procs"),
                           method], capture_output=True, text=True, timeout=240)
    # The manager (uid 0, oom_score_adj 0) survives: the kernel takes the sandbox first.
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "oom", report
    assert "OOM killer" in report["error"], report
