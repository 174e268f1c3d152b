"""One validation layer for every config field (issue 21, config validation): from
Python and from a profile, a wrong-typed or out-of-range value raises ConfigError
naming the field as the user wrote it, never another exception; property-tested."""

from __future__ import annotations

from typing import Any

import pytest

# In the `test` extra (scripts/setup.sh installs it); a venv made before it was added
# skips this file rather than failing the whole run's collection.
pytest.importorskip("hypothesis", reason="pip install '.[test]' (hypothesis)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from neural_doc_flow_security.sandbox.config import (
    MAX_TIMEOUT_SECONDS,
    MAX_VALUES,
    BindMount,
    CapabilityConfig,
    FilesystemConfig,
    NamespaceConfig,
    NetworkPolicy,
    SandboxConfig,
)
from neural_doc_flow_security.sandbox.errors import ConfigError

TEXT = st.text(max_size=12).filter(lambda s: s.strip().lower() != "none")
INTS = st.integers(min_value=-(2**70), max_value=2**70)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
BOOLS = st.booleans()
INT_LISTS = st.lists(INTS, max_size=3)
TABLES = st.dictionaries(st.text(max_size=5), INTS, max_size=2)

NOT_A_NUMBER = st.one_of(TEXT, BOOLS, INT_LISTS, TABLES)
NOT_A_BOOL = st.one_of(TEXT, INTS, FLOATS, INT_LISTS, TABLES)
NOT_A_STR = st.one_of(INTS, FLOATS, BOOLS, INT_LISTS, TABLES)
NOT_A_LIST = st.one_of(TEXT, INTS, FLOATS, BOOLS)


def _limit(name: str) -> st.SearchStrategy[Any]:
    """A whole-number limit: wrong types, floats, and out-of-range whole numbers."""
    highest = MAX_VALUES[name]
    return st.one_of(NOT_A_NUMBER, FLOATS, st.integers(max_value=0), st.integers(min_value=highest + 1))


