"""OCI runtime bundles (issue 19, part 2): `ndf-sandbox oci run BUNDLE_DIR`,
`SandboxConfig.from_oci_bundle`, `ndf-sandbox oci spec`.

The bundles are busybox-static roots built by hand with a config.json written
here. Where runc (Debian's `runc`) is installed, the same bundle runs under both
and gives the same stdout, exit code and limits; runc gets a `cgroupsPath` below
this test's own cgroup (it would make one at the top of each hierarchy
otherwise), checked gone afterwards. Probes of the escape suite's kind (signal a
host process, reach a host listener, write through a read-only bind) are
checked on the host side under our runtime.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import image_helpers
from api_helpers import run
from conftest import NDF_SANDBOX, SandboxCaller, accepted_connections, ndf_host_env
from image_helpers import BUSYBOX, make_image
from neural_doc_flow_security.sandbox.api import SandboxManager
from neural_doc_flow_security.sandbox.config import SandboxConfig
from neural_doc_flow_security.sandbox.errors import ConfigError
from neural_doc_flow_security.sandbox.oci import load_bundle, spec_from_config

pytestmark = [pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox"),
              pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
              pytest.mark.timeout(300)]

host_tmp = image_helpers.host_tmp
RUNC = shutil.which("runc")
needs_runc = pytest.mark.skipif(RUNC is None or os.geteuid() != 0, reason="needs root and runc")
EXTRA_APPLETS = ("sort", "head", "seq", "sleep", "kill", "nc", "hostname", "mkdir")


def base_spec(args: list[str], **linux: Any) -> dict[str, Any]:
    """A minimal bundle config: uid 0, no capabilities, the usual namespaces."""
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"],
                    "cwd": "/", "noNewPrivileges": True,
                    "capabilities": {name: [] for name in ("bounding", "effective", "permitted", "ambient")}},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bundlehost",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
                  "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                  "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"], **linux},
    }


def make_bundle(directory: Path, spec: dict[str, Any]) -> Path:
    rootfs = make_image(directory / "rootfs")
    for applet in EXTRA_APPLETS:
        if not (rootfs / "bin" / applet).exists():
            (rootfs / "bin" / applet).symlink_to("busybox")
    write_spec(directory, spec)
    directory.chmod(0o755)
    return directory


def write_spec(directory: Path, spec: dict[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps(spec))
    (directory / "config.json").chmod(0o644)


def ours(bundle: Path, *options: str, **env: str) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any]]:
    result_file = bundle.parent / f"result-{secrets.token_hex(4)}.json"
    done = subprocess.run([NDF_SANDBOX, "oci", "run", *options, "--json-result", str(result_file), str(bundle)],
                          capture_output=True, env=ndf_host_env(**env), timeout=120, check=False)
    data = json.loads(result_file.read_text()) if result_file.exists() and result_file.stat().st_size else {}
    return done, data


def _own_cgroup() -> str:
    """This process's memory cgroup path (the others are "/" here): runc's cgroupsPath
    goes below it, so it is below ours in every hierarchy."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.strip().split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return "/"


@pytest.fixture
def runc() -> Iterator[Any]:
    """Runs a bundle under runc with a cgroup below ours; checks it is gone after."""
    made: list[str] = []

    def run(bundle: Path) -> subprocess.CompletedProcess[bytes]:
        name = f"ndf-oci-{secrets.token_hex(6)}"
        spec = json.loads((bundle / "config.json").read_text())
        spec["linux"]["cgroupsPath"] = f"{_own_cgroup().rstrip('/')}/{name}"
        made.append(spec["linux"]["cgroupsPath"])
        write_spec(bundle, spec)
        try:
            return subprocess.run([str(RUNC), "run", "--bundle", str(bundle), name], capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=120, check=False)
        finally:
            subprocess.run([str(RUNC), "delete", "--force", name], capture_output=True, check=False)
            spec["linux"].pop("cgroupsPath")
            write_spec(bundle, spec)

    yield run
    left = [f"/sys/fs/cgroup/{c}{path}" for path in made for c in os.listdir("/sys/fs/cgroup")
            if os.path.isdir(f"/sys/fs/cgroup/{c}{path}")]
    for path in left:
        os.rmdir(path)
    assert not left, f"runc left cgroups: {left}"


@needs_runc
def test_same_stdout_and_exit_code_as_runc(host_tmp: Path, runc: Any) -> None:
    script = "echo hello; hostname; id -u; cat /etc/hostname 2>/dev/null; ls /; exit 3"
    bundle = make_bundle(host_tmp / "bundle", base_spec(["/bin/sh", "-c", script]))
    mine, result = ours(bundle)
    theirs = runc(bundle)
    assert (mine.returncode, theirs.returncode) == (3, 3), (mine, theirs)
    assert mine.stdout.splitlines()[:3] == theirs.stdout.splitlines()[:3] == [b"hello", b"bundlehost", b"0"]
    assert result["outcome"] == "error" and result["exit_code"] == 3


