"""Landlock, the second file-system wall (linux/landlock.py): it holds on its own.

Each probe runs under `ndf-sandbox run` as root and as an unprivileged user, and
again with `--landlock off` to prove that the probe would see the hole: the
mounts are deliberately made wider than the rules (tests/landlock_runner.py
leaves one bind target out of the ruleset), or the namespace that would also
stop the probe is turned off (pid, net), so that Landlock is the only wall.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import api_helpers
from conftest import (
    NDF_SANDBOX,
    ROOT_CALLER,
    UNPRIVILEGED_CALLER,
    SandboxCaller,
    _ensure_unprivileged_user,
    accepted_connections,
    unique_marker,
    wait_until,
)
from neural_doc_flow_security.sandbox.config import SandboxConfig
from neural_doc_flow_security.sandbox.errors import ConfigError, UnsupportedError
from neural_doc_flow_security.sandbox.launch import plan
from neural_doc_flow_security.sandbox.linux import landlock
from neural_doc_flow_security.sandbox.result import SandboxResult

RUNNER = str(Path(__file__).with_name("landlock_runner.py"))
ABI, WHY_NOT = landlock.abi()

pytestmark = pytest.mark.skipif(not ABI, reason=f"no Landlock: {WHY_NOT}")

SECRET = "ndf-landlock-decoy-" + secrets.token_hex(4)


@pytest.fixture(params=["root", "unprivileged"])
def caller(request: pytest.FixtureRequest) -> SandboxCaller:
    """`ndf-sandbox` started by root and by uid 4242."""
    if os.geteuid() != 0:
        pytest.skip("the CLI probes start the sandbox as root and as uid 4242: run them as root")
    if request.param == "root":
        return ROOT_CALLER
    _ensure_unprivileged_user()
    return UNPRIVILEGED_CALLER


def unruled(caller: SandboxCaller, target: str) -> SandboxCaller:
    """The same caller, with the bind on `target` mounted but left out of the Landlock rules."""
    return dataclasses.replace(caller, program=(sys.executable, RUNNER, target))


@pytest.fixture
def decoy_dir(shared_host_dir: Path) -> Path:
    """A host directory every uid may read and write, holding a decoy file."""
    (shared_host_dir / "secret").write_text(SECRET)
    (shared_host_dir / "secret").chmod(0o644)
    return shared_host_dir


def _isolation(caller: SandboxCaller, options: list[str], command: list[str],
               tmp_path: Path) -> tuple[subprocess.CompletedProcess[bytes], dict[str, object]]:
    result_file = tmp_path / f"result-{secrets.token_hex(4)}.json"
    result_file.touch()
    result_file.chmod(0o666)
    done = caller.run(["--json-result", str(result_file), *options], command)
    return done, json.loads(result_file.read_text())["isolation"]


# --------------------------------------------------------------------------- the file system


def test_read_outside_the_rules_is_denied_though_mounted(caller: SandboxCaller, decoy_dir: Path,
                                                         shared_host_dir: Path) -> None:
    """The host directory is bound read-only (the mount namespace lets it through);
    Landlock alone refuses the read with EACCES. With Landlock off the same read works."""
    options = ["--ro-bind", f"{decoy_dir}:/mnt/decoy"]
    probe = ["cat", "/mnt/decoy/secret"]
    denied, isolation = _isolation(unruled(caller, "/mnt/decoy"), options, probe, shared_host_dir)
    assert SECRET.encode() not in denied.stdout
    assert denied.returncode == 1, denied.stderr
    assert b"Permission denied" in denied.stderr
    assert isolation["landlock"] == f"ABI {ABI}"

    allowed, isolation = _isolation(unruled(caller, "/mnt/decoy"), [*options, "--landlock", "off"], probe,
                                    shared_host_dir)
    assert allowed.stdout == SECRET.encode(), allowed.stderr
    assert isolation["landlock"] == "off"
    assert "landlock: off" in isolation["not_enforced"]  # type: ignore[operator]


def test_write_outside_the_rules_is_denied_though_mounted_writable(caller: SandboxCaller, decoy_dir: Path) -> None:
    """A writable bind left out of the rules: the mount allows the write, Landlock
    refuses it; the host file never appears. With Landlock off it does."""
    marker = decoy_dir / "written"
    options = ["--bind", f"{decoy_dir}:/mnt/decoy"]
    probe = ["sh", "-c", "echo escaped > /mnt/decoy/written"]
    denied = unruled(caller, "/mnt/decoy").run(options, probe)
    assert denied.returncode != 0
    assert b"Permission denied" in denied.stderr
    assert not marker.exists()

    allowed = unruled(caller, "/mnt/decoy").run([*options, "--landlock", "off"], probe)
    assert allowed.returncode == 0, allowed.stderr
    assert marker.read_text() == "escaped\n"
    marker.unlink()


def test_ruled_paths_work(caller: SandboxCaller, decoy_dir: Path) -> None:
    """What the mounts grant, the rules grant too: system files, the writable bind,
    /tmp, /dev/shm, /dev/null, listing the root and /etc."""
    probe = ["sh", "-c", "cat /etc/passwd >/dev/null && cat /mnt/ro/secret && echo x > /mnt/rw/made && "
             "echo y > /tmp/t && cat /tmp/t && echo z > /dev/shm/s && rm /dev/shm/s && "
             "echo w > /dev/null && ls / /etc >/dev/null && echo done"]
    done = caller.run(["--ro-bind", f"{decoy_dir}:/mnt/ro", "--bind", f"{decoy_dir}:/mnt/rw"], probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{SECRET}y\ndone\n".encode()
    assert (decoy_dir / "made").read_text() == "x\n"
    (decoy_dir / "made").unlink()


# --------------------------------------------------------------------------- scopes (ABI >= 6)


@pytest.fixture
def sentinel_as(caller: SandboxCaller) -> Iterator[subprocess.Popen[bytes]]:
    """A host `sleep` of the sandbox payload's host uid (nobody as root, with --uid
    65534; 4242 through its user namespace): without a pid namespace and without
    Landlock, the payload may signal it."""
    uid = 65534 if caller.is_root else caller.uid
    proc = subprocess.Popen(["sleep", unique_marker()], user=uid, group=uid, extra_groups=[],
                            start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.skipif(ABI < 6, reason="signal scoping needs Landlock ABI 6")
def test_signal_outside_the_domain_is_refused(caller: SandboxCaller, sentinel_as: subprocess.Popen[bytes],
                                              shared_host_dir: Path) -> None:
    """No pid namespace: the host sentinel is visible and of the payload's uid, so only
    Landlock's signal scope stops the kill. With Landlock off, the same kill lands."""
    profile = shared_host_dir / "nopid.toml"
    profile.write_text("[namespaces]\npid = false\n")
    profile.chmod(0o644)
    probe = ["sh", "-c", f"kill -TERM {sentinel_as.pid}"]
    # As root, the payload takes the sentinel's uid (else it would get its own, from id_range).
    options = ["--profile", str(profile), *(["--uid", "65534", "--gid", "65534"] if caller.is_root else [])]
    denied = caller.run(options, probe)
    if b"namespaces.pid: cannot be enforced" in denied.stderr:
        pytest.skip("no pid namespace needs a cgroup, which this caller cannot create here")
    assert denied.returncode != 0
    assert b"Operation not permitted" in denied.stderr
    assert sentinel_as.poll() is None  # host-side: the sentinel lives

    allowed = caller.run([*options, "--landlock", "off"], probe)
    assert allowed.returncode == 0, allowed.stderr
    assert wait_until(lambda: sentinel_as.poll() is not None)


