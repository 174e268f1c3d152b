"""`ndf-sandbox serve`: `ndf-sandbox run` without the Python start-up.

`ndf-sandbox` is a small native program (cli_client.c). For a `run` command it
connects to this server's socket, if one listens, and sends its arguments,
environment, umask, rlimits, its fds 0-2 and its working directory (an fd);
else it runs the Python CLI (`ndf-sandbox-py`), which does the same work after
~100 ms of interpreter start and imports.

The server keeps READY_CHILDREN children forked ahead of calls. Each makes the
next sandbox's spare (clone, namespaces, v1 cgroup move, its root: launch/spare.py),
then accepts one call itself, tells the server (which forks another), becomes the
caller (fds 0-2, working directory, umask, rlimits, environment), runs the CLI's
own main() on the caller's arguments, sends the exit status and exits: the run is
the Python CLI's, only warm. It has left the server's session, and a stopping
server does not end it.

A child serves only a caller in its own context: the same user and groups,
capabilities, no_new_privs and seccomp state, namespaces, cgroups, root, LSM
label, scheduling, CPU affinity, I/O priority and OOM score adjustment (the spare
was made with its own). Any other caller is told to fall back, and its run is the
Python CLI's in its own context; so is a call whose PYTHON* or locale variables
differ from the server's, or whose rlimits cannot be taken on (different ones drop
the spare: the sandbox is then cloned with them). The socket's directory is the
user's alone (0700); the client checks that before it connects.

Protocol (little-endian; client -> server, first message with SCM_RIGHTS
[fd 0, fd 1, fd 2, cwd]): b"NDF1", the 16-byte build id, umask, argc, envc and
body length (uint32 each), 16 rlimit pairs (uint64 cur, max), then argc and
envc NUL-terminated strings. Then b"S" + signal number per forwarded signal.
Server -> client: b"F" (fall back, nothing was done) or b"X" + int32 status.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import locale
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ._build_id import BUILD_ID
from .errors import SandboxError

if TYPE_CHECKING:
    from .launch.launcher import Launcher, LaunchRequest

_HEADER = struct.Struct("<4s16sIIII")
_RLIMIT = struct.Struct("<QQ")
_RLIMITS = 16  # Linux's RLIM_NLIMITS: RLIMIT_CPU (0) .. RLIMIT_RTTIME (15)
_MAX_BODY = 4 << 20
_REQUEST_WAIT = 10.0  # seconds a connected client has to send its request
_SO_PEERPIDFD = 77  # Linux 6.5: the peer's pidfd, so a recycled pid cannot pass the checks
_STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                  "NoNewPrivs", "Seccomp", "Seccomp_filters", "Cpus_allowed_list", "Mems_allowed_list")
_STAT_FIELDS = (18, 19, 40, 41)  # priority, nice, rt_priority, policy (after the command's ")")
_FALL_BACK = b"F"
STOP_WAIT = 10.0  # seconds the server waits for its waiting children to remove their spares
READY_CHILDREN = 2  # calls one after the other each find one prepared (a spare takes ~10-25 ms to make)


def socket_path(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Where this installation's server listens (the client computes the same):
    $NDF_SANDBOX_SOCKET, else $XDG_RUNTIME_DIR (or /tmp)/ndf-sandbox-UID/BUILD_ID.sock."""
    explicit = environ.get("NDF_SANDBOX_SOCKET", "")
    if explicit:
        return explicit
    base = environ.get("XDG_RUNTIME_DIR", "")
    base = base if base.startswith("/") else "/tmp"
    return f"{base}/ndf-sandbox-{os.geteuid()}/{BUILD_ID}.sock"


