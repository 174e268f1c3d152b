"""The zygote: a small, single-threaded fork server that starts every sandbox.

The manager starts it as a fresh interpreter in isolated mode, from "/" and with
a minimal environment (start_methods.zygote_command), so the host process, which
may run threads and hold gigabytes, is never forked, and the memory every sandbox
is forked from holds nothing of the host's environment, working directory or
script directory. The zygote imports what sandboxes need once, then serves
requests on a SOCK_SEQPACKET socket:

    manager -> zygote  pickle (both sides are the trusted host), fds by SCM_RIGHTS
        {"op": "hello", "sys_path": [...]}
        {"op": "spawn", "id": N, "request": LaunchRequest, "targets": [fd numbers]} + fds
        {"op": "kill" | "freeze" | "thaw" | "stats" | "signal" | "arm" | "collect", "id": N, ...}
        every request but hello carries "req": N, echoed in its reply; a control
        request without one is carried out and not answered (arm, kill after use)
    zygote -> manager  msgpack
        {"op": "started", "id", "pid", "isolation", "counters"} + the sandbox's pidfd
        {"op": "exited", "id", "result": {...}}
        {"op": "reply", "id", "ok", ...} | {"op": "failed", "id", "error", ...}
        {"op": "failed", ..., "elsewhere": True}: the template is gone, nothing was
        started: the manager sends the launch to another zygote
        {"op": "preparing", "busy": bool}: making a spare (a launch sent now would wait)
        {"op": "refusing", "why"}: the template is gone; it exits once its sandboxes have

When the manager goes away (socket EOF, or SIGTERM from the parent-death
signal) the zygote kills every sandbox, removes their cgroups and exits. When
its template dies it refuses every launch (the manager sends them to another
zygote), serves the sandboxes it has until they end, then stops taking requests
(the manager's sends fail), answers those already sent and exits.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import gc
import importlib
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import msgpack

from ..errors import SandboxError, UnsupportedError

if TYPE_CHECKING:
    from .launcher import Launcher, LaunchRequest
    from .template import Template

# What the sandboxes need is imported before the template is forked (_make_template);
# the zygote's own machinery (launcher, cgroups, seccomp, ...) only after.

MAX_REQUEST_BYTES = 4 * 1024 * 1024
PREPARE_WHEN_IDLE_FOR = 0.0005  # seconds without a request or an exit
MAX_FDS = 8
MAX_WAIT = 3600.0  # seconds: the longest single poll (a later deadline is waited for in steps)

# SIGTERM (the parent-death signal: the manager is gone) only sets this and wakes the
# serving loop through the wake-up fd, which then returns: the shutdown that follows
# (kill every sandbox, remove their cgroups) runs to its end, never interrupted.
_terminating = False
_wakeup_read = -1


def _log() -> Any:
    import logging

    return logging.getLogger(__name__)


def _on_sigterm(_signum: int, _frame: object) -> None:
    global _terminating
    _terminating = True


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _watch_sigterm() -> None:
    global _wakeup_read
    _wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _recv(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_REQUEST_BYTES, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), flags)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _handle(launcher: Launcher, request: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
    from .counters import counter_files
    from .template import TemplateGone

    op = request["op"]
    sandbox_id: int = request.get("id", 0)
    if op == "spawn":
        launch: LaunchRequest = request["request"]
        try:
            fd_map = tuple(zip(request["targets"], fds, strict=True))
            # Checked again here (a ConfigError fails this launch): no value may reach
            # the launcher that its loop cannot take (a timeout too large for poll()).
            launch = dataclasses.replace(launch, config=dataclasses.replace(launch.config), fd_map=fd_map)
            spawned = launcher.start(sandbox_id, launch)
            return {"op": "started", "id": sandbox_id, "pid": spawned.pid,
                    "isolation": spawned.isolation().to_dict(), "counters": counter_files(spawned.cgroup)}
        except UnsupportedError as e:
            return {"op": "failed", "id": sandbox_id, "error": str(e), "protection": e.protection,
                    "reason": e.reason}
        except TemplateGone as e:
            return {"op": "failed", "id": sandbox_id, "error": str(e), "elsewhere": True}
        except Exception as e:  # noqa: BLE001 - one bad request must not end the zygote (and its sandboxes)
            return {"op": "failed", "id": sandbox_id, "error": str(e)}
        finally:
            for fd in fds:
                os.close(fd)
    for fd in fds:
        os.close(fd)
    try:
        reply: dict[str, Any] = {"op": "reply", "id": sandbox_id, "ok": True}
        if op == "kill":
            launcher.kill(sandbox_id)
        elif op == "freeze":
            reply["how"] = launcher.freeze(sandbox_id)
        elif op == "collect":
            reply["usage"] = dataclasses.asdict(launcher.collect(sandbox_id))
        elif op == "arm":
            launcher.arm(sandbox_id, request.get("at"))
        elif op == "thaw":
            launcher.thaw(sandbox_id)
        elif op == "signal":
            launcher.signal(sandbox_id, request["signal"])
        elif op == "stats":
            reply["stats"] = launcher.stats(sandbox_id)
        elif op == "update_limits":
            reply["update"] = launcher.update_limits(sandbox_id, request["changes"]).to_dict()
        else:
            return {"op": "reply", "id": sandbox_id, "ok": False, "error": f"unknown op {op!r}"}
        return reply
    except KeyError:
        return {"op": "reply", "id": sandbox_id, "ok": False, "error": "no such sandbox (it has exited)"}
    except (SandboxError, OSError) as e:
        return {"op": "reply", "id": sandbox_id, "ok": False, "error": str(e), "field": getattr(e, "field", None)}


def serve(sock: socket.socket, launcher: Launcher) -> None:
    """Serve requests until the manager closes its end, or until the template died
    and the sandboxes started before have ended."""
    try:
        _serve(sock, launcher)
        if launcher.template_lost:
            _refuse_the_rest(sock, launcher)
    except (BrokenPipeError, ConnectionResetError):
        return  # the manager is gone: main() kills what is left


def _serve(sock: socket.socket, launcher: Launcher) -> None:
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, None)
    if _wakeup_read >= 0:
        selector.register(_wakeup_read, selectors.EVENT_READ, "signal")
    if launcher.template is not None:
        selector.register(launcher.template, selectors.EVENT_READ, ("template", 0))
    reported: set[int] = set()  # sandboxes whose result went out with init's report, before init was reaped
    refusing = False
    while True:
        if launcher.template_lost and not refusing:
            # Fail closed: no launch more (they are refused, and the manager sends them
            # to its other zygotes); the sandboxes cloned before go on to their end.
            refusing = True
            _send(sock, {"op": "refusing", "why": launcher.template_lost})
            if launcher.template is not None:
                selector.unregister(launcher.template)
                launcher.template.close()  # reaped (it has gone, or goes at the EOF)
        if refusing and not launcher.running:
            return
        deadline = launcher.next_deadline()
        timeout = None if deadline is None else min(MAX_WAIT, max(0.0, deadline - time.monotonic()))
        for key, _ in selector.select(timeout):
            if key.data is None:
                data, fds = _recv(sock)
                if not data:
                    return
                _answer(sock, launcher, data, fds, selector)
                continue
            if key.data == "signal":  # SIGTERM: the manager is gone (parent-death signal)
                _drain(key.fd)
                if _terminating:
                    return
                continue
            if selector.get_map().get(key.fd) is not key:
                continue  # unregistered by an earlier event of this batch (its sandbox was finished)
            event, sandbox_id = key.data
            if event == "template":  # its socket hung up
                launcher.template_gone("the template process is gone")
                continue
            if event == "report":  # init has reported the payload's end: the result can go now
                selector.unregister(key.fd)
                result = launcher.report(sandbox_id)
                if result is not None:
                    reported.add(sandbox_id)
                    _send(sock, {"op": "exited", "id": sandbox_id, "result": result.to_dict()})
                continue
            selector.unregister(key.fd)
            if sandbox_id not in reported:
                with contextlib.suppress(KeyError):
                    selector.unregister(launcher.running[sandbox_id].status_read)
            result = launcher.finish(sandbox_id, defer_cgroup=True)
            if sandbox_id in reported:
                reported.discard(sandbox_id)
            else:
                _send(sock, {"op": "exited", "id": sandbox_id, "result": result.to_dict()})
            launcher.remove_retired()
        launcher.expire()
        if not launcher.template_lost:
            _prepare_while_idle(sock, selector, launcher)


def _answer(sock: socket.socket, launcher: Launcher, data: bytes, fds: list[int],
            selector: selectors.BaseSelector) -> None:
    """Carry out a request, watch the sandbox it started, reply if it asks for one.
    Whatever goes wrong while handling it fails this request only: the zygote, its
    other sandboxes and the manager's later requests go on."""
    request: dict[str, Any] = {}
    try:
        request = pickle.loads(data)
        reply = _handle(launcher, request, fds)
        if reply is not None and reply["op"] == "started":
            spawned = launcher.running[reply["id"]]
            selector.register(spawned.status_read, selectors.EVENT_READ, ("report", reply["id"]))
            selector.register(spawned.pidfd, selectors.EVENT_READ, ("exit", reply["id"]))
    except Exception as e:  # noqa: BLE001 - one bad request must not end the zygote (and its sandboxes)
        _log().exception("request failed")
        op = "failed" if request.get("op") == "spawn" else "reply"
        reply = {"op": op, "id": request.get("id", 0), "ok": False, "error": f"the zygote failed it: {e!r}"}
        if request.get("op") == "spawn" and request.get("id") in launcher.running:
            with contextlib.suppress(Exception):  # started, but cannot be watched: it must not run unseen
                launcher.kill(request["id"])
                launcher.finish(request["id"])
    if reply is not None and "req" in request:
        reply["req"] = request["req"]
        started = reply["op"] == "started" and reply["id"] in launcher.running
        # A started sandbox's pidfd goes along: the manager can kill it without us.
        _send(sock, reply, (launcher.running[reply["id"]].pidfd,) if started else ())