# Every field (as a profile spells it) and values that must be refused for it.
WRONG: dict[str, st.SearchStrategy[Any]] = {
    **{name: _limit(name) for name in ("memory_limit_mb", "cpu_quota_percent", "max_processes", "io_read_bps",
                                       "io_write_bps", "io_read_iops", "io_write_iops")},
    "max_file_size_mb": st.one_of(NOT_A_NUMBER, FLOATS, st.integers(max_value=0)),
    "timeout_seconds": st.one_of(NOT_A_NUMBER, st.integers(max_value=0), st.floats(max_value=0),
                                 st.floats(min_value=MAX_TIMEOUT_SECONDS, exclude_min=True),
                                 st.sampled_from([float("nan"), float("inf")])),
    "max_open_files": st.one_of(NOT_A_NUMBER, FLOATS, st.integers(max_value=2),
                                st.integers(min_value=MAX_VALUES["max_open_files"] + 1)),
    "hostname": st.one_of(NOT_A_STR, st.sampled_from(["", "-x", "a_b", "x" * 64, "a.b"])),
    "uid": st.one_of(NOT_A_NUMBER, FLOATS, st.integers(max_value=-1), st.integers(min_value=2**32 - 1)),
    "gid": st.one_of(NOT_A_NUMBER, FLOATS, st.integers(max_value=-1), st.integers(min_value=2**32 - 1)),
    "id_range": st.one_of(TEXT, INTS, FLOATS, BOOLS, TABLES, st.lists(INTS, min_size=3, max_size=4),
                          st.lists(TEXT, min_size=2, max_size=2), st.tuples(st.integers(max_value=0), INTS)),
    "environment": st.one_of(NOT_A_LIST, st.lists(st.one_of(INTS, BOOLS, st.just("NO_EQUALS")), min_size=1,
                                                  max_size=3),
                             st.dictionaries(st.just("A"), st.one_of(INTS, BOOLS, FLOATS), min_size=1)),
    "seccomp": st.one_of(NOT_A_STR, st.sampled_from(["", "on", "relative.toml", "/x\0y"])),
    "no_new_privs": NOT_A_BOOL,
    "rootless_limits": st.one_of(NOT_A_STR, st.sampled_from(["", "rlimits", "CGROUP"])),
    "landlock": st.one_of(NOT_A_STR, st.sampled_from(["", "on", "AUTO"])),
    **{f"namespaces.{name}": NOT_A_BOOL for name in ("pid", "net", "mnt", "uts", "ipc", "user", "cgroup")},
    "capabilities.drop_all": NOT_A_BOOL,
    "capabilities.allowed": st.one_of(NOT_A_LIST, st.just("CAP_CHOWN"), st.lists(st.one_of(INTS, TEXT),
                                                                                   min_size=1, max_size=2)),
    "capabilities.ambient": st.one_of(NOT_A_LIST, st.just("CAP_CHOWN"), st.lists(INTS, min_size=1, max_size=2)),
    "filesystem.read_only_binds": st.one_of(NOT_A_LIST, st.just("/srv/models"), st.lists(INTS, min_size=1)),
    "filesystem.binds": st.one_of(NOT_A_LIST, st.just("/srv/out"), st.lists(INTS, min_size=1)),
    "filesystem.bind_mounts": st.one_of(NOT_A_LIST, st.lists(st.one_of(INTS, TEXT), min_size=1, max_size=2)),
    "filesystem.tmp_size_mb": st.one_of(NOT_A_NUMBER, FLOATS, st.integers(max_value=0)),
    "filesystem.python": NOT_A_BOOL,
    **{f"filesystem.{name}": st.one_of(INTS, FLOATS, BOOLS, INT_LISTS, TABLES,
                                       st.sampled_from(["relative/dir", "/a/../b", "/x\0y"]))
       for name in ("image", "overlay_keep_dir")},
    "filesystem.image_root_path": st.one_of(INTS, FLOATS, BOOLS, INT_LISTS, TABLES,
                                            st.sampled_from(["", "/rootfs", "a/../b", "x\0y", "rootfs"])),
    "filesystem.overlay": NOT_A_BOOL,
    "filesystem.overlay_size_mb": st.one_of(NOT_A_NUMBER, FLOATS, st.integers(max_value=0)),
    "filesystem.overlay_changes": st.one_of(NOT_A_STR, st.sampled_from(["", "save", "Report"])),
    **{f"network.{name}": st.one_of(NOT_A_LIST, st.lists(st.one_of(INTS, BOOLS, st.sampled_from(
        ["", " 10.0.0.1", "10.0.0.1/8", "[fd00::1", "[fd00::1]:", "a_b", "1.2.3.4:0", "1.2.3.4:70000", "x:2-1",
         "10.0.0.1:80/sctp", "fd00::1/200", "999.1.1.1"])), min_size=1, max_size=3))
       for name in ("allow", "deny")},
    "network.dns": NOT_A_BOOL,
    "network.hosts": st.one_of(INTS, FLOATS, BOOLS, st.just("a.internal"),
                               st.dictionaries(st.just("a.internal"), st.one_of(INTS, st.just(["not-an-ip"])),
                                               min_size=1),
                               st.dictionaries(st.sampled_from(["bad_name", "host", "a.internal:80"]),
                                               st.just(["10.0.0.1"]), min_size=1)),
    "network.ipv4_range": st.one_of(NOT_A_STR, st.sampled_from(["", "10.0.0.0/31", "8.8.8.0/24", "fd00::/64",
                                                                "10.0.0.1/16"])),
    "network.ipv6_range": st.one_of(NOT_A_STR, st.sampled_from(["", "fd00::/127", "2a00:1450::/64", "10.0.0.0/8"])),
    "network.method": st.one_of(NOT_A_STR, st.sampled_from(["", "nft", "PROXY", "slirp4netns"])),
}
NESTED = {"namespaces": NamespaceConfig, "capabilities": CapabilityConfig, "filesystem": FilesystemConfig,
          "network": NetworkPolicy}


