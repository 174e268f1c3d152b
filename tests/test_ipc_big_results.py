"""A callable's big bytes or str result travels in a sealed memfd of its own,
bounded by `max_memfd_bytes` (not by `max_frame_bytes`): the host checks the
seals and the size before mapping, copies the value out and unmaps at once.
Evidence on the host: the value, no memfd mapping left in /proc/self/maps, the fd
table back to its size, and a ProtocolViolation for every hostile variant."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import Iterator

import pytest

from neural_doc_flow_security.sandbox.errors import ProtocolViolation
from neural_doc_flow_security.sandbox.ipc import framing
from neural_doc_flow_security.sandbox.ipc.channel import RECORD_INLINE, AsyncChannel, SyncChannel, create_channel_pair
from neural_doc_flow_security.sandbox.ipc.limits import DecodeLimits, MiB
from neural_doc_flow_security.sandbox.ipc.memfd import seal_bytes
from neural_doc_flow_security.sandbox.ipc.messages import IpcMessage, MessageKind


def memfd_mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "memfd:" in line]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def nothing_left_mapped_or_open() -> Iterator[None]:
    gc.collect()
    fds, mappings = fd_count(), memfd_mappings()
    yield
    gc.collect()
    assert fd_count() == fds, "file descriptors left open"
    assert memfd_mappings() == mappings, "memfd mappings left"


def receive(value: object, host_limits: DecodeLimits | None = None) -> IpcMessage | None:
    """The sandbox end sends `value` as a result; the host end receives it."""
    async def main() -> IpcMessage | None:
        host_end, sandbox_end = create_channel_pair()
        with SyncChannel(sandbox_end) as sandbox:
            sandbox.send(IpcMessage.result(value))
        async with AsyncChannel(host_end, host_limits) as host:
            return await host.receive()

    return asyncio.run(main())


@pytest.mark.parametrize("value", [b"\x00\xff" * (32 * MiB), "é€" * (4 * MiB), bytearray(b"b" * MiB)],
                         ids=["64 MiB bytes", "20 MiB str", "bytearray"])
def test_big_bytes_and_str_results_come_back_through_a_memfd(value: bytes | str) -> None:
    received = receive(value)
    assert received is not None and received.kind is MessageKind.RESULT
    assert received.value == value
    assert type(received.value) is (str if isinstance(value, str) else bytes)
    assert not memfd_mappings()  # copied out and unmapped before the message was handed over


def test_the_frame_of_a_big_bytes_result_holds_only_a_reference() -> None:
    wire, blobs = IpcMessage.result(b"r" * (20 * MiB)).to_wire(inline_limit=32 * 1024)
    assert wire == {"kind": "result", "blob": {"fd": 0, "size": 20 * MiB}, "text": False}
    assert len(blobs) == 1
    small, none = IpcMessage.result(b"small").to_wire(inline_limit=32 * 1024)
    assert small == {"kind": "result", "value": b"small"} and none == []


def test_a_result_over_max_memfd_bytes_is_refused_naming_it() -> None:
    limits = DecodeLimits(max_memfd_bytes=4 * MiB)
    sandbox_end, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with SyncChannel(sandbox_end) as sandbox, other:
        sandbox.expect_peer_limits(limits)  # as the sandbox does with the host's limits
        with pytest.raises(ValueError, match=rf"result of {5 * MiB} bytes exceeds max_memfd_bytes={4 * MiB}"):
            sandbox.send(IpcMessage.result(b"x" * (5 * MiB)))
    # A sandbox that sends it anyway: the host refuses it before mapping it.
    with pytest.raises(ProtocolViolation, match=rf"exceeds the limit of {4 * MiB}"):
        receive(b"x" * (5 * MiB), limits)


def hostile_result(blob: bytes, text: object, *, seal: bool = True) -> ProtocolViolation:
    """A sandbox that writes its own record: a result in the memfd shape."""
    async def main() -> None:
        host_end, sandbox_end = create_channel_pair()
        wire = {"kind": "result", "blob": {"fd": 0, "size": len(blob)}, "text": text}
        if seal:
            fd = seal_bytes(blob)
        else:
            fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.write(fd, blob)
        try:
            sandbox_end.sendmsg([bytes((RECORD_INLINE,)) + framing.encode(wire)],
                                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
        finally:
            os.close(fd)
            sandbox_end.close()
        async with AsyncChannel(host_end) as host:
            await host.receive()

    with pytest.raises(ProtocolViolation) as info:
        asyncio.run(main())
    return info.value


@pytest.mark.parametrize("blob, text, seal, reason", [
    (b"\xff\xfe" * 40000, True, True, "result text is not UTF-8"),
    (b"x" * 40000, "yes", True, "result.text must be true or false"),
    (b"x" * 40000, False, False, "memfd is missing seals"),
])
def test_hostile_memfd_results_are_violations(blob: bytes, text: object, seal: bool, reason: str) -> None:
    assert reason in str(hostile_result(blob, text, seal=seal))
