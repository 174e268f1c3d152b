"""`ndf-sandbox`: the command line over the same engine as the Python API.

    ndf-sandbox run [limits...] -- CMD ARGS...   run a program in a fresh sandbox
    ndf-sandbox check [--json]                   what this host can enforce
    ndf-sandbox cleanup                          remove the leftovers of dead managers
    ndf-sandbox oci run|spec ...                 run an OCI bundle, or write a profile as config.json
    ndf-sandbox demo [--json] [--cluster dask|ray]   a document pipeline with hostile plugins

Exit status of `run`: the program's own code; 128+N when it was killed by
signal N; 124 on timeout; 125 when the kernel OOM-killed it; 127 when the
program does not exist (as in a shell); 126 when the sandbox could not be set
up (a protection could not be applied, or the program cannot be executed);
123 on a protocol violation; 2 for a bad command line or profile.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .config import (
    BindMount,
    CapabilityConfig,
    NetworkPolicy,
    SandboxConfig,
    parse_rate,
    parse_size_mb,
)
from .errors import ConfigError, SandboxError
from .result import EXIT_SANDBOX_ERROR

EXIT_USAGE = 2
EXIT_NOT_FOUND = 127  # like a shell's "command not found"
AUDIT_SANDBOX_ID = 1  # the one sandbox of a run, in its audit events
AUDIT_PLUGIN_ID = "ndf-sandbox run"
NO_LIMIT = ("none", "unlimited")
_ZERO = re.compile(r"^0+(\.0*)?\s*([kKmMgG]?i?[bB]?)$")

RUN_EXAMPLES = """examples:
  ndf-sandbox run -- /bin/echo hello
  ndf-sandbox run --memory 1G --timeout 120 --ro-bind /srv/in:/in --bind /srv/out:/out \\
      --bind-owner caller -- pdftotext /in/a.pdf /out/a.txt   # a.txt is yours on the host
  ndf-sandbox run --net --timeout none -- curl -sI https://example.org
  ndf-sandbox run --profile parser.toml --json-result /tmp/result.json -- ./parse doc.pdf

Limits take "none" (or "unlimited") for no limit; 0 is refused, as in the Python API.
Exit status: the program's own; 128+N killed by signal N; 124 timeout; 125 OOM-killed;
127 program not found; 126 set-up failed (a protection could not be applied, or the
program cannot be executed); 123 protocol violation; 2 bad command line or profile."""


def _optional(value: str, field: str, parse: Any) -> Any:
    """`value` parsed, or None for "none"/"unlimited". 0 is refused: the API takes no
    0-means-unlimited either, and a limit of 0 read as "no limit" would surprise."""
    if value.strip().lower() in NO_LIMIT:
        return None
    if _ZERO.match(value.strip()):
        raise ConfigError(field, f"must be > 0, got {value!r} (write none for no limit)")
    return parse(value)


class _BindOption(argparse.Action):
    """Collects --ro-bind, --bind, --ro-bind-to and --bind-to into one list, in order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        specs = [*(getattr(namespace, self.dest, None) or []), (option_string, values)]
        setattr(namespace, self.dest, specs)


def _bind_from_option(option: str, value: str | list[str], owner: str) -> BindMount:
    read_only = option.startswith("--ro-")
    owner = "sandbox" if read_only else owner
    if isinstance(value, str):
        bind = BindMount.parse(value, read_only=read_only)
        return BindMount(bind.source, bind.target, read_only, owner)
    return BindMount(source=value[0], target=value[1], read_only=read_only, owner=owner)


RUN_DESCRIPTION = ("Run CMD in a fresh sandbox. Defaults are the secure profile, bounded: 512M memory, 128 "
                   "processes, a 64M /tmp, 30 s wall time (cgroups; without one, as an unprivileged user, the "
                   "default memory and process limits are rlimits, see --rootless-limits). Options override "
                   "the --profile, which overrides the defaults.")


def _build_run_parser(sub: Any) -> None:
    _add_run_arguments(sub.add_parser("run", help="run a program in a fresh sandbox", description=RUN_DESCRIPTION,
                                      epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter))


