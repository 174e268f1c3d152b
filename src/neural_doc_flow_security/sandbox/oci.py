"""OCI runtime bundles: a bundle's config.json as a SandboxConfig, and back.

`load_bundle(path)` maps the fields of the runtime spec this sandbox implements
(process, root, hostname, mounts, linux.namespaces, linux.resources,
linux.seccomp, maskedPaths, readonlyPaths) onto a SandboxConfig whose
`filesystem.image` is the bundle. Every other field is an error naming it as
the spec spells it (`linux.sysctl`), unless `ignore_unsupported`: then it is
listed in `OciBundle.not_enforced` (and the isolation report's `not_enforced`).

The sandbox's own hardening stays on unless the bundle asks otherwise and the
caller allows it (`trust_bundle`): capabilities, `noNewPrivileges: false`, a
namespace left out (the host's shared) and a bind of a host path outside the
bundle are refused without it, naming the field, and a limit (memory, CPU,
processes, open files, file size, I/O) above the caller's stays the caller's
(listed in not_enforced); a bundle's seccomp rules are
added to the default list, never replace it. A bundle without
`noNewPrivileges` or `linux.seccomp` keeps ours (runc would run without).

`spec_from_config(config)` writes the config.json equivalent of a profile (for
runc, crun or podman), as far as the spec can say it (see the README).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .config import NOBODY, BindMount, CapabilityConfig, SandboxConfig
from .errors import ConfigError

_MAX_CONFIG_BYTES = 1 << 20
_NAMESPACES = {"pid": "pid", "network": "net", "mount": "mnt", "uts": "uts", "ipc": "ipc", "user": "user",
               "cgroup": "cgroup"}
_RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE")
# Mounts the sandbox always makes itself (fresh /proc, minimal /dev, private /tmp).
_OWN_MOUNTS = {"/proc": "proc", "/dev": "tmpfs", "/dev/pts": "devpts", "/dev/shm": "tmpfs", "/tmp": "tmpfs"}


class OciError(ConfigError):
    """A bundle field this sandbox does not implement or may not apply; `field` is
    its path in config.json (`linux.sysctl`, `process.capabilities`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


@dataclass(frozen=True)
class OciBundle:
    """A bundle, mapped: the config, the process to run and what is not enforced."""

    config: SandboxConfig
    args: tuple[str, ...]
    cwd: str
    not_enforced: tuple[str, ...] = ()


class _Mapper:
    """Reads one config.json, collecting what it cannot apply."""

    def __init__(self, spec: Mapping[str, Any], bundle: str, ignore_unsupported: bool, trust_bundle: bool) -> None:
        self.spec, self.bundle = spec, bundle
        self.ignore_unsupported, self.trust_bundle = ignore_unsupported, trust_bundle
        self.not_enforced: list[str] = []

    def unsupported(self, field: str, why: str = "not implemented by this sandbox") -> None:
        if not self.ignore_unsupported:
            raise OciError(field, f"{why} (--ignore-unsupported / ignore_unsupported=True runs without it)")
        self.not_enforced.append(f"oci {field}: {why}")

    def weaker(self, field: str, what: str) -> None:
        if not self.trust_bundle:
            raise OciError(field, f"the bundle asks for {what}, weaker than the sandbox's default: allow it "
                                  "with --trust-bundle (trust_bundle=True)")

    def limit(self, field: str, config: SandboxConfig, name: str, value: int) -> int:
        """`value` for the limit `name`, at most the caller's (`config`'s) unless the
        bundle is trusted: a bundle may tighten a limit, not lift it."""
        ours = getattr(config, name)
        if self.trust_bundle or ours is None or value <= ours:
            return value
        self.not_enforced.append(f"oci {field}: {value} is above the sandbox's {name} = {ours}, which stays "
                                 "(--trust-bundle / trust_bundle=True applies the bundle's)")
        return int(ours)

    def known(self, table: Mapping[str, Any], prefix: str, keys: tuple[str, ...]) -> None:
        for key in table:
            if key not in keys:
                self.unsupported(prefix + key)


def _table(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OciError(field, f"must be an object, got {value!r}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OciError(field, f"must be a list, got {value!r}")
    return value


def read_spec(bundle: str) -> dict[str, Any]:
    """The bundle's config.json (bounded, never through a symlink): the one reader of
    it, for load_bundle and for a bundle given as `filesystem.image` (rootfs.image_root)."""
    path = os.path.join(bundle, "config.json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise OciError("config.json", f"cannot open {path!r}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_CONFIG_BYTES + 1)
    if len(data) > _MAX_CONFIG_BYTES:
        raise OciError("config.json", f"{path!r} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        spec = json.loads(data)
    except ValueError as e:
        raise OciError("config.json", f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise OciError("config.json", f"{path!r}: the top level must be an object")
    return spec


def root_path(spec: Mapping[str, Any], default: str | None = None) -> str:
    """The spec's root.path (`default` when it has none), checked: a path beneath the
    bundle (relative, no '..')."""
    path = _table(spec.get("root"), "root").get("path", default)
    if not isinstance(path, str) or not path or "\0" in path or path.startswith("/") or ".." in path.split("/"):
        raise OciError("root.path", f"must be a path beneath the bundle (relative, no '..'), got {path!r}")
    return path


def load_bundle(path: str | os.PathLike[str], *, ignore_unsupported: bool = False,
                trust_bundle: bool = False, base: SandboxConfig | None = None) -> OciBundle:
    """Map the bundle at `path` onto `base` (default: SandboxConfig())."""
    bundle = os.path.realpath(os.fspath(path))
    spec = read_spec(bundle)
    m = _Mapper(spec, bundle, ignore_unsupported, trust_bundle)
    m.known(spec, "", ("ociVersion", "process", "root", "hostname", "mounts", "linux", "annotations"))
    version = spec.get("ociVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise OciError("ociVersion", f"must be a 1.x version, got {version!r}")
    config = base or SandboxConfig()
    process = _table(spec.get("process"), "process")
    args, cwd, config = _process(m, process, config)
    config = _root(m, spec, config)
    if "hostname" in spec:
        config = replace(config, hostname=spec["hostname"])
    linux = _table(spec.get("linux"), "linux")
    m.known(linux, "linux.", ("namespaces", "resources", "seccomp", "maskedPaths", "readonlyPaths",
                              "cgroupsPath", "devices"))
    config = _namespaces(m, linux, config)
    config = _mounts(m, _list(spec.get("mounts"), "mounts"), config)
    config = _resources(m, _table(linux.get("resources"), "linux.resources"), config)
    config = _seccomp(m, linux.get("seccomp"), config)
    _paths(m, linux)
    for device in _list(linux.get("devices"), "linux.devices"):
        m.unsupported("linux.devices", f"device node {_table(device, 'linux.devices').get('path')!r} (the "
                      "sandbox's /dev holds null, zero, full, random, urandom and a private devpts only)")
    return OciBundle(config, args, cwd, tuple(m.not_enforced))


def _process(m: _Mapper, process: Mapping[str, Any], config: SandboxConfig
             ) -> tuple[tuple[str, ...], str, SandboxConfig]:
    m.known(process, "process.", ("terminal", "consoleSize", "user", "args", "env", "cwd", "capabilities",
                                  "rlimits", "noNewPrivileges"))
    if process.get("terminal"):
        raise OciError("process.terminal", "true is not supported: the sandbox never hands a terminal to "
                                           "its program (see the README, CLI)")
    args = _list(process.get("args"), "process.args")
    if not args or not all(isinstance(a, str) for a in args):
        raise OciError("process.args", f"must be a non-empty list of strings, got {args!r}")
    cwd = process.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise OciError("process.cwd", f"must be an absolute path, got {cwd!r}")
    env = _list(process.get("env"), "process.env")
    pairs = []
    for item in env:
        if not isinstance(item, str) or "=" not in item:
            raise OciError("process.env", f"entries must be 'NAME=value', got {item!r}")
        name, _, value = item.partition("=")
        pairs.append((name, value))
    changes: dict[str, Any] = {"environment": tuple(pairs)}
    user = _table(process.get("user"), "process.user")
    m.known(user, "process.user.", ("uid", "gid", "additionalGids"))
    if user.get("additionalGids"):
        m.unsupported("process.user.additionalGids", "supplementary groups are always dropped")
    if "uid" in user:
        changes["uid"] = user["uid"]
        changes["gid"] = user.get("gid", user["uid"])
    rlimits = _list(process.get("rlimits"), "process.rlimits")
    for limit in rlimits:
        limit = _table(limit, "process.rlimits")
        kind, hard = limit.get("type"), limit.get("hard")
        if kind not in _RLIMITS or not isinstance(hard, int):
            m.unsupported(f"process.rlimits.{kind}")
        elif kind == "RLIMIT_NOFILE":
            changes["max_open_files"] = m.limit("process.rlimits.RLIMIT_NOFILE", config, "max_open_files", hard)
        elif kind == "RLIMIT_FSIZE":
            changes["max_file_size_mb"] = m.limit("process.rlimits.RLIMIT_FSIZE", config, "max_file_size_mb",
                                                  max(1, hard >> 20))
        elif hard != 0:
            m.weaker("process.rlimits.RLIMIT_CORE", "core dumps")
            m.unsupported("process.rlimits.RLIMIT_CORE", "core dumps stay off")
    caps = _table(process.get("capabilities"), "process.capabilities")
    m.known(caps, "process.capabilities.", ("bounding", "effective", "permitted", "inheritable", "ambient"))
    sets = {name: tuple(_list(caps.get(name), f"process.capabilities.{name}")) for name in
            ("bounding", "effective", "permitted", "inheritable", "ambient")}
    granted = tuple(dict.fromkeys(sets["bounding"] + sets["effective"] + sets["permitted"]))
    if granted or sets["ambient"]:
        m.weaker("process.capabilities", f"capabilities {', '.join(granted or sets['ambient'])}")
        if len({frozenset(sets[n]) for n in ("bounding", "effective", "permitted")}) > 1:
            m.unsupported("process.capabilities", "bounding, effective and permitted sets that differ (the "
                          "sandbox grants their union in each)")
        changes["capabilities"] = CapabilityConfig(drop_all=True, allowed=granted, ambient=sets["ambient"])
    nnp = process.get("noNewPrivileges")
    if nnp is False:
        m.weaker("process.noNewPrivileges", "noNewPrivileges = false")
        changes["no_new_privs"] = False
    try:
        config = replace(config, **changes)
    except ConfigError as e:
        raise OciError("process", str(e)) from None
    return tuple(args), cwd, config


def _root(m: _Mapper, spec: Mapping[str, Any], config: SandboxConfig) -> SandboxConfig:
    root = _table(spec.get("root"), "root")
    m.known(root, "root.", ("path", "readonly"))
    path = root_path(spec)
    # readonly = false: runc writes into the bundle's rootfs; here the writes land in a
    # copy-on-write layer inside the sandbox and are discarded (filesystem.overlay).
    overlay = root.get("readonly") is False
    if overlay:
        m.not_enforced.append("oci root.readonly: false gives a copy-on-write root (filesystem.overlay): "
                              "writes are discarded, never written into the bundle")
    # root.path as read here travels on: the launch does not read config.json again.
    fs = replace(config.filesystem, image=m.bundle, image_root_path=path,
                 overlay=config.filesystem.overlay or overlay, python=False)
    return replace(config, filesystem=fs)


def _namespaces(m: _Mapper, linux: Mapping[str, Any], config: SandboxConfig) -> SandboxConfig:
    entries = _list(linux.get("namespaces"), "linux.namespaces")
    wanted: dict[str, bool] = {}
    for entry in entries:
        entry = _table(entry, "linux.namespaces")
        kind = entry.get("type")
        if kind not in _NAMESPACES:
            m.unsupported(f"linux.namespaces.{kind}")
            continue
        if entry.get("path"):
            m.unsupported(f"linux.namespaces.{kind}.path", "joining an existing namespace")
            continue
        wanted[_NAMESPACES[kind]] = True
    ns = config.namespaces
    changes: dict[str, Any] = {}
    for kind, field in _NAMESPACES.items():
        if field == "user":  # the sandbox decides: a user namespace whenever it runs without root
            continue
        if not wanted.get(field) and getattr(ns, field):
            if field == "mnt":
                raise OciError("linux.namespaces", "a bundle without a mount namespace cannot have its own root")
            m.weaker(f"linux.namespaces.{kind}", f"the host's {kind} namespace (no {kind} entry)")
            changes[field] = False
    return replace(config, namespaces=replace(ns, **changes)) if changes else config


def _mount_options(mount: Mapping[str, Any], i: int) -> list[str]:
    options = _list(mount.get("options"), f"mounts[{i}].options")
    if not all(isinstance(o, str) for o in options):
        raise OciError(f"mounts[{i}].options", "must be strings")
    return options


def _mounts(m: _Mapper, mounts: list[Any], config: SandboxConfig) -> SandboxConfig:
    binds: list[BindMount] = []
    fs = config.filesystem
    for i, mount in enumerate(mounts):
        mount = _table(mount, f"mounts[{i}]")
        destination, kind = mount.get("destination"), mount.get("type")
        options = _mount_options(mount, i)
        if not isinstance(destination, str) or not destination.startswith("/"):
            raise OciError(f"mounts[{i}].destination", f"must be an absolute path, got {destination!r}")
        destination = os.path.normpath(destination)
        if kind == "bind" or "bind" in options or "rbind" in options:
            source = mount.get("source")
            if not isinstance(source, str):
                raise OciError(f"mounts[{i}].source", f"must be a path, got {source!r}")
            source = os.path.normpath(os.path.join(m.bundle, source))  # relative: to the bundle
            if not (source + "/").startswith(m.bundle + "/"):
                m.weaker(f"mounts[{i}].source", f"the host path {source!r} (outside the bundle)")
            try:
                binds.append(BindMount(source, destination, read_only="rw" not in options))
            except ConfigError as e:
                raise OciError(f"mounts[{i}]", str(e)) from None
        elif _OWN_MOUNTS.get(destination) == kind:
            if destination == "/tmp":
                size = next((o[5:] for o in options if o.startswith("size=")), None)
                if size is not None:
                    from .config import parse_size_mb

                    fs = replace(fs, tmp_size_mb=parse_size_mb(size, f"mounts[{i}].options"))
        elif kind == "mqueue" and destination == "/dev/mqueue":
            m.not_enforced.append("oci mounts /dev/mqueue: not mounted (POSIX message queues stay in the "
                                  "sandbox's own IPC namespace)")
        elif destination.startswith("/sys"):
            m.unsupported(f"mounts[{i}] ({destination}, {kind})", "the sandbox has no /sys")
        else:
            m.unsupported(f"mounts[{i}] ({destination}, {kind})", "only bind mounts and the sandbox's own "
                          "/proc, /dev, /dev/pts, /dev/shm and /tmp")
    return replace(config, filesystem=replace(fs, bind_mounts=fs.bind_mounts + tuple(binds)))


def _resources(m: _Mapper, resources: Mapping[str, Any], config: SandboxConfig) -> SandboxConfig:
    m.known(resources, "linux.resources.", ("memory", "cpu", "pids", "blockIO", "devices"))
    changes: dict[str, Any] = {}
    memory = _table(resources.get("memory"), "linux.resources.memory")
    m.known(memory, "linux.resources.memory.", ("limit", "swap", "disableOOMKiller"))
    if isinstance(memory.get("limit"), int) and memory["limit"] > 0:
        changes["memory_limit_mb"] = m.limit("linux.resources.memory.limit", config, "memory_limit_mb",
                                             max(1, math.ceil(memory["limit"] / (1 << 20))))
    if memory.get("swap") not in (None, memory.get("limit"), 0, -1):
        m.unsupported("linux.resources.memory.swap", "swap is not limited apart from memory")
    if memory.get("disableOOMKiller"):
        m.unsupported("linux.resources.memory.disableOOMKiller")
    cpu = _table(resources.get("cpu"), "linux.resources.cpu")
    m.known(cpu, "linux.resources.cpu.", ("quota", "period", "shares", "cpus", "mems"))
    quota, period = cpu.get("quota"), cpu.get("period", 100_000)
    if isinstance(quota, int) and quota > 0 and isinstance(period, int) and period > 0:
        changes["cpu_quota_percent"] = m.limit("linux.resources.cpu.quota", config, "cpu_quota_percent",
                                               max(1, round(quota * 100 / period)))
    for key in ("shares", "cpus", "mems"):
        if key in cpu:
            m.unsupported(f"linux.resources.cpu.{key}")
    pids = _table(resources.get("pids"), "linux.resources.pids")
    m.known(pids, "linux.resources.pids.", ("limit",))
    if isinstance(pids.get("limit"), int) and pids["limit"] > 0:
        changes["max_processes"] = m.limit("linux.resources.pids.limit", config, "max_processes", pids["limit"])
    block = _table(resources.get("blockIO"), "linux.resources.blockIO")
    m.known(block, "linux.resources.blockIO.", ("throttleReadBpsDevice", "throttleWriteBpsDevice",
                                                "throttleReadIOPSDevice", "throttleWriteIOPSDevice"))
    for key, field in (("throttleReadBpsDevice", "io_read_bps"), ("throttleWriteBpsDevice", "io_write_bps"),
                       ("throttleReadIOPSDevice", "io_read_iops"), ("throttleWriteIOPSDevice", "io_write_iops")):
        rates = {_table(d, f"linux.resources.blockIO.{key}").get("rate") for d in
                 _list(block.get(key), f"linux.resources.blockIO.{key}")}
        if len(rates) > 1:
            m.unsupported(f"linux.resources.blockIO.{key}", "different rates per device (the sandbox has one "
                          "rate for every device)")
        elif rates and isinstance(rate := next(iter(rates)), int):
            changes[field] = m.limit(f"linux.resources.blockIO.{key}", config, field, rate)
    for rule in _list(resources.get("devices"), "linux.resources.devices"):
        if _table(rule, "linux.resources.devices").get("allow"):
            m.unsupported("linux.resources.devices", "a device cgroup rule that allows access")
    try:
        return replace(config, **changes)
    except ConfigError as e:
        raise OciError("linux.resources", str(e)) from None


_ERRNO_ACTIONS = ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD")


def _seccomp(m: _Mapper, value: Any, config: SandboxConfig) -> SandboxConfig:
    """A deny-list profile (defaultAction SCMP_ACT_ALLOW) is added to the sandbox's
    default list; an allow-list profile, argument conditions and other actions are
    not implemented (with ignore_unsupported: the default list alone)."""
    if value is None:
        return config
    seccomp = _table(value, "linux.seccomp")
    m.known(seccomp, "linux.seccomp.", ("defaultAction", "architectures", "syscalls", "flags"))
    if seccomp.get("defaultAction") != "SCMP_ACT_ALLOW":
        m.unsupported("linux.seccomp.defaultAction", f"{seccomp.get('defaultAction')!r}: only a deny list "
                      "(SCMP_ACT_ALLOW by default) is implemented; the sandbox's default profile is in force")
        return config
    deny: list[str] = []
    kill = False
    for i, rule in enumerate(_list(seccomp.get("syscalls"), "linux.seccomp.syscalls")):
        rule = _table(rule, f"linux.seccomp.syscalls[{i}]")
        action, names = rule.get("action"), _list(rule.get("names"), f"linux.seccomp.syscalls[{i}].names")
        if rule.get("args"):
            m.unsupported(f"linux.seccomp.syscalls[{i}].args", "argument conditions")
        elif action == "SCMP_ACT_ALLOW":
            continue  # allowed unless the sandbox's own list denies it
        elif action in _ERRNO_ACTIONS:
            deny += [n for n in names if isinstance(n, str)]
            kill = kill or action != "SCMP_ACT_ERRNO"
        else:
            m.unsupported(f"linux.seccomp.syscalls[{i}].action", repr(action))
    from .linux.seccomp import default_profile

    deny = sorted(set(deny) - {name for name, match in default_profile().deny.items() if match == "always"})
    if not deny:
        return config  # the sandbox's default list denies them all already
    if config.seccomp != "default":
        m.unsupported("linux.seccomp", f"the caller's profile {config.seccomp!r} stays in force")
        return config
    profile = {"extends": "default", "deny": deny, "action": "kill" if kill else "errno"}
    return replace(config, seccomp=_profile_file(profile))


def _profile_file(profile: dict[str, Any]) -> str:
    """The profile as a JSON file named by its content, in a private directory of this
    user under TMPDIR (the same bundle reuses the name, and the compiled filter cached
    by it). What is there is never trusted: a sandbox that can write the directory (a
    writable bind of it as this uid) could have put an empty deny list in the file, so
    unless the file holds exactly this profile it is written again before use."""
    import hashlib

    from .private_dir import make_private_directory

    text = json.dumps(profile, sort_keys=True).encode()
    directory = os.path.join(tempfile.gettempdir(), f"ndf-oci-seccomp-{os.geteuid()}")
    path = os.path.join(directory, hashlib.sha256(text).hexdigest()[:32] + ".json")
    try:
        if not make_private_directory(directory):
            raise OciError("linux.seccomp", f"{directory!r} is not a private directory of this user")
        if _read_no_follow(path, len(text)) != text:
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            os.replace(tmp, path)
    except OSError as e:
        raise OciError("linux.seccomp", f"cannot write the bundle's deny list into {directory!r}: "
                                        f"{e.strerror or e}") from None
    return path


def _read_no_follow(path: str, size: int) -> bytes | None:
    """Up to `size` + 1 bytes of the regular file `path`, or None (missing, a link, not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(size + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _paths(m: _Mapper, linux: Mapping[str, Any]) -> None:
    """maskedPaths and readonlyPaths are what the sandbox does anyway, or errors."""
    from .linux.rootfs import PROC_MASKED_DIRS, PROC_MASKED_FILES, PROC_READ_ONLY

    masked = {f"/proc/{name}" for name in PROC_MASKED_FILES + PROC_MASKED_DIRS}
    read_only = {f"/proc/{name}" for name in PROC_READ_ONLY}
    for key, covered in (("maskedPaths", masked), ("readonlyPaths", read_only | masked)):
        for path in _list(linux.get(key), f"linux.{key}"):
            if not isinstance(path, str):
                raise OciError(f"linux.{key}", f"entries must be paths, got {path!r}")
            path = os.path.normpath(path)
            if path in covered or path == "/sys" or path.startswith("/sys/"):
                continue  # masked by the sandbox (it has no /sys at all)
            if path.startswith("/proc/") and not os.path.lexists(path):
                continue  # not on this kernel
            if key == "readonlyPaths" and not path.startswith(("/proc", "/dev", "/tmp")):
                continue  # the image root is read-only
            m.unsupported(f"linux.{key} {path}")


# ------------------------------------------------------------------ profile -> config.json


def spec_from_config(config: SandboxConfig, args: tuple[str, ...] = ("sh",)) -> dict[str, Any]:
    """The config.json equivalent of `config` (root.path "rootfs"), for runc and its kin."""
    from .linux import seccomp
    from .linux.rootfs import PROC_MASKED_DIRS, PROC_MASKED_FILES, PROC_READ_ONLY

    caps = sorted(config.capabilities.allowed) if config.capabilities.drop_all else _all_capabilities()
    fs = config.filesystem
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", f"size={fs.tmp_size_mb}m"]},
    ]
    mounts += [{"destination": b.target, "type": "bind", "source": b.source,
                "options": ["rbind", "nosuid", "nodev", "ro" if b.read_only else "rw"]} for b in fs.all_binds]
    rlimits = [{"type": "RLIMIT_NOFILE", "hard": config.max_open_files, "soft": config.max_open_files},
               {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
    if config.max_file_size_mb is not None:
        size = config.max_file_size_mb << 20
        rlimits.append({"type": "RLIMIT_FSIZE", "hard": size, "soft": size})
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if config.memory_limit_mb is not None:
        resources["memory"] = {"limit": config.memory_limit_mb << 20}
    if config.cpu_quota_percent is not None:
        resources["cpu"] = {"quota": config.cpu_quota_percent * 1000, "period": 100_000}
    if config.max_processes is not None:
        resources["pids"] = {"limit": config.max_processes}
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": config.uid if config.uid is not None else NOBODY,
                     "gid": config.gid if config.gid is not None else NOBODY},
            "args": list(args),
            "env": [f"{k}={v}" for k, v in config.environment],
            "cwd": "/",
            "capabilities": {name: caps for name in ("bounding", "effective", "permitted", "inheritable")}
            | {"ambient": sorted(config.capabilities.ambient)},
            "rlimits": rlimits,
            "noNewPrivileges": config.no_new_privs,
        },
        "root": {"path": "rootfs", "readonly": not fs.overlay},
        "hostname": config.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": kind} for kind, field in _NAMESPACES.items()
                           if field != "user" and getattr(config.namespaces, field)],
            "resources": resources,
            "maskedPaths": [f"/proc/{n}" for n in PROC_MASKED_FILES + PROC_MASKED_DIRS] + ["/sys"],
            "readonlyPaths": [f"/proc/{n}" for n in PROC_READ_ONLY],
        },
    }
    if config.seccomp != "off":
        profile = seccomp.profile_for(config.seccomp)
        always = sorted(name for name, match in profile.deny.items() if match == "always")
        denials = {"names": always, "action": "SCMP_ACT_ERRNO", "errnoRet": profile.errno}
        if profile.allow is None:
            spec["linux"]["seccomp"] = {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [denials],
            }
        else:  # an allow-list: every other syscall fails with ENOSYS
            spec["linux"]["seccomp"] = {
                "defaultAction": "SCMP_ACT_ERRNO",
                "defaultErrnoRet": errno.ENOSYS,
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": sorted(profile.allow - set(always)), "action": "SCMP_ACT_ALLOW"}, denials],
            }
        spec["annotations"] = {"org.neural-doc-flow.seccomp": "the sandbox's argument checks (set-id modes, "
                               "clone flags, socket families, terminal ioctls) have no equivalent here"}
    return spec


def _all_capabilities() -> list[str]:
    from .config import CAPABILITIES

    return sorted(CAPABILITIES)


def bundle_config(path: str | os.PathLike[str], **options: Any) -> SandboxConfig:
    """SandboxConfig.from_oci_bundle: the config alone (see load_bundle)."""
    return load_bundle(path, **options).config


__all__ = ["OciBundle", "OciError", "bundle_config", "load_bundle", "read_spec", "root_path", "spec_from_config"]
