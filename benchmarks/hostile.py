"""Scenario 7 of run.py: what hostile sandboxes cost the host (issues 14.7 and 22).

7a. Decode cost: the manager's CPU per MB of frames and its peak memory per frame,
    for valid, garbage and amplifying frames (framing.decode, in this process).
7b. Hostile neighbours: the latency of trivial calls while N sandboxes flood the
    manager with valid messages (paced under the rate limit, the host reading them),
    invalid records, or amplifying frames (each refused, its sandbox killed, the next
    one started), next to the same calls with no flood. Issue 22's floor: a flood may
    not raise the p50 by more than 2x, nor leave host fds or mappings behind.

Run alone: /opt/ndf-venv/bin/python benchmarks/run.py --only hostile
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from run import Table, _async_check, _timed_calls, summary

from neural_doc_flow_security.sandbox import PluginContext

AMPLIFYING_FRAME = (b"\xdd" + struct.pack(">I", 100_000)) * 1000  # issue 22's 5 KB frame
_SEND_RECORD = """
import array, os, socket, time
def send_record(record):
    sock = socket.socket(fileno=3)
    sock.sendmsg([record])
    sock.detach()
"""


def _frames() -> dict[str, bytes]:
    from neural_doc_flow_security.sandbox.ipc import framing

    rng = random.Random(22)
    return {
        "valid: log message": framing.encode({"kind": "log", "level": "info", "text": "x" * 40}),
        "valid: result of 1,000 ints": framing.encode({"kind": "result", "value": list(range(1000))}),
        "valid: 32 KiB data": framing.encode({"kind": "data", "tag": "", "data": b"\x00" * 32768}),
        "valid: 30,000 nils (wide)": framing.encode({"kind": "result", "value": [None] * 30_000}),
        "garbage: 4 KiB random": bytes(rng.randrange(256) for _ in range(4096)),
        "amplifying: nested array32 (5 KB)": AMPLIFYING_FRAME,
    }


def scenario_decode_cost(megabytes: float) -> list[Table]:
    """7a: CPU ms per MB of each kind of frame, and tracemalloc's peak for one frame."""
    from neural_doc_flow_security.sandbox.errors import ProtocolViolation
    from neural_doc_flow_security.sandbox.ipc import framing
    from neural_doc_flow_security.sandbox.ipc.limits import DecodeLimits

    limits = DecodeLimits()
    table = Table("7a. Decoding frames from a sandbox: manager CPU per MB and peak memory per frame", None,
                  "framing.decode in this process, repeated to the given MB; peak: tracemalloc for one "
                  "frame. Issue 22 measured 62 ms of CPU and +66.5 MiB for one amplifying frame before.",
                  timing=False)

    def decode(frame: bytes) -> str:
        try:
            framing.decode(frame, limits)
            return "accepted"
        except ProtocolViolation:
            return "refused"

    for name, frame in _frames().items():
        repeats = max(1, int(megabytes * 2**20 / len(frame)))
        verdict = decode(frame)
        start = time.process_time()
        for _ in range(repeats):
            decode(frame)
        cpu = time.process_time() - start
        tracemalloc.start()
        decode(frame)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        table.add(name, {}, verdict=verdict, frame_bytes=len(frame), frames=repeats,
                  cpu_ms_per_mb=cpu * 1000 / (repeats * len(frame) / 2**20), peak_kib_per_frame=peak / 1024)
    return [table]


# -- the flooders (run inside sandboxes) --------------------------------------------------

def paced_logs(ctx: PluginContext) -> None:
    """Valid messages, as fast as the rate limit allows (~1,000/s), until stopped."""
    import time

    while not ctx.stop_requested:
        ctx.log("flooding with valid messages")
        time.sleep(0.001)


def raw_then_sleep(source: str) -> None:
    exec(source, {})


_INVALID = _SEND_RECORD + "send_record(b'\\xff' * 4096)\ntime.sleep(600)\n"
_AMPLIFYING = _SEND_RECORD + f"send_record(b'\\x01' + {AMPLIFYING_FRAME!r})\ntime.sleep(600)\n"