class _RecordedOption:
    """One add_argument call of the `run` parser, as _parse_run_fast reads it."""

    def __init__(self, flags: tuple[str, ...], kwargs: dict[str, Any], group: int) -> None:
        self.flags = flags
        self.action = kwargs.get("action", "store")
        long = next((flag for flag in flags if flag.startswith("--")), flags[0])
        self.dest = kwargs.get("dest") or long.lstrip("-").replace("-", "_")  # as argparse names it
        self.default = kwargs.get("default", {"store_true": False, "store_false": True}.get(self.action))
        self.takes_value = self.action not in ("store_true", "store_false")
        # What the fast parser reads as argparse does; anything else (nargs=2 as in
        # --bind-to, the REMAINDER, other actions, SUPPRESS, const) is left to argparse.
        self.plain = (kwargs.get("nargs") is None and "const" not in kwargs
                      and self.action in ("store", "store_true", "store_false", "append", _BindOption)
                      and self.default is not argparse.SUPPRESS)
        self.required = bool(kwargs.get("required"))
        self.type = kwargs.get("type")
        self.choices = kwargs.get("choices")
        self.group = group  # > 0: of a mutually exclusive group


class _Recorder:
    """Stands in for the `run` parser to record its options: the fast parser's table
    comes from the very calls that build the argparse parser."""

    def __init__(self, options: list[_RecordedOption], group: int = 0) -> None:
        self.options = options
        self.group = group

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        self.options.append(_RecordedOption(flags, kwargs, self.group))

    def add_mutually_exclusive_group(self) -> _Recorder:
        return _Recorder(self.options, group=len(self.options) + 1)


