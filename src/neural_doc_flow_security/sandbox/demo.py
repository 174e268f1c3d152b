"""`ndf-sandbox demo`: a small document pipeline with good and hostile plugins.

Every plugin runs concurrently, each in its own fresh sandbox. The good ones
turn the bundled sample documents into text (pypdf, pdftotext, html.parser, a
word counter); the hostile ones try to read host secrets, phone home, write on
the host, fork-bomb, eat memory and never return. The demo then checks, on the
host side, that nothing got out: the decoy secret appears in no output, the
loopback listener saw no connection, the marker file does not exist, and the
kernel's own counters (pids, memory, wall time) stayed under the limits.

Exit status: 0 when every good plugin produced its text and every hostile one
was contained as expected; 1 when one did not; 3 when nothing failed but some
rows could not run here (e.g. cgroup limits need root).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import audit
from . import demo_plugins as plugins
from .api import SandboxManager
from .config import SandboxConfig
from .detect import detect_features, missing_for
from .errors import SandboxError
from .result import Outcome, SandboxResult

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INCOMPLETE = 3

GOOD_CONFIG = SandboxConfig(memory_limit_mb=256, max_processes=32, timeout_seconds=20)
FORK_BOMB_PIDS = 16
MEMORY_EATER_MB = 128
NEVER_RETURNS_TIMEOUT = 2.0
SNIPPET_CHARS = 48


# -- the pipeline -------------------------------------------------------------


@dataclass
class HostEvidence:
    """What the host itself observes: the decoy secret, the marker, the listener."""

    decoy_dir: str
    secret_path: str
    secret: str
    marker_path: str
    port: int = 0
    connections: int = 0
    bytes_received: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "secret": {"path": self.secret_path, "leaked": False},
            "marker": {"path": self.marker_path, "exists": os.path.lexists(self.marker_path)},
            "listener": {"address": f"127.0.0.1:{self.port}", "connections": self.connections,
                         "bytes_received": self.bytes_received},
        }


@dataclass(frozen=True)
class PluginSpec:
    """One row of the demo: a plugin, its document, its limits and what must happen."""

    name: str
    kind: str                                   # "good" or "hostile"
    document: str                               # sample file name, or "-" for hostile plugins
    config: SandboxConfig
    function: Callable[..., Any] | None = None  # a Python plugin (execute_sandboxed) ...
    args: tuple[Any, ...] = ()
    command: tuple[str, ...] = ()               # ... or a program (execute_command), document on stdin
    expect_text: str = ""                       # good: a phrase the text must contain
    threat: str = ""                            # hostile: what it tries
    protection: str = ""                        # hostile: what should stop it
    expected_outcomes: frozenset[Outcome] = frozenset()
    expected_errors: frozenset[str] = frozenset()  # exception names accepted for outcome "error"
    needs_cgroups: str = ""                     # hostile: the cgroup limit its containment rests on
    host_check: Callable[[SandboxResult, HostEvidence], str] | None = None  # "" = fine, else why not

    @property
    def good(self) -> bool:
        return self.kind == "good"


@dataclass
class PluginRun:
    """The state and verdict of one row."""

    spec: PluginSpec
    status: str = "waiting"          # waiting, running, passed, failed, skipped
    result: SandboxResult | None = None
    text: str = ""
    reason: str = ""
    notes: list[str] = field(default_factory=list)  # the full story behind a skip or a dropped limit
    limits_dropped: bool = False
    config: SandboxConfig | None = None

    @property
    def error_type(self) -> str:
        if self.result is None or not self.result.error:
            return ""
        if self.result.error_type:
            return self.result.error_type
        head = self.result.error.split(":", 1)[0]
        return head if head.isidentifier() else ""

    @property
    def error_line(self) -> str:
        if self.result is None or not self.result.error:
            return ""
        return self.result.error.splitlines()[0]


def _sample(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("samples", name).read_bytes()


def _no_leak(result: SandboxResult, evidence: HostEvidence) -> str:
    return "the decoy secret came back" if evidence.secret in _everything_said(result) else ""


def _no_connection(result: SandboxResult, evidence: HostEvidence) -> str:
    return (f"the host listener accepted {evidence.connections} connection(s)"
            if evidence.connections else "")


def _no_marker(result: SandboxResult, evidence: HostEvidence) -> str:
    return f"{evidence.marker_path} exists on the host" if os.path.lexists(evidence.marker_path) else ""


def _pids_held(result: SandboxResult, evidence: HostEvidence) -> str:
    peak = result.resource_usage.processes_peak
    return f"{peak} processes > pids limit {FORK_BOMB_PIDS}" if peak > FORK_BOMB_PIDS else ""


def _memory_held(result: SandboxResult, evidence: HostEvidence) -> str:
    peak = result.resource_usage.memory_peak_bytes
    limit = MEMORY_EATER_MB * 1024 * 1024
    return f"peak memory {peak >> 20} MiB > limit {MEMORY_EATER_MB} MiB" if peak > limit else ""


def _wall_held(result: SandboxResult, evidence: HostEvidence) -> str:
    wall = result.resource_usage.wall_seconds
    return f"ran {wall:.1f} s despite the {NEVER_RETURNS_TIMEOUT:.0f} s timeout" \
        if wall > NEVER_RETURNS_TIMEOUT + 3 else ""


def build_pipeline(evidence: HostEvidence) -> list[PluginSpec]:
    """The demo's rows: six good plugins (one per sample) and six hostile ones."""
    contained = frozenset({Outcome.ERROR})
    return [
        PluginSpec("pdf-text (pypdf)", "good", "report.pdf", GOOD_CONFIG,
                   function=plugins.extract_pdf_text, args=(_sample("report.pdf"),),
                   expect_text="Quarterly Research Report"),
        PluginSpec("pdftotext (poppler)", "good", "invoice.pdf", GOOD_CONFIG,
                   command=("pdftotext", "-", "-"), args=(_sample("invoice.pdf"),),
                   expect_text="INVOICE 2024-0117"),
        PluginSpec("html-to-text", "good", "release-notes.html", GOOD_CONFIG,
                   function=plugins.html_to_text, args=(_sample("release-notes.html"),),
                   expect_text="Release notes 3.2"),
        PluginSpec("html-to-text", "good", "newsletter.html", GOOD_CONFIG,
                   function=plugins.html_to_text, args=(_sample("newsletter.html"),),
                   expect_text="Team newsletter"),
        PluginSpec("word-count", "good", "meeting-notes.txt", GOOD_CONFIG,
                   function=plugins.count_words, args=(_sample("meeting-notes.txt"),), expect_text="words"),
        PluginSpec("word-count", "good", "corpus-readme.txt", GOOD_CONFIG,
                   function=plugins.count_words, args=(_sample("corpus-readme.txt"),), expect_text="words"),
        PluginSpec("secret-reader", "hostile", "-", GOOD_CONFIG,
                   function=plugins.read_host_secrets, args=(evidence.secret_path,),
                   threat="reads host secrets", protection="mount namespace: file not visible",
                   expected_outcomes=contained, expected_errors=frozenset({"FileNotFoundError", "PermissionError"}),
                   host_check=_no_leak),
        PluginSpec("phone-home", "hostile", "-", GOOD_CONFIG,
                   function=plugins.phone_home, args=(evidence.port,),
                   threat="phones home (host loopback)", protection="empty network namespace, Landlock: no TCP",
                   expected_outcomes=contained,
                   # PermissionError: Landlock (ABI >= 4) refuses the connect before any route is tried.
                   expected_errors=frozenset({"ConnectionRefusedError", "OSError", "TimeoutError",
                                              "PermissionError"}),
                   host_check=_no_connection),
        PluginSpec("host-writer", "hostile", "-", GOOD_CONFIG,
                   function=plugins.write_outside, args=(evidence.marker_path,),
                   threat="writes outside its sandbox", protection="read-only root, host /tmp not visible",
                   expected_outcomes=contained,
                   expected_errors=frozenset({"FileNotFoundError", "PermissionError", "OSError"}),
                   host_check=_no_marker),
        PluginSpec("fork-bomb", "hostile", "-", GOOD_CONFIG.replace(max_processes=FORK_BOMB_PIDS),
                   function=plugins.fork_bomb,
                   threat="fork-bombs", protection=f"pids.max={FORK_BOMB_PIDS} (cgroup)",
                   expected_outcomes=frozenset({Outcome.ERROR, Outcome.KILLED}),
                   expected_errors=frozenset({"BlockingIOError"}), needs_cgroups="process limit",
                   host_check=_pids_held),
        PluginSpec("memory-eater", "hostile", "-", GOOD_CONFIG.replace(memory_limit_mb=MEMORY_EATER_MB),
                   function=plugins.eat_memory,
                   threat="eats memory (up to 2 GiB)", protection=f"memory limit {MEMORY_EATER_MB}M (OOM kill)",
                   expected_outcomes=frozenset({Outcome.OOM}), needs_cgroups="memory limit",
                   host_check=_memory_held),
        PluginSpec("never-returns", "hostile", "-", GOOD_CONFIG.replace(timeout_seconds=NEVER_RETURNS_TIMEOUT),
                   function=plugins.never_return,
                   threat="never returns", protection=f"wall timeout {NEVER_RETURNS_TIMEOUT:.0f}s (tree killed)",
                   expected_outcomes=frozenset({Outcome.TIMEOUT}), host_check=_wall_held),
    ]