@needs_runc
def test_memory_limit_oom_like_runc(host_tmp: Path, runc: Any) -> None:
    # sort holds its whole input (one 200 MB line) in memory; the limit is 32 MiB: the
    # kernel kills sort (137), the shell goes on under both runtimes
    spec = base_spec(["/bin/sh", "-c", "head -c 200000000 /dev/zero | sort > /dev/null; echo survived $?"],
                     resources={"memory": {"limit": 32 << 20}})
    bundle = make_bundle(host_tmp / "bundle", spec)
    mine, result = ours(bundle)
    theirs = runc(bundle)
    assert mine.stdout == theirs.stdout == b"survived 137\n", (mine, theirs)
    assert theirs.returncode == 0
    # ours names the OOM kill (exit status 125, as `ndf-sandbox run`); see the README
    assert (mine.returncode, result["outcome"]) == (125, "oom"), (mine, result)
    assert "memory_limit_mb=32: cgroup" in result["isolation"]["limits"]


@needs_runc
def test_pids_limit_like_runc(host_tmp: Path, runc: Any) -> None:
    spec = base_spec(["/bin/sh", "-c", "for i in $(seq 1 20); do sleep 5 & done; echo all forked"],
                     resources={"pids": {"limit": 8}})
    bundle = make_bundle(host_tmp / "bundle", spec)
    mine, result = ours(bundle)
    theirs = runc(bundle)
    assert mine.returncode == theirs.returncode == 2, (mine, theirs)  # the shell gives up: cannot fork
    assert b"can't fork" in mine.stderr and b"can't fork" in theirs.stderr
    assert mine.stdout == theirs.stdout == b""
    assert "max_processes=8: cgroup" in result["isolation"]["limits"]


def test_a_bundle_cannot_lift_the_callers_limits(host_tmp: Path) -> None:
    """A bundle may tighten the sandbox's limits, not lift them: memory, processes and
    open files above the caller's stay the caller's (said in not_enforced) unless
    --trust-bundle."""
    spec = base_spec(["/bin/sh", "-c", "ulimit -n"], resources={"memory": {"limit": 64 << 30},
                                                                 "pids": {"limit": 100_000}})
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}]
    bundle = make_bundle(host_tmp / "bundle", spec)
    mine, result = ours(bundle)
    assert mine.returncode == 0, mine
    assert mine.stdout == b"256\n"
    defaults = SandboxConfig()
    limits = " ".join(result["isolation"]["limits"])
    assert f"max_processes={defaults.max_processes}" in limits and "max_processes=100000" not in limits, limits
    assert f"memory_limit_mb={defaults.memory_limit_mb}" in limits, limits
    lifted = " ".join(result["isolation"]["not_enforced"])
    for field in ("linux.resources.memory.limit", "linux.resources.pids.limit", "process.rlimits.RLIMIT_NOFILE"):
        assert field in lifted, lifted
    tightened = load_bundle(make_bundle(host_tmp / "small", base_spec(["true"], resources={"pids": {"limit": 8}})))
    assert tightened.config.max_processes == 8 and not tightened.not_enforced
    trusted = load_bundle(bundle, trust_bundle=True).config
    assert (trusted.memory_limit_mb, trusted.max_processes, trusted.max_open_files) == (64 << 10, 100_000, 65536)


@needs_runc
def test_a_bundle_seccomp_deny_list_applies_like_runc(host_tmp: Path, runc: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seccomp = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    spec = base_spec(["/bin/sh", "-c", "mkdir /tmp/d && echo made || echo refused"], seccomp=seccomp)
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]})
    bundle = make_bundle(host_tmp / "bundle", spec)
    # the bundle's extra denials become a profile file in a private directory under TMPDIR: this test's own
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    assert load_bundle(bundle).config.seccomp.startswith(f"{host_tmp}/ndf-oci-seccomp-{os.geteuid()}/")
    mine, _ = ours(bundle, TMPDIR=str(host_tmp))
    theirs = runc(bundle)
    assert mine.stdout == theirs.stdout == b"refused\n", (mine, theirs)