def _parse_run_fast(argv: list[str]) -> argparse.Namespace | None:
    """`run`'s command line (what follows `run`) parsed as argparse would, without
    building its parser (which costs `ndf-sandbox run` milliseconds), for the plain
    forms only: options spelled in full, `--opt VALUE` or `--opt=VALUE`, then the
    command. None for anything else (help, an abbreviation, a value that starts with
    "-", nargs=2, a bad value or choice): argparse then parses it, and reports its
    errors, itself."""
    options: list[_RecordedOption] = []
    _add_run_arguments(_Recorder(options))  # type: ignore[arg-type]  # records the same calls
    if any(option.required for option in options):
        return None  # argparse alone says which is missing
    by_flag = {flag: option for option in options for flag in option.flags}
    values: dict[str, Any] = {}
    for recorded in options:  # the first default of a dest wins, as in argparse
        default = recorded.default
        values.setdefault(recorded.dest, list(default) if isinstance(default, list) else default)
    groups_used: dict[int, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-"):
            values["command"] = argv[i:]
            break
        flag, eq, inline = arg.partition("=")
        found = by_flag.get(flag)
        if found is None or not found.plain or (eq and not inline):
            return None
        option = found
        if option.group and groups_used.setdefault(option.group, flag) != flag:
            return None  # two options of one exclusive group: argparse's error
        if not option.takes_value:
            if eq:
                return None
            values[option.dest] = option.action == "store_true"
            i += 1
            continue
        if eq:
            value = inline
        elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            i += 1
            value = argv[i]
        else:
            return None
        if option.type is not None:
            try:
                value = option.type(value)
            except Exception:  # noqa: BLE001 - argparse reports it, as it would have
                return None
        if option.choices is not None and value not in option.choices:
            return None
        if option.action == "append":
            values[option.dest] = [*(values[option.dest] or []), value]
        elif option.action is _BindOption:
            values[option.dest] = [*(values[option.dest] or []), (flag, value)]
        elif option.action == "store":
            values[option.dest] = value
        else:
            return None
        i += 1
    else:
        values["command"] = []
    return argparse.Namespace(**values)


def _add_run_arguments(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    run.add_argument("--profile", metavar="FILE", help="TOML profile to start from")
    run.add_argument("--memory", metavar="SIZE",
                     help="memory limit, e.g. 256M, 1G (default 512M; none: no limit; 0 is refused)")
    run.add_argument("--cpu", metavar="PERCENT",
                     help="CPU quota; 100 = one full CPU, 50 half of one (default none: no quota)")
    run.add_argument("--pids", metavar="N", help="maximum number of processes (default 128; none: no limit)")
    run.add_argument("--timeout", metavar="SECONDS",
                     help="wall-clock timeout in seconds, at most 604800 (default 30; none: no limit; "
                          "0 is refused)")
    run.add_argument("--nofile", metavar="N", type=int, help="maximum open files (RLIMIT_NOFILE, default 256)")
    run.add_argument("--max-file-size", metavar="SIZE",
                     help="largest file a process may write (RLIMIT_FSIZE), e.g. 100M; writable binds "
                          "have no quota otherwise (default none)")
    run.add_argument("--rootless-limits", choices=("cgroup", "rlimit"),
                     help="without a usable cgroup (unprivileged, no delegated subtree): 'cgroup' "
                          "(default) refuses a limit you set; 'rlimit' enforces it with a weaker rlimit "
                          "(RLIMIT_AS per process for memory, RLIMIT_NPROC in the sandbox's user "
                          "namespace for processes, RLIMIT_CPU for the CPU quota)")
    run.add_argument("--io-read-bps", metavar="RATE", help="disk read bandwidth, e.g. 10M")
    run.add_argument("--io-write-bps", metavar="RATE", help="disk write bandwidth, e.g. 10M")
    net = run.add_mutually_exclusive_group()
    net.add_argument("--net", dest="net", action="store_true", default=None,
                     help="share the host's network (no network namespace)")
    net.add_argument("--no-net", dest="net", action="store_false",
                     help="a new, empty network namespace: loopback only (default)")
    run.add_argument("--net-allow", metavar="DEST", action="append", default=[],
                     help="a network policy: the sandbox may reach DEST (repeatable): 10.0.3.2:8080, "
                          "[fd00::2]:443/tcp, 192.0.2.0/24:1000-2000/udp, name.internal:443, host; "
                          "everything else is dropped (see the README)")
    run.add_argument("--net-deny", metavar="DEST", action="append", default=[],
                     help="a network policy: never reach DEST, even where --net-allow would (repeatable)")
    run.add_argument("--net-dns", action="store_true",
                     help="with a network policy: a resolver answering only the allowed names")
    run.add_argument("--net-host", metavar="NAME=ADDR[,ADDR]", action="append", default=[],
                     help="with a network policy: NAME has these addresses (not looked up; repeatable)")
    run.add_argument("--net-method", choices=("auto", "veth", "proxy"),
                     help="with a network policy: how it is enforced: veth (a veth pair and nftables, as root), "
                          "proxy (a connect proxy: TCP only, for proxy-aware clients), auto (default: veth as "
                          "root, else proxy)")
    run.add_argument("--ro-bind", metavar="SRC[:DST]", dest="bind_specs", action=_BindOption, default=[],
                     help="bind a host path read-only (at DST, default the same path)")
    run.add_argument("--bind", metavar="SRC[:DST]", dest="bind_specs", action=_BindOption, default=[],
                     help="bind a host path read-write (nosuid, nodev)")
    run.add_argument("--ro-bind-to", metavar=("SRC", "DST"), nargs=2, dest="bind_specs", action=_BindOption, default=[],
                     help="like --ro-bind, for paths that contain ':'")
    run.add_argument("--bind-to", metavar=("SRC", "DST"), nargs=2, dest="bind_specs", action=_BindOption, default=[],
                     help="like --bind, for paths that contain ':'. Binds are mounted in the order given, "
                          "a parent before anything below it; SRC must be its real path (no symlink on it)")
    run.add_argument("--bind-owner", choices=("sandbox", "caller"), default="sandbox",
                     help="who owns on the host the files the sandbox creates in the --bind/--bind-to "
                          "directories: 'sandbox' (default), the sandbox's own uid (as root an id of "
                          "its own, so the directory must be writable by it); 'caller', your uid/gid "
                          "(as root an idmapped mount: ext4, xfs, btrfs, tmpfs; needs seccomp)")
    run.add_argument("--tmpfs-size", metavar="SIZE", help="size of the private /tmp (default 64M)")
    run.add_argument("--python", action="store_true", help="make the Python installation visible")
    run.add_argument("--image", metavar="DIR",
                     help="an unpacked root file system (or an OCI bundle) as the sandbox's read-only root, "
                          "instead of the host's system directories")
    run.add_argument("--overlay", action="store_true",
                     help="a copy-on-write root: writes land in a tmpfs inside the sandbox, never on the host")
    run.add_argument("--overlay-size", metavar="SIZE",
                     help="size of the overlay's tmpfs (default: --tmpfs-size)")
    run.add_argument("--overlay-changes", choices=("discard", "report", "keep"),
                     help="what happens to the overlay's changes: discard (default), report (listed in "
                          "the JSON result), keep (also copied into --overlay-keep DIR)")
    run.add_argument("--overlay-keep", metavar="DIR",
                     help="a new host directory that receives the overlay's changes (--overlay-changes keep)")
    run.add_argument("--cap", metavar="CAP", action="append", default=[],
                     help="keep this capability (e.g. CAP_NET_BIND_SERVICE)")
    run.add_argument("--ambient-cap", metavar="CAP", action="append", default=[],
                     help="keep this capability across exec for a non-root uid")
    run.add_argument("--hostname", metavar="NAME", help="host name inside the sandbox (default sandbox)")
    run.add_argument("--uid", metavar="N", type=int,
                     help="uid of the program (default: as root, a host uid of the sandbox's own from "
                          "id_range; unprivileged, 65534 in a user namespace)")
    run.add_argument("--gid", metavar="N", type=int, help="gid of the program (default: like --uid)")
    run.add_argument("--env", metavar="K=V", action="append", default=[],
                     help="set an environment variable (the environment is clean otherwise)")
    run.add_argument("--seccomp", metavar="default|allow-list|deny-list|learn|off|FILE",
                     help="system call filter: default (the built-in deny list, for a program), "
                          "deny-list, allow-list (the built-in allow-list), learn (record every syscall the "
                          "program makes and write the allow-list profile it needs to "
                          "--seccomp-learn-output), off (no filter), or an absolute path to a .toml/.json "
                          "profile (see the README)")
    run.add_argument("--seccomp-learn-output", metavar="FILE",
                     help="with --seccomp learn: write the learned allow-list profile (TOML) here")
    run.add_argument("--landlock", choices=("auto", "required", "off"),
                     help="a Landlock ruleset following the mounts (default: auto, where the kernel has it)")
    run.add_argument("--cwd", metavar="DIR", default="/",
                     help="working directory inside the sandbox, an absolute path (default /)")
    run.add_argument("--json-result", metavar="FILE",
                     help="write the result as JSON to FILE (outcome, exit code, signal, argv, resource "
                          "usage, isolation, refused syscalls, overlay changes); FILE is opened before CMD "
                          "runs")
    run.add_argument("--audit-log", metavar="FILE",
                     help="append the run's audit events (start, end, limits hit, refusals) to FILE as JSON "
                          "lines (see the README's Audit log)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return run


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("neural-doc-flow-security")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """--version, read from the installed metadata only when asked (importlib.metadata
    costs more than the rest of `ndf-sandbox run`'s imports together)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _build_oci_parser(sub: Any) -> None:
    oci = sub.add_parser("oci", help="run an OCI runtime bundle, or write a profile as its config.json")
    commands = oci.add_subparsers(dest="oci_command", required=True)
    run = commands.add_parser("run", help="run BUNDLE_DIR (config.json + its root) in the sandbox")
    run.add_argument("bundle", metavar="BUNDLE_DIR")
    run.add_argument("--ignore-unsupported", action="store_true",
                     help="run without the bundle's fields this sandbox does not implement (listed in "
                          "isolation.not_enforced and on stderr) instead of refusing")
    run.add_argument("--trust-bundle", action="store_true",
                     help="let the bundle weaken the defaults: capabilities, noNewPrivileges false, the "
                          "host's namespaces")
    run.add_argument("--timeout", metavar="SECONDS", help="wall timeout (default 30; none: no timeout)")
    run.add_argument("--json-result", metavar="FILE", help="write the result as JSON to FILE (as `run` does)")
    run.add_argument("--audit-log", metavar="FILE", help="append the run's audit events to FILE (as `run` does)")
    spec = commands.add_parser("spec", help="write the config.json equivalent of a profile")
    spec.add_argument("--profile", metavar="FILE", help="TOML profile (default: the default profile)")
    spec.add_argument("--output", metavar="FILE", help="write here instead of stdout")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ndf-sandbox`."""
    parser = argparse.ArgumentParser(prog="ndf-sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="subcommand", required=True)
    _build_run_parser(sub)
    check = sub.add_parser("check", help="report what this host can enforce")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("cleanup", help="remove what sandboxes of dead managers left behind (their cgroups, "
                                     "network-policy links and nftables tables)")
    _build_oci_parser(sub)
    serve = sub.add_parser("serve", help="serve `ndf-sandbox run` calls warm: the native ndf-sandbox hands them "
                                         "to this server, without the Python start-up (until SIGTERM or Ctrl-C)")
    serve.add_argument("--socket", metavar="PATH",
                       help="listen here (default: $NDF_SANDBOX_SOCKET, else "
                            "$XDG_RUNTIME_DIR or /tmp, /ndf-sandbox-UID/BUILD.sock)")
    serve.add_argument("--ready", metavar="N", type=int, default=2,
                       help="children kept waiting for calls, each with its next sandbox made (default 2)")
    demo = sub.add_parser("demo", help="run a document pipeline with good and hostile plugins")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.add_argument("--plain", action="store_true", help="plain log lines, no live display")
    demo.add_argument("--cluster", choices=("dask", "ray"),
                      help="spread the pipeline over a local cluster of two workers (needs the extra of that name)")
    return parser


def config_from_args(args: argparse.Namespace, profile: SandboxConfig | None = None) -> SandboxConfig:
    """Apply the command-line options on top of the profile (`profile`, else loaded
    from --profile, else the defaults)."""
    config = profile or (SandboxConfig.from_toml(args.profile) if args.profile else SandboxConfig())
    changes: dict[str, Any] = {}
    if args.memory is not None:
        changes["memory_limit_mb"] = _optional(args.memory, "memory_limit_mb",
                                               lambda v: parse_size_mb(v, "memory_limit_mb"))
    if args.cpu is not None:
        changes["cpu_quota_percent"] = _optional(args.cpu, "cpu_quota_percent", lambda v: _int(v, "cpu_quota_percent"))
    if args.pids is not None:
        changes["max_processes"] = _optional(args.pids, "max_processes", lambda v: _int(v, "max_processes"))
    if args.timeout is not None:
        changes["timeout_seconds"] = _optional(args.timeout, "timeout_seconds", lambda v: _float(v, "timeout_seconds"))
    if args.nofile is not None:
        changes["max_open_files"] = args.nofile
    if args.max_file_size is not None:
        changes["max_file_size_mb"] = _optional(args.max_file_size, "max_file_size_mb",
                                                lambda v: parse_size_mb(v, "max_file_size_mb"))
    if args.rootless_limits is not None:
        changes["rootless_limits"] = args.rootless_limits
    if args.io_read_bps is not None:
        changes["io_read_bps"] = _optional(args.io_read_bps, "io_read_bps", lambda v: parse_rate(v, "io_read_bps"))
    if args.io_write_bps is not None:
        changes["io_write_bps"] = _optional(args.io_write_bps, "io_write_bps", lambda v: parse_rate(v, "io_write_bps"))
    if args.net is not None:
        changes["namespaces"] = replace(config.namespaces, net=not args.net)
    if args.net_allow or args.net_deny or args.net_dns or args.net_host or args.net_method:
        policy = config.network or NetworkPolicy()
        hosts = dict(policy.hosts)
        for item in args.net_host:
            name, sep, addresses = item.partition("=")
            if not sep or not addresses:
                raise ConfigError("network.hosts", f"--net-host takes NAME=ADDR[,ADDR], got {item!r}")
            hosts[name.lower()] = tuple(addresses.split(","))
        changes["network"] = replace(policy, allow=policy.allow + tuple(args.net_allow),
                                     deny=policy.deny + tuple(args.net_deny), dns=policy.dns or args.net_dns,
                                     hosts=tuple(hosts.items()), method=args.net_method or policy.method)
    if (args.bind_specs or args.tmpfs_size or args.python or args.image or args.overlay or args.overlay_size
            or args.overlay_changes or args.overlay_keep):
        fs = config.filesystem
        changes["filesystem"] = replace(
            fs,
            bind_mounts=fs.bind_mounts + tuple(_bind_from_option(option, value, args.bind_owner)
                                               for option, value in args.bind_specs),
            tmp_size_mb=parse_size_mb(args.tmpfs_size, "filesystem.tmp_size_mb") if args.tmpfs_size
            else fs.tmp_size_mb,
            python=fs.python or args.python,
            image=os.path.abspath(args.image) if args.image else fs.image,
            image_root_path=None if args.image else fs.image_root_path,
            overlay=fs.overlay or args.overlay,
            overlay_size_mb=parse_size_mb(args.overlay_size, "filesystem.overlay_size_mb") if args.overlay_size
            else fs.overlay_size_mb,
            overlay_changes=args.overlay_changes or fs.overlay_changes,
            overlay_keep_dir=os.path.abspath(args.overlay_keep) if args.overlay_keep else fs.overlay_keep_dir,
        )
    if args.cap or args.ambient_cap:
        caps = config.capabilities
        allowed = tuple(dict.fromkeys(caps.allowed + tuple(args.cap) + tuple(args.ambient_cap)))
        changes["capabilities"] = CapabilityConfig(
            drop_all=True, allowed=allowed, ambient=tuple(dict.fromkeys(caps.ambient + tuple(args.ambient_cap))))
    for name in ("hostname", "uid", "gid", "seccomp", "landlock"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.env:
        env = dict(config.environment)
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError("environment", f"--env takes K=V, got {item!r}")
            env[key] = value
        changes["environment"] = tuple(env.items())
    return replace(config, **changes) if changes else config


# The option that sets each config field, to name it in an error as the user wrote it.
_OPTIONS = {
    "memory_limit_mb": "memory", "cpu_quota_percent": "cpu", "max_processes": "pids",
    "timeout_seconds": "timeout", "max_open_files": "nofile", "max_file_size_mb": "max_file_size",
    "rootless_limits": "rootless_limits", "io_read_bps": "io_read_bps", "io_write_bps": "io_write_bps",
    "filesystem.tmp_size_mb": "tmpfs_size", "hostname": "hostname", "uid": "uid", "gid": "gid",
    "seccomp": "seccomp", "landlock": "landlock", "environment": "env", "capabilities.allowed": "cap",
    "capabilities.ambient": "ambient_cap", "filesystem.read_only_binds": "bind_specs",
    "filesystem.binds": "bind_specs", "filesystem.image": "image", "filesystem.overlay_size_mb": "overlay_size",
    "filesystem.overlay_changes": "overlay_changes", "filesystem.overlay_keep_dir": "overlay_keep",
    "network.allow": "net_allow", "network.deny": "net_deny", "network.hosts": "net_host", "network": "net",
    "network.method": "net_method",
}


def _origin(args: argparse.Namespace, field: str) -> str:
    """' in --memory' when the option that sets `field` was given, else nothing."""
    dest = _OPTIONS.get(field)
    if dest is None or not getattr(args, dest, None):
        return ""
    return " in " + ("--ro-bind/--bind" if dest == "bind_specs" else "--" + dest.replace("_", "-"))


def _int(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(field, f"must be a whole number, got {text!r}") from None


def _float(text: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(field, f"must be a number of seconds, got {text!r}") from None


def _command_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("ndf-sandbox run: missing command (ndf-sandbox run [options] -- CMD ARGS...)", file=sys.stderr)
        return EXIT_USAGE
    if args.audit_log:  # only then is logging imported: the run path stays without it
        from . import audit

        try:
            audit.add_file_sink(args.audit_log)
        except OSError as e:
            print(f"ndf-sandbox: cannot write --audit-log {args.audit_log!r}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
    try:
        profile = SandboxConfig.from_toml(args.profile) if args.profile else None
    except ConfigError as e:
        _audit_refused(e)
        print(f"ndf-sandbox: invalid profile {args.profile}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = config_from_args(args, profile)
    except ConfigError as e:
        _audit_refused(e)
        print(f"ndf-sandbox: invalid configuration{_origin(args, e.field)}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not args.cwd.startswith("/") or "\0" in args.cwd:
        print(f"ndf-sandbox: invalid --cwd: must be an absolute path, got {args.cwd!r}", file=sys.stderr)
        return EXIT_USAGE
    if (config.seccomp == "learn") != bool(args.seccomp_learn_output):
        print("ndf-sandbox: invalid configuration: --seccomp learn and --seccomp-learn-output FILE go "
              "together", file=sys.stderr)
        return EXIT_USAGE
    if args.seccomp_learn_output:
        try:  # before the program runs, like --json-result
            args.learn_file = open(args.seccomp_learn_output, "w")  # noqa: SIM115 - closed by _run
        except OSError as e:
            print(f"ndf-sandbox: cannot write --seccomp-learn-output {args.seccomp_learn_output!r}: "
                  f"{e.strerror}", file=sys.stderr)
            return EXIT_USAGE
    if args.json_result:
        try:  # before the program runs: a run whose result cannot be written is not started
            args.json_file = open(args.json_result, "w")  # noqa: SIM115 - closed by _run
        except OSError as e:
            print(f"ndf-sandbox: cannot write --json-result {args.json_result!r}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
    if sys.platform != "linux":
        return _run(args, config, command)
    from .launch import resources, served
    from .linux import network

    serving = served.serving()  # then the server did what follows ahead (cli_server.py)
    if config.cgroup_limits_requested and not serving:
        from .linux.cgroups.delegation import adopt_delegated_subtree

        adopt_delegated_subtree()  # alone in a delegated cgroup (systemd-run -p Delegate=yes): use it
    if not serving:
        # As root: the sandbox's network namespace (and its cgroup, for limits) are made in
        # threads while we import.
        network.make_ahead()
        if config.cgroup_limits_requested:
            resources.make_spare_cgroup(in_background=True)
    try:
        return _run(args, config, command)
    finally:
        if not serving:  # else the server's child removes it after its answer
            resources.discard_spare_cgroup()  # unused (the launch failed before taking it)


def _run(args: argparse.Namespace, config: SandboxConfig, command: list[str],
         not_enforced: tuple[str, ...] = ()) -> int:
    json_file = getattr(args, "json_file", None)
    learn_file = getattr(args, "learn_file", None)
    try:
        return _run_and_report(args, config, command, json_file, not_enforced)
    finally:
        for file in (json_file, learn_file):
            if file is not None:
                file.close()


def _run_and_report(args: argparse.Namespace, config: SandboxConfig, command: list[str], json_file: Any,
                    not_enforced: tuple[str, ...] = ()) -> int:
    from .launch import served
    from .launch.supervise import run_program

    if not served.serving():  # else its server's child did while it waited for the call
        _remove_stale_cgroups()
    on_start = None
    if args.audit_log:
        from . import audit

        def on_start(pid: int, isolation: Any) -> None:
            audit.sandbox_started(AUDIT_SANDBOX_ID, AUDIT_PLUGIN_ID, pid, isolation, config=config, kind="command",
                                  start_method="cli", argv=command)
    try:
        result = run_program(config, command, cwd=args.cwd, on_start=on_start)
        if not_enforced:
            result = replace(result, isolation=replace(
                result.isolation, not_enforced=result.isolation.not_enforced + not_enforced))
    except ConfigError as e:  # found while planning (e.g. a --seccomp file): still the command line
        _audit_refused(e)
        print(f"ndf-sandbox: invalid configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SandboxError as e:
        _audit_refused(e)
        print(f"ndf-sandbox: {e}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    if args.audit_log:
        audit.sandbox_ended(AUDIT_SANDBOX_ID, AUDIT_PLUGIN_ID, result)
    if result.outcome.value == "sandbox_error" or result.outcome.value in ("timeout", "oom"):
        print(f"ndf-sandbox: {result.outcome.value}: {result.error}", file=sys.stderr)
    status = EXIT_NOT_FOUND if _program_not_found(result.error) else result.cli_exit_status()
    learn_file = getattr(args, "learn_file", None)
    if learn_file is not None:
        learned = _write_learned_profile(learn_file, args.seccomp_learn_output, result, command)
        status = learned if learned != 0 else status
    if json_file is not None:
        import json

        json.dump(_json_result(result, command, status), json_file, indent=2)
    return status


def _audit_refused(error: Exception) -> None:
    """Audit a refused run (a no-op unless --audit-log made a sink: logging is not imported)."""
    if "logging" in sys.modules:
        from . import audit

        audit.launch_refused(AUDIT_PLUGIN_ID, error)


def _write_learned_profile(file: Any, path: str, result: Any, command: list[str]) -> int:
    """--seccomp learn: write the allow-list profile of what the program called (0), or
    say why there is none (the sandbox-error status)."""
    from .linux.seccomp import learned_profile_text

    events = [e for e in result.security_events if e.kind == "learned_syscall"]
    if result.outcome.value == "sandbox_error" or not events or any(e.target == "(omitted)" for e in events):
        why = "the program did not start" if not events else "too many syscalls to record them all"
        print(f"ndf-sandbox: --seccomp learn: no profile written: {why}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR
    file.write(learned_profile_text({e.target: e.count for e in events}, command))
    note = "" if result.outcome.value == "ok" else f" (the program ended with {result.outcome.value}: " \
        "a run that did not finish its work may have missed syscalls)"
    print(f"ndf-sandbox: learned {len(events)} syscalls; use --seccomp {os.path.abspath(path)}{note}",
          file=sys.stderr)
    return 0


def _program_not_found(error: str | None) -> bool:
    """Whether the exec stage failed because the program does not exist (ENOENT on
    the program itself, not on --cwd): the shell's 127, not a set-up failure."""
    prefix = "sandbox setup failed at stage 'exec': "
    if not error or not error.startswith(prefix):
        return False
    message = error[len(prefix):]
    return message.startswith("command not found: ") or (
        message.startswith("cannot execute ") and "(errno 2:" in message)


def _json_result(result: Any, command: list[str], status: int) -> dict[str, Any]:
    """--json-result: the result's dict plus the argv run and the exit status. The
    program's stdout/stderr are its own streams here (not captured): included, as
    text bounded like the API's output, only when a backend did capture them."""
    data: dict[str, Any] = {"argv": command, "exit_status": status, **result.to_dict()}
    for name in ("stdout", "stderr"):
        captured: bytes = getattr(result, name)
        if captured:
            data[name] = captured.decode(errors="replace")
    return data


def _remove_stale_cgroups() -> None:
    """Reclaim cgroups left by sandboxes whose launcher was killed (never others')."""
    from .linux.cgroups import remove_stale_cgroups

    try:
        remove_stale_cgroups()
    except (OSError, SandboxError):
        pass  # nothing of ours to reclaim, or no cgroups here


def _command_check(args: argparse.Namespace) -> int:
    import json

    from .detect import detect_features, format_report, missing_for, report_to_dict

    features = detect_features()
    missing = missing_for(SandboxConfig(), features)
    if args.json:
        print(json.dumps({"features": report_to_dict(features), "default_profile_missing": missing}, indent=2))
    else:
        print(format_report(features))  # ends with what the default profile lacks here, if anything
    return 1 if missing else 0


def _command_cleanup() -> int:
    """Remove the sandbox cgroups of managers (and CLI runs) that are gone, killing
    what still runs in them; those of live managers are left alone."""
    from .linux.cgroups import remove_stale_cgroups

    try:
        removed = remove_stale_cgroups()
    except (OSError, SandboxError) as e:
        print(f"ndf-sandbox cleanup: {e}", file=sys.stderr)
        return 1
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} leftover cgroup directories removed")
    import shutil

    if os.geteuid() == 0 and shutil.which("nft"):
        from .linux import netpolicy

        try:
            slots = netpolicy.cleanup()
        except (OSError, SandboxError) as e:
            print(f"ndf-sandbox cleanup: network policy leftovers: {e}", file=sys.stderr)
            return 1
        for slot in slots:
            print(f"removed the host's link and nftables table of {slot}")
        print(f"{len(slots)} leftover network policy slots removed")
    return 0


def _command_oci(args: argparse.Namespace) -> int:
    """`oci run BUNDLE_DIR` and `oci spec`."""
    import json

    from . import oci

    if args.oci_command == "spec":
        try:
            config = SandboxConfig.from_toml(args.profile) if args.profile else SandboxConfig()
            text = json.dumps(oci.spec_from_config(config), indent=2) + "\n"
        except ConfigError as e:
            print(f"ndf-sandbox oci spec: {e}", file=sys.stderr)
            return EXIT_USAGE
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 0
    try:
        bundle = oci.load_bundle(args.bundle, ignore_unsupported=args.ignore_unsupported,
                                 trust_bundle=args.trust_bundle)
        config = bundle.config
        if args.timeout is not None:
            config = replace(config, timeout_seconds=_optional(
                args.timeout, "timeout_seconds", lambda v: _float(v, "timeout_seconds")))
    except ConfigError as e:
        print(f"ndf-sandbox oci run: {args.bundle}: {e}", file=sys.stderr)
        return EXIT_USAGE
    for note in bundle.not_enforced:
        print(f"ndf-sandbox oci run: not enforced: {note}", file=sys.stderr)
    if args.audit_log:
        from . import audit

        try:
            audit.add_file_sink(args.audit_log)
        except OSError as e:
            print(f"ndf-sandbox: cannot write --audit-log {args.audit_log!r}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
    args.cwd = bundle.cwd
    if args.json_result:
        try:
            args.json_file = open(args.json_result, "w")  # noqa: SIM115 - closed by _run
        except OSError as e:
            print(f"ndf-sandbox: cannot write --json-result {args.json_result!r}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
    return _run(args, config, list(bundle.args), bundle.not_enforced)


def _command_serve(args: argparse.Namespace) -> int:
    from . import cli_server

    try:
        if args.ready < 1:
            raise SandboxError(f"--ready must be at least 1, got {args.ready}")
        return cli_server.serve(args.socket or cli_server.socket_path(), args.ready)
    except (SandboxError, OSError) as e:
        print(f"ndf-sandbox serve: {e}", file=sys.stderr)
        return EXIT_SANDBOX_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ndf-sandbox` console script."""
    from .launch.stdio import ensure_std_fds

    ensure_std_fds()  # before any pipe or socket: none of ours may become a payload's fd 0-2
    argv = sys.argv[1:] if argv is None else list(argv)
    # The common case, a plain `run` command line, needs no parser built (they cost
    # milliseconds); anything else, errors and help included, is argparse's.
    fast = _parse_run_fast(argv[1:]) if argv[:1] == ["run"] else None
    if fast is not None:
        fast.subcommand = "run"
    args = fast or build_parser().parse_args(argv)
    if args.subcommand == "run":
        return _command_run(args)
    if args.subcommand == "check":
        return _command_check(args)
    if args.subcommand == "cleanup":
        return _command_cleanup()
    if args.subcommand == "oci":
        return _command_oci(args)
    if args.subcommand == "serve":
        return _command_serve(args)
    if args.cluster:
        from .demo_cluster import run_cluster_demo

        return run_cluster_demo(args.cluster, json_output=args.json)
    from .demo import run_demo

    return run_demo(json_output=args.json, plain=args.plain)


if __name__ == "__main__":
    sys.exit(main())