def _without_cgroup_limits(config: SandboxConfig) -> SandboxConfig:
    return config.replace(memory_limit_mb=None, max_processes=None, cpu_quota_percent=None,
                          io_read_bps=None, io_write_bps=None, io_read_iops=None, io_write_iops=None)


def plan_runs(specs: list[PluginSpec]) -> list[PluginRun]:
    """Decide, per row, the config this host can enforce, or why the row is skipped.

    Without cgroups (not root), good plugins and the hostile ones whose containment
    does not rest on a cgroup run without memory/pids limits (and say so); the
    fork bomb and the memory eater are skipped rather than run unfenced.
    """
    features = detect_features()
    runs = []
    for spec in specs:
        run = PluginRun(spec)
        if spec.command and shutil.which(spec.command[0]) is None:
            run.status, run.reason = "skipped", f"{spec.command[0]} is not installed (apt-get install poppler-utils)"
        elif spec.function is plugins.extract_pdf_text and importlib.util.find_spec("pypdf") is None:
            run.status, run.reason = "skipped", "pypdf is not installed (pip install 'neural-doc-flow-security[demo]')"
        missing = missing_for(spec.config, features)
        if run.status == "skipped" or not missing:
            run.config = spec.config
        elif spec.needs_cgroups:
            run.status = "skipped"
            root = "run as root" if os.geteuid() != 0 else "this host cannot enforce it"
            run.reason = f"{spec.needs_cgroups} needs cgroups: {root}"
            run.notes.append(missing[0])
        else:
            degraded = _without_cgroup_limits(spec.config)
            still = missing_for(degraded, features)
            if still:
                run.status, run.reason = "skipped", f"cannot sandbox here: {still[0]}"
            else:
                run.config = degraded
                run.limits_dropped = True
                run.notes.append(f"memory/pids limits not enforced here: {missing[0]}")
        runs.append(run)
    return runs


