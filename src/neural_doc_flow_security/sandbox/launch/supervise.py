"""Run one sandbox to the end in the calling (single-threaded) process: the
engine of `ndf-sandbox run`.

Signals the caller receives (Ctrl-C, SIGTERM, SIGHUP) are forwarded to the
sandbox; if it has not ended `grace_seconds` later, the whole tree is killed.
The wall timeout kills the whole tree. Either way the tree is gone on return.
A program gets this process's fds 0-2, except terminals, which it gets as pipes
relayed from here (launch/stdio.py).
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..config import SandboxConfig
from ..result import IsolationReport, SandboxResult
from . import bootstrap, served
from .launcher import Launcher, LaunchRequest
from .spawn import STD_FDS, SpawnedSandbox, has_exited
from .stdio import TerminalRelay, ensure_std_fds

_FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _forwarding_signals(spawned: SpawnedSandbox, received: list[float]) -> Iterator[None]:
    def forward(signum: int, _frame: object) -> None:
        received.append(time.monotonic())
        spawned.signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_sandbox(spawned: SpawnedSandbox, timeout: float | None, grace_seconds: float,
                 relay: TerminalRelay | None = None, control_fd: int | None = None) -> None:
    """Block until the sandbox's init exits, enforcing the timeout and signal grace
    (and copying between the terminal and the sandbox's pipes, given a relay).
    `control_fd`: a served run's client connection (launch/served.py); the signals
    it forwards are forwarded, and its end is a hang-up."""
    deadline = None if timeout is None else spawned.started + timeout
    received: list[float] = []
    # A signal must end the poll (Python would retry it with the old timeout):
    # the handler's wake-up byte lands on this pipe.
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    try:
        with _forwarding_signals(spawned, received):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARD)  # held since before the launch
            while True:
                now = time.monotonic()
                limits = [t for t in (deadline, received[0] + grace_seconds if received else None) if t is not None]
                wait_ms = None if not limits else max(0, int((min(limits) - now) * 1000) + 1)
                poller = select.poll()
                poller.register(spawned.pidfd, select.POLLIN)
                poller.register(wake_read, select.POLLIN)
                if control_fd is not None:
                    poller.register(control_fd, select.POLLIN)
                if relay is not None:
                    wanted, relay_ms = relay.poll_fds()
                    for fd, events in wanted.items():
                        poller.register(fd, events)
                    if relay_ms is not None:
                        wait_ms = relay_ms if wait_ms is None else min(wait_ms, relay_ms)
                ready = dict(poller.poll(wait_ms))
                if spawned.pidfd in ready:
                    return
                if relay is not None:
                    relay.on_ready(ready)
                if wake_read in ready:
                    while _drain(wake_read):
                        pass
                if control_fd is not None and control_fd in ready:
                    forwarded = _client_signals(control_fd)
                    if forwarded is None:  # the client is gone: as if its terminal hung up
                        control_fd = None
                        forwarded = [signal.SIGHUP]
                    for signum in forwarded:
                        received.append(time.monotonic())
                        spawned.signal(signum)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    spawned.timed_out = True
                    spawned.kill()
                elif received and now >= received[0] + grace_seconds:
                    spawned.kill()
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_read)
        os.close(wake_write)


def _client_signals(fd: int) -> list[int] | None:
    """The signals a served run's client forwarded (b"S" + the signal number each);
    None once it has closed its end."""
    try:
        data = os.read(fd, 512)
    except OSError:
        return None
    if not data:
        return None
    pairs = zip(data[0::2], data[1::2], strict=False)
    return [number for tag, number in pairs if tag == ord("S") and number in _FORWARD]


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def run_sandboxed(config: SandboxConfig, payload: bootstrap.Payload, *, name: str = "run",
                  fd_map: tuple[tuple[int, int], ...] = STD_FDS,
                  grace_seconds: float = 5.0, relay: TerminalRelay | None = None,
                  on_start: Callable[[int, IsolationReport], None] | None = None) -> SandboxResult:
    """Run `payload` in a fresh sandbox and return its result; `relay` (whose pipes
    `fd_map` names) copies between them and the caller's terminal meanwhile;
    `on_start(pid, isolation)` is called once it runs (the audit log)."""
    ensure_std_fds()
    call = served.take()
    launcher = call.launcher if call is not None else Launcher()
    # A signal that arrives while the sandbox starts is held, then forwarded to it
    # (the child starts with an empty signal mask, see bootstrap's signal stage).
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARD)
    try:
        spawned = launcher.start(0, LaunchRequest(config, payload, name, fd_map, accounting_cgroup="never"))
        if on_start is not None:
            on_start(spawned.pid, spawned.isolation())
        if relay is not None:
            relay.launched()
        try:
            wait_sandbox(spawned, config.timeout_seconds, grace_seconds, relay,
                         call.control_fd if call is not None else None)
        finally:
            if not _exited(spawned):
                spawned.kill()
        if relay is not None:
            relay.finish()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    # A served run's emptied cgroup is removed once the client has its answer.
    return launcher.finish(0, defer_cgroup=call is not None)


def run_program(config: SandboxConfig, argv: list[str] | tuple[str, ...], *, cwd: str = "/",
                on_start: Callable[[int, IsolationReport], None] | None = None) -> SandboxResult:
    """Run a program in a fresh sandbox, with this process's stdin/stdout/stderr; a
    terminal among them is replaced by a pipe relayed from here (launch/stdio.py),
    a closed one by /dev/null."""
    ensure_std_fds()
    relay = TerminalRelay.for_std_fds()
    try:
        return run_sandboxed(config, bootstrap.ExecPayload(tuple(argv), cwd),
                             fd_map=relay.fd_map if relay is not None else STD_FDS, relay=relay, on_start=on_start)
    finally:
        if relay is not None:
            relay.close()


def _exited(spawned: SpawnedSandbox) -> bool:
    return has_exited(spawned.pidfd) if spawned.pidfd >= 0 else True

