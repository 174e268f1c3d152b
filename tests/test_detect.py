"""Tests of sandbox.detect: the report must match what the kernel really allows.

Every probe answer is checked against an independent attempt in a forked,
throw-away child. No host-wide knob is changed: the "user namespaces disabled"
case sets user.max_user_namespaces=0 inside a fresh user namespace, where the
sysctl is per namespace and only limits that namespace's descendants.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from neural_doc_flow_security.sandbox import detect
from neural_doc_flow_security.sandbox.config import NamespaceConfig, SandboxConfig
from neural_doc_flow_security.sandbox.detect import (
    NAMESPACE_FLAGS,
    HostFeatures,
    NamespaceSupport,
    detect_features,
    format_report,
    missing_for,
    probe_features,
    report_to_dict,
)
from neural_doc_flow_security.sandbox.linux.cgroups.base import CgroupSupport, ControllerSupport

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="probes Linux kernel features")
root_only = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")

libc = ctypes.CDLL(None, use_errno=True)


def in_child(fn: Callable[[], Any]) -> Any:
    """Run fn in a forked child; return its JSON-encoded result (or raise its error)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_fd)
            payload = json.dumps({"value": fn()})
        except BaseException as e:  # noqa: BLE001
            payload, code = json.dumps({"error": repr(e)}), 1
        os.write(write_fd, payload.encode())
        os._exit(code)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    answer = json.loads(data)
    if "error" in answer:
        raise AssertionError(f"child failed: {answer['error']}")
    return answer["value"]


def can_unshare(flag: int) -> bool:
    return bool(in_child(lambda: libc.unshare(flag) == 0))


# ------------------------------------------------------------------ matches reality


@linux_only
def test_root_detection_matches_geteuid() -> None:
    features = detect_features()
    assert features.os == "linux"
    assert features.euid == os.geteuid()
    assert features.is_root == (os.geteuid() == 0)
    assert features.kernel_release == os.uname().release


@linux_only
def test_every_namespace_answer_matches_a_real_unshare() -> None:
    features = probe_features()
    assert {ns.name for ns in features.namespaces} == set(NAMESPACE_FLAGS)
    for ns in features.namespaces:
        flag = NAMESPACE_FLAGS[ns.name]
        if ns.needs_user_ns:
            flag |= NAMESPACE_FLAGS["user"]
        assert can_unshare(flag) == ns.creatable, ns
        if not ns.creatable:
            assert ns.reason


@linux_only
@root_only
def test_unprivileged_user_namespace_answer_matches_nobody_trying() -> None:
    features = probe_features()

    def as_nobody() -> bool:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        return bool(libc.unshare(NAMESPACE_FLAGS["user"]) == 0)

    assert features.unprivileged_user_namespaces == in_child(as_nobody)


@linux_only
def test_landlock_abi_matches_the_syscall() -> None:
    features = detect_features()
    abi = libc.syscall(444, ctypes.c_void_p(None), ctypes.c_size_t(0), ctypes.c_uint32(1))
    assert features.landlock_abi == max(abi, 0)
    if os.uname().release.startswith("6.18"):  # this machine: Landlock ABI 7
        assert features.landlock_abi > 0


@linux_only
def test_seccomp_and_no_new_privs_match_proc() -> None:
    features = detect_features()
    with open("/proc/sys/kernel/seccomp/actions_avail") as f:
        assert features.seccomp_actions == tuple(f.read().split())
    assert features.seccomp
    assert features.no_new_privs
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    assert features.seccomp_mode == int(status["Seccomp"])


@linux_only
def test_capabilities_match_proc_status() -> None:
    features = detect_features()
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    cap_eff = int(status["CapEff"].strip(), 16)
    assert features.cap_effective == cap_eff
    assert features.cap_bounding == int(status["CapBnd"].strip(), 16)
    assert features.has_cap_sys_admin == bool(cap_eff >> 21 & 1)
    for name in features.caps_not_in_bounding:
        assert name.startswith("CAP_")


@linux_only
def test_pidfd_clone3_overlay_match_reality() -> None:
    features = detect_features()
    with open("/proc/filesystems") as f:
        assert features.overlayfs == ("overlay" in f.read().split())
    try:
        os.close(os.pidfd_open(os.getpid()))
        has_pidfd = True
    except (AttributeError, OSError):
        has_pidfd = False
    assert features.pidfd_open == has_pidfd
    libc.syscall(435, ctypes.c_void_p(None), ctypes.c_size_t(0))
    assert features.clone3 == (ctypes.get_errno() != 38)  # ENOSYS


@linux_only
def test_container_hints_follow_the_marker_files() -> None:
    features = detect_features()
    if os.path.exists("/.dockerenv"):
        assert features.in_container
        assert any("/.dockerenv" in h for h in features.container_hints)
    assert features.in_container == bool(features.container_hints)