_CONNECT = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "try:\n"
            "    s.connect('\\0' + sys.argv[1])\n"
            "except OSError as e:\n"
            "    sys.exit(f'refused: {e.strerror}')\n")


@pytest.mark.skipif(ABI < 6, reason="abstract unix socket scoping needs Landlock ABI 6")
def test_abstract_unix_connect_to_the_host_is_refused(
        caller: SandboxCaller, abstract_unix_listener: tuple[socket.socket, str]) -> None:
    """The host's network namespace is shared (--net), so the host's abstract socket
    is reachable; Landlock's scope refuses the connect and the listener accepts
    nothing. With Landlock off the connect arrives."""
    listener, name = abstract_unix_listener
    probe = [sys.executable, "-c", _CONNECT, name]
    denied = caller.run(["--net", "--python"], probe)
    assert denied.returncode != 0
    assert b"refused: Operation not permitted" in denied.stderr
    assert accepted_connections(listener) == 0

    allowed = caller.run(["--net", "--python", "--landlock", "off"], probe)
    assert allowed.returncode == 0, allowed.stderr
    assert accepted_connections(listener) == 1


@pytest.mark.skipif(ABI < 4, reason="TCP rules need Landlock ABI 4")
def test_tcp_is_denied_in_the_sandboxs_network_namespace(root_caller: SandboxCaller) -> None:
    """With its own network namespace, the payload may neither bind nor connect TCP."""
    probe = [sys.executable, "-c", "import socket\ns = socket.socket()\ntry:\n s.bind(('127.0.0.1', 8080))\n"
             "except PermissionError:\n print('bind denied')\n"]
    done = root_caller.run(["--python"], probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"bind denied\n"


# --------------------------------------------------------------------------- a Python callable


def connect_abstract(name: str) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError as e:
        return f"refused: {e.strerror}"
    finally:
        sock.close()
    return "connected"


@pytest.mark.skipif(os.geteuid() != 0 or ABI < 6, reason="needs root (the API tests run as root) and ABI 6")
@pytest.mark.parametrize("method", api_helpers.START_METHODS)
def test_a_callable_runs_under_landlock(method: str, abstract_unix_listener: tuple[socket.socket, str]) -> None:
    """Both start methods: with the host's network shared, only Landlock's scope keeps
    a callable from the host's abstract unix socket; with Landlock off it connects."""
    listener, name = abstract_unix_listener
    host_net = SandboxConfig().namespaces.__class__(net=False)

    async def go() -> tuple[SandboxResult, SandboxResult]:
        async with api_helpers.manager(method) as m:
            locked = m.with_options(sandbox_config=SandboxConfig(namespaces=host_net))
            on = await locked.execute_sandboxed("landlock", connect_abstract, name)
            assert accepted_connections(listener) == 0
            unlocked = m.with_options(sandbox_config=SandboxConfig(namespaces=host_net, landlock="off"))
            off = await unlocked.execute_sandboxed("landlock", connect_abstract, name)
            return on, off

    on, off = api_helpers.run(go())
    assert on.ok and off.ok, (api_helpers.describe(on), api_helpers.describe(off))
    assert on.output == "refused: Operation not permitted"
    assert on.isolation.landlock == f"ABI {ABI}"
    assert off.output == "connected"
    assert accepted_connections(listener) == 1
    assert off.isolation.landlock == "off" and "landlock: off" in off.isolation.not_enforced


# --------------------------------------------------------------------------- config and plan


def test_config_is_validated_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^landlock: must be 'auto', 'required' or 'off', got 'on'"):
        SandboxConfig(landlock="on")
    with pytest.raises(ConfigError, match=r"^landlock: 'required' needs namespaces.mnt"):
        SandboxConfig(landlock="required", namespaces=SandboxConfig().namespaces.__class__(mnt=False))
    with pytest.raises(ConfigError, match=r"^landlock: 'required' needs .* no_new_privs"):
        SandboxConfig(landlock="required", no_new_privs=False)
    assert SandboxConfig.from_dict({"landlock": "required"}).landlock == "required"


def test_required_without_landlock_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without Landlock: "required" refuses to plan; "auto" names it as not enforced."""
    monkeypatch.setattr(landlock, "abi", lambda: (0, "the kernel has no Landlock syscalls (ENOSYS)"))
    plan._plan_launch.cache_clear()
    try:
        with pytest.raises(UnsupportedError, match="landlock: cannot be enforced on this host: the kernel has no"):
            plan.plan_launch(SandboxConfig(landlock="required"))
        auto = plan.plan_launch(SandboxConfig())
        assert auto.landlock is None
        assert auto.isolation_report().landlock == "off"
        assert any(note.startswith("landlock: not applied (the kernel has no") for note in auto.not_enforced)
    finally:
        plan._plan_launch.cache_clear()


@pytest.mark.parametrize("kernel_abi", [1, 2, 3, 4, 5, 6, 7])
def test_rights_are_masked_to_the_kernels_abi(kernel_abi: int) -> None:
    """A lower ABI gets only the rights it knows (else landlock_create_ruleset is EINVAL)."""
    config = SandboxConfig()
    rootfs = plan._plan_launch(config, 0, 0).rootfs
    assert rootfs is not None
    ruleset = landlock.plan_landlock(config, rootfs, kernel_abi)
    known = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}.get(kernel_abi, (1 << 16) - 1)
    assert ruleset.handled_fs == known
    assert all(access & ~known == 0 and access for _, access in ruleset.rules)
    assert ruleset.handled_net == (3 if kernel_abi >= 4 else 0)
    assert ruleset.scoped == (3 if kernel_abi >= 6 else 0)
    assert ("/tmp", landlock.READ_WRITE & known) in ruleset.rules


def test_the_fallback_backends_refuse_required_landlock() -> None:
    """Neither the posix nor the Windows backend has Landlock: "required" fails closed there."""
    from neural_doc_flow_security.sandbox.fallback import posix, windows

    required = SandboxConfig(landlock="required")
    assert ("landlock", "no Landlock ruleset in the posix backend", True) in posix.unenforced_protections(required)
    assert ("landlock", "no Landlock on Windows", True) in windows.unenforced_protections(required)
    assert ("landlock", "no Landlock on Windows", False) in windows.unenforced_protections(SandboxConfig())


def test_check_reports_the_abi() -> None:
    """`ndf-sandbox check` names the ABI the sandboxes use."""
    done = subprocess.run([NDF_SANDBOX, "check", "--json"], capture_output=True, timeout=60, check=False)
    assert json.loads(done.stdout)["features"]["landlock_abi"] == ABI, done.stderr
    table = subprocess.run([NDF_SANDBOX, "check"], capture_output=True, timeout=60, check=False).stdout
    assert any(line.split()[:3] == [b"landlock", b"ABI", str(ABI).encode()] for line in table.splitlines())
