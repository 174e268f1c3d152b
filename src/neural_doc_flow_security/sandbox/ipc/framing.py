"""msgpack frames with hard limits; the only decoder the host runs on sandbox bytes.

A frame is one msgpack value built from None, bool, int, float, str, bytes,
list and str-keyed dict. Decoding never unpickles and never accepts ext types;
it bounds sizes, element counts and nesting depth, and turns every failure
(garbage, truncation, bad UTF-8, too deep, too wide) into ProtocolViolation.

msgpack allocates each array and map at its announced length when it reads the
header, so a frame must first prove that it holds what it announces: a skip pass
(msgpack's own, in C, which builds nothing) must consume exactly the frame. Then
every announced element is backed by at least one byte, and what the decoder
allocates, and the work it does, is linear in the frame's size.

On SOCK_SEQPACKET the kernel keeps frame boundaries; `encode_length_prefixed`
and `parse_length_prefix` serve byte streams (pipes, SOCK_STREAM), where a
4-byte big-endian length precedes each frame and a length over the limit is
refused before any of the body is read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, NoReturn

import msgpack

from ..errors import ProtocolViolation
from .limits import DecodeLimits

LENGTH_PREFIX = struct.Struct(">I")

_SCALARS = (type(None), bool, int, float, str, bytes)


class _TooManyObjects(Exception):
    """Raised from inside msgpack's hooks to stop decoding early."""


def encode(value: object) -> bytes:
    """Encode a frame. Raises TypeError for values msgpack cannot represent."""
    packed: bytes = msgpack.packb(value, use_bin_type=True, datetime=False)
    return packed


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ProtocolViolation(f"msgpack ext type {code} is not accepted")


def check_well_formed(data: bytes | bytearray | memoryview) -> None:
    """Refuse a frame that is not exactly one complete msgpack value, building nothing.

    Linear in the frame's bytes: announced lengths are only counted down against
    the bytes that are there, never allocated.
    """
    size = memoryview(data).nbytes
    unpacker = msgpack.Unpacker(max_buffer_size=max(size, 1))
    try:
        unpacker.feed(data)
        unpacker.skip()
    except msgpack.OutOfData:
        raise ProtocolViolation("undecodable frame: truncated (it announces more than it holds)") from None
    except msgpack.StackError:
        raise ProtocolViolation("frame nesting is too deep") from None
    except Exception as exc:  # any decoder fault on hostile bytes is the peer's fault
        raise ProtocolViolation(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if unpacker.tell() != size:
        raise ProtocolViolation(f"undecodable frame: {size - unpacker.tell()} bytes of trailing data")


def decode(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> object:
    """Decode one untrusted frame under `limits`; raise ProtocolViolation on any fault."""
    size = memoryview(data).nbytes
    if size > limits.max_frame_bytes:
        raise ProtocolViolation(f"frame of {size} bytes exceeds max_frame_bytes={limits.max_frame_bytes}")
    check_well_formed(data)
    objects = 0

    # The hooks see every container as soon as it is built, so an amplifying
    # frame (millions of tiny elements) is stopped before it is fully allocated.
    def count_list(items: list[Any]) -> list[Any]:
        nonlocal objects
        objects += len(items)
        if objects > limits.max_objects:
            raise _TooManyObjects
        return items

    def count_map(mapping: dict[Any, Any]) -> dict[Any, Any]:
        nonlocal objects
        objects += len(mapping)
        if objects > limits.max_objects:
            raise _TooManyObjects
        return mapping

    try:
        value: object = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            list_hook=count_list,
            object_hook=count_map,
            max_bin_len=size,
            max_str_len=size,
            max_array_len=min(size, limits.max_container_len),
            max_map_len=min(size, limits.max_container_len),
            max_ext_len=0,
        )
    except ProtocolViolation:
        raise
    except _TooManyObjects:
        raise ProtocolViolation(f"frame holds more than max_objects={limits.max_objects} elements") from None
    except RecursionError:
        raise ProtocolViolation("frame nesting is too deep") from None
    except msgpack.StackError:
        raise ProtocolViolation("frame nesting is too deep") from None
    except MemoryError:
        raise ProtocolViolation("frame needs more memory than the host will give") from None
    except Exception as exc:  # any decoder fault on hostile bytes is the peer's fault
        raise ProtocolViolation(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    check_shape(value, limits.max_depth)
    return value


def check_shape(value: object, max_depth: int) -> None:
    """Reject values nested deeper than `max_depth` or holding non-wire types.

    Iterative, so no input can exhaust the Python stack; only containers are
    stacked, so it costs no memory per scalar.
    """
    if not isinstance(value, list | dict):
        if not isinstance(value, _SCALARS):
            raise ProtocolViolation(f"value of type {type(value).__name__} is not accepted")
        return
    stack: list[tuple[list[Any] | dict[Any, Any], int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolViolation(f"frame nesting exceeds max_depth={max_depth}")
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise ProtocolViolation(f"map key of type {type(key).__name__} is not accepted")
            children: Iterable[object] = item.values()
        else:
            children = item
        for child in children:
            if isinstance(child, list | dict):
                stack.append((child, depth + 1))
            elif not isinstance(child, _SCALARS):
                raise ProtocolViolation(f"value of type {type(child).__name__} is not accepted")


def encode_length_prefixed(frame: bytes) -> bytes:
    """Prefix a frame with its 4-byte big-endian length (for byte streams)."""
    return LENGTH_PREFIX.pack(len(frame)) + frame


def parse_length_prefix(header: bytes | bytearray | memoryview, limits: DecodeLimits) -> int:
    """Return the body length announced by a 4-byte header, refusing lengths over the limit.

    Call this before reading (or allocating for) the body: a peer that claims
    4 GiB is refused here at the cost of four bytes.
    """
    if len(header) != LENGTH_PREFIX.size:
        raise ProtocolViolation(f"length prefix must be {LENGTH_PREFIX.size} bytes, got {len(header)}")
    (length,) = LENGTH_PREFIX.unpack(header)
    if length > limits.max_frame_bytes:
        raise ProtocolViolation(
            f"frame announces {length} bytes, over max_frame_bytes={limits.max_frame_bytes}"
        )
    return int(length)