@linux_only
def test_cache_and_refresh() -> None:
    first = detect_features()
    assert detect_features() is first
    detect_features.cache_clear()
    second = detect_features()
    assert second is not first
    assert second.namespaces == first.namespaces


# ------------------------------------------------------------------ the isolation floor


@linux_only
@root_only
def test_default_config_is_fully_enforceable_here_as_root() -> None:
    assert missing_for(SandboxConfig(), detect_features()) == []


@linux_only
@root_only
def test_user_namespaces_disabled_are_named_with_their_knob() -> None:
    """A process whose user namespace has user.max_user_namespaces=0 and that is not
    root there (unmapped: euid 65534) cannot build the default sandbox."""
    with open("/proc/sys/user/max_user_namespaces") as f:
        host_value = f.read()

    def inside_limited_userns() -> dict[str, Any]:
        assert libc.unshare(NAMESPACE_FLAGS["user"]) == 0
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        features = probe_features()
        return {
            "euid": os.geteuid(),
            "user": dataclasses.asdict(features.namespace("user") or NamespaceSupport("user", True)),
            "missing": missing_for(SandboxConfig(), features),
        }

    answer = in_child(inside_limited_userns)
    assert answer["euid"] != 0
    assert answer["user"]["creatable"] is False
    assert "user.max_user_namespaces=0" in answer["user"]["reason"]
    assert len(answer["missing"]) == 1
    message = answer["missing"][0]
    assert message.startswith("namespaces.user:")
    assert "non-root" in message and "user.max_user_namespaces=0" in message
    with open("/proc/sys/user/max_user_namespaces") as f:
        assert f.read() == host_value  # the host knob was never touched


def fake_features(**changes: Any) -> HostFeatures:
    base = HostFeatures(
        os="linux", platform="Linux-test", machine="x86_64", kernel_release="6.18", euid=0, is_root=True,
        namespaces=tuple(NamespaceSupport(n, True) for n in NAMESPACE_FLAGS),
        seccomp=True, no_new_privs=True, landlock_abi=7,
        cgroups=CgroupSupport(tuple(ControllerSupport(n, "v1", f"/sys/fs/cgroup/{n}", True)
                                    for n in ("memory", "cpu", "pids", "blkio"))),
    )
    return dataclasses.replace(base, **changes)


def test_missing_for_is_empty_when_everything_is_there() -> None:
    config = SandboxConfig(memory_limit_mb=256, cpu_quota_percent=50, max_processes=10, io_read_bps=1000)
    assert missing_for(config, fake_features()) == []


def test_missing_namespace_is_named_with_reason() -> None:
    namespaces = tuple(NamespaceSupport(n, n != "net", errno=1, reason="" if n != "net" else "EPERM here")
                       for n in NAMESPACE_FLAGS)
    missing = missing_for(SandboxConfig(), fake_features(namespaces=namespaces))
    assert missing == ["namespaces.net: a network namespace is required, but this process cannot "
                       "create one: EPERM here"]
    # Not asked for: not missing.
    config = SandboxConfig(namespaces=NamespaceConfig(net=False))
    assert missing_for(config, fake_features(namespaces=namespaces)) == []


def test_namespace_needing_user_ns_when_user_ns_is_switched_off() -> None:
    namespaces = tuple(NamespaceSupport(n, True, needs_user_ns=n != "user") for n in NAMESPACE_FLAGS)
    features = fake_features(namespaces=namespaces, euid=1000, is_root=False)
    assert missing_for(SandboxConfig(uid=1000, gid=1000), features) == []
    missing = missing_for(SandboxConfig(namespaces=NamespaceConfig(user=False)), features)
    assert len(missing) == 7
    assert all("namespaces.user = false" in m for m in missing[:6])
    assert missing[6].startswith("uid: switching to uid 65534")


def test_cgroup_limits_need_usable_controllers() -> None:
    cgroups = CgroupSupport((
        ControllerSupport("memory", "v1", "/sys/fs/cgroup/memory/x", False, "not writable"),
        ControllerSupport("cpu", "v1", "/sys/fs/cgroup/cpu", True),
    ))
    config = SandboxConfig(memory_limit_mb=128, cpu_quota_percent=100, max_processes=8)
    missing = missing_for(config, fake_features(cgroups=cgroups))
    assert len(missing) == 2
    assert missing[0].startswith("memory_limit_mb:") and "not writable" in missing[0]
    assert missing[1].startswith("max_processes:") and "pids" in missing[1]


