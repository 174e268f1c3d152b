"""Per-stage timing of one cold `run_program(SandboxConfig(), ["/bin/true"])`, without touching src/.

Run as its own process (run.py does: `python benchmarks/stages.py --runs N`); it prints JSON.

How: before running, this process wraps (monkeypatches) the functions the launch
calls through module attributes: the parent's steps (plan, cgroup,
clone3, id maps, wait, finish), every named stage of the child bootstrap
(`bootstrap._stage`), the fork of the sandbox's pid 1, and the mount syscalls of
the rootfs stage. The sandbox processes are forks of this one, so the wrappers
run there too; each wrapper appends (label, start, end) on CLOCK_MONOTONIC (the
sandbox has no time namespace) to a MAP_SHARED anonymous mapping that survives
the fork, so parent, init and payload write into one timeline. The `exec` stage
never returns; its row is "exec until the parent sees the exit" (execve,
/bin/true, exit, init reaps and exits, pidfd readable).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_BUF_SIZE = 1 << 20
_REGIONS = 3  # parent, sandbox pid 1 (before and after its fork), payload: one writer each
_REGION_SIZE = _BUF_SIZE // _REGIONS
_HEADER = struct.Struct("<Q")   # bytes used
_RECORD = struct.Struct("<48sqq")  # label, start ns, end ns


class Timeline:
    """Records shared by every process forked from this one. Processes that run at the
    same time write to separate regions (`region` is set in each child after its fork)."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, _BUF_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.region = 0
        self.reset()

    def reset(self) -> None:
        for region in range(_REGIONS):
            _HEADER.pack_into(self.buf, region * _REGION_SIZE, 0)

    def add(self, label: str, start: int, end: int) -> None:
        base = self.region * _REGION_SIZE
        (used,) = _HEADER.unpack_from(self.buf, base)
        offset = base + _HEADER.size + used
        if offset + _RECORD.size > base + _REGION_SIZE:
            return
        _RECORD.pack_into(self.buf, offset, label.encode()[:48], start, end)
        _HEADER.pack_into(self.buf, base, used + _RECORD.size)

    def records(self) -> list[tuple[str, int, int]]:
        out = []
        for region in range(_REGIONS):
            base = region * _REGION_SIZE
            (used,) = _HEADER.unpack_from(self.buf, base)
            for offset in range(base + _HEADER.size, base + _HEADER.size + used, _RECORD.size):
                raw, start, end = _RECORD.unpack_from(self.buf, offset)
                out.append((raw.rstrip(b"\0").decode(), start, end))
        return sorted(out, key=lambda r: r[1])


TIMELINE = Timeline()
_now = time.monotonic_ns


def _wrap(module: Any, name: str, label: str | Callable[[Any], str],
          child_region: int | None = None) -> None:
    original = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = _now()
        result = original(*args, **kwargs)
        end = _now()
        if child_region is not None and result[0] == 0:
            TIMELINE.region = child_region
        TIMELINE.add(label(result) if callable(label) else label, start, end)
        return result

    setattr(module, name, timed)


def install_probes() -> None:
    """Wrap the launch's steps. Call once, in a process that only measures."""
    from neural_doc_flow_security.sandbox.launch import bootstrap, launcher, resources, spawn, supervise
    from neural_doc_flow_security.sandbox.linux import syscalls

    _wrap(launcher, "plan_launch", "P plan_launch (lru-cached)")
    _wrap(resources, "create_cgroup", "P create_cgroup")
    _wrap(syscalls, "clone3_fork",
          lambda r: "C clone3 -> child runs" if r[0] == 0 else "P clone3 returns in parent",
          child_region=1)
    _wrap(spawn, "write_id_maps", "P write uid/gid maps")
    _wrap(supervise, "wait_sandbox", "P wait (pidfd poll)")
    _wrap(launcher, "finish_sandbox", "P finish (wait4, result)")
    for call in ("mount", "mount_setattr", "pivot_root", "umount2"):
        _wrap(syscalls, call, f"S {call}()")

    real_fork = os.fork

    def fork() -> int:
        start = _now()
        pid = real_fork()
        if pid == 0:
            TIMELINE.region = 2
        TIMELINE.add("I fork pid-1 init" if pid else "C fork -> payload runs", start, _now())
        return pid

    # bootstrap's `os` is the os module itself: this process only measures, and during a
    # launch only bootstrap.run_child calls os.fork (subprocess uses _posixsubprocess).
    bootstrap.os.fork = fork

    real_stage = bootstrap._stage

    def stage(name: str, error_fd: int, action: Callable[[], object]) -> None:
        start = _now()
        if name == "exec":
            TIMELINE.add("C exec (until parent sees exit)", start, -1)
        real_stage(name, error_fd, action)
        TIMELINE.add(f"C {name}", start, _now())

    bootstrap._stage = stage


