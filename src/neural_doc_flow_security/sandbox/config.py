"""Sandbox configuration: frozen dataclasses, validation, and TOML profiles.

Every value is checked when the object is built; a bad value raises ConfigError
naming the field (as a dotted path), the value, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Linux capability numbers (include/uapi/linux/capability.h).
CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        """
        CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETGID
        CAP_SETUID CAP_SETPCAP CAP_LINUX_IMMUTABLE CAP_NET_BIND_SERVICE CAP_NET_BROADCAST CAP_NET_ADMIN
        CAP_NET_RAW CAP_IPC_LOCK CAP_IPC_OWNER CAP_SYS_MODULE CAP_SYS_RAWIO CAP_SYS_CHROOT
        CAP_SYS_PTRACE CAP_SYS_PACCT CAP_SYS_ADMIN CAP_SYS_BOOT CAP_SYS_NICE CAP_SYS_RESOURCE
        CAP_SYS_TIME CAP_SYS_TTY_CONFIG CAP_MKNOD CAP_LEASE CAP_AUDIT_WRITE CAP_AUDIT_CONTROL
        CAP_SETFCAP CAP_MAC_OVERRIDE CAP_MAC_ADMIN CAP_SYSLOG CAP_WAKE_ALARM CAP_BLOCK_SUSPEND
        CAP_AUDIT_READ CAP_PERFMON CAP_BPF CAP_CHECKPOINT_RESTORE
        """.split()
    )
}

NOBODY = 65534
# As root each live sandbox gets a host uid/gid of its own from this range (linux/ids.py):
# high, below 2**31 (some tools take ids as signed), clear of systemd's container ranges.
DEFAULT_ID_RANGE = (2_000_000_000, 2000)
# The default profile's limits: room for a document parser (a PDF or OCR engine),
# not for exhausting the machine. Unprivileged without a cgroup, these (and only
# these, unless rootless_limits = "rlimit") are enforced by rlimits instead.
DEFAULT_MEMORY_LIMIT_MB = 512
DEFAULT_MAX_PROCESSES = 128
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_TMP_SIZE_MB = 64
OVERLAY_CHANGES = ("discard", "report", "keep")
ROOTLESS_LIMITS = ("cgroup", "rlimit")
BIND_OWNERS = ("sandbox", "caller")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEFAULT_ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", "/tmp"),
    ("LANG", "C.UTF-8"),
)


def _suggest(value: str, choices: Iterable[str]) -> str:
    import difflib  # only on the error path: keeps `ndf-sandbox run` quick to start

    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# The largest value of each numeric field: what the kernel (cgroup files, rlimits,
# pid_max) and the event loops (a timeout must fit a poll() of the zygote, the
# launcher and asyncio) accept. A larger one would fail far from the config, inside
# a zygote; each limit is generous for any real use.
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_VALUES: dict[str, int] = {
    "memory_limit_mb": (2**63 - 1) >> 20,  # memory.max / memory.limit_in_bytes take an int64 of bytes
    "cpu_quota_percent": 100 * 4096,  # 4,096 CPUs (the quota in microseconds per 100 ms period)
    "max_processes": 4 * 1024 * 1024,  # PID_MAX_LIMIT
    "max_open_files": 1 << 20,  # the default fs.nr_open
    "io_read_bps": 2**63 - 1,
    "io_write_bps": 2**63 - 1,
    "io_read_iops": 2**63 - 1,
    "io_write_iops": 2**63 - 1,
    "filesystem.tmp_size_mb": (2**63 - 1) >> 20,
    "filesystem.overlay_size_mb": (2**63 - 1) >> 20,
}


def _positive(field_name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field_name, f"must be a number > 0, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(field_name, f"must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ConfigError(field_name, f"must be > 0, got {value!r}")
    highest = MAX_TIMEOUT_SECONDS if field_name == "timeout_seconds" else MAX_VALUES.get(field_name)
    if highest is not None and value > highest:
        days = " (7 days; none means no timeout)" if field_name == "timeout_seconds" else ""
        raise ConfigError(field_name, f"must be at most {highest}{days}, got {value!r}")


def _capability_names(field_name: str, names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(field_name, f"entries must be capability names, got {name!r}")
        if name not in CAPABILITIES:
            spelled = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
            hint = f" (did you mean {spelled}?)" if spelled in CAPABILITIES else _suggest(spelled, CAPABILITIES)
            raise ConfigError(field_name, f"unknown capability {name}{hint}")


def _sequence(field_name: str, value: Any, what: str) -> tuple[Any, ...]:
    """`value` as a tuple; a string (which would be read one character at a time),
    a mapping or a scalar is refused."""
    if isinstance(value, (str, bytes)):
        raise ConfigError(field_name, f"must be a list of {what}, got the string {value!r} "
                                      f"(write [{value!r}] for a list of one)")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(field_name, f"must be a list of {what}, got {value!r}")
    return tuple(value)


class _KnownFields:
    """Refuses unknown keyword arguments with a ConfigError naming them (with a
    suggestion), instead of the dataclass __init__'s bare TypeError."""

    _prefix = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in kwargs:
            if key not in names:
                raise ConfigError(f"{cls._prefix}{key}", f"unknown field of {cls.__name__}{_suggest(key, names)}")
        if len(args) > len(names):
            raise ConfigError(cls.__name__, f"takes at most {len(names)} values, got {len(args)}")
        return super().__new__(cls)