def serve(path: str, ready_children: int = READY_CHILDREN) -> int:
    """Listen on `path` until SIGTERM, SIGINT or SIGHUP, with `ready_children`
    children waiting for calls; the CLI's exit status."""
    if not BUILD_ID:
        raise SandboxError("ndf-sandbox serve needs an installed build (its native client has the same build "
                           "id); this is a source checkout")
    if not path.startswith("/"):
        raise SandboxError(f"--socket must be an absolute path, got {path!r}")
    from .linux.cgroups.delegation import adopt_delegated_subtree

    _private_directory(os.path.dirname(path))
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise SandboxError(f"another ndf-sandbox serve listens on {path}") from None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead server's (we hold the lock)
        listener.bind(path)
        listener.listen(64)
        listener.setblocking(False)  # every waiting child selects it: one of them gets each caller
        adopt_delegated_subtree()  # as `run` does, once, before any child: alone in a delegated cgroup, use it
        _warm_up()
        our_context = _context("self")  # after the delegation's move: what a caller must match
        gc.freeze()  # what is here now stays out of the collector: fewer copied pages in each child
        print(f"ndf-sandbox serve: listening on {path}", file=sys.stderr, flush=True)
        with _stop_signals() as wake:
            _accept_calls(listener, (*wake, lock), ready_children, our_context)
    finally:
        listener.close()
        for ours in (path, path + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ours)
        os.close(lock)
    return 0


def _private_directory(directory: str) -> None:
    """Make `directory` ours alone (0700), or check that it is."""
    from .private_dir import make_private_directory

    if not make_private_directory(directory):
        raise SandboxError(f"{directory} must be a directory of uid {os.geteuid()} that nobody else may use "
                           f"(mode 0700); it is not: the server will not listen there")


def _warm_up() -> None:
    """Import and plan what a run needs, once, before any child is forked."""
    from .ipc import memfd  # noqa: F401 - imported for the children (a spare's launch)
    from .launch import supervise  # noqa: F401
    from .launch.launcher import effective_config
    from .launch.plan import plan_launch

    plan_launch(effective_config(_typical_request()))


@contextlib.contextmanager
def _stop_signals() -> Iterator[tuple[int, int]]:
    """A pipe that becomes readable on SIGTERM, SIGINT or SIGHUP (stop) and SIGCHLD."""
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in watched}
    try:
        yield wake_read, wake_write
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_read)
        os.close(wake_write)


@dataclass
class _ReadyChild:
    """A child forked ahead of a call, and its link to the server."""

    pid: int
    link: socket.socket
    prepared: bool = False


def _accept_calls(listener: socket.socket, server_fds: tuple[int, int, int], ready_children: int,
                  our_context: tuple[object, ...]) -> None:
    """Serve until a stop signal, with `ready_children` children waiting for calls:
    each, once prepared, accepts one itself, from a caller whose _context is `our_context`.
    `server_fds`: the wake-up pipe (read end first) and the lock, which no child may keep."""
    wake_read = server_fds[0]
    ready: list[_ReadyChild] = []
    calls: set[int] = set()  # children running a call
    died = 0  # children in a row that died before they took a call
    try:
        while True:
            if len(ready) < ready_children and died:
                time.sleep(min(2.0, 0.1 * 2**died))  # no fork storm when something kills them at once
            # A child is replaced once its call has ended, unless no prepared one is left:
            # preparing (a clone, a cgroup move, a root) beside a call would slow the call.
            while len(ready) < ready_children and not (calls and any(c.prepared for c in ready)):
                ready.append(_fork_ready_child(listener, server_fds, [child.link for child in ready],
                                               our_context))
            links = {child.link.fileno(): child for child in ready}
            # Children that keep dying take no calls: the callers are told to fall back.
            watched = [wake_read, *links, *([listener.fileno()] if died >= 3 else [])]
            readable, _, _ = select.select(watched, [], [])
            if wake_read in readable:
                signals = os.read(wake_read, 512)
                calls -= _reap_children()
                if any(number != signal.SIGCHLD for number in signals):
                    return
            for fd in set(readable) & set(links):
                child = links[fd]
                said = child.link.recv(1)
                if said == b"r":
                    child.prepared = True
                    died = 0
                    continue
                ready.remove(child)  # it took a call (b"t"), or died (it said why on stderr)
                child.link.close()
                if said == b"t":
                    calls.add(child.pid)
                    died = 0
                else:
                    died = min(died + 1, 5)
            if listener.fileno() in readable:
                with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                    connection, _ = listener.accept()
                    with connection:
                        _tell(connection, _FALL_BACK)
    finally:
        waiting = [child for child in ready if not _took_a_call(child)]
        for child in ready:
            child.link.close()  # a waiting child sees the end: removes its spare and exits
        _wait_for(waiting, STOP_WAIT)