def test_every_field_is_covered() -> None:
    import dataclasses

    names = {f.name for f in dataclasses.fields(SandboxConfig) if f.name not in NESTED}
    for outer, cls in NESTED.items():
        names |= {f"{outer}.{f.name}" for f in dataclasses.fields(cls)}
    assert names == set(WRONG)


def _from_python(name: str, value: Any) -> None:
    outer, _, inner = name.partition(".")
    if not inner:
        SandboxConfig(**{name: value})
    elif name.startswith("filesystem.") and name.endswith("binds") and isinstance(value, list):
        FilesystemConfig(**{inner: value})  # a list of non-BindMount entries
    else:
        SandboxConfig(**{outer: NESTED[outer](**{inner: value})})


def _from_profile(name: str, value: Any) -> None:
    outer, _, inner = name.partition(".")
    SandboxConfig.from_dict({outer: {inner: value}} if inner else {name: value})


@pytest.mark.filterwarnings("ignore:profile key namespaces.net is deprecated:FutureWarning")
@pytest.mark.parametrize("build", [_from_python, _from_profile], ids=["python", "profile"])
@pytest.mark.parametrize("name", sorted(WRONG))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_wrong_values_raise_config_error_naming_the_field(name: str, build: Any, data: st.DataObject) -> None:
    value = data.draw(WRONG[name], label=name)
    if build is _from_python and name == "environment" and isinstance(value, dict):
        pass  # a mapping is accepted from Python too; its values are still checked
    with pytest.raises(ConfigError) as info:
        build(name, value)
    assert info.value.field == name, str(info.value)


@pytest.mark.parametrize(("build", "field"), [
    (lambda: SandboxConfig(memory_limit=256), "memory_limit (did you mean memory_limit_mb?)"),
    (lambda: NamespaceConfig(network=False), "namespaces.network"),
    (lambda: CapabilityConfig(allow=["CAP_CHOWN"]), "capabilities.allow (did you mean allowed?)"),
    (lambda: SandboxConfig().replace(timeout=3), "timeout (did you mean timeout_seconds?)"),
    (lambda: BindMount("/a", readonly=False), "readonly"),
])
def test_unknown_keyword_is_a_config_error_with_a_suggestion(build: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()  # was a bare TypeError from the dataclass __init__
    assert field.split(" ")[0] == info.value.field
    assert field.split(" ", 1)[-1] in str(info.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"capabilities": {"allowed": "CAP_CHOWN"}}, "capabilities.allowed: must be a list of capability names, "
                                                  "got the string 'CAP_CHOWN'"),
    ({"filesystem": {"read_only_binds": "/srv/models"}}, "filesystem.read_only_binds: must be a list"),
    ({"environment": "FOO=1"}, "environment: must be a list"),
    ({"capabilities": {"allowed": ["cap_chown"]}}, "unknown capability cap_chown (did you mean CAP_CHOWN?)"),
    ({"capabilities": {"allowed": ["sys_admin"]}}, "unknown capability sys_admin (did you mean CAP_SYS_ADMIN?)"),
    ({"no_new_privs": "no"}, "no_new_privs: must be true or false, got 'no'"),
    ({"no_new_privs": False}, "no_new_privs: false needs seccomp = 'off'"),
    ({"environment": {"A": 1}}, "environment: entries must be"),
])
def test_the_reported_cases_are_refused_naming_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        SandboxConfig.from_dict(data)
    assert message in str(info.value)


def test_string_list_entries_are_not_read_character_by_character() -> None:
    config = SandboxConfig.from_dict({"environment": ["FOO=1", "BAR=a=b"]})
    assert config.environment == (("FOO", "1"), ("BAR", "a=b"))  # was ('F','O','O','=','1'): refused
    with pytest.raises(ConfigError, match="environment"):
        SandboxConfig(environment=["AB"])  # was read as A=B
    assert SandboxConfig(no_new_privs=False, seccomp="off").no_new_privs is False