def _environment(value: Any) -> tuple[tuple[str, str], ...]:
    """`environment` as (name, value) pairs: from a mapping, (name, value) pairs or
    "NAME=value" strings; anything else is refused, naming the entry."""
    if isinstance(value, Mapping):
        value = tuple(value.items())
    pairs = []
    for entry in _sequence("environment", value, "(name, value) pairs or 'NAME=value' strings"):
        if isinstance(entry, str) and "=" in entry:
            entry = tuple(entry.split("=", 1))
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(isinstance(s, str) for s in entry)):
            raise ConfigError("environment", f"entries must be (name, value) strings or 'NAME=value', got {entry!r}")
        name, text = entry
        if not _ENV_NAME.match(name):
            raise ConfigError("environment", f"invalid variable {name!r}")
        if "\0" in text:
            raise ConfigError("environment", f"the value of {name} must not contain a NUL byte")
        pairs.append((name, text))
    return tuple(pairs)


@dataclass(frozen=True)
class NamespaceConfig(_KnownFields):
    """Which Linux namespaces the sandbox gets. `net=True` means a new, empty network
    namespace (only loopback). `user=None` means: on when not running as root.
    A profile says `network = "none" | "host"` instead of `[namespaces] net` (the
    CLI's word: "host" is net=False); the old key still loads, with a FutureWarning."""

    _prefix = "namespaces."

    pid: bool = True
    net: bool = True
    mnt: bool = True
    uts: bool = True
    ipc: bool = True
    user: bool | None = None
    cgroup: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, bool) or (f.name == "user" and value is None)):
                raise ConfigError(f"namespaces.{f.name}", f"must be true or false, got {value!r}")

    def user_enabled(self, euid: int) -> bool:
        """Whether a user namespace is used when running with effective uid `euid`."""
        return self.user if self.user is not None else euid != 0


@dataclass(frozen=True)
class CapabilityConfig(_KnownFields):
    """Capabilities of the payload. `allowed` stay in the bounding, permitted and
    effective sets; `ambient` ones also survive exec for a non-root uid."""

    _prefix = "capabilities."

    drop_all: bool = True
    allowed: tuple[str, ...] = ()
    ambient: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", _sequence("capabilities.allowed", self.allowed, "capability names"))
        object.__setattr__(self, "ambient", _sequence("capabilities.ambient", self.ambient, "capability names"))
        if not isinstance(self.drop_all, bool):
            raise ConfigError("capabilities.drop_all", f"must be true or false, got {self.drop_all!r}")
        _capability_names("capabilities.allowed", self.allowed)
        _capability_names("capabilities.ambient", self.ambient)
        if not self.drop_all and (self.allowed or self.ambient):
            raise ConfigError(
                "capabilities.drop_all",
                "false keeps every capability; `allowed`/`ambient` only make sense with true",
            )
        missing = [c for c in self.ambient if c not in self.allowed]
        if missing:
            raise ConfigError(
                "capabilities.ambient",
                f"{', '.join(missing)} must also be in capabilities.allowed",
            )