def one_run() -> list[tuple[str, int, int]]:
    """One launch; returns its records (relative to the start of run_program)."""
    from neural_doc_flow_security.sandbox import SandboxConfig
    from neural_doc_flow_security.sandbox.launch.supervise import run_program

    TIMELINE.reset()
    t0 = _now()
    result = run_program(SandboxConfig(), ["/bin/true"])
    t1 = _now()
    if result.outcome.value != "ok":
        raise RuntimeError(f"run_program failed: {result.outcome.value}: {result.error}")
    records = TIMELINE.records()
    wait_end = max((end for label, _s, end in records if label == "P wait (pidfd poll)"), default=t1)
    fixed = []
    seen: dict[str, int] = defaultdict(int)
    for label, start, end in records:
        seen[label] += 1
        if label.startswith("C ") and seen[label] > 1:
            label = f"{label} #{seen[label]}"
        if end == -1:
            end = wait_end
        elif label.startswith("C exec"):
            continue  # the wrapped stage never returns; only the -1 record counts
        fixed.append((label, start - t0, end - t0))
    fixed.append(("= total run_program", 0, t1 - t0))
    return fixed


def measure(runs: int, bwrap_argv: list[str] | None) -> dict[str, Any]:
    """`runs` launches, interleaved with bwrap runs when given; per-label medians."""
    install_probes()
    from neural_doc_flow_security.sandbox import SandboxConfig
    from neural_doc_flow_security.sandbox.launch.plan import _plan_launch

    one_run()  # warm: plan cache, imports
    start = _now()
    _plan_launch.__wrapped__(SandboxConfig(), os.geteuid(), os.getegid())  # type: ignore[attr-defined]
    plan_cold_us = (_now() - start) / 1000
    durations: dict[str, list[float]] = defaultdict(list)
    offsets: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    bwrap: list[float] = []
    for _ in range(runs):
        per_run: dict[str, float] = defaultdict(float)
        for label, start, end in one_run():
            per_run[label] += (end - start) / 1000  # syscalls: summed over their calls
            calls[label] += 1
            if label not in offsets or len(offsets[label]) < len(durations[label]) + 1:
                offsets[label].append(start / 1000)
        for label, value in per_run.items():
            durations[label].append(value)
        if bwrap_argv:
            t = time.perf_counter()
            subprocess.run(bwrap_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            bwrap.append((time.perf_counter() - t) * 1e6)
    rows = [{"label": label, "calls_per_run": calls[label] / runs, "median_us": statistics.median(values),
             "p90_us": _p90(values), "offset_us": statistics.median(offsets[label])}
            for label, values in durations.items()]
    rank = {label: i for i, (label, _s, _e) in enumerate(sorted(one_run(), key=lambda r: r[1]))}
    rows.sort(key=lambda r: (r["label"].startswith("="), rank.get(r["label"], 999), r["offset_us"]))
    return {"runs": runs, "rows": rows, "plan_launch_uncached_us": plan_cold_us,
            "bwrap_us": {"median": statistics.median(bwrap), "p90": _p90(bwrap)} if bwrap else None}


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--bwrap", help="JSON argv of the bwrap command to interleave")
    args = parser.parse_args()
    print(json.dumps(measure(args.runs, json.loads(args.bwrap) if args.bwrap else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
