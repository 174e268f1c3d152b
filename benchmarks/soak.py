"""Soak: one SandboxManager, many calls of mixed outcomes, its footprint over time.

    /opt/ndf-venv/bin/python benchmarks/soak.py [--calls 100000] [--every 10000] [--in-flight 8]

Runs `--calls` execute_sandboxed calls, `--in-flight` at a time, of mixed outcomes
(ok, error, timeout, oom, 1 MB of stdout and a 1 MB result) and prints, every
`--every` calls, the manager's RSS and USS, its zygotes' RSS (summed), its fds, gc-tracked objects and
threads, and what is on the host (cgroup directories named after the manager or
its zygotes, and processes under the zygotes other than their templates: the
spare sandboxes each idle zygote keeps made ahead, two each, are among them; more
than that, or growing, is a leftover). At the end: growth per 1,000 calls between the
first report and the last (the first `--every` calls warm caches up). Not run in CI:
100,000 calls take ~20-40 min on the 2-core VM. Needs root (the oom calls need a
memory cgroup).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import sys
import threading
import time
from typing import Any

import psutil

from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager

TIMEOUT = SandboxConfig(timeout_seconds=0.3)
OOM = SandboxConfig(memory_limit_mb=48)
# One call in 20 of each kind but ok: error, timeout, oom, 1 MB outputs.
MIX = ["ok"] * 16 + ["error", "timeout", "oom", "big"]


def _ok(i: int) -> int:
    return i


def _error(i: int) -> None:
    raise ValueError(f"call {i} fails as planned")


def _sleep(_i: int) -> None:
    import time

    time.sleep(30)


def _oom(_i: int) -> bytes:
    block = bytearray(256 * 1024 * 1024)
    for at in range(0, len(block), 4096):
        block[at] = 1
    return bytes(block[:1])


def _big(_i: int) -> bytes:
    import sys

    sys.stdout.write("x" * (1 << 20))
    return b"y" * (1 << 20)


CALLS: dict[str, tuple[Any, SandboxConfig | None, str]] = {
    "ok": (_ok, None, "ok"), "error": (_error, None, "error"), "timeout": (_sleep, TIMEOUT, "timeout"),
    "oom": (_oom, OOM, "oom"), "big": (_big, None, "ok"),
}


def _leftovers(manager: SandboxManager) -> tuple[int, int]:
    """Sandbox cgroups of this manager's process and zygotes, and sandbox processes
    left under the zygotes (their children beyond the template) once idle."""
    owners = {os.getpid(), *getattr(manager._starter, "pids", [])}
    cgroups = 0
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        for name in list(dirs):
            if name.startswith("ndf-"):
                dirs.remove(name)
                parts = name.split("-")
                cgroups += len(parts) > 1 and parts[1].isdigit() and int(parts[1]) in owners
        if top.count("/") > 7:
            dirs.clear()
    processes = 0
    for pid in getattr(manager._starter, "pids", []):
        try:
            processes += max(0, len(psutil.Process(pid).children()) - 1)  # not the template
        except psutil.Error:
            pass
    return cgroups, processes


def _sample(manager: SandboxManager) -> dict[str, float]:
    gc.collect()
    me = psutil.Process()
    memory = me.memory_full_info()
    cgroups, processes = _leftovers(manager)
    zygotes = 0.0
    for pid in getattr(manager._starter, "pids", []):
        try:
            zygotes += psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            pass
    return {"rss_mib": memory.rss / 2**20, "uss_mib": memory.uss / 2**20, "zygotes_mib": zygotes, "fds": me.num_fds(),
            "objects": len(gc.get_objects()), "threads": threading.active_count(),
            "cgroups_left": cgroups, "processes_left": processes}


async def soak(calls: int, every: int, in_flight: int) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    wrong: collections.Counter[str] = collections.Counter()
    samples: list[tuple[int, dict[str, float]]] = []
    started = time.monotonic()
    async with SandboxManager(status_interval=None) as manager:
        slots = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            kind = MIX[i % len(MIX)]
            function, config, expected = CALLS[kind]
            async with slots:
                try:
                    result = await manager.with_options(sandbox_config=config).execute_sandboxed(kind, function, i)
                except Exception as e:  # noqa: BLE001 - counted, the soak goes on
                    outcomes[f"raised {type(e).__name__}"] += 1
                    return
            outcomes[result.outcome.value] += 1
            if result.outcome.value != expected:
                wrong[f"{kind}->{result.outcome.value}"] += 1

        print("calls   secs   rss MiB  uss MiB  zygotes MiB  fds  objects  threads  cgroup dirs  sandbox processes",
              flush=True)
        for done in range(0, calls, every):
            await asyncio.gather(*(one(i) for i in range(done, min(calls, done + every))))
            await manager.wait_pool_ready()
            await asyncio.sleep(0.5)  # the last sandboxes' teardown
            sample = _sample(manager)
            samples.append((min(calls, done + every), sample))
            print(f"{samples[-1][0]:>6} {time.monotonic() - started:>6.0f} {sample['rss_mib']:>9.1f} "
                  f"{sample['uss_mib']:>8.1f} {sample['zygotes_mib']:>12.1f} {sample['fds']:>4.0f} "
                  f"{sample['objects']:>8.0f} "
                  f"{sample['threads']:>8.0f} {sample['cgroups_left']:>12.0f} {sample['processes_left']:>18.0f}",
                  flush=True)
        print(f"stats: {manager.stats()}")
    print(f"outcomes: {dict(outcomes)}; not as expected: {dict(wrong)}")
    if len(samples) >= 2:
        (first_n, first), (last_n, last) = samples[0], samples[-1]
        per = 1000 / (last_n - first_n)
        print(f"growth per 1,000 calls (from call {first_n} to {last_n}): "
              f"RSS {(last['rss_mib'] - first['rss_mib']) * 1024 * per:+.1f} KiB, "
              f"USS {(last['uss_mib'] - first['uss_mib']) * 1024 * per:+.1f} KiB, "
              f"fds {(last['fds'] - first['fds']) * per:+.2f}, "
              f"objects {(last['objects'] - first['objects']) * per:+.1f}, "
              f"threads {(last['threads'] - first['threads']) * per:+.2f}")


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(soak(args.calls, args.every, args.in_flight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