def _refuse_the_rest(sock: socket.socket, launcher: Launcher) -> None:
    """The template is gone and our sandboxes have ended: take no more requests (the
    manager's sends now fail: it sends them to another zygote) and answer those
    already sent (a launch is refused: nothing started, it goes elsewhere too)."""
    sock.shutdown(socket.SHUT_RD)
    selector = selectors.DefaultSelector()  # never used: nothing is started now
    while True:
        try:
            data, fds = _recv(sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            return
        _answer(sock, launcher, data, fds, selector)


def _prepare_while_idle(sock: socket.socket, selector: selectors.BaseSelector, launcher: Launcher) -> None:
    """Idle for a moment: make the next sandbox's spare, cgroup and network namespace.
    The manager is told while this runs (it cannot be interrupted): it sends its
    launches to another zygote meanwhile, if one is free."""
    told = False

    def announce() -> None:
        nonlocal told
        if not told:
            _send(sock, {"op": "preparing", "busy": True})
            told = True

    while not selector.select(PREPARE_WHEN_IDLE_FOR) and launcher.prepare_next(announce):
        pass
    if told:
        _send(sock, {"op": "preparing", "busy": False})


def _make_template(preload: list[str]) -> Template:
    """Import what sandboxes need, do once what each payload process would
    otherwise do, and fork the template every sandbox is cloned from."""
    import cloudpickle  # noqa: F401

    from ..config import SandboxConfig
    from . import python_worker
    from .payload import environment_entries
    from .template import Template

    python_worker.prepare_in_zygote(environment_entries(SandboxConfig().environment))
    for name in preload:  # the manager's `preload`: every sandbox starts with them imported
        importlib.import_module(name)
    import threading

    if threading.active_count() > 1:  # the template must clone from a single-threaded process
        raise SandboxError(f"preload: importing {', '.join(preload)} started a thread")
    _forget_hidden_directories()
    _drop_thread_reinit_at_fork()
    # Everything imported so far lives as long as the template: keep the collector
    # away from it, so payload processes do not copy those pages just to scan them.
    gc.freeze()
    return Template()


def _forget_hidden_directories() -> None:
    """Drop the import system's cached finders (with their directory listings) for
    every directory outside sys.path, which the manager set to the Python
    installation's directories only: the sandboxes see those anyway, and each
    payload would otherwise list them again on its first import. The zygote never
    imported from elsewhere (isolated mode, cwd "/"), so this is a safeguard."""
    roots = tuple(path.rstrip("/") + "/" for path in sys.path if path)
    for path in list(sys.path_importer_cache):
        if path not in sys.path and not (path or ".").startswith(roots):
            del sys.path_importer_cache[path]


def _warm_up(launcher: Launcher) -> None:
    """Plan the default sandbox (the seccomp filter, the root) and start making the
    next sandbox's network namespace and cgroup."""
    from ..config import SandboxConfig
    from ..linux import network
    from . import python_worker, resources
    from .launcher import LaunchRequest, effective_config
    from .plan import plan_launch

    plan_launch(effective_config(LaunchRequest(SandboxConfig(), python_worker.PythonWorkerPayload())))
    network.make_ahead()
    resources.make_spare_cgroup()


def _drop_thread_reinit_at_fork() -> None:
    """Remove threading's and logging's after-fork-in-child hooks from this interpreter.

    They rebuild the state of threads that were running at the fork, and the
    template never clones with another thread alive (it runs none); what they
    would touch costs each payload process ~150 copied pages (~0.7 ms). Other
    hooks (random's reseed) stay. CPython keeps the hooks in a plain list that
    only the interpreter state refers to, found here through the collector."""
    import threading

    logging = sys.modules.get("logging")
    dropped = {threading._after_fork, getattr(logging, "_after_at_fork_child_reinit_locks", None)}  # type: ignore[attr-defined]
    for referrer in gc.get_referrers(threading._after_fork):  # type: ignore[attr-defined]
        if type(referrer) is list:
            referrer[:] = [hook for hook in referrer if hook not in dropped]


HELPER_OOM_SCORE_ADJ = 500
"""Zygotes and their templates: the OOM killer takes them after every sandbox
(spawn.SANDBOX_OOM_SCORE_ADJ) and before the manager."""


def main(argv: list[str]) -> int:
    """Entry point, `argv`: [_, FD, PARENT_PID] (see start_methods.zygote_command)."""
    fd, parent_pid = int(argv[1]), int(argv[2])

    def terminate(_signum: int, _frame: object) -> None:
        raise SystemExit(0)  # nothing to clean up yet

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the manager, which decides
    # The OOM killer takes sandboxes first, then helpers; the template inherits it.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as oom_score:
        oom_score.write(str(HELPER_OOM_SCORE_ADJ))
    sock = socket.socket(fileno=fd)
    hello = pickle.loads(sock.recv(MAX_REQUEST_BYTES))  # the payloads' sys.path (the Python installation's)
    sys.path[:] = hello["sys_path"]
    template = _make_template(hello.get("preload", []))  # it dies with us (its own parent-death signal)
    from ..linux import syscalls as sc  # ctypes: not in the template's image
    from .launcher import Launcher

    _watch_sigterm()  # only now: the template (and the payloads it clones) must not inherit the wake-up fd
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the manager died before the signal was armed
        template.close()
        return 0

    launcher = Launcher(netns_ahead=True, spares=True, template=template)
    try:
        _warm_up(launcher)
        serve(sock, launcher)
    finally:
        launcher.shutdown()
        if not launcher.template_lost:
            template.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