def _took_a_call(child: _ReadyChild) -> bool:
    """Whether the child said it took a call (its end is the call's, not ours to wait for)."""
    took = False
    with contextlib.suppress(OSError):
        while said := child.link.recv(1, socket.MSG_DONTWAIT):
            took |= said == b"t"
    return took


def _wait_for(children: list[_ReadyChild], seconds: float) -> None:
    """Reap the children that exit within `seconds` (one that took a call just as we
    stopped does not say so in time: it is not waited for longer)."""
    deadline = time.monotonic() + seconds
    for child in children:
        try:
            pidfd = os.pidfd_open(child.pid)
        except ProcessLookupError:
            continue  # reaped already
        try:
            select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)


def _tell(connection: socket.socket, answer: bytes) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(answer)


def _reap_children() -> set[int]:
    """Reap the children that have exited; their pids."""
    reaped = set()
    with contextlib.suppress(ChildProcessError):
        while pid := os.waitpid(-1, os.WNOHANG)[0]:
            reaped.add(pid)
    return reaped


# -- who may be served ---------------------------------------------------------

def _peer_in_our_context(connection: socket.socket, ours: tuple[object, ...]) -> bool:
    """Whether the connected process runs as we do (`ours`: our _context): same
    credentials, capabilities, no_new_privs, seccomp, namespaces, cgroups, root, LSM
    label, scheduling, I/O priority and OOM score adjustment."""
    try:
        pid, uid, gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if pid <= 0 or uid != os.geteuid() or gid != os.getegid():
            return False
        # The caller's pidfd as it connected: a pid read from SO_PEERCRED could be
        # recycled before we look. Without SO_PEERPIDFD (Linux < 6.5) nobody is served.
        pidfd = struct.unpack("i", connection.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4))[0]
        try:
            same = _context(str(pid)) == ours
            alive = not select.select([pidfd], [], [], 0)[0]  # its pid was not recycled meanwhile
        finally:
            os.close(pidfd)
        return same and alive
    except OSError:
        return False


def _context(pid: str) -> tuple[object, ...]:
    """What a sandbox started by `pid` would take from it (its spare was cloned ahead
    by our child: it must not differ) or be allowed by it."""
    from .linux import syscalls as sc

    proc = f"/proc/{pid}"
    status = [line for line in Path(f"{proc}/status").read_text().splitlines()
              if line.split(":", 1)[0] in _STATUS_FIELDS]
    stat_fields = Path(f"{proc}/stat").read_text().rpartition(")")[2].split()
    scheduling = [stat_fields[i - 3] for i in _STAT_FIELDS]  # numbered from 1, the first two are gone
    io_priority = sc.ioprio_get_process(os.getpid() if pid == "self" else int(pid))
    namespaces = sorted((name, os.stat(f"{proc}/ns/{name}").st_ino) for name in os.listdir(f"{proc}/ns"))
    root = os.stat(f"{proc}/root")
    label = None
    with contextlib.suppress(OSError):
        label = Path(f"{proc}/attr/current").read_bytes()
    return (status, scheduling, io_priority, Path(f"{proc}/oom_score_adj").read_text(), namespaces,
            Path(f"{proc}/cgroup").read_text(), (root.st_dev, root.st_ino), label,
            Path(f"{proc}/personality").read_text() if os.path.exists(f"{proc}/personality") else None)


# -- the child that runs one call ----------------------------------------------

