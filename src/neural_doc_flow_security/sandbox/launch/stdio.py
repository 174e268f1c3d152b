"""The standard streams a program sandbox gets from `ndf-sandbox run`.

Two rules, both about what fds 0-2 of the caller may hand to a payload:

- Closed fds 0-2 are opened on /dev/null first (:func:`ensure_std_fds`), before
  any pipe or socket is made: otherwise the first pipe of ours would take the
  free number and be passed on as the payload's stdin, stdout or stderr.
- The caller's terminal is never handed to a payload. A terminal fd can change
  the terminal for everyone who shares it (termios, window size, line
  discipline, exclusive mode, which the kernel allows on any open fd of a
  terminal, controlling or not). When fds 0-2 are terminals, the payload gets
  pipes instead and :class:`TerminalRelay` copies between them and the
  terminal, as `docker run -i` without `-t` does: the payload sees no
  terminal (``isatty`` is false, output is block-buffered), input is read from
  the terminal only while `ndf-sandbox` is in its foreground process group.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import time
from typing import Final

STD_FDS: Final = (0, 1, 2)
_CHUNK: Final = 65536
_BACKGROUND_RECHECK_MS: Final = 250  # how often a background run looks whether it is foreground again
_DRAIN_SECONDS: Final = 5.0  # after the sandbox ended: the longest wait for its output pipes' EOF


def ensure_std_fds() -> None:
    """Open /dev/null on each of fds 0, 1 and 2 that is closed (inheritable, like a
    shell's `< /dev/null`). Call before making any pipe, socket or file."""
    for fd in STD_FDS:
        try:
            os.fstat(fd)
            continue
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
        opened = os.open(os.devnull, os.O_RDWR)
        if opened != fd:  # another thread took the number meanwhile
            os.dup2(opened, fd)
            os.close(opened)
        os.set_inheritable(fd, True)


def _terminal_id(fd: int) -> tuple[int, int] | None:
    """(device, inode) of the terminal open on `fd`, or None when it is not a terminal."""
    try:
        if not os.isatty(fd):
            return None
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_rdev, st.st_ino) if stat.S_ISCHR(st.st_mode) else None


class TerminalRelay:
    """Pipes in place of the caller's terminals on fds 0-2, and the copying between them.

    ``fd_map`` is the launch's (target, source) map. After the launch,
    :meth:`launched` closes the payload's ends here; :meth:`poll_fds` and
    :meth:`on_ready` run inside the caller's wait loop; :meth:`finish` copies
    what is left once the sandbox has ended and closes everything.
    """

    def __init__(self) -> None:
        self.fd_map: tuple[tuple[int, int], ...] = ()
        self._theirs: list[int] = []
        self._input: int | None = None  # our write end of the payload's stdin pipe
        self._pending = b""  # read from the terminal, not yet written to the payload
        self._outputs: dict[int, int] = {}  # our read end -> the terminal fd it is copied to
        self._dead_terminals: set[int] = set()

    @classmethod
    def for_std_fds(cls) -> TerminalRelay | None:
        """A relay for those of this process's fds 0-2 that are terminals; None if none is."""
        terminals = {fd: _terminal_id(fd) for fd in STD_FDS}
        if not any(terminals.values()):
            return None
        relay = cls()
        mapping: dict[int, int] = {}
        if terminals[0]:
            theirs, ours = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(ours, False)
            relay._input = ours
            relay._theirs.append(theirs)
            mapping[0] = theirs
        shared: dict[tuple[int, int], int] = {}
        for fd in (1, 2):
            terminal = terminals[fd]
            if terminal is None:
                continue
            if terminal in shared:  # stdout and stderr on one terminal: one pipe keeps their order
                mapping[fd] = shared[terminal]
                continue
            ours, theirs = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(ours, False)
            relay._outputs[ours] = fd
            relay._theirs.append(theirs)
            mapping[fd] = shared[terminal] = theirs
        relay.fd_map = tuple((fd, mapping.get(fd, fd)) for fd in STD_FDS)
        return relay

    def launched(self) -> None:
        """The sandbox holds its ends now: close ours, so its exit means EOF here."""
        for fd in self._theirs:
            os.close(fd)
        self._theirs.clear()

    def poll_fds(self) -> tuple[dict[int, int], int | None]:
        """What to poll now ({fd: events}) and the longest wait in ms (None: no limit)."""
        wanted = {fd: select.POLLIN for fd in self._outputs}
        limit = None
        if self._input is not None:
            if self._pending:
                wanted[self._input] = select.POLLOUT
            elif self._in_foreground():
                wanted[0] = select.POLLIN
            else:
                limit = _BACKGROUND_RECHECK_MS
        return wanted, limit

    def on_ready(self, ready: dict[int, int]) -> None:
        """Copy what the poll found ready ({fd: revents})."""
        for fd in [fd for fd in self._outputs if fd in ready]:
            self._copy_output(fd)
        if self._input is None:
            return
        if ready.get(self._input):
            self._write_input()
        elif ready.get(0) and not self._pending:
            try:
                data = os.read(0, _CHUNK)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR, errno.EIO):
                    return  # EIO: moved to the background between the check and the read
                raise
            if not data:  # end of input (^D): the payload sees EOF
                self._close_input()
                return
            self._pending = data
            self._write_input()

    def finish(self) -> None:
        """The sandbox has ended: copy the output still in the pipes, then close all."""
        self._close_input()
        deadline = time.monotonic() + _DRAIN_SECONDS
        poller = select.poll()
        for fd in self._outputs:
            poller.register(fd, select.POLLIN)
        while self._outputs:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms <= 0:
                break
            ready = poller.poll(wait_ms)
            if not ready:
                break
            for fd, _ in ready:
                if fd in self._outputs and not self._copy_output(fd):
                    poller.unregister(fd)
        self.close()

    def close(self) -> None:
        """Close every fd of the relay (idempotent)."""
        self._close_input()
        for fd in [*self._outputs, *self._theirs]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._outputs.clear()
        self._theirs.clear()

    def _in_foreground(self) -> bool:
        try:
            return os.tcgetpgrp(0) == os.getpgrp()
        except OSError:
            return False

    def _copy_output(self, fd: int) -> bool:
        """Copy one chunk from `fd` to its terminal; False (and fd closed) at EOF."""
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return True
        if not data:
            del self._outputs[fd]
            os.close(fd)
            return False
        terminal = self._outputs[fd]
        if terminal not in self._dead_terminals:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(terminal, view):]
            except OSError:  # the terminal hung up: keep draining, so the payload never blocks
                self._dead_terminals.add(terminal)
        return True

    def _write_input(self) -> None:
        assert self._input is not None
        try:
            written = os.write(self._input, self._pending)
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the payload closed its stdin, or ended
            self._close_input()
            return
        self._pending = self._pending[written:]

    def _close_input(self) -> None:
        if self._input is not None:
            os.close(self._input)
            self._input = None
            self._pending = b""
