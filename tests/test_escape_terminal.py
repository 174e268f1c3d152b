"""The caller's standard streams (issue 23 items 7, 8): a sandbox never gets the
caller's terminal, and a closed fd 0-2 never becomes one of our pipes.

`ndf-sandbox` runs here on a pty the test makes (its controlling terminal, in
the foreground, as under a shell), started by root, by uid 4242 and by root from
a spare. Host-side evidence: the pty's termios, window size and exclusive flag
after the run; for closed fds, what the payload's fds 0-2 were, written to a
file in a bind the test reads. Hostile programs only touch the test's own pty.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI_TIMEOUT, SandboxCaller, ndf_host_env

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox")

TIOCGEXCL = 0x80045440
ROWS, COLS = 24, 80


def _controlling_terminal() -> None:
    """preexec_fn: a new session whose controlling terminal is fd 0 (the pty)."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@contextlib.contextmanager
def new_pty() -> Iterator[tuple[int, int]]:
    """A fresh pty (master, slave) with a known window size, closed afterwards."""
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (ROWS, COLS))
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def run_on_pty(pty: tuple[int, int], argv: list[str], typed: bytes = b"",
               env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Run `argv` with the pty's slave as fds 0-2 and controlling terminal; type `typed`.
    Returns (exit status, what reached the terminal)."""
    master, slave = pty
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd="/tmp",
                            env=env if env is not None else ndf_host_env(),
                            preexec_fn=_controlling_terminal)
    os.set_blocking(master, False)
    screen = bytearray()
    if typed:
        os.write(master, typed)
    deadline = time.monotonic() + CLI_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            screen += _read_available(master)
            time.sleep(0.02)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        screen += _read_available(master)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return code, bytes(screen)


def _read_available(fd: int) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def assert_terminal_untouched(slave: int, screen: bytes) -> None:
    """Host-side evidence on the test's pty: echo still on, canonical mode, the same
    window size, line discipline N_TTY, not in exclusive mode."""
    lflag = termios.tcgetattr(slave)[3]
    assert lflag & termios.ECHO, f"echo was turned off\n{screen!r}"
    assert lflag & termios.ICANON, f"canonical mode was turned off\n{screen!r}"
    assert termios.tcgetwinsize(slave) == (ROWS, COLS), screen
    excl = array.array("i", [0])
    fcntl.ioctl(slave, TIOCGEXCL, excl)
    assert excl[0] == 0, f"the terminal was left in exclusive mode\n{screen!r}"
    ldisc = array.array("i", [-1])
    fcntl.ioctl(slave, termios.TIOCGETD, ldisc)
    assert ldisc[0] == 0, screen  # N_TTY


TAMPER = ("stty -echo; stty -icanon; stty cols 7; "
          "python3 -c 'import fcntl, termios; fcntl.ioctl(0, termios.TIOCEXCL); fcntl.ioctl(1, termios.TIOCEXCL)'; "
          "test -t 0 && echo STDIN-IS-A-TTY; test -t 1 && echo STDOUT-IS-A-TTY; "
          "read line; echo \"got:$line\"; echo to-stderr >&2")


def test_payload_cannot_change_the_callers_terminal(sandbox_caller: SandboxCaller) -> None:
    with new_pty() as pty:
        code, screen = run_on_pty(pty, sandbox_caller.argv(["--python"], ["sh", "-c", TAMPER]), typed=b"hello\n")
        assert code == 0, screen
        assert_terminal_untouched(pty[1], screen)
    # the program still talks to the user, through pipes the launcher relays
    assert b"got:hello" in screen and b"to-stderr" in screen, screen
    assert b"IS-A-TTY" not in screen, screen


def test_stdin_eof_and_plain_output_are_relayed(sandbox_caller: SandboxCaller) -> None:
    # ^D (VEOF) at the start of a line: the payload sees the end of its input
    with new_pty() as pty:
        code, screen = run_on_pty(pty, sandbox_caller.argv([], ["sh", "-c", "cat; echo after-eof"]),
                                  typed=b"line one\n\x04")
    assert code == 0, screen
    assert screen.count(b"line one") == 2, screen  # the terminal's echo, then cat's copy
    assert b"after-eof" in screen, screen


API_ON_A_TERMINAL = """
import asyncio, fcntl, os, termios
from neural_doc_flow_security.sandbox import SandboxManager

def tamper():
    import errno, fcntl, os, termios
    done = []
    for fd in (0, 1, 2):
        try:
            attrs = termios.tcgetattr(fd)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            done.append(fd)
        except (OSError, termios.error):
            pass
    try:
        os.open("/dev/tty", os.O_RDWR)
        done.append("tty")
    except OSError:
        pass
    return done

async def main():
    async with SandboxManager(start_method={method!r}) as m:
        run = await m.execute_command("stty", ["sh", "-c", "stty -echo; stty cols 7; test -t 0 && echo TTY; true"])
        print("COMMAND", run.outcome.value, run.stdout, flush=True)
        result = await m.execute_sandboxed("tamper", tamper)
        print("CALLABLE", result.outcome.value, result.output, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("method", ["zygote", "fork"])
def test_api_sandboxes_never_get_the_hosts_terminal(root_caller: SandboxCaller, method: str) -> None:
    argv = [sys.executable, "-c", API_ON_A_TERMINAL.format(method=method)]
    with new_pty() as pty:
        code, screen = run_on_pty(pty, argv, env=ndf_host_env())
        assert code == 0, screen
        assert_terminal_untouched(pty[1], screen)
    assert b"COMMAND ok b''" in screen and b"CALLABLE ok []" in screen, screen


# --- closed standard fds ---------------------------------------------------------------------

REPORT_FDS = """
import os
def link(fd):
    try:
        return os.readlink(f"/proc/self/fd/{{fd}}")
    except OSError:
        return "closed"
with open({out!r}, "w") as f:
    f.write(" ".join(link(fd) for fd in (0, 1, 2)))
"""


@pytest.mark.parametrize("closed", ["0<&-", "1>&-", "2>&-", "0<&- 1>&- 2>&-"])
def test_closed_std_fds_never_become_our_pipes(sandbox_caller: SandboxCaller, shared_host_dir: Path,
                                               closed: str) -> None:
    out = shared_host_dir / "fds"
    code = REPORT_FDS.format(out=str(out))
    argv = sandbox_caller.argv(["--python", "--bind", str(shared_host_dir)], ["python3", "-c", code])
    closed_fds = [int(part[0]) for part in closed.split()]
    files = tempfile.mkdtemp(prefix="ndf-stdio-")
    try:
        for attempt in range(3):  # the bug showed in 8 of 10 runs: try a few times
            out.unlink(missing_ok=True)
            # the fds that stay open are regular files: any pipe or socket would be ours
            with open(os.path.join(files, "in"), "wb+") as stdin, open(os.path.join(files, "out"), "wb+") as stdout:
                result = subprocess.run(["sh", "-c", f'exec "$@" {closed}', "sh", *argv], stdin=stdin,
                                        stdout=stdout, stderr=stdout, env=ndf_host_env(), cwd="/tmp",
                                        timeout=CLI_TIMEOUT, check=False)
                stdout.seek(0)
                assert result.returncode == 0, (attempt, stdout.read())
            links = out.read_text().split()  # host-side: what the payload had on fds 0-2
            assert len(links) == 3, links
            for fd in closed_fds:
                assert links[fd] == "/dev/null", (fd, links)
            assert not [link for link in links if link.startswith(("pipe:", "socket:", "anon_inode:"))], links
    finally:
        shutil.rmtree(files)