def _fork_ready_child(listener: socket.socket, server_fds: tuple[int, ...],
                      other_links: list[socket.socket], our_context: tuple[object, ...]) -> _ReadyChild:
    """Fork a child that prepares a sandbox and takes a call. It keeps none of the
    server's fds but the listener (an other child's link kept open would hide the
    server's end of it from that child)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    server = os.getpid()
    pid = os.fork()
    if pid:
        theirs.close()
        return _ReadyChild(pid, ours)
    status = 70
    try:
        ours.close()
        for link in other_links:
            link.close()
        signal.set_wakeup_fd(-1)
        for fd in server_fds:
            os.close(fd)
        status = _ready_child(listener, theirs, server, our_context)
    finally:
        os._exit(status)


def _ready_child(listener: socket.socket, server_link: socket.socket, server: int,
                 our_context: tuple[object, ...]) -> int:
    """Prepare the next sandbox, then accept one call from a caller in our context
    (others are told to fall back) and run it. Ends when the server does, unless it
    has taken a call."""
    from .linux import syscalls as sc

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    gc.disable()  # one call, then exit: a collection would only copy the server's pages
    os.setsid()  # out of the server's terminal and process group
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # until it takes a call: a dead server's child waits for none
    if os.getppid() != server:
        return 0
    from . import cli
    from .launch.launcher import Launcher

    launcher = Launcher(spares=True)
    try:
        cli._remove_stale_cgroups()  # what a run does first, done ahead
        launcher.expect(_typical_request())
        _rehearse()
        told = False
        call = None
        while call is None:  # its one spare, made ahead; remade when its root gets too old to be used
            launcher.prepare_next()
            if not told:
                with contextlib.suppress(OSError):  # the server stops: the link is readable now
                    server_link.send(b"r")
                told = True
            deadline = launcher.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable = select.select([server_link, listener], [], [], wait)[0]
            if server_link in readable:
                return 0  # the server stops
            if listener in readable:
                call = _accept_ours(listener, our_context)
        with contextlib.suppress(OSError):
            server_link.send(b"t")  # taken: the server forks another child
        sc.prctl(sc.PR_SET_PDEATHSIG, 0)  # the call goes on if the server stops now
        server_link.close()
        listener.close()
        connection, request = call
        with connection:
            return _run_call(connection, request, launcher)
    finally:
        launcher.shutdown()  # the spare a call did not take, its cgroup, the network namespace made ahead


def _accept_ours(listener: socket.socket, ours: tuple[object, ...]) -> tuple[socket.socket, _Request] | None:
    """A call from a caller in our context, if one is waiting (another child may
    have taken it); one from elsewhere is told to fall back, one that is no request
    is dropped. The caller is checked once it has sent its request: it only waits
    then (its /proc files are slow to read while it runs)."""
    try:
        connection, _ = listener.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return None
    connection.setblocking(True)
    request = _read_request(connection)
    if request is not None and _peer_in_our_context(connection, ours):
        return connection, request
    if request is not None:
        _tell(connection, _FALL_BACK)
        for fd in request.fds:
            os.close(fd)
    connection.close()
    return None


def _rehearse() -> None:
    """Run the call's first steps once, on nothing: the pages they touch are copied
    from the server's now (a forked child copies each page it writes, and Python
    writes to every object it uses), not while a caller waits."""
    from . import cli

    _context("self")
    args = cli._parse_run_fast(["--", "/bin/true"])
    assert args is not None
    cli.config_from_args(args)


def _typical_request() -> LaunchRequest:
    """A launch like that of `ndf-sandbox run -- PROGRAM` with the default options."""
    from . import cli
    from .launch import bootstrap
    from .launch.launcher import LaunchRequest
    from .launch.spawn import STD_FDS

    args = cli._parse_run_fast(["--", "/bin/true"])
    assert args is not None
    return LaunchRequest(cli.config_from_args(args), bootstrap.ExecPayload(("/bin/true",), "/"), "run", STD_FDS,
                         accounting_cgroup="never")


def _run_call(connection: socket.socket, request: _Request, launcher: Launcher) -> int:
    from . import cli
    from .launch import served

    argv, environ, umask, rlimits, fds = request
    try:
        if not _take_on(environ, rlimits, launcher):
            _tell(connection, _FALL_BACK)
            return 0
        os.umask(umask)
        os.fchdir(fds[3])
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
    finally:
        for fd in fds:
            os.close(fd)
    os.environ.clear()
    os.environ.update(environ)
    _open_std_streams()
    sys.argv = ["ndf-sandbox", *argv]
    served.serve_next_run(served.ServedCall(launcher, connection.fileno()))
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's errors and --help
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BaseException as e:  # noqa: BLE001 - the client must hear an end
        print(f"ndf-sandbox: the CLI server failed the call: {e!r}", file=sys.stderr)
        status = 126
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    _tell(connection, b"X" + struct.pack("<i", status))
    return status & 0xFF


class _Request(NamedTuple):
    """A caller's call: what it sent (fds: its 0, 1, 2 and working directory)."""

    argv: list[str]
    environ: dict[str, str]
    umask: int
    rlimits: list[tuple[int, int]]
    fds: list[int]