def _everything_said(result: SandboxResult) -> str:
    output = result.output
    said = output if isinstance(output, str) else repr(output)
    return "\n".join((said, result.error or "", result.stdout.decode("utf-8", "replace"),
                      result.stderr.decode("utf-8", "replace")))


def judge(run: PluginRun, evidence: HostEvidence) -> None:
    """Set the row's status (passed/failed) and reason from its result and the host's evidence."""
    result, spec = run.result, run.spec
    if run.status == "skipped" or result is None:
        return
    if spec.good:
        text = result.stdout.decode("utf-8", "replace") if spec.command else result.output
        run.text = text.strip() if isinstance(text, str) else ""
        if result.outcome is not Outcome.OK:
            run.status, run.reason = "failed", f"outcome {result.outcome.value}: {run.error_line or result.exit_code}"
        elif spec.expect_text not in run.text:
            run.status, run.reason = "failed", f"no text (expected {spec.expect_text!r} in the output)"
        else:
            run.status, run.reason = "passed", "produced its text"
        return
    problems = []
    if result.outcome is Outcome.OK:
        problems.append(f"NOT CONTAINED: it succeeded ({str(result.output)[:80]!r})"
                        if evidence.secret not in _everything_said(result) else
                        "NOT CONTAINED: it succeeded and the secret came back")
    elif result.outcome not in spec.expected_outcomes:
        problems.append(f"outcome {result.outcome.value} ({run.error_line}), expected "
                        + " or ".join(sorted(o.value for o in spec.expected_outcomes)))
    elif (result.outcome is Outcome.ERROR and spec.expected_errors
          and run.error_type not in spec.expected_errors):
        problems.append(f"error {run.error_line!r}, expected " + " or ".join(sorted(spec.expected_errors)))
    if spec.host_check is not None and (why := spec.host_check(result, evidence)):
        problems.append(f"host evidence: {why}")
    if evidence.secret in _everything_said(result):
        problems.append("host evidence: the decoy secret came back")
    run.status = "failed" if problems else "passed"
    run.reason = "; ".join(problems) if problems else "contained"