@dataclass(frozen=True)
class BindMount(_KnownFields):
    """A host path made visible inside the sandbox at `target` (default: same path).

    `owner`, for a writable bind: who owns, on the host, the files the sandbox
    creates there. "sandbox" (the default) leaves them to the sandbox's own uid/gid:
    as root that is the launch's id from `id_range`, so the directory must be
    writable by it (or `uid` set), and no other sandbox or host user shares it.
    "caller" makes them belong to the uid/gid of the process that starts the
    sandbox, so a bound output directory of the caller just works: as root an
    idmapped mount maps the sandbox's uid/gid, and only them, to the caller's (the
    sandbox keeps its own unprivileged uid; it can give files no other owner); the
    file system must support idmapped mounts (ext4, xfs, btrfs, tmpfs do), else the
    launch fails naming it. Without root the sandbox's uid is the caller's already
    (a user namespace), so both values mean the caller. "caller" is not the default
    because as root the caller is root: every file in the bind that the caller owns
    becomes writable by the sandbox; bind a directory meant for its output."""

    source: str
    target: str = ""
    read_only: bool = True
    owner: str = "sandbox"

    def __post_init__(self) -> None:
        kind = "read_only_binds" if self.read_only is True else "binds"
        if not isinstance(self.read_only, bool):
            raise ConfigError(f"filesystem.{kind}", f"read_only must be true or false, got {self.read_only!r}")
        if not isinstance(self.owner, str) or self.owner not in BIND_OWNERS:
            raise ConfigError(f"filesystem.{kind}", f"owner must be 'sandbox' or 'caller', got {self.owner!r}")
        if self.read_only and self.owner != "sandbox":
            raise ConfigError(f"filesystem.{kind}", f"owner = {self.owner!r} is for a writable bind "
                              "(read_only = false): the sandbox creates no file in a read-only one")
        if self.target == "":
            object.__setattr__(self, "target", self.source)
        for name in ("source", "target"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(f"filesystem.{kind}", f"{name} must be an absolute path, got {value!r}")
            if ".." in value.split("/"):
                raise ConfigError(f"filesystem.{kind}", f"{name} must not contain '..', got {value!r}")
            if "\0" in value:
                raise ConfigError(f"filesystem.{kind}", f"{name} must not contain a NUL byte, got {value!r}")
        if os.path.normpath(self.target) == "/":
            raise ConfigError(f"filesystem.{kind}", "target must not be / (the root is read-only)")

    @classmethod
    def parse(cls, spec: str, *, read_only: bool) -> BindMount:
        """Parse the CLI form SRC[:DST]."""
        source, _, target = spec.partition(":")
        return cls(source=source, target=target, read_only=read_only)


@dataclass(frozen=True)
class FilesystemConfig(_KnownFields):
    """The sandbox's file system: a read-only root built from system directories,
    plus these binds, a private /tmp of `tmp_size_mb`, and the Python
    installation when `python` is true (needed to run Python callables).

    `bind_mounts` is one ordered list of binds, each read-only or not as its
    BindMount says; `read_only_binds` and `binds` are the older two-list form, taken
    before it (see `all_binds`). A bind's parent is always mounted before what is
    below it, whatever the order; of two binds on one target, the later is on top.
    A bind's source must be its real path: no component may be a symlink.

    `image`: an unpacked root file system (a directory, or an OCI bundle: its
    config.json's root.path, `rootfs` by default) that becomes the sandbox's root,
    read-only, instead of the host's system directories; the usual /proc, /dev and
    /tmp and the binds go on top, and /etc/passwd, group, hosts and hostname are
    synthesized where the image lacks them. It runs programs, not Python callables.
    `image_root_path`: with an OCI bundle as `image`, its root.path as already read
    (from_oci_bundle sets it): the bundle's config.json is then not read again at
    launch, so a change to it after the bundle was checked is not seen.

    `overlay`: the root is copy-on-write (overlayfs): writes anywhere succeed and
    land in a tmpfs of `overlay_size_mb` (default: `tmp_size_mb`) inside the sandbox,
    never on the host. `overlay_changes`: "discard" (default), "report" (the result
    lists the paths created, modified and deleted) or "keep" (also copied, without
    device nodes, set-id bits or symlink following on the host, into the new host
    directory `overlay_keep_dir`, or a new tar archive if its name ends in .tar)."""

    _prefix = "filesystem."

    read_only_binds: tuple[BindMount, ...] = ()
    binds: tuple[BindMount, ...] = ()
    tmp_size_mb: int = DEFAULT_TMP_SIZE_MB
    python: bool = False
    bind_mounts: tuple[BindMount, ...] = ()
    image: str | None = None
    image_root_path: str | None = None
    overlay: bool = False
    overlay_size_mb: int | None = None
    overlay_changes: str = "discard"
    overlay_keep_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("read_only_binds", "binds", "bind_mounts"):
            binds = _sequence(f"filesystem.{name}", getattr(self, name), "BindMount")
            object.__setattr__(self, name, binds)
            for bind in binds:
                if not isinstance(bind, BindMount):
                    raise ConfigError(f"filesystem.{name}", f"entries must be BindMount, got {bind!r}")
        if isinstance(self.tmp_size_mb, float) or not isinstance(self.python, bool):
            name, value = ("tmp_size_mb", self.tmp_size_mb) if isinstance(self.tmp_size_mb, float) \
                else ("python", self.python)
            kind = "a whole number > 0" if name == "tmp_size_mb" else "true or false"
            raise ConfigError(f"filesystem.{name}", f"must be {kind}, got {value!r}")
        _positive("filesystem.tmp_size_mb", self.tmp_size_mb, allow_none=False)
        for name in ("image", "overlay_keep_dir"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
                raise ConfigError(f"filesystem.{name}", f"must be an absolute path, got {value!r}")
            if ".." in value.split("/"):
                raise ConfigError(f"filesystem.{name}", f"must not contain '..', got {value!r}")
        path = self.image_root_path
        if path is not None and (self.image is None or not isinstance(path, str) or not path or "\0" in path
                                 or path.startswith("/") or ".." in path.split("/")):
            raise ConfigError("filesystem.image_root_path", "must be a path beneath filesystem.image (relative, "
                              f"no '..') and needs it, got {path!r}")
        if not isinstance(self.overlay, bool):
            raise ConfigError("filesystem.overlay", f"must be true or false, got {self.overlay!r}")
        if isinstance(self.overlay_size_mb, float):
            raise ConfigError("filesystem.overlay_size_mb", f"must be a whole number > 0, got {self.overlay_size_mb!r}")
        _positive("filesystem.overlay_size_mb", self.overlay_size_mb)
        if self.overlay_changes not in OVERLAY_CHANGES:
            raise ConfigError("filesystem.overlay_changes",
                              f"must be one of {', '.join(map(repr, OVERLAY_CHANGES))}, got {self.overlay_changes!r}")
        if self.overlay_changes != "discard" and not self.overlay:
            raise ConfigError("filesystem.overlay_changes", f"{self.overlay_changes!r} needs overlay = true")
        if (self.overlay_changes == "keep") != (self.overlay_keep_dir is not None):
            raise ConfigError("filesystem.overlay_keep_dir", "is the host directory that overlay_changes = 'keep' "
                              f"copies the changes into: give both or neither (got {self.overlay_keep_dir!r})")
        if self.image is not None and self.python:
            raise ConfigError("filesystem.image", "an image root cannot hold the host's Python installation "
                              "(python = true, a Python callable): run a program in it")

    @property
    def overlay_mb(self) -> int:
        """The size cap of the overlay's upper layer, in MiB."""
        return self.overlay_size_mb if self.overlay_size_mb is not None else self.tmp_size_mb

    @property
    def all_binds(self) -> tuple[BindMount, ...]:
        """Every bind, in order: `read_only_binds`, `binds`, then `bind_mounts`."""
        return self.read_only_binds + self.binds + self.bind_mounts


NETWORK_METHODS = ("auto", "veth", "proxy")
"""The values of NetworkPolicy.method."""
DEFAULT_NET_RANGE = "10.213.0.0/16"
DEFAULT_NET_RANGE6 = "fd8d:f1c3:a1e2::/48"


def _destinations(field_name: str, value: Any) -> tuple[str, ...]:
    from .netdest import parse_destination

    entries = []
    for entry in _sequence(field_name, value, "destinations like '10.0.3.2:8080'"):
        try:
            entries.append(str(parse_destination(entry)))
        except ValueError as e:
            raise ConfigError(field_name, f"{entry!r}: {e}") from None
    return tuple(dict.fromkeys(entries))


def _hosts(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`network.hosts` as (name, addresses) pairs: from a mapping or pairs."""
    import ipaddress

    from .netdest import parse_destination

    if isinstance(value, Mapping):
        value = tuple(value.items())
    pairs = []
    for entry in _sequence("network.hosts", value, "(name, [addresses]) pairs"):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ConfigError("network.hosts", f"entries must be name = [addresses], got {entry!r}")
        name, addresses = entry
        try:
            parsed = parse_destination(name)
        except ValueError as e:
            raise ConfigError("network.hosts", f"{name!r}: {e}") from None
        if parsed.name is None or parsed.is_host or parsed.ports or parsed.protocol:
            raise ConfigError("network.hosts", f"keys must be DNS names, got {name!r}")
        addresses = _sequence("network.hosts", addresses, f"addresses (for {name})")
        try:
            normalized = tuple(str(ipaddress.ip_address(a)) for a in addresses)
        except ValueError as e:
            raise ConfigError("network.hosts", f"{name}: {e}") from None
        pairs.append((parsed.name, normalized))
    return tuple(pairs)


@dataclass(frozen=True)
class NetworkPolicy(_KnownFields):
    """Which endpoints the sandbox may reach (as root: a veth pair to the host,
    nftables rules inside the sandbox's network namespace and on the host; see
    linux/netpolicy.py). Everything not allowed is dropped, and each denied attempt
    is counted in the result's security_events.

    `allow`/`deny`: destinations like "10.0.3.2:8080", "[fd00::2]:443/tcp",
    "192.0.2.0/24:1000-2000/udp", "model-server.internal:443", "host" (every address
    of the host, its loopback and bridges included); names are resolved by the host
    at launch. A deny entry wins over an allow entry. The host and the link-local /
    metadata ranges (169.254.0.0/16, fe80::/10) are denied unless an allow entry
    names them ("host", an address or CIDR inside them).
    `dns`: the sandbox gets a resolver (on the host's end of its link) that answers
    only the allowed names, with the addresses resolved at launch.
    `hosts`: names with fixed addresses (not looked up), like /etc/hosts.
    `ipv4_range`/`ipv6_range`: private ranges the sandboxes' links take their
    addresses from (a /30 and a /126 each).
    `method`: how the policy is enforced: "veth" (the veth pair and nftables, as
    root), "proxy" (a connect proxy on the host, linux/connect_proxy.py: the sandbox
    keeps only loopback and reaches allowed TCP endpoints through HTTP CONNECT or
    SOCKS5 at 127.0.0.1:3128; no UDP, no `dns`), "auto" (the default: "veth" as
    root without a user namespace, else "proxy")."""

    _prefix = "network."

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    dns: bool = False
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    ipv4_range: str = DEFAULT_NET_RANGE
    ipv6_range: str = DEFAULT_NET_RANGE6
    method: str = "auto"

    def __post_init__(self) -> None:
        import ipaddress

        object.__setattr__(self, "allow", _destinations("network.allow", self.allow))
        object.__setattr__(self, "deny", _destinations("network.deny", self.deny))
        object.__setattr__(self, "hosts", _hosts(self.hosts))
        if not isinstance(self.dns, bool):
            raise ConfigError("network.dns", f"must be true or false, got {self.dns!r}")
        for name, version, longest in (("ipv4_range", 4, 30), ("ipv6_range", 6, 126)):
            value = getattr(self, name)
            try:
                net = ipaddress.ip_network(value, strict=True) if isinstance(value, str) else None
            except ValueError:
                net = None
            if net is None or net.version != version or net.prefixlen > longest or not net.is_private:
                raise ConfigError(f"network.{name}", f"must be a private IPv{version} CIDR of /{longest} or "
                                  f"larger, got {value!r}")
            object.__setattr__(self, name, str(net))
        if self.method not in NETWORK_METHODS:
            raise ConfigError("network.method", f"must be one of {', '.join(map(repr, NETWORK_METHODS))}, "
                              f"got {self.method!r}")
        problem = self.proxy_problem() if self.method == "proxy" else None
        if problem is not None:
            raise ConfigError(*problem)

    def proxy_problem(self) -> tuple[str, str] | None:
        """What of this policy the connect proxy cannot enforce, as (field, why), or
        None: it carries TCP only and has no resolver inside the sandbox (fail closed)."""
        from .netdest import parse_destination

        if self.dns:
            return ("network.dns", "true needs a resolver inside the sandbox; the connect proxy (network.method "
                    "'proxy') has none: names resolve through it (socks5h://, CONNECT name:port)")
        for entry in self.allow:
            if parse_destination(entry).protocol == "udp":
                return ("network.allow", f"{entry!r} allows UDP; the connect proxy (network.method 'proxy') "
                        "carries TCP only")
        return None

    @property
    def names(self) -> tuple[str, ...]:
        """The DNS names the policy allows (what its resolver answers)."""
        from .netdest import parse_destination

        return tuple(dict.fromkeys(d.name for d in map(parse_destination, self.allow)
                                   if d.name is not None and not d.is_host))


SECCOMP_PROFILES = ("default", "allow-list", "deny-list", "learn", "off")
"""The built-in values of SandboxConfig.seccomp (besides an absolute profile path)."""


@dataclass(frozen=True)
class SandboxConfig(_KnownFields):
    """Everything one sandbox enforces. The defaults are the secure profile: every
    namespace, no network, a read-only root, all capabilities dropped, seccomp on,
    an unprivileged uid, a clean environment, and bounded resources (512 MiB of
    memory, 128 processes, a 64 MiB /tmp, 30 s wall time). Resource limits set here
    are required: if this host cannot enforce one, the sandbox refuses to start,
    naming the field.

    `uid`/`gid`: None (the default) gives each live sandbox, as root, a host id of
    its own from `id_range` (first, count), so that per-uid kernel limits are not
    shared between sandboxes; without root the sandbox runs in a user namespace as
    uid/gid 65534 mapped to the caller's own. A number: that id, for every sandbox.

    `cpu_quota_percent`: 100 means one full CPU, 50 half of one, 200 two CPUs.
    `seccomp`: "default" (the allow-list for callables, the deny-list for commands),
    "allow-list", "deny-list", "learn" (let every syscall through but the deny list's
    and record each one: `result.security_events` of kind "learned_syscall"), "off",
    or an absolute path to a .toml/.json profile (linux/seccomp.py).
    `no_new_privs`: False needs `seccomp="off"` (the kernel takes a seccomp filter
    from a process without CAP_SYS_ADMIN only under no_new_privs).
    Every field is checked for its type and range; an unknown keyword is a
    ConfigError naming it, with a suggestion.
    `max_file_size_mb`: the largest file a process may write (RLIMIT_FSIZE): writable
    binds have no quota otherwise.
    `rootless_limits`: how limits are enforced where no cgroup can be made (an
    unprivileged user without a delegated cgroup subtree). "cgroup" (default): a limit
    the user set is refused there; the default profile's memory and process limits
    fall back to rlimits (weaker, and the result's isolation says so). "rlimit": every
    limit falls back to an rlimit: memory to RLIMIT_AS (per process address space),
    processes to RLIMIT_NPROC (counted in the sandbox's own user namespace), CPU quota
    to RLIMIT_CPU (CPU seconds per process: the quota's share of the wall timeout).
    `landlock`: "auto" applies a Landlock ruleset derived from the mounts where the
    kernel has Landlock (else the isolation report names it as not enforced),
    "required" refuses to start without it, "off" does without.
    """

    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB
    cpu_quota_percent: int | None = None
    timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS
    max_processes: int | None = DEFAULT_MAX_PROCESSES
    max_open_files: int = 256
    max_file_size_mb: int | None = None
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None
    namespaces: NamespaceConfig = field(default_factory=NamespaceConfig)
    capabilities: CapabilityConfig = field(default_factory=CapabilityConfig)
    filesystem: FilesystemConfig = field(default_factory=FilesystemConfig)
    hostname: str = "sandbox"
    uid: int | None = None
    gid: int | None = None
    id_range: tuple[int, int] = DEFAULT_ID_RANGE
    environment: tuple[tuple[str, str], ...] = DEFAULT_ENVIRONMENT
    seccomp: str = "default"
    no_new_privs: bool = True
    rootless_limits: str = "cgroup"
    landlock: str = "auto"
    network: NetworkPolicy | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "environment", _environment(self.environment))
        for name in ("memory_limit_mb", "cpu_quota_percent", "max_processes", "io_read_bps",
                     "io_write_bps", "io_read_iops", "io_write_iops", "max_file_size_mb"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(name, f"must be a whole number > 0 or none, got {value!r}")
            _positive(name, value)
        _positive("timeout_seconds", self.timeout_seconds)
        _positive("max_open_files", self.max_open_files, allow_none=False)
        if isinstance(self.max_open_files, float) or self.max_open_files < 3:
            raise ConfigError("max_open_files", f"must be a whole number >= 3, got {self.max_open_files!r}")
        for name, cls in (("namespaces", NamespaceConfig), ("capabilities", CapabilityConfig),
                          ("filesystem", FilesystemConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(name, f"must be {cls.__name__}, got {getattr(self, name)!r}")
        if not isinstance(self.hostname, str) or not _HOSTNAME.match(self.hostname):
            raise ConfigError("hostname", f"must be a DNS label (letters, digits, '-'), got {self.hostname!r}")
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < 2**32 - 1):
                raise ConfigError(name, f"must be a whole number from 0 to 4294967294 or none, got {value!r}")
        if isinstance(self.id_range, list):
            object.__setattr__(self, "id_range", tuple(self.id_range))
        if (not isinstance(self.id_range, tuple) or len(self.id_range) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.id_range)
                or self.id_range[0] < 1 or not 1 <= self.id_range[1] <= 65536
                or self.id_range[0] + self.id_range[1] > 2**32 - 1):
            raise ConfigError("id_range", "must be (first id, count): first >= 1, 1 <= count <= 65536, "
                              f"first + count <= 4294967295, got {self.id_range!r}")
        if not isinstance(self.seccomp, str) or "\0" in self.seccomp or not (
            self.seccomp in SECCOMP_PROFILES or self.seccomp.startswith("/")
        ):
            raise ConfigError("seccomp", "must be 'default', 'allow-list', 'deny-list', 'learn', 'off' or an "
                              f"absolute file path, got {self.seccomp!r}")
        if not isinstance(self.no_new_privs, bool):
            raise ConfigError("no_new_privs", f"must be true or false, got {self.no_new_privs!r}")
        if not isinstance(self.rootless_limits, str) or self.rootless_limits not in ROOTLESS_LIMITS:
            raise ConfigError("rootless_limits", f"must be 'cgroup' or 'rlimit', got {self.rootless_limits!r}")
        if self.landlock not in ("auto", "required", "off"):
            raise ConfigError("landlock", f"must be 'auto', 'required' or 'off', got {self.landlock!r}")
        if self.landlock == "required" and not (self.namespaces.mnt and self.no_new_privs):
            raise ConfigError("landlock", "'required' needs namespaces.mnt = true (the rules follow the mounts) "
                              "and no_new_privs = true")
        if self.network is not None:
            if not isinstance(self.network, NetworkPolicy):
                raise ConfigError("network", f"must be a NetworkPolicy or none, got {self.network!r}")
            if not self.namespaces.net:
                raise ConfigError("network", "a network policy needs the sandbox's own network namespace "
                                  "(namespaces.net = true; not --net)")
        if self.max_processes is not None and self.max_processes < 2:
            raise ConfigError("max_processes",
                              f"must be >= 2 (the sandbox's init and the payload), got {self.max_processes}")
        if not self.namespaces.mnt and self.filesystem.all_binds:
            raise ConfigError("filesystem", "binds need namespaces.mnt = true")
        for name in ("image", "overlay"):
            if not self.namespaces.mnt and getattr(self.filesystem, name):
                raise ConfigError(f"filesystem.{name}", "needs namespaces.mnt = true")
        if self.seccomp == "off" and any(bind.owner == "caller" for bind in self.filesystem.all_binds):
            raise ConfigError("filesystem", "a bind with owner = 'caller' needs seccomp: its set-id rule keeps "
                              "the sandbox from making set-id files there that the host would own as the caller")
        if not self.no_new_privs and self.seccomp != "off":
            raise ConfigError("no_new_privs", "false needs seccomp = 'off': the kernel installs a seccomp "
                              "filter only for a process with no_new_privs (the sandbox drops CAP_SYS_ADMIN first)")

    @property
    def cgroup_limits_requested(self) -> bool:
        """Whether any limit needs a cgroup."""
        return any(
            getattr(self, name) is not None
            for name in ("memory_limit_mb", "cpu_quota_percent", "max_processes", "io_read_bps",
                         "io_write_bps", "io_read_iops", "io_write_iops")
        )

    @property
    def uid_or_nobody(self) -> int:
        """`uid`, or 65534 where no per-sandbox id is given (fallbacks, user namespaces)."""
        return NOBODY if self.uid is None else self.uid

    @property
    def gid_or_nobody(self) -> int:
        """`gid`, or 65534 where no per-sandbox id is given (fallbacks, user namespaces)."""
        return NOBODY if self.gid is None else self.gid

    def replace(self, **changes: Any) -> SandboxConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxConfig:
        """Build a config from a mapping shaped like the dataclasses (a parsed profile)."""
        config: SandboxConfig = _from_mapping(cls, data, "")
        return config

    @classmethod
    def from_oci_bundle(cls, path: str | os.PathLike[str], *, ignore_unsupported: bool = False,
                        trust_bundle: bool = False) -> SandboxConfig:
        """The config of an OCI runtime bundle (config.json + its root): its root as
        `filesystem.image`, its limits, namespaces, capabilities and seccomp list (see
        oci.py). A field this sandbox does not implement is an error naming it unless
        `ignore_unsupported`; a bundle asking for weaker protection than the defaults
        (capabilities, noNewPrivileges false, a shared namespace) is refused unless
        `trust_bundle`. The process to run: `oci.load_bundle(path).args`."""
        from .oci import bundle_config

        return bundle_config(path, ignore_unsupported=ignore_unsupported, trust_bundle=trust_bundle)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> SandboxConfig:
        """Load a TOML profile; errors name the file and the field."""
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError("profile", f"cannot read {os.fspath(path)!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("profile", f"{os.fspath(path)!r} is not valid TOML: {e}") from None
        return cls.from_dict(data)


NETWORK_CHOICES = ("none", "host")


def _network_key(data: Mapping[str, Any]) -> dict[str, Any]:
    """A profile's `network = "none" | "host"` (the word --net/--no-net use) turned into
    namespaces.net; the older `namespaces.net` (true meant *no* network) still works,
    with a FutureWarning."""
    data = dict(data)
    namespaces = data.get("namespaces")
    old = isinstance(namespaces, Mapping) and "net" in namespaces
    if old:
        import warnings

        warnings.warn("profile key namespaces.net is deprecated: write network = \"none\" (a new, empty "
                      "network namespace) or network = \"host\" (the host's network)", FutureWarning,
                      stacklevel=4)
    if "network" not in data:
        return data
    network = data.pop("network")
    if isinstance(network, Mapping):  # a policy: the sandbox's own namespace, with a link to the host
        data["network"] = network
        network = "none"
    elif not isinstance(network, str) or network not in NETWORK_CHOICES:
        raise ConfigError("network", f"must be \"none\", \"host\" or a policy table {{allow = [...], "
                          f"deny = [...], dns = true}}, got {network!r}")
    if old:
        raise ConfigError("network", "give network or the deprecated namespaces.net, not both")
    if namespaces is not None and not isinstance(namespaces, Mapping):
        return data  # refused below, naming `namespaces`
    data["namespaces"] = {**(namespaces or {}), "net": network == "none"}
    return data


def _from_mapping(cls: type[Any], data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "profile", f"must be a table, got {data!r}")
    if cls is SandboxConfig:
        data = _network_key(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    import typing

    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", f"unknown field{_suggest(key, fields)}")
        hint = hints[key]
        if hint in (NamespaceConfig, CapabilityConfig, FilesystemConfig):
            value = _from_mapping(hint, value, f"{prefix}{key}.")
        elif cls is SandboxConfig and key == "network":
            value = _from_mapping(NetworkPolicy, value, "network.")
        elif key in ("read_only_binds", "binds", "bind_mounts"):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{prefix}{key}", f"must be a list, got {value!r}")
            value = tuple(_bind_from_profile(v, key) for v in value)
        elif value == "none" and type(None) in typing.get_args(hint):
            value = None
        kwargs[key] = value
    return cls(**kwargs)


_BIND_TABLE_KEYS = ("source", "target", "owner", "read_only")


def _bind_from_profile(value: Any, key: str) -> BindMount:
    """One entry of a profile's bind list `key`: 'SRC[:DST]' (not in bind_mounts), or a
    table {source, target} (bind_mounts: also read_only, default true)."""
    field_name = f"filesystem.{key}"
    read_only = key == "read_only_binds"
    if isinstance(value, str) and key != "bind_mounts":
        return BindMount.parse(value, read_only=read_only)
    if isinstance(value, Mapping):
        # read_only only in bind_mounts (the older lists say it by their name); owner in writable lists
        allowed = _BIND_TABLE_KEYS if key == "bind_mounts" else _BIND_TABLE_KEYS[:3 if key == "binds" else 2]
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise ConfigError(field_name, f"unknown key {unknown[0]!r} in a bind table (allowed: {', '.join(allowed)})")
        if key == "bind_mounts":
            read_only = value.get("read_only", True)
            if not isinstance(read_only, bool):
                raise ConfigError(field_name, f"read_only must be true or false, got {read_only!r}")
        try:
            return BindMount(source=value.get("source", ""), target=value.get("target", ""), read_only=read_only,
                             owner=value.get("owner", "sandbox"))
        except ConfigError as e:  # named after the list the entry is in
            raise ConfigError(field_name, str(e).split(": ", 1)[1]) from None
    form = "a table {source, target, owner, read_only}" if key == "bind_mounts" else "'SRC[:DST]' or a table"
    raise ConfigError(field_name, f"entries must be {form}, got {value!r}")


_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]?)(i?[bB])?$")


def parse_size_mb(text: str, field_name: str) -> int:
    """Parse '256M', '1G', '512' (MiB) into MiB."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ConfigError(field_name, f"must be a size like 256M or 1G, got {text!r}")
    number, unit = int(match.group(1)), match.group(2).upper()
    mib = {"": number, "K": -(-number // 1024), "M": number, "G": number * 1024}[unit]
    if mib <= 0:
        raise ConfigError(field_name, f"must be > 0, got {text!r}")
    return mib


def parse_rate(text: str, field_name: str) -> int:
    """Parse a byte rate like '10M' (per second) into bytes per second."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ConfigError(field_name, f"must be a rate like 10M (bytes per second), got {text!r}")
    number, unit = int(match.group(1)), match.group(2).upper()
    value = number * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]
    if value <= 0:
        raise ConfigError(field_name, f"must be > 0, got {text!r}")
    return value
