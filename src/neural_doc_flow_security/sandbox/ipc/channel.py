"""Host <-> sandbox channels over one AF_UNIX SOCK_SEQPACKET socketpair per sandbox.

SEQPACKET keeps record boundaries (no length prefix to lie about: a record
longer than the receive buffer arrives flagged MSG_TRUNC and is refused) and
ties passed fds to the record they came with. A record is one header byte and
a body:

    0x01 INLINE   body = msgpack frame; attached fds = the frame's memfd blobs
    0x02 SPILLED  body empty; fd 0 = sealed memfd holding the msgpack frame,
                  fds 1.. = the frame's memfd blobs

Senders spill frames bigger than `max_inline_bytes` and blobs bigger than half
of it. Receivers check, in order: fd count, record size, rate, total bytes,
memfd seals and sizes, frame limits, message shape and the kinds the peer may
send. Every received fd is closed before `receive` returns, used or not. After
a ProtocolViolation the channel stays poisoned: every later receive raises it
again, and the caller should kill the sandbox.

`AsyncChannel` is the host end (asyncio). `SyncChannel` is the blocking end
used inside the sandbox; it needs only recvmsg, sendmsg, poll, memfd_create,
write, fcntl, fstat, mmap, munmap and close from the seccomp filter.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import socket
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import ProtocolViolation
from . import framing
from .limits import DecodeLimits, MessageRateLimiter
from .memfd import read_sealed, seal_bytes, unmap
from .messages import KINDS_SENT_BY, Blob, ChannelRole, IpcMessage

if TYPE_CHECKING:
    import asyncio

RECORD_INLINE = 0x01
RECORD_SPILLED = 0x02

_FD_SIZE = array.array("i").itemsize
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
# Plain ints: the enum's own `&` costs more than the rest of a small record's checks.
_MSG_TRUNC, _MSG_CTRUNC = int(socket.MSG_TRUNC), int(socket.MSG_CTRUNC)
_DEFAULT_LIMITS = DecodeLimits()


def create_channel_pair() -> tuple[socket.socket, socket.socket]:
    """Return (host_end, sandbox_end), both close-on-exec.

    The launcher passes `sandbox_end.fileno()` to the sandboxed process (e.g.
    via pass_fds) and closes its own copy; the host wraps `host_end` in an
    AsyncChannel.
    """
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def _peer_role(role: ChannelRole) -> ChannelRole:
    return ChannelRole.SANDBOX if role is ChannelRole.HOST else ChannelRole.HOST


class _RecordCodec:
    """Turns messages into records and back, enforcing every limit; no I/O."""

    def __init__(self, limits: DecodeLimits, role: ChannelRole) -> None:
        self.limits = limits
        self.role = role
        self.accept = KINDS_SENT_BY[_peer_role(role)]
        self.rate = MessageRateLimiter(limits.max_messages_per_second, limits.burst_messages)
        self.total_bytes = 0
        self.violation: ProtocolViolation | None = None
        self.peer_limits: DecodeLimits | None = None  # what the peer enforces, when known
        self.ancbufsize = socket.CMSG_SPACE(limits.max_fds_per_message * _FD_SIZE)

    # -- sending ------------------------------------------------------------

    def pack(self, message: IpcMessage) -> tuple[bytes, list[int]]:
        """Return the record and the fds to attach; the caller closes the fds after sending."""
        if message.kind not in KINDS_SENT_BY[self.role]:
            raise ValueError(f"the {self.role.value} side may not send {message.kind.value!r} messages")
        limits = self.limits
        wire, blobs = message.to_wire(inline_limit=limits.max_inline_bytes // 2)
        frame = framing.encode(wire)
        peer = self.peer_limits
        cap = (peer or limits).max_frame_bytes
        if len(frame) > cap:
            raise ValueError(f"message of {len(frame)} bytes exceeds max_frame_bytes={cap}")
        blob_cap = (peer or limits).max_memfd_bytes
        for blob in blobs:
            if memoryview(blob).nbytes > blob_cap:
                raise ValueError(f"{message.kind.value} of {memoryview(blob).nbytes} bytes exceeds "
                                 f"max_memfd_bytes={blob_cap}")
        if peer is not None:
            try:
                framing.prescan(frame, peer)
            except ProtocolViolation as exc:
                raise ValueError(f"the host would refuse it: {exc}") from None
        fds: list[int] = []
        try:
            if 1 + len(frame) <= limits.max_inline_bytes:
                record = bytes((RECORD_INLINE,)) + frame
            else:
                record = bytes((RECORD_SPILLED,))
                fds.append(seal_bytes(frame))
            for blob in blobs:
                fds.append(seal_bytes(blob))
        except BaseException:
            _close_all(fds)
            raise
        return record, fds

    # -- receiving ----------------------------------------------------------

    def next_call(self) -> None:
        """See AsyncChannel.next_call."""
        self.total_bytes = 0
        self.rate.refund()

    def check_poisoned(self) -> None:
        if self.violation is not None:
            raise ProtocolViolation(f"channel already failed: {self.violation}")

    def unpack(self, record: memoryview, msg_flags: int, fds: list[int]) -> IpcMessage:
        """Decode one received record; always closes `fds`; poisons the channel on a violation."""
        try:
            return self._unpack(record, msg_flags, fds)
        except ProtocolViolation as exc:
            self.violation = ProtocolViolation(str(exc))  # kept without the traceback and its frames
            raise
        finally:
            _close_all(fds)

    def _unpack(self, record: memoryview, msg_flags: int, fds: list[int]) -> IpcMessage:
        limits = self.limits
        if msg_flags & _MSG_CTRUNC:
            raise ProtocolViolation(
                f"record carried more than max_fds_per_message={limits.max_fds_per_message} fds"
            )
        if msg_flags & _MSG_TRUNC:
            raise ProtocolViolation(f"record longer than max_inline_bytes={limits.max_inline_bytes}")
        if not self.rate.try_acquire():
            raise ProtocolViolation(
                f"more than {limits.max_messages_per_second:g} messages/s "
                f"(burst {limits.burst_messages}): flooding"
            )
        self._account(len(record))

        header = record[0]
        if header == RECORD_INLINE:
            frame: memoryview = record[1:]
            blob_fds = fds
        elif header == RECORD_SPILLED:
            if len(record) != 1 or not fds:
                raise ProtocolViolation("spilled record must be one byte with the frame memfd attached")
            frame = read_sealed(fds[0], limits.max_frame_bytes)
            blob_fds = fds[1:]
        else:
            raise ProtocolViolation(f"unknown record header {header:#04x}")

        try:
            if header == RECORD_SPILLED:
                self._account(frame.nbytes)
            decoded = framing.decode(frame, limits)
        finally:
            unmap(frame)

        used: set[int] = set()
        views: list[memoryview] = []

        def resolve_blob(index: int, size: int) -> memoryview:
            if index >= len(blob_fds) or index in used:
                raise ProtocolViolation(f"blob reference to fd {index}, which is not attached or reused")
            used.add(index)
            view = read_sealed(blob_fds[index], limits.max_memfd_bytes)
            views.append(view)
            if view.nbytes != size:
                raise ProtocolViolation(f"blob memfd holds {view.nbytes} bytes, message announced {size}")
            self._account(size)
            return view

        try:
            message = IpcMessage.from_wire(decoded, accept=self.accept, resolve_blob=resolve_blob)
            if len(used) != len(blob_fds):
                raise ProtocolViolation(f"{len(blob_fds) - len(used)} unexpected fd(s) attached to a message")
        except BaseException:
            # Nothing of a refused frame may stay mapped (the exception's traceback
            # keeps this frame's locals alive as long as someone keeps the exception).
            for view in views:
                unmap(view)
            raise
        return message

    def _account(self, size: int) -> None:
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            raise ProtocolViolation(f"peer sent more than max_total_bytes={self.limits.max_total_bytes}")


def _ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class AsyncChannel:
    """The host end of a sandbox channel, for asyncio.

    Owns the socket; use `async with` or call `close()`. Receives only the
    kinds a sandbox may send (status, data, progress, log, result, error,
    heartbeat) and raises ProtocolViolation, with the reason, on anything else.
    """

    def __init__(
        self,
        sock: socket.socket,
        limits: DecodeLimits | None = None,
        *,
        role: ChannelRole = ChannelRole.HOST,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._codec = _RecordCodec(limits or _DEFAULT_LIMITS, role)
        # No receive buffer is kept per channel (a manager may hold thousands):
        # recvmsg allocates each record, sized to what arrived.
        import asyncio  # here: sandboxes (the template's image) never load asyncio and ssl

        self._receive_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False
        self._eof = False

    @property
    def limits(self) -> DecodeLimits:
        """The limits enforced on received messages."""
        return self._codec.limits

    @property
    def closed(self) -> bool:
        """True once close() has been called."""
        return self._closed

    @property
    def bytes_received(self) -> int:
        """Bytes accounted against max_total_bytes so far."""
        return self._codec.total_bytes

    def next_call(self) -> None:
        """A reused worker's channel carries one call after another, and its limits
        are per call: the bytes counted against max_total_bytes are forgotten, and
        the message that answers (or starts) a call is given back to the rate limit."""
        self._codec.next_call()

    async def send(self, message: IpcMessage) -> None:
        """Send one message; waits while the socket buffer is full.

        Raises BrokenPipeError/ConnectionResetError if the sandbox end is gone,
        ValueError for a message this side may not send or that is too large.
        """
        if self._closed:
            raise ConnectionError("channel is closed")
        record, fds = self._codec.pack(message)
        try:
            async with self._send_lock:
                await self._send_record(record, fds)
        finally:
            _close_all(fds)

    async def _send_record(self, record: bytes, fds: list[int]) -> None:
        while True:
            if self._closed:
                raise ConnectionError("channel closed while sending")
            try:
                self._sock.sendmsg([record], _ancillary(fds), _SEND_FLAGS)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)

    async def receive(self, timeout: float | None = None) -> IpcMessage | None:
        """Return the next message, or None once the peer has closed its end.

        Raises TimeoutError if nothing arrives within `timeout` seconds, and
        ProtocolViolation if the peer broke the protocol (then and forever after).
        """
        import asyncio

        async with asyncio.timeout(timeout), self._receive_lock:
            self._codec.check_poisoned()
            while True:
                if self._closed or self._eof:
                    return None
                try:
                    record, ancdata, msg_flags, _ = self._sock.recvmsg(
                        self._codec.limits.max_inline_bytes, self._codec.ancbufsize, _RECV_FLAGS
                    )
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=False)
                    continue
                except ConnectionResetError:
                    self._eof = True
                    return None
                fds = _fds_from_ancdata(ancdata)
                if not record and not msg_flags & (_MSG_TRUNC | _MSG_CTRUNC):
                    # SEQPACKET reports EOF as a zero-length read; a zero-length
                    # record (never sent by this protocol) reads the same.
                    _close_all(fds)
                    self._eof = True
                    return None
                return self._codec.unpack(memoryview(record), msg_flags, fds)

    async def _wait(self, *, writable: bool) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        if writable:
            add, remove = loop.add_writer, loop.remove_writer
        else:
            add, remove = loop.add_reader, loop.remove_reader
        add(fd, wake)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if not self._closed:
                remove(fd)

    def close(self) -> None:
        """Close the socket; pending receives return None. Idempotent."""
        if self._closed:
            return
        self._closed = True
        fd = self._sock.fileno()
        if self._waiters:
            import asyncio

            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._sock.close()

    async def __aenter__(self) -> AsyncChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncChannel:
    """The blocking end of a channel, used inside the sandbox (no asyncio).

    By default it plays the sandbox role: it sends status, data, progress, log,
    result, error and heartbeat messages and accepts control, call and data.
    """

    def __init__(
        self,
        sock: socket.socket,
        limits: DecodeLimits | None = None,
        *,
        role: ChannelRole = ChannelRole.SANDBOX,
    ) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._codec = _RecordCodec(limits or _DEFAULT_LIMITS, role)
        # Fresh anonymous pages, not a bytearray: the kernel maps them zero-filled on
        # first touch, so a small message costs one page (a zygote's forked sandbox
        # would otherwise copy-on-write every page of a heap buffer it clears).
        # Made on the first receive: a cold worker's call comes with its launch.
        self._buffer: mmap.mmap | None = None
        self._eof = False

    @classmethod
    def from_fd(
        cls, fd: int, limits: DecodeLimits | None = None, *, role: ChannelRole = ChannelRole.SANDBOX
    ) -> SyncChannel:
        """Wrap an inherited socket fd (the sandbox end of create_channel_pair); takes ownership."""
        return cls(socket.socket(fileno=fd), limits, role=role)

    def fileno(self) -> int:
        """The socket's fd (for select/poll)."""
        return self._sock.fileno()

    def expect_peer_limits(self, limits: DecodeLimits) -> None:
        """Check what this end sends against the limits the peer decodes with (its
        max_frame_bytes replaces this end's own): a message the peer would refuse
        as a protocol violation raises ValueError here instead."""
        self._codec.peer_limits = limits

    def next_call(self) -> None:
        """See AsyncChannel.next_call."""
        self._codec.next_call()

    def send(self, message: IpcMessage) -> None:
        """Send one message, blocking while the socket buffer is full."""
        record, fds = self._codec.pack(message)
        try:
            self._sock.sendmsg([record], _ancillary(fds), _SEND_FLAGS)
        finally:
            _close_all(fds)

    def send_data(self, content: Blob, *, tag: str = "") -> None:
        """Shorthand for send(IpcMessage.data(content, tag=tag))."""
        self.send(IpcMessage.data(content, tag=tag))

    def receive(self, timeout: float | None = None) -> IpcMessage | None:
        """Return the next message, None at EOF; TimeoutError after `timeout` seconds."""
        self._codec.check_poisoned()
        if self._eof:
            return None
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, self._codec.limits.max_inline_bytes, mmap.MAP_PRIVATE)
        if timeout is not None:  # the socket stays blocking otherwise (each change is a syscall)
            self._sock.settimeout(timeout)
        try:
            nbytes, ancdata, msg_flags, _ = self._sock.recvmsg_into(
                [self._buffer], self._codec.ancbufsize, _RECV_FLAGS
            )
        except ConnectionResetError:
            self._eof = True
            return None
        except BlockingIOError:  # timeout == 0 makes the socket non-blocking
            raise TimeoutError("no message within 0 seconds") from None
        finally:
            if timeout is not None:
                self._sock.settimeout(None)  # sends stay blocking
        fds = _fds_from_ancdata(ancdata)
        if nbytes == 0 and not msg_flags & (_MSG_TRUNC | _MSG_CTRUNC):
            _close_all(fds)
            self._eof = True
            return None
        return self._codec.unpack(memoryview(self._buffer)[:nbytes], msg_flags, fds)

    def close(self) -> None:
        """Close the socket. Idempotent."""
        self._sock.close()

    def __enter__(self) -> SyncChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