async def _execute(manager: SandboxManager, run: PluginRun) -> SandboxResult:
    spec, config = run.spec, run.config
    if spec.command:
        return await manager.execute_command(spec.name, list(spec.command), stdin=spec.args[0],
                                             sandbox_config=config)
    assert spec.function is not None
    return await manager.with_options(sandbox_config=config).execute_sandboxed(spec.name, spec.function, *spec.args)


@contextlib.contextmanager
def host_evidence() -> Iterator[HostEvidence]:
    """A decoy dir with a secret file (0600) and the marker path; removed afterwards."""
    decoy_dir = tempfile.mkdtemp(prefix="ndf-demo-")
    try:
        secret = "NDF-DEMO-SECRET-" + secrets.token_hex(16)
        secret_path = os.path.join(decoy_dir, "api-token.secret")
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        yield HostEvidence(decoy_dir, secret_path, secret, os.path.join(decoy_dir, "PLUGIN-WAS-HERE"))
    finally:
        shutil.rmtree(decoy_dir, ignore_errors=True)


async def run_pipeline(on_update: Callable[[PluginRun], None] | None = None) -> tuple[list[PluginRun], dict[str, Any]]:
    """Run every row concurrently; returns the judged rows and the host's evidence."""
    with host_evidence() as evidence:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            evidence.connections += 1
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                evidence.bytes_received += len(await asyncio.wait_for(reader.read(4096), 1.0))
            writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        evidence.port = server.sockets[0].getsockname()[1]
        try:
            runs = plan_runs(build_pipeline(evidence))
            for run in runs:
                if on_update:
                    on_update(run)
            async with SandboxManager(GOOD_CONFIG, max_concurrent=len(runs)) as manager:
                async def one(run: PluginRun) -> None:
                    if run.status == "skipped":
                        return
                    run.status = "running"
                    if on_update:
                        on_update(run)
                    try:
                        run.result = await _execute(manager, run)
                    except Exception as e:  # noqa: BLE001 - a sandbox that cannot start is a row's result
                        run.result = SandboxResult(outcome=Outcome.SANDBOX_ERROR, error=f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.05)  # let the listener accept anything already queued
                    judge(run, evidence)
                    if on_update:
                        on_update(run)

                await asyncio.gather(*(one(run) for run in runs))
                manager_stats = dataclasses.asdict(manager.stats())  # its health after the pipeline
            await asyncio.sleep(0.1)
        finally:
            server.close()
            await server.wait_closed()
        for run in runs:  # final verdicts, with every host observation in
            if run.result is not None:
                judge(run, evidence)
        report = evidence.to_dict()
        report["manager"] = manager_stats
        report["secret"]["leaked"] = any(evidence.secret in _everything_said(r.result)
                                         for r in runs if r.result is not None)
    report["marker"]["exists_after_cleanup"] = os.path.lexists(evidence.marker_path)
    return runs, report