@pytest.mark.skipif(os.geteuid() != 0, reason="an owner = 'caller' bind as root")
def test_a_sandbox_cannot_empty_a_bundles_deny_list_for_later_runs(host_tmp: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The file a bundle's extra denials are written to is reused by name: a sandbox
    that could write its directory (here a writable bind of it whose files are the
    caller's) replaces it with an empty deny list; the next load of the bundle must
    apply the bundle's list all the same."""
    seccomp = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    bundle = make_bundle(host_tmp / "bundle", base_spec(["/bin/true"], seccomp=seccomp))
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    profile = Path(load_bundle(bundle).config.seccomp)
    expected = profile.read_bytes()
    forge = subprocess.run([NDF_SANDBOX, "run", "--bind", f"{profile.parent}:/p", "--bind-owner", "caller", "--",
                            "/bin/sh", "-c", "for f in /p/*.json; do echo '{\"deny\": []}' > $f; done"],
                           capture_output=True, env=ndf_host_env(), cwd="/tmp", timeout=60, check=False)
    assert forge.returncode == 0, forge.stderr.decode()
    again = Path(load_bundle(bundle).config.seccomp)
    assert again.read_bytes() == expected, again.read_bytes()


@needs_runc
def test_spec_of_a_profile_runs_under_runc(host_tmp: Path, runc: Any) -> None:
    profile = host_tmp / "p.toml"
    profile.write_text("memory_limit_mb = 64\nmax_processes = 16\nhostname = \"fromprofile\"\n")
    done = subprocess.run([NDF_SANDBOX, "oci", "spec", "--profile", str(profile)], capture_output=True,
                          env=ndf_host_env(), timeout=60, check=True)
    spec = json.loads(done.stdout)
    assert spec["linux"]["resources"]["memory"]["limit"] == 64 << 20
    assert spec["linux"]["resources"]["pids"]["limit"] == 16
    spec["process"]["args"] = ["/bin/sh", "-c", "hostname; id -u"]
    spec["process"]["env"] = ["PATH=/bin"]
    bundle = make_bundle(host_tmp / "bundle", spec)
    theirs = runc(bundle)
    mine, _ = ours(bundle)
    assert theirs.returncode == 0, theirs
    assert theirs.stdout == mine.stdout == b"fromprofile\n65534\n", (mine, theirs)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_probes_are_contained_under_our_runtime(host_tmp: Path, sentinel_process: subprocess.Popen[bytes],
                                                loopback_listener: socket.socket) -> None:
    port = loopback_listener.getsockname()[1]
    script = (f"kill -9 {sentinel_process.pid}; echo overwritten > /shared/file; "
              f"echo x | nc -w 1 127.0.0.1 {port}; ls /usr /home 2>&1; true")
    spec = base_spec(["/bin/sh", "-c", script])
    spec["mounts"].append({"destination": "/shared", "type": "bind", "source": "shared", "options": ["rbind", "ro"]})
    bundle = make_bundle(host_tmp / "bundle", spec)
    shared = bundle / "shared"
    shared.mkdir()
    (shared / "file").write_text("host content\n")
    (shared / "file").chmod(0o666)
    mine, result = ours(bundle)
    assert mine.returncode == 0, mine
    # host-side evidence
    assert sentinel_process.poll() is None
    assert (shared / "file").read_text() == "host content\n"
    assert accepted_connections(loopback_listener) == 0
    assert result["isolation"]["seccomp"].startswith("deny-list: ")  # "default": the deny-list for programs


def test_a_bundle_runs_for_every_caller(sandbox_caller: SandboxCaller, host_tmp: Path) -> None:
    bundle = make_bundle(host_tmp / "bundle", base_spec(["/bin/sh", "-c", "hostname; id -u; cat /marker"]))
    done = subprocess.run([*sandbox_caller.prefix, *sandbox_caller.program, "oci", "run", str(bundle)],
                          capture_output=True, env=ndf_host_env(), cwd="/tmp", timeout=120, check=False)
    assert done.returncode == 0, done
    assert done.stdout == b"bundlehost\n0\nfrom the image\n"


def test_an_unsupported_field_is_an_error_naming_it(host_tmp: Path) -> None:
    bundle = make_bundle(host_tmp / "bundle", base_spec(["/bin/true"], sysctl={"net.ipv4.ip_forward": "1"}))
    with pytest.raises(ConfigError, match=r"linux\.sysctl"):
        SandboxConfig.from_oci_bundle(bundle)
    mapped = load_bundle(bundle, ignore_unsupported=True)
    assert any("linux.sysctl" in note for note in mapped.not_enforced)
    done = subprocess.run([NDF_SANDBOX, "oci", "run", str(bundle)], capture_output=True, env=ndf_host_env(),
                          timeout=60, check=False)
    assert done.returncode == 2 and b"linux.sysctl" in done.stderr, done


def test_a_bundle_cannot_weaken_the_hardening_without_the_callers_consent(host_tmp: Path) -> None:
    spec = base_spec(["/bin/true"])
    spec["process"]["capabilities"] = {name: ["CAP_NET_RAW"] for name in ("bounding", "effective", "permitted")}
    bundle = make_bundle(host_tmp / "bundle", spec)
    with pytest.raises(ConfigError, match=r"process\.capabilities.*--trust-bundle"):
        load_bundle(bundle)
    assert load_bundle(bundle, trust_bundle=True).config.capabilities.allowed == ("CAP_NET_RAW",)
    spec = base_spec(["/bin/true"])
    spec["process"]["noNewPrivileges"] = False
    write_spec(bundle, spec)
    with pytest.raises(ConfigError, match=r"process\.noNewPrivileges"):
        load_bundle(bundle)
    spec = base_spec(["/bin/true"])
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]  # no network
    write_spec(bundle, spec)
    with pytest.raises(ConfigError, match=r"linux\.namespaces\.network"):
        load_bundle(bundle)
    assert load_bundle(bundle, trust_bundle=True).config.namespaces.net is False
    spec = base_spec(["/bin/true"])
    spec["mounts"].append({"destination": "/etc", "type": "bind", "source": "/etc", "options": ["rbind", "ro"]})
    write_spec(bundle, spec)
    with pytest.raises(ConfigError, match=r"mounts\[2\]\.source.*outside the bundle"):
        load_bundle(bundle)


def test_a_change_to_config_json_after_the_bundle_was_read_is_not_seen(host_tmp: Path) -> None:
    """config.json is read once (load_bundle, as `oci run` does): a root.path pointed
    elsewhere afterwards, or a config.json no longer valid, does not reach the launch."""
    bundle = make_bundle(host_tmp / "bundle", base_spec(["/bin/cat", "/marker"]))
    make_image(bundle / "other", marker="another root")
    mapped = load_bundle(bundle)
    assert mapped.config.filesystem.image_root_path == "rootfs"
    changed = base_spec(["/bin/cat", "/marker"])
    changed["root"]["path"] = "other"
    outputs = []
    for text in (json.dumps(changed), "not json"):
        (bundle / "config.json").write_text(text)

        async def launch() -> Any:
            async with SandboxManager(mapped.config) as m:
                return await m.execute_command("oci", list(mapped.args), timeout=60)

        result = run(launch())
        assert result.ok, result
        outputs.append(result.stdout)
    assert outputs == [b"from the image\n"] * 2


def test_the_bundle_maps_onto_the_config(host_tmp: Path) -> None:
    spec = base_spec(["/bin/sh", "-c", "true"], resources={
        "memory": {"limit": 100 << 20}, "cpu": {"quota": 50000, "period": 100000}, "pids": {"limit": 12},
        "blockIO": {"throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}]}})
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 100, "soft": 100}]
    spec["process"]["cwd"] = "/bin"
    spec["root"]["readonly"] = False
    spec["mounts"].append({"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "rw"]})
    bundle = make_bundle(host_tmp / "bundle", spec)
    mapped = load_bundle(bundle)
    config = mapped.config
    assert (config.memory_limit_mb, config.cpu_quota_percent, config.max_processes, config.io_read_bps) == \
        (100, 50, 12, 1 << 20)
    assert (config.max_open_files, config.hostname, config.uid, config.gid) == (100, "bundlehost", 0, 0)
    assert config.filesystem.image == str(bundle.resolve()) and config.filesystem.overlay
    assert [(b.source, b.target, b.read_only) for b in config.filesystem.bind_mounts] == \
        [(str(bundle.resolve() / "data"), "/data", False)]
    assert mapped.args == ("/bin/sh", "-c", "true") and mapped.cwd == "/bin"
    assert dict(config.environment) == {"PATH": "/bin"}


def test_spec_from_config_round_trips(host_tmp: Path) -> None:
    config = SandboxConfig(memory_limit_mb=128, max_processes=10, cpu_quota_percent=25, hostname="h")
    spec = spec_from_config(config)
    assert spec["process"]["noNewPrivileges"] is True and spec["process"]["terminal"] is False
    assert spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"
    assert spec["linux"]["resources"]["cpu"] == {"quota": 25000, "period": 100000}
    back = load_bundle(make_bundle(host_tmp / "bundle", spec)).config
    assert back.seccomp == "default" and back.no_new_privs and back.capabilities.allowed == ()
    assert (back.memory_limit_mb, back.max_processes, back.cpu_quota_percent, back.hostname) == (128, 10, 25, "h")
    assert back.namespaces == config.namespaces