def test_cgroup_probe_unknown_fails_closed_for_limits_only() -> None:
    # The default profile's memory limit falls back to RLIMIT_AS; its process limit
    # to RLIMIT_NPROC where that counts the sandbox alone: in its own user namespace
    # (unprivileged) or for its own host uid (as root, by default), not for a uid
    # named in the config (as root). A limit the user set is missing unless
    # rootless_limits = "rlimit" and an rlimit stands in for it.
    why = "cgroup support unknown: probe missing"
    as_root = fake_features(cgroups=None, cgroups_reason=why)
    unprivileged = fake_features(cgroups=None, cgroups_reason=why, euid=1000, is_root=False)
    assert missing_for(SandboxConfig(), unprivileged) == []
    assert missing_for(SandboxConfig(), as_root) == []
    assert missing_for(SandboxConfig(uid=65534, gid=65534, max_processes=None), as_root) == []
    assert missing_for(SandboxConfig(uid=65534, gid=65534), as_root) == [
        f"max_processes: required, but {why}, and RLIMIT_NPROC would count every process of uid 65534 "
        "on the host (no user namespace, and the uid is not the sandbox's own)"]
    missing = missing_for(SandboxConfig(io_write_bps=1 << 20, memory_limit_mb=256), unprivileged)
    assert [m.split(":")[0] for m in missing] == ["memory_limit_mb", "io_write_bps"]
    assert all(why in m and 'rootless_limits = "rlimit"' in m for m in missing)
    opted_in = SandboxConfig(memory_limit_mb=256, cpu_quota_percent=50, rootless_limits="rlimit")
    assert missing_for(opted_in, unprivileged) == []
    missing = missing_for(opted_in.replace(io_write_bps=1 << 20), unprivileged)
    assert missing == [f"io_write_bps: required, but {why}, and no rlimit stands in for an I/O limit"]


def test_seccomp_missing_is_named() -> None:
    features = fake_features(seccomp=False, seccomp_reason="the kernel lacks seccomp filters")
    assert missing_for(SandboxConfig(), features) == [
        "seccomp: a seccomp filter ('default') is required, but the kernel lacks seccomp filters"
    ]
    assert missing_for(SandboxConfig(seccomp="off"), features) == []


def test_non_linux_report_and_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("win32", "darwin"):
        monkeypatch.setattr(sys, "platform", name)
        features = probe_features()
        assert features.os == name
        assert features.namespaces == () and not features.seccomp and features.landlock_abi == 0
        assert features.fallback
        missing = missing_for(SandboxConfig(memory_limit_mb=64), features)
        assert any(m.startswith("namespaces.net:") for m in missing)
        assert any(m.startswith("seccomp:") for m in missing)
        assert any(m.startswith("memory_limit_mb:") for m in missing) == (name == "darwin")
        if name == "win32":
            assert any(m.startswith("namespaces.net: required, but no network isolation") for m in missing)
        assert "fallback backend" in format_report(features)


# ------------------------------------------------------------------ output


def test_format_report_is_an_aligned_table() -> None:
    text = format_report(fake_features())
    lines = text.splitlines()
    assert lines[0].split() == ["feature", "status", "detail"]
    status_column = lines[0].index("status")
    for line in lines[2:]:
        if not line:
            break
        assert line[status_column - 2:status_column] == "  "
    assert "landlock" in text and "ABI 7" in text
    assert "can be fully enforced" in text


def test_report_to_dict_is_json() -> None:
    data = report_to_dict(fake_features())
    decoded = json.loads(json.dumps(data))
    assert decoded["os"] == "linux"
    assert decoded["namespaces"][0]["name"] == "user"
    assert decoded["cgroups"]["controllers"][0]["name"] == "memory"
    assert decoded["missing_for_default_config"] == []


@linux_only
def test_real_report_renders() -> None:
    features = detect_features()
    text = format_report(features)
    assert "namespace net" in text
    json.dumps(report_to_dict(features))
    assert detect.__name__  # module imports cleanly


@linux_only
def test_cgroup_support_comes_from_the_cgroup_probe() -> None:
    features = probe_features()
    if features.cgroups is None:
        pytest.skip(features.cgroups_reason)
    assert isinstance(features.cgroups, CgroupSupport)
    config = SandboxConfig(memory_limit_mb=64, cpu_quota_percent=50, max_processes=8)
    controllers = [features.cgroups.get(name) for name in ("memory", "cpu", "pids")]
    expected_missing = [c for c in controllers if c is None or not c.usable]
    assert len(missing_for(config, features)) == len(expected_missing)


@linux_only
def test_cgroup_probe_import_failure_reports_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "neural_doc_flow_security.sandbox.linux.cgroups", None)
    features = probe_features()
    assert features.cgroups is None
    assert features.cgroups_reason.startswith("cgroup support unknown")
    assert missing_for(SandboxConfig(max_processes=4), features)[0].startswith("max_processes:")