async def _flood(manager: Any, kind: str, stop: asyncio.Event, config: Any, index: int) -> int:
    """One flooding neighbour until `stop`; returns how many sandboxes it used."""
    used = 0
    if kind == "valid":
        handle = await manager.with_options(sandbox_config=config).spawn(f"flood-valid-{index}", paced_logs)
        used = 1
        while not stop.is_set():
            await handle.receive(timeout=0.05)
        await handle.stop()
        return used
    while not stop.is_set():
        if kind == "busy":
            await manager.execute_sandboxed("busy", int)
        else:
            source = _INVALID if kind == "invalid" else _AMPLIFYING
            await manager.with_options(sandbox_config=config).execute_sandboxed(f"flood-{kind}", raw_then_sleep,
                                                                                source)
        used += 1
    return used


def _memfd_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum("/memfd:" in line for line in maps)


async def scenario_hostile(flooders: int, calls: int) -> list[Table]:
    """7b: trivial-call latency next to `flooders` sandboxes flooding each way."""
    from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager

    config = SandboxConfig(timeout_seconds=120)
    table = Table(f"7b. Hostile neighbours: execute_sandboxed(lambda: 42) while {flooders} sandboxes flood",
                  "no flood", "Floor (issue 22): p50 at most 2x the no-flood p50; no fd or memfd mapping "
                  "of the manager left after the flooders end. busy: the same neighbours making trivial "
                  "calls back to back, no flood: an invalid or amplifying frame kills its sandbox, so those "
                  "floods are also a stream of launches, which the busy row prices alone; a plugin whose "
                  "sandboxes violated the protocol waits before its next launch (0.1 s doubling to 5 s: "
                  "violation_backoff_seconds), so "
                  "invalid and amplifying floods are throttled. manager_cpu: share "
                  "of one CPU the manager used during the timed calls.")
    async with SandboxManager(config, max_concurrent=flooders + 8, status_interval=None) as manager:
        async def trivial() -> object:
            return await _async_check(manager.execute_sandboxed("trivial", lambda: 42))

        base: dict[str, Any] | None = None
        busy: dict[str, Any] | None = None
        for kind in ("no flood", "busy", "valid", "invalid", "amplifying"):
            await manager.wait_pool_ready()
            fds_before, maps_before = len(os.listdir("/proc/self/fd")), _memfd_mappings()
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(_flood(manager, kind, stop, config, i))
                     for i in range(flooders if kind != "no flood" else 0)]
            await asyncio.sleep(1.0 if tasks else 0)  # the flood is under way
            cpu, wall = time.process_time(), time.perf_counter()
            stats = summary(await _timed_calls(trivial, calls, warmup=1))
            cpu_share = (time.process_time() - cpu) / (time.perf_counter() - wall)
            stop.set()
            used = sum(await asyncio.gather(*tasks))
            await manager.wait_pool_ready()
            await asyncio.sleep(0.2)
            extra: dict[str, Any] = {"flood_sandboxes": used, "manager_cpu": f"{cpu_share:.0%}",
                                     "fds_left": len(os.listdir("/proc/self/fd")) - fds_before,
                                     "memfd_maps_left": _memfd_mappings() - maps_before}
            if base is None:
                base = stats
            else:
                extra["floor_p50_2x"] = ("n/a: no flood" if kind == "busy" else
                                         "ok" if stats["median_ms"] <= 2 * base["median_ms"] else "MISSED")
                if busy is not None:
                    extra["x_busy"] = f"{stats['median_ms'] / busy['median_ms']:.2f}"
            if kind == "busy":
                busy = stats
            table.add(kind, stats, **extra)
    return [table]


def run_all(quick: bool, arun: Callable[[Awaitable[list[Table]]], list[Table]]) -> list[Table]:
    """Both parts, for run.py's `hostile` section."""
    tables = scenario_decode_cost(2.0 if quick else 8.0)
    return tables + arun(scenario_hostile(4, 20 if quick else 60))