def _open_std_streams() -> None:
    """sys.stdin, stdout and stderr anew on the caller's fds 0-2, as the interpreter
    makes them at its start (the server's were made for its own fds: a terminal
    there, or none, would buffer them otherwise). The locale and PYTHON* settings
    are the server's (else the call fell back)."""
    started = sys.__stdout__  # what the interpreter chose at its start, from the same settings
    encoding = started.encoding if started is not None else locale.getencoding()
    errors = started.errors if started is not None else "strict"
    unbuffered = not sys.flags.ignore_environment and bool(os.environ.get("PYTHONUNBUFFERED"))

    def text(fd: int, mode: str, **options: Any) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedWriter(raw) if mode == "w" else io.BufferedReader(raw)
        return io.TextIOWrapper(buffered, encoding=encoding, **options)

    sys.stdin = text(0, "r", errors=errors)
    sys.stdout = text(1, "w", errors=errors, line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr = text(2, "w", errors="backslashreplace", line_buffering=True, write_through=unbuffered)


def _read_request(connection: socket.socket) -> _Request | None:
    """The client's request; None when it is not one (the fds it sent are closed)."""
    connection.settimeout(_REQUEST_WAIT)
    fixed = _HEADER.size + _RLIMITS * _RLIMIT.size
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(connection, fixed, 4)
        while len(data) < fixed:
            more = connection.recv(fixed - len(data))
            if not more:
                raise ConnectionError("short header")
            data += more
        magic, build_id, umask, argc, envc, body_length = _HEADER.unpack_from(data)
        if magic != b"NDF1" or build_id != BUILD_ID.encode() or len(fds) != 4 or body_length > _MAX_BODY:
            raise ConnectionError("not a request of this build")
        body = b""
        while len(body) < body_length:
            more = connection.recv(body_length - len(body))
            if not more:
                raise ConnectionError("short body")
            body += more
        strings = [s.decode("utf-8", "surrogateescape") for s in body.split(b"\0")[:-1]]
        if len(strings) != argc + envc or argc < 1 or strings[0] != "run":
            raise ConnectionError("malformed request")
    except (OSError, struct.error, ConnectionError):
        for fd in fds:
            os.close(fd)
        return None
    connection.settimeout(None)
    rlimits = [_RLIMIT.unpack_from(data, _HEADER.size + i * _RLIMIT.size) for i in range(_RLIMITS)]
    environ = dict(entry.split("=", 1) for entry in strings[argc:] if "=" in entry)
    return _Request(strings[:argc], environ, umask, rlimits, fds)


def _take_on(environ: dict[str, str], rlimits: list[tuple[int, int]], launcher: Launcher) -> bool:
    """Take on the caller's rlimits (the spares made ahead, which have ours, are
    dropped if they differ); False (fall back) when the interpreter's own settings
    (PYTHON* variables, the locale) differ or a limit cannot be taken on."""
    def python_settings(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
        return {k: v for k, v in env.items() if k.startswith("PYTHON") or k in ("LANG", "LC_ALL", "LC_CTYPE")}

    if python_settings(environ) != python_settings(os.environ):
        return False
    def limit(value: int) -> int:
        return resource.RLIM_INFINITY if value == 2**64 - 1 else value

    wanted = [(limit(soft), limit(hard)) for soft, hard in rlimits]
    if wanted == [resource.getrlimit(number) for number in range(_RLIMITS)]:
        return True
    launcher.discard_spares()
    try:
        for number, pair in enumerate(wanted):
            resource.setrlimit(number, pair)
    except (OSError, ValueError):
        return False
    return True
