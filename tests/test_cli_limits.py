"""Resource limits through `ndf-sandbox run` (cgroups v1 on this host, as root):
the kernel's evidence comes back in the JSON result and the exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from neural_doc_flow_security.sandbox.linux.cgroups import probe_cgroups

NDF_SANDBOX = str(Path(sys.executable).with_name("ndf-sandbox"))


def _usable(controller: str) -> bool:
    support = probe_cgroups().get(controller)
    return support is not None and support.usable


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits need root here (no delegated subtree)"),
    pytest.mark.timeout(180),
]


def run_with_limits(options: list[str], command: list[str]) -> tuple[int, dict[str, Any], bytes]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run([NDF_SANDBOX, "run", "--json-result", out.name, *options, "--", *command],
                              capture_output=True, timeout=150, cwd="/tmp")
        result = json.loads(Path(out.name).read_text())
    return proc.returncode, result, proc.stderr


@pytest.mark.skipif(not _usable("memory"), reason="no usable memory controller")
def test_memory_hog_is_oom_killed_and_reported_oom() -> None:
    hog = "b = []\nwhile True: b.append(bytearray(8 << 20))"  # stops at the cgroup limit
    code, result, stderr = run_with_limits(["--memory", "64M", "--python"], ["python3", "-c", hog])
    assert code == 125, stderr
    assert result["outcome"] == "oom", result
    assert result["resource_usage"]["memory_peak_bytes"] <= 70 * 2**20, result  # the cgroup's peak
    assert any("memory" in part for part in result["isolation"]["cgroup"].split(", ")), result


@pytest.mark.skipif(not _usable("pids"), reason="no usable pids controller")
def test_fork_bomb_stops_at_the_process_limit() -> None:
    # Bounded: 200 attempts at most, each child sleeps 5 s and exits.
    bomb = "i=0; while [ $i -lt 200 ]; do sleep 5 & i=$((i+1)); done 2>/dev/null; wait; echo done"
    code, result, stderr = run_with_limits(["--pids", "8", "--timeout", "60"], ["sh", "-c", bomb])
    assert result["resource_usage"]["processes_peak"] <= 8, result
    assert result["outcome"] in ("ok", "error"), result  # the shell sees fork failures, not a kill


@pytest.mark.skipif(not _usable("io"), reason="no usable blkio controller")
def test_direct_writes_are_counted_by_the_io_controller(tmp_path: Path) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="ndf-cli-io-", dir="/var/tmp"))  # on the disk, not tmpfs
    try:
        os.chmod(scratch, 0o777)
        code, result, stderr = run_with_limits(
            ["--io-write-bps", "4M", "--bind", str(scratch)],
            ["dd", "if=/dev/zero", f"of={scratch}/data", "bs=1M", "count=4", "oflag=direct"])
        assert code == 0, stderr
        assert result["resource_usage"]["io_write_bytes"] >= 4 * 2**20, result
        assert (scratch / "data").stat().st_size == 4 * 2**20
    finally:
        for child in scratch.iterdir():
            child.unlink()
        scratch.rmdir()


@pytest.mark.skipif(not _usable("cpu"), reason="no usable cpu controller")
def test_cpu_quota_is_written_and_the_run_completes() -> None:
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    code, result, stderr = run_with_limits(["--cpu", "25", "--python"], ["python3", "-c", spin])
    assert code == 0, stderr
    usage = result["resource_usage"]
    assert usage["cpu_user_seconds"] + usage["cpu_system_seconds"] >= 0.25, result  # from cpuacct
    assert "cpu" in result["isolation"]["cgroup"], result
