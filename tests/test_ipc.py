"""The host<->sandbox IPC layer: round trips, memfd transfer, and every limit a hostile sandbox meets."""

from __future__ import annotations

import array
import asyncio
import dataclasses
import datetime
import decimal
import enum
import fcntl
import functools
import gc
import os
import pickle
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest

from neural_doc_flow_security.sandbox.errors import ConfigError, ProtocolViolation
from neural_doc_flow_security.sandbox.ipc import framing, values
from neural_doc_flow_security.sandbox.ipc.channel import (
    RECORD_INLINE,
    RECORD_SPILLED,
    AsyncChannel,
    SyncChannel,
    create_channel_pair,
)
from neural_doc_flow_security.sandbox.ipc.limits import DecodeLimits, GiB, MessageRateLimiter
from neural_doc_flow_security.sandbox.ipc.memfd import REQUIRED_SEALS, read_sealed, seal_bytes
from neural_doc_flow_security.sandbox.ipc.messages import ControlMessage, IpcMessage, MessageKind


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaked_fds() -> Iterator[None]:
    gc.collect()
    before = _fd_count()
    yield
    gc.collect()
    assert _fd_count() == before, "the test leaked file descriptors"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def send_raw(sock: socket.socket, record: bytes, fds: Sequence[int] = ()) -> None:
    """What a hostile sandbox can do: any bytes, any fds, straight onto the socket."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([record], ancillary)


def inline(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return bytes((RECORD_INLINE,)) + packed


def unsealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    return fd


async def host_receives_from_raw(
    hostile: Callable[[socket.socket], None], limits: DecodeLimits | None = None, count: int = 1
) -> list[IpcMessage | None]:
    """Let `hostile` write on the sandbox end, then receive `count` messages on the host end."""
    host_end, sandbox_end = create_channel_pair()
    try:
        hostile(sandbox_end)
    finally:
        sandbox_end.close()
    async with AsyncChannel(host_end, limits) as channel:
        return [await channel.receive() for _ in range(count)]


def assert_violation(hostile: Callable[[socket.socket], None], limits: DecodeLimits | None = None) -> str:
    with pytest.raises(ProtocolViolation) as info:
        run(host_receives_from_raw(hostile, limits))
    return str(info.value)


# -- round trips ---------------------------------------------------------------

SANDBOX_MESSAGES = [
    IpcMessage.status(health="ok", heartbeat_age=0.25, usage={"rss": 123, "cpu": 1.5}),
    IpcMessage.data(b"chunk", tag="page-1"),
    IpcMessage.data(b""),
    IpcMessage.progress(0.5, note="half way"),
    IpcMessage.log("warning", "odd glyph"),
    IpcMessage.result({"text": "hello", "pages": [1, 2, 3], "raw": b"\x00\xff", "ok": True, "x": None}),
    IpcMessage.result(None),
    IpcMessage.error("ValueError", "bad page", "Traceback ...\n"),
    IpcMessage.heartbeat(7),
]


@pytest.mark.parametrize("message", SANDBOX_MESSAGES, ids=lambda m: m.kind.value)
def test_sandbox_to_host_round_trip(message: IpcMessage) -> None:
    async def main() -> IpcMessage | None:
        host_end, sandbox_end = create_channel_pair()
        with SyncChannel(sandbox_end) as sandbox:
            sandbox.send(message)
        async with AsyncChannel(host_end) as host:
            received = await host.receive()
            assert await host.receive() is None
            return received

    assert run(main()) == message


@pytest.mark.parametrize(
    "message",
    [
        IpcMessage.control(ControlMessage.STOP),
        IpcMessage.control(ControlMessage.PAUSE),
        IpcMessage.control(ControlMessage.RESUME),
        IpcMessage.call(pickle.dumps(("fn", (1, 2)))),
        IpcMessage.data(b"input document", tag="doc"),
    ],
    ids=lambda m: m.kind.value,
)
def test_host_to_sandbox_round_trip(message: IpcMessage) -> None:
    async def main() -> IpcMessage | None:
        host_end, sandbox_end = create_channel_pair()
        async with AsyncChannel(host_end) as host:
            await host.send(message)
        with SyncChannel(sandbox_end) as sandbox:
            received = sandbox.receive()
            assert sandbox.receive() is None
            return received

    assert run(main()) == message


def test_error_from_exception_carries_type_and_traceback() -> None:
    try:
        raise KeyError("page 3")
    except KeyError as exc:
        message = IpcMessage.from_exception(exc)
    assert message.error_type == "KeyError"
    assert "page 3" in message.message
    assert "raise KeyError" in message.traceback


def test_big_data_goes_by_sealed_memfd_and_arrives_read_only() -> None:
    payload = os.urandom(3 * 1024 * 1024)

    async def main() -> None:
        host_end, sandbox_end = create_channel_pair()
        with SyncChannel(sandbox_end) as sandbox:
            sandbox.send_data(payload, tag="big")
        async with AsyncChannel(host_end) as host:
            message = await host.receive()
        assert message is not None and message.kind is MessageKind.DATA
        content = message.content
        assert isinstance(content, memoryview)
        assert content.readonly
        assert content == payload
        assert message.tag == "big"
        with pytest.raises(TypeError):
            content[0] = 0
        content.release()

    run(main())


def test_big_result_frame_spills_to_memfd() -> None:
    value = {"text": "x" * (2 * 1024 * 1024), "lines": list(range(1000))}

    async def main() -> IpcMessage | None:
        host_end, sandbox_end = create_channel_pair()
        with SyncChannel(sandbox_end) as sandbox:
            sandbox.send(IpcMessage.result(value))
        async with AsyncChannel(host_end) as host:
            return await host.receive()

    received = run(main())
    assert received is not None and received.value == value


def test_big_call_payload_reaches_sandbox_by_memfd() -> None:
    payload = pickle.dumps(b"y" * (1024 * 1024))

    async def main() -> None:
        host_end, sandbox_end = create_channel_pair()
        async with AsyncChannel(host_end) as host:
            await host.send(IpcMessage.call(payload))
        with SyncChannel(sandbox_end) as sandbox:
            message = sandbox.receive()
        assert message is not None and message.kind is MessageKind.CALL
        assert isinstance(message.payload, memoryview) and message.payload == payload

    run(main())


def test_sides_may_only_send_their_own_kinds() -> None:
    host_end, sandbox_end = create_channel_pair()
    with SyncChannel(sandbox_end) as sandbox, pytest.raises(ValueError):
        sandbox.send(IpcMessage.control(ControlMessage.STOP))

    async def main() -> None:
        async with AsyncChannel(host_end) as host:
            with pytest.raises(ValueError):
                await host.send(IpcMessage.result(1))

    run(main())


# -- memfds ----------------------------------------------------------------------


def test_seal_bytes_then_read_sealed_round_trip() -> None:
    fd = seal_bytes(b"abc" * 1000)
    try:
        view = read_sealed(fd, 10_000)
    finally:
        os.close(fd)
    assert view == b"abc" * 1000 and view.readonly
    view.release()


def test_unsealed_memfd_is_rejected() -> None:
    def hostile(sock: socket.socket) -> None:
        fd = unsealed_memfd(b"z" * 100_000)
        try:
            send_raw(sock, inline({"kind": "data", "tag": "", "data": {"fd": 0, "size": 100_000}}), [fd])
        finally:
            os.close(fd)

    assert "missing seals" in assert_violation(hostile)


def test_memfd_writable_after_partial_sealing_is_rejected() -> None:
    def hostile(sock: socket.socket) -> None:
        fd = unsealed_memfd(b"z" * 100)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        try:
            send_raw(sock, inline({"kind": "data", "tag": "", "data": {"fd": 0, "size": 100}}), [fd])
        finally:
            os.close(fd)

    assert "missing seals" in assert_violation(hostile)


def test_non_memfd_fd_as_blob_is_rejected() -> None:
    def hostile(sock: socket.socket) -> None:
        read_end, write_end = os.pipe()
        try:
            send_raw(sock, inline({"kind": "data", "tag": "", "data": {"fd": 0, "size": 0}}), [read_end])
        finally:
            os.close(read_end)
            os.close(write_end)

    assert "not a sealable memfd" in assert_violation(hostile)


def sparse_sealed_memfd(size: int) -> int:
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)  # sparse: costs the sender nothing
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    return fd


@pytest.mark.parametrize("as_frame", [True, False], ids=["spilled-frame", "data-blob"])
def test_memfd_claiming_4_gib_is_rejected_without_mapping(as_frame: bool) -> None:
    def hostile(sock: socket.socket) -> None:
        fd = sparse_sealed_memfd(4 * GiB)
        try:
            if as_frame:
                send_raw(sock, bytes((RECORD_SPILLED,)), [fd])
            else:
                send_raw(sock, inline({"kind": "data", "tag": "", "data": {"fd": 0, "size": 4 * GiB}}), [fd])
        finally:
            os.close(fd)

    assert "exceeds the limit" in assert_violation(hostile)


def test_blob_size_must_match_announcement() -> None:
    def hostile(sock: socket.socket) -> None:
        fd = seal_bytes(b"q" * 10)
        try:
            send_raw(sock, inline({"kind": "data", "tag": "", "data": {"fd": 0, "size": 11}}), [fd])
        finally:
            os.close(fd)

    assert "announced" in assert_violation(hostile)


# -- length lies, depth, width, types ---------------------------------------------------


def test_stream_length_prefix_claiming_4_gib_is_refused_before_the_body() -> None:
    limits = DecodeLimits()
    with pytest.raises(ProtocolViolation):
        framing.parse_length_prefix(b"\xff\xff\xff\xff", limits)
    frame = framing.encode({"a": 1})
    prefixed = framing.encode_length_prefixed(frame)
    assert framing.parse_length_prefix(prefixed[:4], limits) == len(frame)


def test_record_longer_than_inline_limit_is_rejected() -> None:
    limits = DecodeLimits(max_inline_bytes=1024)

    def hostile(sock: socket.socket) -> None:
        send_raw(sock, inline({"kind": "log", "level": "info", "text": "x" * 4000}))

    assert "max_inline_bytes" in assert_violation(hostile, limits)


def test_deeply_nested_frame_is_rejected_without_crashing() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolViolation):
        framing.decode(deep, DecodeLimits())

    def hostile(sock: socket.socket) -> None:
        fd = seal_bytes(deep)  # too big for one record, so it comes as a spilled frame
        try:
            send_raw(sock, bytes((RECORD_SPILLED,)), [fd])
        finally:
            os.close(fd)

    assert "deep" in assert_violation(hostile)


def test_depth_limit_is_exact() -> None:
    limits = DecodeLimits(max_depth=5)
    framing.decode(framing.encode([[[[[1]]]]]), limits)
    with pytest.raises(ProtocolViolation, match="max_depth"):
        framing.decode(framing.encode([[[[[[1]]]]]]), limits)


def test_wide_payloads_are_rejected() -> None:
    limits = DecodeLimits()
    with pytest.raises(ProtocolViolation):
        framing.decode(framing.encode([None] * (limits.max_container_len + 1)), limits)
    with pytest.raises(ProtocolViolation):
        framing.decode(framing.encode({str(i): 0 for i in range(limits.max_container_len + 1)}), limits)
    many_small = [[0] * 1000 for _ in range(50)]
    with pytest.raises(ProtocolViolation, match="max_objects"):
        framing.decode(framing.encode(many_small), DecodeLimits(max_objects=10_000))


def test_ext_types_outside_the_table_are_rejected() -> None:
    limits = DecodeLimits()
    with pytest.raises(ProtocolViolation, match="ext type 42"):
        framing.decode(msgpack.packb(msgpack.ExtType(42, b"x")), limits)
    timestamp = msgpack.packb(msgpack.Timestamp(1, 0))  # msgpack decodes ext -1 without ext_hook
    with pytest.raises(ProtocolViolation, match="ext type -1"):
        framing.decode(timestamp, limits)
    assert assert_violation(lambda sock: send_raw(sock, bytes((RECORD_INLINE,)) + timestamp))


def test_common_value_types_round_trip() -> None:
    @dataclasses.dataclass
    class Page:
        number: int
        words: tuple[str, ...]

    class Colour(enum.IntEnum):
        RED = 1

    value = {
        1: "int key", -2**63: "min", 2**64 - 1: "max", None: "nil key", False: "bool key", b"raw": "bytes key",
        "tuple": (1, ("a", b"b"), [2.5, None]), "set": {1, "a", b"b", None}, "frozenset": frozenset({3}),
        "when": datetime.datetime(2026, 12, 4, 15, 30, 1, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        "naive": datetime.datetime(2026, 1, 2), "day": datetime.date(2026, 12, 4),
        "at": datetime.time(23, 59, 58, 999), "price": decimal.Decimal("-12.3400"),
        "deep": functools.reduce(lambda inner, _: [inner], range(100), []),
        "page": Page(3, ("a", "b")), "colour": Colour.RED, "empty": ((), set(), frozenset()),
    }
    decoded = framing.decode(framing.encode(value), DecodeLimits())
    assert decoded == {**value, "page": {"number": 3, "words": ("a", "b")}, "colour": 1}
    assert type(decoded["tuple"]) is tuple and type(decoded["tuple"][1]) is tuple
    assert type(decoded["set"]) is set and type(decoded["frozenset"]) is frozenset
    assert decoded["when"].utcoffset() == datetime.timedelta(hours=2)
    assert str(decoded["price"]) == "-12.3400"


@pytest.mark.parametrize("value, reason", [
    (object(), "builtins.object cannot be sent"),
    ({(1, 2)}, "set holding a tuple"),
    ({1.5}, "set holding a float"),
])
def test_values_outside_the_table_cannot_be_sent(value: object, reason: str) -> None:
    with pytest.raises(TypeError, match=reason):
        framing.encode(value)


@pytest.mark.parametrize("frame, reason", [
    # keys whose hashes a peer could make collide (quadratic dict building) or unhashable ones
    (msgpack.packb({1.5: 0}), "map key"),
    (b"\x81" + msgpack.packb(msgpack.ExtType(values.EXT_TUPLE, msgpack.packb([1]))) + b"\x00", "map key"),
    (b"\x81\x91\x01\x00", "map key"),
    (msgpack.packb(msgpack.ExtType(values.EXT_SET, msgpack.packb([1.5]))), "set item"),
    (msgpack.packb(msgpack.ExtType(values.EXT_SET, msgpack.packb([[1]]))), "set item"),
    # an ext container whose array does not fill it, or is no array
    (msgpack.packb(msgpack.ExtType(values.EXT_TUPLE, msgpack.packb([1]) + b"\x00")), "does not fill"),
    (msgpack.packb(msgpack.ExtType(values.EXT_TUPLE, b"\x01")), "must hold one array"),
    (msgpack.packb(msgpack.ExtType(values.EXT_TUPLE, b"\x92\x01")), "bytes left"),
    (msgpack.packb(msgpack.ExtType(values.EXT_DECIMAL, b"1" * 5000)), "too long"),
    (msgpack.packb(msgpack.ExtType(values.EXT_DATE, b"yesterday")), "undecodable"),
])
def test_hostile_ext_and_key_frames_are_refused(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation, match=reason):
        framing.decode(frame, DecodeLimits())


def test_hostile_nested_tuples_are_refused_by_the_prescan_alone() -> None:
    """Tuples inside tuples, 10,000 deep (one item each, or announcing 65,535): the
    walk over the headers refuses the frame before msgpack allocates or recurses."""
    for header, reason in ((b"\x91", "max_depth"), (b"\xdc\xff\xff", "max_objects")):
        frame = b"\x00"
        for _ in range(10_000):
            body = header + frame
            frame = b"\xc9" + len(body).to_bytes(4, "big") + bytes((values.EXT_TUPLE,)) + body
        with pytest.raises(ProtocolViolation, match=reason):
            framing.prescan(frame, DecodeLimits())
    wide = msgpack.packb(msgpack.ExtType(values.EXT_SET, b"\xdd\x7f\xff\xff\xff"))
    with pytest.raises(ProtocolViolation, match="max_container_len"):
        framing.prescan(wide, DecodeLimits())


@pytest.mark.parametrize(
    "record",
    [
        b"\x01\xc1",  # msgpack's reserved byte
        b"\x01\x92\x01",  # truncated array
        b"\x01\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x01\x81\xa4kind\xa4data\x00",  # trailing bytes
        b"\x07hello",  # unknown record header
        b"\x02",  # spilled record without its memfd
        os.urandom(512),
    ],
)
def test_garbage_bytes_raise_protocol_violation(record: bytes) -> None:
    assert_violation(lambda sock: send_raw(sock, record))


@pytest.mark.parametrize(
    "wire",
    [
        ["kind", "result"],
        {"kind": "teleport"},
        {"kind": 5},
        {"kind": "call", "payload": b"x"},  # a sandbox may not send calls
        {"kind": "control", "control": "stop"},  # nor control commands
        {"kind": "result"},
        {"kind": "result", "value": 1, "extra": 2},
        {"kind": "progress", "fraction": 1.5, "note": ""},
        {"kind": "progress", "fraction": float("nan"), "note": ""},
        {"kind": "progress", "fraction": "0.5", "note": ""},
        {"kind": "status", "health": "ok", "heartbeat_age": -1, "usage": {}},
        {"kind": "status", "health": "ok", "heartbeat_age": 0, "usage": {"rss": "big"}},
        {"kind": "log", "level": "shout", "text": ""},
        {"kind": "heartbeat", "sequence": True},
        {"kind": "error", "type": 1, "message": "", "traceback": ""},
        {"kind": "data", "tag": "", "data": "text"},
        {"kind": "data", "tag": "", "data": {"fd": 0, "size": 1}},  # no fd attached
    ],
)
def test_wrong_message_shapes_are_rejected(wire: object) -> None:
    assert_violation(lambda sock: send_raw(sock, inline(wire)))


def test_channel_stays_poisoned_after_a_violation() -> None:
    async def main() -> None:
        host_end, sandbox_end = create_channel_pair()
        send_raw(sandbox_end, b"\x01\xc1")
        send_raw(sandbox_end, inline({"kind": "heartbeat", "sequence": 1}))
        sandbox_end.close()
        async with AsyncChannel(host_end) as host:
            with pytest.raises(ProtocolViolation):
                await host.receive()
            with pytest.raises(ProtocolViolation, match="already failed"):
                await host.receive()

    run(main())


# -- the host never unpickles ------------------------------------------------------


class _CreatesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickles_from_the_sandbox_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(_CreatesMarker(str(marker)))
    host_end, sandbox_end = create_channel_pair()
    pid = os.fork()
    if pid == 0:  # the hostile sandbox
        try:
            host_end.close()
            send_raw(sandbox_end, inline({"kind": "result", "value": bomb}))
            send_raw(sandbox_end, inline({"kind": "data", "tag": "pickle", "data": bomb}))
            send_raw(sandbox_end, bytes((RECORD_INLINE,)) + bomb)  # a bare pickle as the frame
        finally:
            os._exit(0)
    sandbox_end.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    async def main() -> list[IpcMessage | None]:
        async with AsyncChannel(host_end) as host:
            received = [await host.receive(), await host.receive()]
            with pytest.raises(ProtocolViolation):
                await host.receive()
            return received

    result, data = run(main())
    assert result is not None and result.value == bomb
    assert data is not None and data.content == bomb
    assert not marker.exists()


# -- rate, totals, fds, EOF -------------------------------------------------------------


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    limiter = MessageRateLimiter(rate=10.0, burst=3, clock=lambda: now[0])
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    now[0] += 100.0
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_flooding_beyond_the_rate_limit_is_a_violation() -> None:
    limits = DecodeLimits(max_messages_per_second=10, burst_messages=20)
    flood = 500
    host_end, sandbox_end = create_channel_pair()
    sandbox = SyncChannel(sandbox_end)

    def flooder() -> None:
        try:
            for sequence in range(flood):
                sandbox.send(IpcMessage.heartbeat(sequence))
        except OSError:
            pass  # the host closed the channel on us
        finally:
            sandbox.close()

    thread = threading.Thread(target=flooder)
    thread.start()

    async def main() -> int:
        received = 0
        async with AsyncChannel(host_end, limits) as host:
            with pytest.raises(ProtocolViolation, match="flooding"):
                while await host.receive() is not None:
                    received += 1
        return received

    try:
        received = run(main())
    finally:
        thread.join()
    assert 20 <= received < flood


def test_total_bytes_limit() -> None:
    limits = DecodeLimits(max_total_bytes=200_000)

    def hostile(sock: socket.socket) -> None:
        for _ in range(3):
            fd = seal_bytes(b"b" * 90_000)
            try:
                send_raw(sock, inline({"kind": "data", "tag": "", "data": {"fd": 0, "size": 90_000}}), [fd])
            finally:
                os.close(fd)

    with pytest.raises(ProtocolViolation, match="max_total_bytes"):
        run(host_receives_from_raw(hostile, limits, count=3))


def test_unexpected_fds_are_closed() -> None:
    before = _fd_count()

    def hostile(sock: socket.socket) -> None:
        read_end, write_end = os.pipe()
        try:
            send_raw(sock, inline({"kind": "heartbeat", "sequence": 1}), [read_end, write_end])
        finally:
            os.close(read_end)
            os.close(write_end)

    assert "unexpected fd" in assert_violation(hostile)
    gc.collect()
    assert _fd_count() == before


def test_too_many_fds_in_one_record_are_all_closed() -> None:
    limits = DecodeLimits(max_fds_per_message=2)
    before = _fd_count()

    def hostile(sock: socket.socket) -> None:
        fds = [seal_bytes(b"x") for _ in range(6)]
        try:
            send_raw(sock, inline({"kind": "heartbeat", "sequence": 1}), fds)
        finally:
            for fd in fds:
                os.close(fd)

    assert "max_fds_per_message" in assert_violation(hostile, limits)
    gc.collect()
    assert _fd_count() == before


def test_peer_close_yields_none_cleanly() -> None:
    async def main() -> list[IpcMessage | None]:
        host_end, sandbox_end = create_channel_pair()
        with SyncChannel(sandbox_end) as sandbox:
            sandbox.send(IpcMessage.heartbeat(1))
        async with AsyncChannel(host_end) as host:
            return [await host.receive(), await host.receive(), await host.receive()]

    first, second, third = run(main())
    assert first == IpcMessage.heartbeat(1)
    assert second is None and third is None


def test_host_close_yields_none_in_the_sandbox() -> None:
    host_end, sandbox_end = create_channel_pair()
    host_end.close()
    with SyncChannel(sandbox_end) as sandbox:
        assert sandbox.receive() is None


def test_receive_timeout_raises_timeout_error() -> None:
    async def main() -> None:
        host_end, sandbox_end = create_channel_pair()
        try:
            async with AsyncChannel(host_end) as host:
                with pytest.raises(TimeoutError):
                    await host.receive(timeout=0.01)
        finally:
            sandbox_end.close()

    run(main())


def test_close_wakes_a_pending_receive() -> None:
    async def main() -> IpcMessage | None:
        host_end, sandbox_end = create_channel_pair()
        try:
            host = AsyncChannel(host_end)
            pending = asyncio.ensure_future(host.receive())
            await asyncio.sleep(0)
            host.close()
            return await pending
        finally:
            sandbox_end.close()

    assert run(main()) is None


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_depth"):
        DecodeLimits(max_depth=0)
    with pytest.raises(ConfigError, match="max_fds_per_message"):
        DecodeLimits(max_fds_per_message=1)