def verdict(runs: list[PluginRun], evidence: dict[str, Any]) -> tuple[int, str]:
    """The exit status and the one-line reason."""
    failed = [r for r in runs if r.status == "failed"]
    skipped = [r for r in runs if r.status == "skipped"]
    if evidence["secret"]["leaked"] and not failed:
        return EXIT_FAILED, "the decoy secret appeared in a plugin's output"
    if failed:
        return EXIT_FAILED, "; ".join(f"{r.spec.name} ({r.spec.document}): {r.reason}" for r in failed)
    good = sum(r.spec.good for r in runs)
    hostile = len(runs) - good
    if skipped:
        return EXIT_INCOMPLETE, (f"nothing failed, but {len(skipped)} row(s) could not run here: "
                                 + "; ".join(f"{r.spec.name}: {r.reason}" for r in skipped))
    return EXIT_OK, f"all {good} good plugins produced their text; all {hostile} hostile plugins were contained"


# -- output -------------------------------------------------------------------


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    flat = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _mib(n: int) -> str:
    return f"{n / 1048576:.0f} MiB" if n else "-"


def _row_facts(run: PluginRun) -> dict[str, str]:
    r = run.result
    usage = r.resource_usage if r is not None else None
    outcome = r.outcome.value if r is not None else "-"
    if r is not None and r.outcome is Outcome.ERROR and run.error_type:
        outcome = f"error {run.error_type}"
    if run.spec.good:
        detail = _snippet(run.text) if run.status == "passed" else run.reason
    else:
        detail = run.spec.protection if run.status == "passed" else run.reason
    return {
        "outcome": "skipped" if run.status == "skipped" else outcome,
        "wall": f"{usage.wall_seconds:.2f}s" if usage else "-",
        "cpu": f"{usage.cpu_user_seconds + usage.cpu_system_seconds:.2f}s" if usage else "-",
        "memory": _mib(usage.memory_peak_bytes) if usage else "-",
        "procs": str(usage.processes_peak or "-") if usage else "-",
        "detail": run.reason if run.status == "skipped" else detail,
    }


def report_to_dict(runs: list[PluginRun], evidence: dict[str, Any], status: int, reason: str,
                   seconds: float) -> dict[str, Any]:
    """The machine-readable report (`--json`)."""
    rows = []
    for run in runs:
        r = run.result
        config = run.config
        rows.append({
            "plugin": run.spec.name,
            "kind": run.spec.kind,
            "document": None if run.spec.document == "-" else run.spec.document,
            "threat": run.spec.threat or None,
            "status": run.status,
            "reason": run.reason,
            "notes": run.notes,
            "outcome": r.outcome.value if r is not None else None,
            "error_type": run.error_type or None,
            "error": run.error_line or None,
            "text": run.text if run.spec.good else None,
            "protection": run.spec.protection or None,
            "expected_outcomes": sorted(o.value for o in run.spec.expected_outcomes) or None,
            "limits": None if config is None else {
                "memory_limit_mb": config.memory_limit_mb, "max_processes": config.max_processes,
                "timeout_seconds": config.timeout_seconds},
            "resource_usage": dataclasses.asdict(r.resource_usage) if r is not None else None,
            "isolation": r.isolation.to_dict() if r is not None else None,
        })
    return {"ok": status == EXIT_OK, "exit_status": status, "reason": reason, "seconds": round(seconds, 3),
            "euid": os.geteuid(), "evidence": evidence, "plugins": rows}


def _plain_line(run: PluginRun) -> str:
    facts = _row_facts(run)
    what = run.spec.document if run.spec.good else run.spec.threat
    mark = {"passed": "ok  " if run.spec.good else "held", "failed": "FAIL", "skipped": "skip"}.get(run.status, "    ")
    line = (f"[{mark}] {run.spec.name:<19} {what:<27} {facts['outcome']:<28} wall {facts['wall']:>5}  "
            f"cpu {facts['cpu']:>5}  mem {facts['memory']:>7}  procs {facts['procs']:>2}")
    if run.status != "passed":
        line += f"\n       {run.status}: {facts['detail']}"
    elif run.spec.good:
        line += f"\n       text: {facts['detail']}"
    else:
        line += f"\n       stopped by {facts['detail']}: {_snippet(run.error_line, 90)}"
    return line


