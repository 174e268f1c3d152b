"""SandboxConfig: secure defaults, validation that names the field, immutability,
TOML profiles and dicts, and the size/rate parsers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from neural_doc_flow_security.sandbox.config import (
    CAPABILITIES,
    DEFAULT_ENVIRONMENT,
    NOBODY,
    BindMount,
    CapabilityConfig,
    FilesystemConfig,
    NamespaceConfig,
    SandboxConfig,
    parse_rate,
    parse_size_mb,
)
from neural_doc_flow_security.sandbox.errors import ConfigError, SandboxError


def test_defaults_are_the_secure_profile() -> None:
    config = SandboxConfig()
    ns = config.namespaces
    assert (ns.pid, ns.net, ns.mnt, ns.uts, ns.ipc, ns.cgroup) == (True,) * 6
    assert ns.user is None and ns.user_enabled(1000) and not ns.user_enabled(0)
    assert config.capabilities == CapabilityConfig(drop_all=True, allowed=(), ambient=())
    assert config.filesystem.binds == () and config.filesystem.read_only_binds == ()
    assert config.filesystem.python is False
    assert config.uid is None and config.gid is None  # a sandbox id of its own (as root), else 65534
    assert config.uid_or_nobody == config.gid_or_nobody == NOBODY == 65534
    assert config.seccomp == "default"
    assert config.no_new_privs is True
    assert config.environment == DEFAULT_ENVIRONMENT
    assert {k for k, _ in config.environment} == {"PATH", "HOME", "LANG"}
    assert config.timeout_seconds is not None and config.timeout_seconds > 0
    assert config.max_open_files > 0
    # Bounded by default (issue 23 item 13): room for a document parser, not for the machine.
    assert (config.memory_limit_mb, config.max_processes, config.filesystem.tmp_size_mb,
            config.timeout_seconds) == (512, 128, 64, 30.0)
    assert config.cgroup_limits_requested
    assert config.max_file_size_mb is None and config.rootless_limits == "cgroup"


@pytest.mark.parametrize(("changes", "message"), [
    ({"memory_limit_mb": -5}, "memory_limit_mb: must be > 0, got -5"),
    ({"memory_limit_mb": 0}, "memory_limit_mb: must be > 0, got 0"),
    ({"memory_limit_mb": 1.5}, "memory_limit_mb: must be a whole number > 0 or none, got 1.5"),
    ({"memory_limit_mb": True}, "memory_limit_mb"),
    ({"cpu_quota_percent": -1}, "cpu_quota_percent: must be > 0, got -1"),
    ({"max_processes": 1}, "max_processes: must be >= 2"),
    ({"max_file_size_mb": 0}, "max_file_size_mb: must be > 0, got 0"),
    ({"rootless_limits": "ulimit"}, "rootless_limits: must be 'cgroup' or 'rlimit', got 'ulimit'"),
    ({"timeout_seconds": 0}, "timeout_seconds: must be > 0, got 0"),
    ({"timeout_seconds": -0.5}, "timeout_seconds: must be > 0, got -0.5"),
    ({"timeout_seconds": 2592000}, "timeout_seconds: must be at most 604800 (7 days"),
    ({"timeout_seconds": 1e12}, "timeout_seconds: must be at most 604800"),
    ({"timeout_seconds": float("inf")}, "timeout_seconds: must be a finite number > 0, got inf"),
    ({"timeout_seconds": float("nan")}, "timeout_seconds: must be a finite number > 0, got nan"),
    ({"timeout_seconds": True}, "timeout_seconds: must be a number > 0, got True"),
    ({"memory_limit_mb": 2**43}, "memory_limit_mb: must be at most"),
    ({"cpu_quota_percent": 10**9}, "cpu_quota_percent: must be at most"),
    ({"max_processes": 2**40}, "max_processes: must be at most"),
    ({"max_open_files": 2**40}, "max_open_files: must be at most"),
    ({"io_read_bps": 2**64}, "io_read_bps: must be at most"),
    ({"timeout_seconds": "10"}, "timeout_seconds: must be a number > 0, got '10'"),
    ({"max_open_files": 2}, "max_open_files"),
    ({"io_write_bps": -1}, "io_write_bps: must be > 0, got -1"),
    ({"hostname": "bad_name"}, "hostname: must be a DNS label"),
    ({"hostname": "-x"}, "hostname"),
    ({"uid": -1}, "uid: must be a whole number from 0 to 4294967294 or none, got -1"),
    ({"id_range": (1, 0)}, "id_range: must be (first id, count)"),
    ({"gid": 2**32 - 1}, "gid"),
    ({"environment": (("1BAD", "x"),)}, "environment: invalid variable '1BAD'"),
    ({"environment": (("K", "a\0b"),)}, "environment"),
    ({"seccomp": "strict"}, "seccomp: must be 'default', 'allow-list', 'deny-list', 'learn', 'off' or an absolute "
                             "file path, got 'strict'"),
    ({"namespaces": {"net": True}}, "namespaces: must be NamespaceConfig"),
])
def test_invalid_value_names_the_field_and_the_value(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig(**changes)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert info.value.field == next(iter(changes))
    assert isinstance(info.value, SandboxError) and isinstance(info.value, ValueError)


def test_unknown_capability_suggests_the_right_name() -> None:
    with pytest.raises(ConfigError) as info:
        CapabilityConfig(allowed=("CAP_DAC_OVERIDE",))
    assert str(info.value) == ("capabilities.allowed: unknown capability CAP_DAC_OVERIDE "
                               "(did you mean CAP_DAC_OVERRIDE?)")
    assert info.value.field == "capabilities.allowed"


def test_capability_rules() -> None:
    with pytest.raises(ConfigError, match=r"capabilities\.ambient: CAP_NET_RAW must also be in"):
        CapabilityConfig(allowed=("CAP_NET_BIND_SERVICE",), ambient=("CAP_NET_RAW",))
    with pytest.raises(ConfigError, match=r"capabilities\.drop_all"):
        CapabilityConfig(drop_all=False, allowed=("CAP_KILL",))
    with pytest.raises(ConfigError, match=r"capabilities\.ambient: unknown capability"):
        CapabilityConfig(allowed=(), ambient=("CAP_FOO",))
    caps = CapabilityConfig(allowed=["CAP_KILL"], ambient=["CAP_KILL"])  # type: ignore[arg-type]
    assert caps.allowed == ("CAP_KILL",) and caps.ambient == ("CAP_KILL",)
    assert CAPABILITIES["CAP_NET_BIND_SERVICE"] == 10
    assert CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40


def test_namespace_values_must_be_booleans() -> None:
    with pytest.raises(ConfigError, match=r"namespaces\.net: must be true or false, got 'yes'"):
        NamespaceConfig(net="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"namespaces\.pid"):
        NamespaceConfig(pid=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("source", "target", "message"), [
    ("relative", "", "source must be an absolute path, got 'relative'"),
    ("/a", "b", "target must be an absolute path, got 'b'"),
    ("/a/../etc", "", "must not contain '..'"),
    ("/a", "/", "target must not be /"),
])
def test_bind_mount_validation(source: str, target: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        BindMount(source, target)
    assert message in str(info.value)
    assert info.value.field == "filesystem.read_only_binds"
    with pytest.raises(ConfigError) as info:
        BindMount(source, target, read_only=False)
    assert info.value.field == "filesystem.binds"


def test_bind_mount_parse() -> None:
    assert BindMount.parse("/src", read_only=True) == BindMount("/src", "/src", True)
    assert BindMount.parse("/src:/dst", read_only=False) == BindMount("/src", "/dst", False)


def test_binds_need_a_mount_namespace() -> None:
    with pytest.raises(ConfigError, match=r"^filesystem: binds need namespaces\.mnt"):
        SandboxConfig(namespaces=NamespaceConfig(mnt=False),
                      filesystem=FilesystemConfig(binds=(BindMount("/data", read_only=False),)))


def test_config_is_frozen() -> None:
    config = SandboxConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory_limit_mb = 10  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.namespaces.net = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.capabilities.allowed = ("CAP_SYS_ADMIN",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.filesystem.python = True  # type: ignore[misc]
    assert isinstance(config.environment, tuple)
    assert hash(config) == hash(SandboxConfig())  # hashable: usable as a cache key


def test_replace_validates_again() -> None:
    config = SandboxConfig().replace(memory_limit_mb=128)
    assert config.memory_limit_mb == 128 and config.cgroup_limits_requested
    with pytest.raises(ConfigError, match="memory_limit_mb: must be > 0, got -1"):
        config.replace(memory_limit_mb=-1)


def test_environment_mapping_is_normalised() -> None:
    config = SandboxConfig(environment={"A": "1", "B": "2"})  # type: ignore[arg-type]
    assert config.environment == (("A", "1"), ("B", "2"))


def test_from_dict_with_nested_tables() -> None:
    config = SandboxConfig.from_dict({
        "memory_limit_mb": 256,
        "timeout_seconds": "none",
        "hostname": "worker",
        "network": "host",
        "namespaces": {"user": True},
        "capabilities": {"allowed": ["CAP_NET_BIND_SERVICE"], "ambient": ["CAP_NET_BIND_SERVICE"]},
        "filesystem": {"read_only_binds": ["/opt/models", {"source": "/srv/in", "target": "/in"}],
                       "binds": ["/srv/out:/out"], "tmp_size_mb": 16, "python": True},
        "environment": {"PATH": "/usr/bin", "MODE": "fast"},
    })
    assert config.memory_limit_mb == 256
    assert config.timeout_seconds is None
    assert config.namespaces == NamespaceConfig(net=False, user=True)
    assert config.capabilities.ambient == ("CAP_NET_BIND_SERVICE",)
    assert config.filesystem.read_only_binds == (BindMount("/opt/models"), BindMount("/srv/in", "/in"))
    assert config.filesystem.binds == (BindMount("/srv/out", "/out", read_only=False),)
    assert config.filesystem.tmp_size_mb == 16 and config.filesystem.python
    assert config.environment == (("PATH", "/usr/bin"), ("MODE", "fast"))


@pytest.mark.parametrize(("data", "message"), [
    ({"memory_limt_mb": 5}, "memory_limt_mb: unknown field (did you mean memory_limit_mb?)"),
    ({"namespaces": {"nett": False}}, "namespaces.nett: unknown field (did you mean net?)"),
    ({"filesystem": {"tmp_size": 5}}, "filesystem.tmp_size: unknown field (did you mean tmp_size_mb?)"),
    ({"capabilities": {"alowed": []}}, "capabilities.alowed: unknown field (did you mean allowed?)"),
    ({"zzzz": 1}, "zzzz: unknown field"),
    ({"namespaces": "all"}, "namespaces: must be a table, got 'all'"),
    ({"filesystem": {"binds": [5]}}, "filesystem.binds: entries must be 'SRC[:DST]' or a table, got 5"),
    ({"capabilities": {"allowed": ["CAP_DAC_OVERIDE"]}},
     "capabilities.allowed: unknown capability CAP_DAC_OVERIDE (did you mean CAP_DAC_OVERRIDE?)"),
])
def test_from_dict_errors_name_the_dotted_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_dict(data)
    assert message in str(info.value)


def test_from_dict_unknown_field_without_a_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_dict({"zzzz": 1})
    assert "did you mean" not in str(info.value)


def test_from_toml(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text(
        'memory_limit_mb = 512\ncpu_quota_percent = 50\nseccomp = "default"\nnetwork = "host"\n'
        '[capabilities]\nallowed = ["CAP_NET_BIND_SERVICE"]\n'
        '[filesystem]\nread_only_binds = ["/usr/share/dict:/dict"]\ntmp_size_mb = 8\n'
        '[environment]\nPATH = "/usr/bin"\n'
    )
    config = SandboxConfig.from_toml(profile)
    assert config == SandboxConfig(
        memory_limit_mb=512, cpu_quota_percent=50,
        namespaces=NamespaceConfig(net=False),
        capabilities=CapabilityConfig(allowed=("CAP_NET_BIND_SERVICE",)),
        filesystem=FilesystemConfig(read_only_binds=(BindMount("/usr/share/dict", "/dict"),), tmp_size_mb=8),
        environment=(("PATH", "/usr/bin"),),
    )
    assert SandboxConfig.from_toml(str(profile)) == config


def test_from_toml_errors_name_the_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_toml(tmp_path / "missing.toml")
    assert info.value.field == "profile" and "missing.toml" in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("memory_limit_mb = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        SandboxConfig.from_toml(bad)
    bad.write_text("[namespaces]\nipcc = true\n")
    with pytest.raises(ConfigError, match=r"namespaces\.ipcc: unknown field \(did you mean ipc\?\)"):
        SandboxConfig.from_toml(bad)
    bad.write_text("memory_limit_mb = -5\n")
    with pytest.raises(ConfigError, match="^memory_limit_mb: must be > 0, got -5$"):
        SandboxConfig.from_toml(bad)


@pytest.mark.parametrize(("text", "mib"), [
    ("256", 256), ("256M", 256), ("256m", 256), ("256MiB", 256), ("256MB", 256), ("1G", 1024),
    ("2g", 2048), ("1024K", 1), ("1K", 1), ("1500K", 2), (" 64M ", 64),
])
def test_parse_size_mb(text: str, mib: int) -> None:
    assert parse_size_mb(text, "memory_limit_mb") == mib


@pytest.mark.parametrize("text", ["", "-5", "abc", "1T", "1.5G", "0", "0M", "M"])
def test_parse_size_mb_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size_mb(text, "memory_limit_mb")
    assert info.value.field == "memory_limit_mb"
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(("text", "bps"), [
    ("100", 100), ("10K", 10 * 1024), ("10M", 10 * 1024**2), ("1G", 1024**3), ("5mb", 5 * 1024**2),
])
def test_parse_rate(text: str, bps: int) -> None:
    assert parse_rate(text, "io_read_bps") == bps


@pytest.mark.parametrize("text", ["fast", "-1", "0", "0K", "10M/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rate(text, "io_write_bps")
    assert info.value.field == "io_write_bps"
    assert repr(text) in str(info.value)
