"""`ndf-sandbox demo --json`: every good plugin produces its text, every hostile one
is contained the expected way, and the host's own evidence agrees.

The demo runs once per caller (module-scoped): as root, where every protection
must hold (exit 0), and as uid 4242, where cgroup limits are impossible on this
host and the fork bomb and memory eater must be reported as skipped, not faked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import NDF_SANDBOX, ROOT_CALLER, UNPRIVILEGED_CALLER, SandboxCaller, ndf_host_env

DEMO_BUDGET_SECONDS = 20.0

GOOD_TEXT = {  # document -> a phrase its text must contain
    "report.pdf": "Quarterly Research Report",
    "invoice.pdf": "INVOICE 2024-0117",
    "release-notes.html": "Release notes 3.2",
    "newsletter.html": "Team newsletter",
    "meeting-notes.txt": "42 words",
    "corpus-readme.txt": "37 words",
}
HOSTILE = {  # plugin -> (accepted outcomes, accepted error types for outcome "error")
    "secret-reader": ({"error"}, {"FileNotFoundError", "PermissionError"}),
    "phone-home": ({"error"}, {"ConnectionRefusedError", "OSError", "TimeoutError", "PermissionError"}),
    "host-writer": ({"error"}, {"FileNotFoundError", "PermissionError", "OSError"}),
    "fork-bomb": ({"error", "killed"}, {"BlockingIOError"}),
    "memory-eater": ({"oom"}, set()),
    "never-returns": ({"timeout"}, set()),
}
NEEDS_CGROUPS = {"fork-bomb", "memory-eater"}


def _run_demo(caller: SandboxCaller) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([*caller.prefix, NDF_SANDBOX, "demo", "--json"], capture_output=True,
                          env=ndf_host_env(), cwd="/tmp", timeout=120, check=False)
    assert proc.stdout, proc.stderr.decode(errors="replace")
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def root_report() -> tuple[int, dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("the full demo needs root (cgroup limits)")
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext is not installed (apt-get install poppler-utils)")
    return _run_demo(ROOT_CALLER)


@pytest.fixture(scope="module")
def unprivileged_report() -> tuple[int, dict[str, Any]]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to start the demo as uid 4242")
    return _run_demo(UNPRIVILEGED_CALLER)


def _rows(report: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    rows = [r for r in report["plugins"] if r["kind"] == kind]
    key = "document" if kind == "good" else "plugin"
    return {r[key]: r for r in rows}


def test_demo_passes_as_root_within_budget(root_report: tuple[int, dict[str, Any]]) -> None:
    status, report = root_report
    assert status == 0, report["reason"]
    assert report["ok"] is True
    assert report["seconds"] < DEMO_BUDGET_SECONDS


def test_every_good_plugin_produced_its_text(root_report: tuple[int, dict[str, Any]]) -> None:
    good = _rows(root_report[1], "good")
    assert set(good) == set(GOOD_TEXT)
    for document, phrase in GOOD_TEXT.items():
        row = good[document]
        assert row["status"] == "passed", row
        assert row["outcome"] == "ok"
        assert phrase in row["text"], (document, row["text"])
    assert {good["report.pdf"]["plugin"], good["invoice.pdf"]["plugin"]} == {
        "pdf-text (pypdf)", "pdftotext (poppler)"}


def test_every_hostile_plugin_was_contained_as_expected(root_report: tuple[int, dict[str, Any]]) -> None:
    hostile = _rows(root_report[1], "hostile")
    assert set(hostile) == set(HOSTILE)
    for name, (outcomes, errors) in HOSTILE.items():
        row = hostile[name]
        assert row["status"] == "passed", row
        assert row["outcome"] in outcomes, row
        if row["outcome"] == "error" and errors:
            assert row["error_type"] in errors, row
        assert row["protection"], row


def test_kernel_counters_stayed_under_the_limits(root_report: tuple[int, dict[str, Any]]) -> None:
    hostile = _rows(root_report[1], "hostile")
    fork = hostile["fork-bomb"]
    assert 2 < fork["resource_usage"]["processes_peak"] <= fork["limits"]["max_processes"] == 16
    memory = hostile["memory-eater"]
    assert memory["limits"]["memory_limit_mb"] == 128
    assert memory["resource_usage"]["memory_peak_bytes"] <= 128 * 1024 * 1024
    never = hostile["never-returns"]
    assert never["limits"]["timeout_seconds"] == 2
    assert 1.9 < never["resource_usage"]["wall_seconds"] < 5


def test_decoy_secret_never_came_back(root_report: tuple[int, dict[str, Any]]) -> None:
    report = root_report[1]
    assert report["evidence"]["secret"]["leaked"] is False
    for row in report["plugins"]:
        for field in ("text", "error", "reason"):
            assert "NDF-DEMO-SECRET-" not in (row[field] or ""), row


def test_marker_file_absent_on_host(root_report: tuple[int, dict[str, Any]]) -> None:
    marker = root_report[1]["evidence"]["marker"]
    assert marker["exists"] is False
    assert not Path(marker["path"]).exists()
    assert not Path(marker["path"]).parent.exists(), "the demo removes its decoy directory"


def test_loopback_listener_got_no_connection(root_report: tuple[int, dict[str, Any]]) -> None:
    listener = root_report[1]["evidence"]["listener"]
    assert listener["address"].startswith("127.0.0.1:")
    assert listener["connections"] == 0
    assert listener["bytes_received"] == 0


def test_unprivileged_demo_skips_cgroup_rows_honestly(
        unprivileged_report: tuple[int, dict[str, Any]]) -> None:
    status, report = unprivileged_report
    rows = {r["plugin"]: r for r in report["plugins"] if r["kind"] == "hostile"}
    for name in NEEDS_CGROUPS:
        assert rows[name]["status"] == "skipped", rows[name]
        assert "needs cgroups: run as root" in rows[name]["reason"]
        assert rows[name]["outcome"] is None  # never run unfenced
    assert not [r for r in report["plugins"] if r["status"] == "failed"], report["reason"]
    assert status == 3 and report["ok"] is False
    assert report["evidence"]["listener"]["connections"] == 0
    assert report["evidence"]["secret"]["leaked"] is False


# -- the verdict logic, without sandboxes: the demo must not claim containment blindly

def test_judge_fails_a_hostile_plugin_that_got_out(tmp_path: Path) -> None:
    from neural_doc_flow_security.sandbox import demo, demo_plugins
    from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

    evidence = demo.HostEvidence(str(tmp_path), str(tmp_path / "secret"), "NDF-DEMO-SECRET-x",
                                 str(tmp_path / "marker"))
    (tmp_path / "secret").write_text(evidence.secret)
    specs = {s.name: s for s in demo.build_pipeline(evidence)}

    # what an unsandboxed secret reader returns: the decoy (and /etc/shadow when readable)
    stolen = demo_plugins.read_host_secrets(evidence.secret_path)
    leak = demo.PluginRun(specs["secret-reader"], result=SandboxResult(Outcome.OK, output=stolen))
    demo.judge(leak, evidence)
    assert leak.status == "failed" and "NOT CONTAINED" in leak.reason

    demo_plugins.write_outside(evidence.marker_path)  # an unsandboxed writer leaves the marker
    wrote = demo.PluginRun(specs["host-writer"],
                           result=SandboxResult(Outcome.ERROR, error="FileNotFoundError: x"))
    demo.judge(wrote, evidence)
    assert wrote.status == "failed" and "exists on the host" in wrote.reason

    evidence.connections = 1
    phoned = demo.PluginRun(specs["phone-home"],
                            result=SandboxResult(Outcome.ERROR, error="ConnectionRefusedError: x"))
    demo.judge(phoned, evidence)
    assert phoned.status == "failed" and "listener accepted 1" in phoned.reason

    killed = demo.PluginRun(specs["memory-eater"], result=SandboxResult(Outcome.KILLED, signal=9))
    demo.judge(killed, evidence)
    assert killed.status == "failed" and "expected oom" in killed.reason
    status, _ = demo.verdict([leak, wrote, phoned, killed], {"secret": {"leaked": True}})
    assert status == demo.EXIT_FAILED


def test_the_report_shows_the_managers_health(root_report: tuple[int, dict[str, Any]]) -> None:
    manager = root_report[1]["evidence"]["manager"]
    assert manager["zygotes_alive"] >= 1 and manager["zygotes_restarted"] == 0 and manager["zygotes_given_up"] == 0
    assert sum(manager["calls"].values()) == len([p for p in root_report[1]["plugins"] if p["status"] != "skipped"])


def test_the_plain_demo_prints_no_audit_lines() -> None:
    """The audit log's WARNING events (the memory-eater's limit_hit, the timeout) went
    to stderr through Python's last-resort handler, as JSON lines between the demo's rows."""
    if os.geteuid() != 0:
        pytest.skip("the full demo needs root (cgroup limits)")
    proc = subprocess.run([*ROOT_CALLER.prefix, NDF_SANDBOX, "demo", "--plain"], capture_output=True,
                          env=ndf_host_env(), cwd="/tmp", timeout=120, check=False)
    output = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert "[held] memory-eater" in output, output
    assert "schema_version" not in output, output