def _evidence_lines(runs: list[PluginRun], evidence: dict[str, Any]) -> list[str]:
    listener = evidence["listener"]
    dropped = [r for r in runs if r.limits_dropped]
    note = [f"note: {len(dropped)} plugins ran without memory/pids limits (cgroups need root here; "
            "--json has the details)"] if dropped else []
    return note + [
        f"host evidence: decoy secret {evidence['secret']['path']}: "
        + ("LEAKED into a plugin's output" if evidence["secret"]["leaked"] else "in no plugin's output"),
        f"host evidence: marker {evidence['marker']['path']}: "
        + ("EXISTS" if evidence["marker"]["exists"] else "absent"),
        f"host evidence: listener {listener['address']}: {listener['connections']} connection(s), "
        f"{listener['bytes_received']} bytes received",
    ]


def _run_plain() -> tuple[list[PluginRun], dict[str, Any], int, str, float]:
    started = time.monotonic()
    print("ndf-sandbox demo: a document pipeline, every plugin in its own sandbox, all at once", flush=True)

    def on_update(run: PluginRun) -> None:
        if run.status in ("passed", "failed", "skipped"):
            print(_plain_line(run), flush=True)

    runs, evidence = asyncio.run(run_pipeline(on_update))
    status, reason = verdict(runs, evidence)
    seconds = time.monotonic() - started
    for line in _evidence_lines(runs, evidence):
        print(line)
    print(f"{'PASS' if status == EXIT_OK else 'FAIL' if status == EXIT_FAILED else 'INCOMPLETE'}: "
          f"{reason} ({seconds:.1f} s)")
    return runs, evidence, status, reason, seconds


_COLORS = {"passed": "green", "failed": "bold red", "skipped": "yellow", "running": "cyan", "waiting": "dim"}


