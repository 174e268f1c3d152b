"""Detection of a delegated cgroup v2 subtree (systemd Delegate=yes) from the cgroup facts.

There is no systemd (and no cgroup v2 with controllers) on the test host, so the
cases run on a fake unified hierarchy built in a temporary directory, laid out and
owned as systemd lays out and chowns a delegated unit, and on this host's real
facts through `ndf-sandbox check`. The cgroup_v2 tests (the tests/vm guest) build
a delegated scope in a real cgroup v2 tree and run `ndf-sandbox` in it as uid 4242.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import NDF_SANDBOX, ndf_host_env, remove_cgroup_dirs, wait_until
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
    # enabled for children until it moves into a leaf, which it may, being alone there.
    assert not found.usable_now and found.movable and found.reason == ""
    status, detail = describe(found)
    assert status == "yes"
    assert "run-r1f2e.scope" in detail and "memory_limit_mb" in detail and "-manager" in detail


@root_only
def test_once_moved_into_its_leaf_the_scope_is_usable_and_nothing_moves_again(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, SCOPE, subtree="cpu memory pids", procs="")
    fake_cgroup(tmp_path, f"{SCOPE}/neural-doc-flow", subtree="memory pids", procs="")
    leaf = f"{SCOPE}/neural-doc-flow/ndf-1234-5678-0-manager"
    fake_cgroup(tmp_path, leaf)
    found = detect_delegation(str(tmp_path), "/", proc_cgroup(leaf), euid=USER)
    assert found is not None and found.cgroup == SCOPE and found.usable_now and not found.movable
    assert describe(found)[0] == "yes"


@root_only
def test_a_delegated_scope_shared_with_other_processes_cannot_be_used(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, SCOPE, procs="1234\n1235\n")
    found = detect_delegation(str(tmp_path), "/", proc_cgroup(SCOPE), euid=USER)
    assert found is not None and found.delegated and not found.usable_now and not found.movable
    assert "no-internal-processes" in found.reason and "only process" in found.reason
    assert describe(found)[0] == "not used"


@root_only
def test_root_rearranges_only_a_cgroup_systemd_marked_as_delegated(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, SCOPE, owner=0)
    found = detect_delegation(str(tmp_path), "/", proc_cgroup(SCOPE), euid=0)
    assert found is not None and found.delegated and not found.marked_delegated and not found.movable
    assert "marked as delegated" in found.reason


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


@root_only
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
                          timeout=VM_TIMEOUT, check=False).stdout
    assert "delegated cgroup v2" in text, text
    data = json.loads(subprocess.run([NDF_SANDBOX, "check", "--json"], capture_output=True, text=True,
                                     env=ndf_host_env(), timeout=VM_TIMEOUT, check=False).stdout)
    delegation = data["features"]["cgroup_delegation"]
    own = Path("/proc/self/cgroup").read_text()
    if delegation is None:
        assert "0::" not in own
    else:
        assert own.count("0::" + delegation["cgroup"]) == 1
        assert set(delegation["offered"]) <= {"memory", "pids", "cpu", "io"}


# --- a delegated scope in the cgroup v2 guest (tests/vm), laid out as systemd makes it ---

SCOPE_CHAIN = ("user.slice", "user-4242.slice", "user@4242.service", "app.slice")
VM_TIMEOUT = 600  # generous: the guest is emulated (TCG) on a shared, loaded host


@pytest.fixture
def delegated_scope() -> Iterator[Path]:
    """/sys/fs/cgroup/user.slice/.../app.slice/run-r<n>.scope delegated to uid 4242 as
    `systemd-run --user --scope -p Delegate=yes` leaves it: memory, pids and cpu handed
    down by every ancestor, the scope directory and its cgroup.procs, subtree_control
    and threads chowned to the user. Removed afterwards (what ran in it must be gone)."""
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.subtree_control").exists() or \
            not {"memory", "pids"} <= set((root / "cgroup.subtree_control").read_text().split()):
        pytest.skip("needs a cgroup v2 root with memory and pids enabled (the tests/vm guest)")
    made: list[Path] = []
    directory = root
    for name in SCOPE_CHAIN:
        directory = directory / name
        if not directory.exists():
            directory.mkdir()
            made.append(directory)
        (directory / "cgroup.subtree_control").write_text("+memory +pids +cpu")
    scope = directory / f"run-r{os.getpid()}.scope"
    scope.mkdir()
    made.append(scope)
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(scope / name, USER, USER)
    try:
        yield scope
    finally:
        left = remove_cgroup_dirs([str(directory) for directory in reversed(made)])  # the scope first
        assert not left, f"cgroups left: {left}"


def in_scope(scope: Path, *argv: str) -> list[str]:
    """argv started as uid 4242 inside `scope`: root puts the process there first, as
    systemd does for a scope's command, then drops to the user."""
    return ["sh", "-c", f'echo $$ > {scope}/cgroup.procs && exec "$@"', "sh",
            "setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "--", *argv]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory uid 4242 may write (tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ndf-delegation-", dir="/var/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.cgroup_v2
@pytest.mark.timeout(VM_TIMEOUT * 2)
@root_only
def test_a_run_alone_in_a_delegated_scope_gets_cgroup_limits(delegated_scope: Path, shared_dir: Path) -> None:
    result_file = shared_dir / "result.json"
    check = subprocess.run(in_scope(delegated_scope, NDF_SANDBOX, "check", "--json"), capture_output=True,
                           text=True, env=ndf_host_env(), timeout=VM_TIMEOUT, check=False)
    delegation = json.loads(check.stdout)["features"]["cgroup_delegation"]
    assert delegation["movable"] and delegation["offered"] == ["memory", "pids", "cpu"], delegation
    run = subprocess.run(in_scope(delegated_scope, NDF_SANDBOX, "run", "--memory", "32M", "--pids", "16",
                                  "--json-result", str(result_file), "--",
                                  "sh", "-c", "head -c 200M /dev/zero | tail >/dev/null"),
                         capture_output=True, text=True, env=ndf_host_env(), timeout=VM_TIMEOUT, check=False)
    result = json.loads(result_file.read_text())
    # The kernel's OOM kill in the sandbox's own cgroup, below the scope: a cgroup limit, not an rlimit.
    assert run.returncode == 125 and result["outcome"] == "oom", (run.stderr, result)
    isolation = result["isolation"]
    assert "memory_limit_mb=32: cgroup" in isolation["limits"], isolation
    assert "max_processes=16: cgroup" in isolation["limits"], isolation
    assert f"{delegated_scope}/neural-doc-flow/ndf-" in isolation["cgroup"], isolation
    # The run moved itself into a leaf and handed memory and pids down from the scope.
    assert {"memory", "pids"} <= set((delegated_scope / "cgroup.subtree_control").read_text().split())
    leaves = sorted(p.name for p in (delegated_scope / "neural-doc-flow").iterdir() if p.is_dir())
    assert len(leaves) == 1 and leaves[0].endswith("-manager"), leaves  # the sandbox's cgroup is gone
    assert (delegated_scope / "cgroup.procs").read_text() == ""


@pytest.mark.cgroup_v2
@pytest.mark.timeout(VM_TIMEOUT * 2)
@root_only
def test_a_run_sharing_the_scope_with_another_process_is_refused_a_limit(delegated_scope: Path) -> None:
    other = subprocess.Popen(in_scope(delegated_scope, "sleep", "900"))
    try:
        assert wait_until(lambda: len((delegated_scope / "cgroup.procs").read_text().split()) == 1, VM_TIMEOUT)
        run = subprocess.run(in_scope(delegated_scope, NDF_SANDBOX, "run", "--memory", "32M", "--", "true"),
                             capture_output=True, text=True, env=ndf_host_env(), timeout=VM_TIMEOUT, check=False)
        assert run.returncode == 126 and "memory_limit_mb" in run.stderr, run.stderr
        assert not (delegated_scope / "neural-doc-flow").exists()  # nothing moved, nothing made
    finally:
        other.kill()
        other.wait()


API_IN_SCOPE = """
import asyncio, json, sys
from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager

async def main():
    for _ in range(2):  # a second manager in the same process finds the scope arranged already
        async with SandboxManager(SandboxConfig(memory_limit_mb=32, max_processes=16)) as manager:
            result = await manager.execute_command("hog", ["sh", "-c", "head -c 200M /dev/zero | tail >/dev/null"])
        print(json.dumps(result.to_dict()))

asyncio.run(main())
"""


@pytest.mark.cgroup_v2
@pytest.mark.timeout(VM_TIMEOUT * 2)
@root_only
def test_a_manager_alone_in_a_delegated_scope_gets_cgroup_limits(delegated_scope: Path) -> None:
    import sys

    run = subprocess.run(in_scope(delegated_scope, sys.executable, "-c", API_IN_SCOPE), capture_output=True,
                         text=True, env=ndf_host_env(), cwd="/", timeout=VM_TIMEOUT, check=False)
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()[-2:]]
    for result in results:
        assert result["outcome"] == "oom", result
        assert "memory_limit_mb=32: cgroup" in result["isolation"]["limits"], result["isolation"]
        assert f"{delegated_scope}/neural-doc-flow/ndf-" in result["isolation"]["cgroup"]
    leaves = [p.name for p in (delegated_scope / "neural-doc-flow").iterdir() if p.is_dir()]
    assert len(leaves) == 1 and leaves[0].endswith("-manager"), leaves  # moved once, nothing nested
