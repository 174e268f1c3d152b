"""Detection of a delegated cgroup v2 subtree (systemd Delegate=yes) from the cgroup facts.

There is no systemd (and no cgroup v2 with controllers) on the test host, so the
cases run on a fake unified hierarchy built in a temporary directory, laid out and
owned as systemd lays out and chowns a delegated unit; the last tests read this
host's real facts through `ndf-sandbox check`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import NDF_SANDBOX, ndf_host_env
from neural_doc_flow_security.sandbox.linux.cgroups.delegation import describe, detect_delegation

USER = 4242
SCOPE = "/user.slice/user-4242.slice/user@4242.service/app.slice/run-r1f2e.scope"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="builds a tree owned by another uid")


def fake_cgroup(mount: Path, path: str, *, controllers: str = "cpu memory pids", subtree: str = "",
                procs: str = "1234\n", owner: int = USER) -> Path:
    """A cgroup directory as cgroupfs shows it, chowned to `owner` as systemd does for
    a delegated unit (the directory, cgroup.procs, cgroup.subtree_control, cgroup.threads)."""
    directory = mount / path.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("cgroup.controllers", controllers), ("cgroup.subtree_control", subtree),
                       ("cgroup.procs", procs), ("cgroup.threads", procs)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o644)
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(directory / name, owner, owner)
    return directory


def proc_cgroup(path: str) -> str:
    return f"0::{path}\n"


@root_only
def test_a_delegated_systemd_scope_is_detected_with_the_limits_it_offers(tmp_path: Path) -> None:
    directory = fake_cgroup(tmp_path, SCOPE)
    found = detect_delegation(str(tmp_path), "/", proc_cgroup(SCOPE), euid=USER)
    assert found is not None
    assert (found.directory, found.unit, found.user_manager) == (str(directory), "run-r1f2e.scope",
                                                                "user@4242.service")
    assert found.delegated and found.owner_uid == USER
    assert found.offered == ("memory", "pids", "cpu")
    assert found.limits == ("memory_limit_mb", "max_processes", "cpu_quota_percent")
    # systemd-run --scope leaves the command in the scope itself: no controller can be
    # enabled for children, and this engine does not move itself into a leaf yet.
    assert not found.usable_now and "no-internal-processes" in found.reason
    status, detail = describe(found)
    assert status == "not used"
    assert "run-r1f2e.scope" in detail and "memory_limit_mb" in detail and "leaf" in detail


@root_only
def test_another_users_cgroup_is_not_delegated(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, SCOPE, owner=0)
    found = detect_delegation(str(tmp_path), "/", proc_cgroup(SCOPE), euid=USER)
    assert found is not None and not found.delegated and not found.usable_now
    assert f"not delegated to uid {USER}" in found.reason and "cgroup.subtree_control" in found.reason
    assert describe(found)[0] == "no"


@root_only
def test_a_delegated_cgroup_without_limit_controllers_offers_nothing(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, SCOPE, controllers="hugetlb")
    found = detect_delegation(str(tmp_path), "/", proc_cgroup(SCOPE), euid=USER)
    assert found is not None and found.delegated and found.offered == () and found.limits == ()
    assert "no limit controller" in found.reason and describe(found)[0] == "no"


def test_the_root_cgroup_can_give_its_controllers_to_children(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, "/", controllers="cpu io memory pids", owner=0)
    found = detect_delegation(str(tmp_path), "/", proc_cgroup("/"), euid=0)
    assert found is not None and found.usable_now and found.reason == ""
    assert found.limits == ("memory_limit_mb", "max_processes", "cpu_quota_percent", "io_read_bps", "io_write_bps")
    assert describe(found)[0] == "yes"


def test_no_unified_hierarchy_entry_means_nothing_to_detect(tmp_path: Path) -> None:
    assert detect_delegation(str(tmp_path), "/", "4:memory:/x\n3:pids:/x\n", euid=0) is None


def test_a_cgroup_outside_the_mount_is_reported(tmp_path: Path) -> None:
    found = detect_delegation(str(tmp_path), "/machine.slice", proc_cgroup(SCOPE), euid=0)
    assert found is not None and not found.delegated and "not visible below" in found.reason


@root_only
def test_check_reports_this_hosts_delegation_facts() -> None:
    text = subprocess.run([NDF_SANDBOX, "check"], capture_output=True, text=True, env=ndf_host_env(),
                          timeout=120, check=False).stdout
    assert "delegated cgroup v2" in text, text
    data = json.loads(subprocess.run([NDF_SANDBOX, "check", "--json"], capture_output=True, text=True,
                                     env=ndf_host_env(), timeout=120, check=False).stdout)
    delegation = data["features"]["cgroup_delegation"]
    own = Path("/proc/self/cgroup").read_text()
    if delegation is None:
        assert "0::" not in own
    else:
        assert own.count("0::" + delegation["cgroup"]) == 1
        assert set(delegation["offered"]) <= {"memory", "pids", "cpu", "io"}
