"""Per-stage timing of one cold `run_program(SandboxConfig(), ["/bin/true"])`, without touching src/.

Run as its own process (run.py does: `python benchmarks/stages.py --runs N`); it prints JSON.

The network namespace is made ahead, outside the timed run, as `ndf-sandbox run`
does while it imports (run.make_ahead); a run without limits makes no cgroup.

How: the parent's steps (plan, cgroup, network namespace, the clone3 call of the
C extension, id maps, wait, finish) are timed by wrapping (monkeypatching) the
functions the launch calls through module attributes. The child side runs in C
(linux/_child.c) and writes its own timeline: with `spawn.trace_fd` set, every
stage writes "CLOCK_MONOTONIC-ns pid name" to that fd (here a memfd) when it
starts; a stage lasts until the next stage of the same process starts. The
`exec` stage's row runs until the parent sees the exit (posix_spawn, /bin/true,
exit, init reaps and exits, pidfd readable). The sandbox has no time namespace,
so parent and child share one clock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

_now = time.monotonic_ns
_parent_records: list[tuple[str, int, int]] = []
_trace_fd = -1


def _wrap(module: Any, name: str, label: str) -> None:
    original = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = _now()
        try:
            return original(*args, **kwargs)
        finally:
            _parent_records.append((label, start, _now()))

    setattr(module, name, timed)


def install_probes() -> None:
    """Wrap the parent's steps and open the child's trace. Call once, in a process that only measures."""
    global _trace_fd
    from neural_doc_flow_security.sandbox.launch import launcher, resources, spawn, supervise
    from neural_doc_flow_security.sandbox.linux import network, steps

    _wrap(launcher, "plan_launch", "P plan_launch (lru-cached)")
    _wrap(resources, "create_cgroup", "P create_cgroup")
    _wrap(network, "take", "P network namespace (made ahead)")
    _wrap(steps, "spawn", "P clone3 returns in parent")
    _wrap(spawn, "write_id_maps", "P write uid/gid maps")
    _wrap(supervise, "wait_sandbox", "P wait (pidfd poll)")
    _wrap(launcher, "finish_sandbox", "P finish (wait4, result)")
    _trace_fd = os.memfd_create("ndf-stages", os.MFD_CLOEXEC)
    spawn.trace_fd = _trace_fd


def _child_records(wait_end: int) -> list[tuple[str, int, int]]:
    os.lseek(_trace_fd, 0, os.SEEK_SET)
    lines = os.read(_trace_fd, 1 << 20).decode().splitlines()
    marks = [(int(ns), int(pid), name) for ns, pid, name in (line.split(" ", 2) for line in lines)]
    records = []
    for i, (start, pid, name) in enumerate(marks):
        later = [ns for ns, other, _ in marks[i + 1:] if other == pid]
        end = later[0] if later else wait_end
        records.append((f"C {name}" + (" (until parent sees exit)" if name == "exec" else ""), start, end))
    return records


def one_run() -> list[tuple[str, int, int]]:
    """One launch; returns its records (relative to the start of run_program)."""
    from run import make_ahead

    from neural_doc_flow_security.sandbox import SandboxConfig
    from neural_doc_flow_security.sandbox.launch.supervise import run_program

    make_ahead()  # as `ndf-sandbox run` does while it imports
    _parent_records.clear()
    os.ftruncate(_trace_fd, 0)
    os.lseek(_trace_fd, 0, os.SEEK_SET)
    t0 = _now()
    result = run_program(SandboxConfig(), ["/bin/true"])
    t1 = _now()
    if result.outcome.value != "ok":
        raise RuntimeError(f"run_program failed: {result.outcome.value}: {result.error}")
    wait_end = max((end for label, _s, end in _parent_records if label == "P wait (pidfd poll)"), default=t1)
    records = _parent_records + _child_records(wait_end)
    seen: dict[str, int] = defaultdict(int)
    fixed = []
    for label, start, end in sorted(records, key=lambda r: r[1]):
        seen[label] += 1
        if label.startswith("C ") and seen[label] > 1:
            label = f"{label} #{seen[label]}"
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