def _rich_table(runs: list[PluginRun], width: int) -> Any:
    """The final table, fitted to `width` columns; narrow terminals get the four
    resource columns folded into one."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Each plugin ran in its own fresh sandbox", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    compact = width < 112
    widths = [20, 9, 13] if compact else [20, 17, 5, 5, 8, 5]
    # each column costs 2 padding + 1 divider (and the table its 2 edges)
    detail_width = min(72, max(16, width - sum(widths) - 3 * (len(widths) + 1) - 2))
    table.add_column("plugin", no_wrap=True, width=20)
    table.add_column("outcome", no_wrap=True, width=9 if compact else 17)
    if compact:
        table.add_column("wall / CPU\nmem / procs", justify="right", no_wrap=True, width=13)
    else:
        for column, width in (("wall", 5), ("CPU", 5), ("peak mem", 8), ("procs", 5)):
            table.add_column(column, justify="right", no_wrap=True, width=width)
    table.add_column("text (good) / stopped by (hostile)", no_wrap=True, overflow="ellipsis",
                     max_width=detail_width)
    for run in runs:
        facts = _row_facts(run)
        color = _COLORS.get(run.status, "white")
        what = run.spec.document if run.spec.good else run.spec.threat
        plugin = Text.assemble((run.spec.name, "bold green" if run.spec.good else "bold magenta"), "\n",
                               (what, "dim"))
        outcome_text, _, error_type = facts["outcome"].partition(" ")
        outcome = Text.assemble((outcome_text, color), "\n", (error_type, "dim"))
        text = _snippet(run.text, detail_width) if run.spec.good and run.status == "passed" else facts["detail"]
        detail = Text(text, style="" if run.status == "passed" else color)
        if not run.spec.good and run.status == "passed" and run.error_line:
            message = run.error_line.removeprefix(f"{run.error_type}: ") if run.error_type else run.error_line
            detail.append("\n" + _snippet(message, detail_width), style="dim")
        if compact:
            usage = [f"{facts['wall']} / {facts['cpu']}\n{facts['memory']} / {facts['procs']}"]
        else:
            usage = [facts["wall"], facts["cpu"], facts["memory"], facts["procs"]]
        table.add_row(plugin, outcome, *usage, detail)
    return table


def _run_rich() -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
    from rich.text import Text

    console = Console()
    console.print("[bold]ndf-sandbox demo[/]: a document pipeline, every plugin in its own sandbox, all at once")
    progress = Progress(SpinnerColumn(finished_text="•"), TextColumn("{task.description}"),
                        TextColumn("{task.fields[what]:<27}"),
                        TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console, transient=True)
    tasks: dict[int, TaskID] = {}

    def on_update(run: PluginRun) -> None:
        key = id(run)
        what = run.spec.document if run.spec.good else run.spec.threat
        state = run.status
        if run.status == "passed":
            state = "produced text" if run.spec.good else f"contained: {_row_facts(run)['outcome']}"
        elif run.status == "failed":
            state = f"FAILED: {run.reason}"
        state = f"[{_COLORS.get(run.status, 'white')}]{escape(state)}[/]"
        if key not in tasks:
            name = f"[bold {'green' if run.spec.good else 'magenta'}]{run.spec.name:<19}[/]"
            tasks[key] = progress.add_task(name, total=1, what=what, state=state,
                                           start=run.status != "waiting")
        task = tasks[key]
        if run.status == "running":
            progress.start_task(task)
        progress.update(task, state=state, completed=1 if run.status in ("passed", "failed", "skipped") else 0)

    started = time.monotonic()
    with Live(progress, console=console, refresh_per_second=12, transient=True):
        runs, evidence = asyncio.run(run_pipeline(on_update))
    status, reason = verdict(runs, evidence)
    seconds = time.monotonic() - started

    console.print(_rich_table(runs, console.width))
    for line in _evidence_lines(runs, evidence):
        console.print(Text(line, style="red" if "LEAKED" in line or "EXISTS" in line else ""))
    style = {EXIT_OK: "bold green", EXIT_FAILED: "bold red"}.get(status, "bold yellow")
    label = {EXIT_OK: "PASS", EXIT_FAILED: "FAIL"}.get(status, "INCOMPLETE")
    console.print(Text.assemble((label, style), f": {reason} ({seconds:.1f} s)"))
    return status


def _keep_audit_events_off_the_display() -> None:
    """The demo shows every sandbox's end itself. Unless the audit logger has a
    handler (up its hierarchy), Python's last-resort handler would print its
    WARNING events (kill, timeout, limit_hit) as JSON lines between the demo's."""
    logger = logging.getLogger(audit.LOGGER_NAME)
    if not logger.hasHandlers():
        logger.addHandler(logging.NullHandler())


def run_demo(json_output: bool = False, plain: bool = False) -> int:
    """Run the demo pipeline and print it (live display on a terminal, plain log
    lines otherwise or with `plain`, a JSON report with `json_output`); returns
    the exit status (0: all good plugins produced text and all hostile ones were
    contained)."""
    _keep_audit_events_off_the_display()
    try:
        if json_output:
            started = time.monotonic()
            runs, evidence = asyncio.run(run_pipeline())
            status, reason = verdict(runs, evidence)
            report = report_to_dict(runs, evidence, status, reason, time.monotonic() - started)
            print(json.dumps(report, indent=2))
            return status
        if not plain and sys.stdout.isatty() and importlib.util.find_spec("rich") is not None:
            return _run_rich()
        return _run_plain()[2]
    except BrokenPipeError:  # `ndf-sandbox demo | head`: the reader left; the sandboxes are already gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    except SandboxError as e:  # the manager itself could not start (the rows' own errors are results)
        if json_output:
            print(json.dumps({"ok": False, "exit_status": EXIT_FAILED, "reason": f"cannot run the demo: {e}"}))
        else:
            print(f"ndf-sandbox demo: cannot run the demo: {e}", file=sys.stderr)
        return EXIT_FAILED
