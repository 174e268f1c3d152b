"""`ndf-sandbox demo --cluster dask|ray --json`: the demo's rows as tasks of a local
two-worker cluster, with the same verdicts as the demo (test_demo.py) and the
rows spread over both workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import NDF_SANDBOX, ndf_host_env
from test_demo import GOOD_TEXT, HOSTILE


@pytest.fixture(scope="module", params=["dask", "ray"])
def report(request: pytest.FixtureRequest) -> tuple[str, int, dict[str, Any]]:
    engine = request.param
    pytest.importorskip("distributed" if engine == "dask" else "ray")
    if os.geteuid() != 0:
        pytest.skip("the full demo needs root (cgroup limits)")
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext is not installed (apt-get install poppler-utils)")
    proc = subprocess.run([NDF_SANDBOX, "demo", "--cluster", engine, "--json"], capture_output=True,
                          env=ndf_host_env(), cwd="/tmp", timeout=300, check=False)
    assert proc.stdout, proc.stderr.decode(errors="replace")
    return engine, proc.returncode, json.loads(proc.stdout)


def test_cluster_demo_passes(report: tuple[str, int, dict[str, Any]]) -> None:
    engine, status, data = report
    assert status == 0, data["reason"]
    assert data["ok"] is True and data["cluster"]["engine"] == engine


def test_rows_were_spread_over_two_workers(report: tuple[str, int, dict[str, Any]]) -> None:
    _, _, data = report
    workers = data["cluster"]["workers"]
    assert len(workers) == 2, workers
    assert {row["worker"] for row in data["plugins"]} == set(workers)


def test_same_verdicts_as_the_demo(report: tuple[str, int, dict[str, Any]]) -> None:
    _, _, data = report
    good = {r["document"]: r for r in data["plugins"] if r["kind"] == "good"}
    assert set(good) == set(GOOD_TEXT)
    for document, phrase in GOOD_TEXT.items():
        assert good[document]["status"] == "passed" and phrase in good[document]["text"], good[document]
    hostile = {r["plugin"]: r for r in data["plugins"] if r["kind"] == "hostile"}
    assert set(hostile) == set(HOSTILE)
    for name, (outcomes, errors) in HOSTILE.items():
        row = hostile[name]
        assert row["status"] == "passed" and row["outcome"] in outcomes, row
        if row["outcome"] == "error" and errors:
            assert row["error_type"] in errors, row
    assert 2 < hostile["fork-bomb"]["resource_usage"]["processes_peak"] <= 16
    assert hostile["memory-eater"]["resource_usage"]["memory_peak_bytes"] <= 128 << 20


def test_host_evidence(report: tuple[str, int, dict[str, Any]]) -> None:
    evidence = report[2]["evidence"]
    assert evidence["secret"]["leaked"] is False
    assert evidence["listener"]["connections"] == 0 and evidence["listener"]["bytes_received"] == 0
    assert evidence["marker"]["exists"] is False and evidence["marker"]["exists_after_cleanup"] is False
    assert not Path(evidence["marker"]["path"]).parent.exists(), "the demo removes its decoy directory"
