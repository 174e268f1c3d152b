"""msgpack frames with hard limits; the only decoder the host runs on sandbox bytes.

A frame is one msgpack value built from None, bool, int, float, str, bytes,
list and str-keyed dict. Decoding never unpickles and never accepts ext types;
it bounds sizes, element counts and nesting depth, and turns every failure
(garbage, truncation, bad UTF-8, too deep, too wide) into ProtocolViolation.
A linear walk over the headers (`prescan`) enforces the bounds before msgpack
allocates: a frame costs the host work and memory linear in its own size.

On SOCK_SEQPACKET the kernel keeps frame boundaries; `encode_length_prefixed`
and `parse_length_prefix` serve byte streams (pipes, SOCK_STREAM), where a
4-byte big-endian length precedes each frame and a length over the limit is
refused before any of the body is read.
"""

from __future__ import annotations

import struct
from typing import NoReturn

import msgpack

from ..errors import ProtocolViolation
from .limits import DecodeLimits

LENGTH_PREFIX = struct.Struct(">I")

_SCALARS = (type(None), bool, int, float, str, bytes)


def encode(value: object) -> bytes:
    """Encode a frame. Raises TypeError for values msgpack cannot represent."""
    packed: bytes = msgpack.packb(value, use_bin_type=True, datetime=False)
    return packed


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ProtocolViolation(f"msgpack ext type {code} is not accepted")


_U8, _U16, _U32 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I")
_LENGTH_FIELD = {1: _U8, 2: _U16, 4: _U32}

# What each lead byte is: (kind, n). kind SKIP: n more bytes follow; BYTES: an n-byte
# length of a str/bin follows; ARRAY/MAP: n is the count, or -width of a count field.
_SKIP, _BYTES, _ARRAY, _MAP, _EXT, _BAD = range(6)


def _lead_bytes() -> tuple[tuple[int, int], ...]:
    table = [(_BAD, 0)] * 256
    for b in range(0x00, 0x80):
        table[b] = (_SKIP, 0)
    for b in range(0xE0, 0x100):
        table[b] = (_SKIP, 0)
    for b in range(0x80, 0x90):
        table[b] = (_MAP, b & 0x0F)
    for b in range(0x90, 0xA0):
        table[b] = (_ARRAY, b & 0x0F)
    for b in range(0xA0, 0xC0):
        table[b] = (_SKIP, b & 0x1F)
    table[0xC0] = table[0xC2] = table[0xC3] = (_SKIP, 0)
    table[0xC4], table[0xC5], table[0xC6] = (_BYTES, 1), (_BYTES, 2), (_BYTES, 4)
    for b in (0xC7, 0xC8, 0xC9, *range(0xD4, 0xD9)):
        table[b] = (_EXT, 0)
    table[0xCA], table[0xCB] = (_SKIP, 4), (_SKIP, 8)
    for b, width in zip(range(0xCC, 0xD0), (1, 2, 4, 8), strict=True):
        table[b] = table[b + 4] = (_SKIP, width)  # uint8..64, int8..64
    table[0xD9], table[0xDA], table[0xDB] = (_BYTES, 1), (_BYTES, 2), (_BYTES, 4)
    table[0xDC], table[0xDD] = (_ARRAY, -2), (_ARRAY, -4)
    table[0xDE], table[0xDF] = (_MAP, -2), (_MAP, -4)
    return tuple(table)


_LEAD = _lead_bytes()


def prescan(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> None:
    """Walk the headers of one frame and enforce depth, widths and the object count
    before msgpack allocates anything.

    msgpack allocates each array and map at its declared length as soon as it
    reads the header. Here every declared count must fit in the bytes that are
    left (an element takes at least one), so what the decoder allocates next is
    bounded by the frame's size; the walk itself keeps one int per open container
    and its work is linear in the number of values, bounded by max_objects.
    """
    view = memoryview(data).cast("B")
    end = len(view)
    max_depth, max_width, max_objects = limits.max_depth, limits.max_container_len, limits.max_objects
    lead = _LEAD
    pending = [1]  # values still to read in each open container; the frame is one value
    objects = 0
    pos = 0
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= end:
            raise ProtocolViolation("undecodable frame: truncated")
        kind, n = lead[view[pos]]
        pos += 1
        if kind == _SKIP:
            pos += n
            continue
        if kind == _BYTES:
            if pos + n > end:
                raise ProtocolViolation("undecodable frame: truncated")
            pos += n + _LENGTH_FIELD[n].unpack_from(view, pos)[0]
            continue
        if kind == _EXT:
            raise ProtocolViolation("msgpack ext types are not accepted")
        if kind == _BAD:
            raise ProtocolViolation(f"undecodable frame: invalid msgpack byte {view[pos - 1]:#04x}")
        if n < 0:
            if pos - n > end:
                raise ProtocolViolation("undecodable frame: truncated")
            width = -n
            n = _LENGTH_FIELD[width].unpack_from(view, pos)[0]
            pos += width
        if n > max_width:
            raise ProtocolViolation(f"container of {n} elements exceeds max_container_len={max_width}")
        values = 2 * n if kind == _MAP else n
        if values > end - pos:
            raise ProtocolViolation(f"undecodable frame: {n} elements announced, {end - pos} remaining bytes")
        objects += n
        if objects > max_objects:
            raise ProtocolViolation(f"frame holds more than max_objects={max_objects} elements")
        if len(pending) > max_depth:
            raise ProtocolViolation(f"frame nesting is too deep: exceeds max_depth={max_depth}")
        pending.append(values)
    if pos != end:
        problem = "truncated" if pos > end else f"{end - pos} bytes of trailing data"
        raise ProtocolViolation(f"undecodable frame: {problem}")


def decode(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> object:
    """Decode one untrusted frame under `limits`; raise ProtocolViolation on any fault."""
    size = memoryview(data).nbytes
    if size > limits.max_frame_bytes:
        raise ProtocolViolation(f"frame of {size} bytes exceeds max_frame_bytes={limits.max_frame_bytes}")
    prescan(data, limits)
    try:
        value: object = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            # Checked by prescan; repeated, scaled to the frame, in case the two disagree.
            max_bin_len=size,
            max_str_len=size,
            max_array_len=min(size, limits.max_container_len),
            max_map_len=min(size, limits.max_container_len),
            max_ext_len=0,
        )
    except ProtocolViolation:
        raise
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

    Iterative, so no input can exhaust the Python stack.
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, _SCALARS):
            continue
        if isinstance(item, list):
            children: list[object] = item
        elif isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise ProtocolViolation(f"map key of type {type(key).__name__} is not accepted")
            children = list(item.values())
        else:
            raise ProtocolViolation(f"value of type {type(item).__name__} is not accepted")
        if depth + 1 > max_depth:
            raise ProtocolViolation(f"frame nesting exceeds max_depth={max_depth}")
        stack.extend((child, depth + 1) for child in children)


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
