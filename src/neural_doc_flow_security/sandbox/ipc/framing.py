"""msgpack frames with hard limits; the only decoder the host runs on sandbox bytes.

A frame is one msgpack value built from None, bool, int, float, str, bytes,
list and dict, plus the ext types of the fixed table in `values` (tuple, set,
frozenset, datetime, date, time, Decimal); map keys and set items are str,
bytes, int, bool or None. Decoding never unpickles and accepts no other ext
type; it bounds sizes, element counts and nesting depth, and turns every failure
(garbage, truncation, bad UTF-8, too deep, too wide) into ProtocolViolation.
msgpack allocates each array and map at its announced length when it reads the
header, so a frame must first prove that it holds what it announces. One linear
walk over the headers (`prescan`, building nothing) does that and enforces
truncation, trailing bytes, depth, widths, the object count, the ext table and
what may be a key, ext payloads included; msgpack's C decoder then builds the
value, with its own length limits and counting hooks as a second net. Every
announced element is backed by at least one byte, and what the decoder
allocates, and the work it does, is linear in the frame's size.

On SOCK_SEQPACKET the kernel keeps frame boundaries; `encode_length_prefixed`
and `parse_length_prefix` serve byte streams (pipes, SOCK_STREAM), where a
4-byte big-endian length precedes each frame and a length over the limit is
refused before any of the body is read.
"""

from __future__ import annotations

import re
import struct
from typing import Any, NoReturn

import msgpack

from ..errors import ProtocolViolation
from . import values
from .limits import DecodeLimits

LENGTH_PREFIX = struct.Struct(">I")

class _TooManyObjects(Exception):
    """Raised from inside msgpack's hooks to stop decoding early."""


def encode(value: object) -> bytes:
    """Encode a frame. Raises TypeError for values it cannot represent (see `values`)."""
    return values.pack(value)


def _refuse(reason: str) -> NoReturn:
    raise ProtocolViolation(reason)


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
    table[0xC7], table[0xC8], table[0xC9] = (_EXT, -1), (_EXT, -2), (_EXT, -4)  # ext 8/16/32: length field
    for b, size in zip(range(0xD4, 0xD9), (1, 2, 4, 8, 16), strict=True):
        table[b] = (_EXT, size)  # fixext: the payload size
    table[0xCA], table[0xCB] = (_SKIP, 4), (_SKIP, 8)
    for b, width in zip(range(0xCC, 0xD0), (1, 2, 4, 8), strict=True):
        table[b] = table[b + 4] = (_SKIP, width)  # uint8..64, int8..64
    table[0xD9], table[0xDA], table[0xDB] = (_BYTES, 1), (_BYTES, 2), (_BYTES, 4)
    table[0xDC], table[0xDD] = (_ARRAY, -2), (_ARRAY, -4)
    table[0xDE], table[0xDF] = (_MAP, -2), (_MAP, -4)
    return tuple(table)


_LEAD = _lead_bytes()
# What may be a map key or a set item: nil, bool, ints, str and bin (see `values`).
_KEY_LEADS = frozenset(
    (*range(0x00, 0x80), *range(0xE0, 0x100), *range(0xA0, 0xC0), 0xC0, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6,
     *range(0xCC, 0xD4), 0xD9, 0xDA, 0xDB)
)
_ARRAY_LEADS = frozenset((*range(0x90, 0xA0), 0xDC, 0xDD))
# Runs of fixed-size scalars of one size (fixints, nil, bools; the ints and floats of
# 2, 3, 5 and 9 bytes): each run is skipped in one C call, its length says how many.
_FIXED_RUNS: dict[int, tuple[int, re.Pattern[bytes]]] = {}
for _size, _leads in ((1, rb"\x00-\x7f\xc0\xc2\xc3\xe0-\xff"), (2, rb"\xcc\xd0"), (3, rb"\xcd\xd1"),
                      (5, rb"\xce\xd2\xca"), (9, rb"\xcf\xd3\xcb")):
    _run = re.compile(rb"(?:[" + _leads + rb"]" + rb"." * (_size - 1) + rb")+", re.DOTALL)
    for _byte in re.findall(rb"[" + _leads + rb"]", bytes(range(256))):
        _FIXED_RUNS[_byte[0]] = (_size, _run)
_PLAIN, _KEYED, _HASHED = 0, 1, 2  # containers: an array, a map (keys), a set's array (every item)


def prescan(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> None:
    """Walk the headers of one frame and enforce depth, widths, the object count,
    the ext table and what may be a key before msgpack allocates anything.

    msgpack allocates each array and map at its declared length as soon as it
    reads the header. Here every declared count must fit in the bytes that are
    left (an element takes at least one), so what the decoder allocates next is
    bounded by the frame's size; the walk itself keeps two ints per open container
    and its work is linear in the number of values, bounded by max_objects. An ext
    container (tuple, set) is walked as the array it holds, which must end exactly
    where its ext ends; a text ext (datetime, Decimal) is bounded and skipped.
    """
    view = memoryview(data).cast("B")
    end = len(view)
    max_depth, max_width, max_objects = limits.max_depth, limits.max_container_len, limits.max_objects
    lead = _LEAD
    pending = [1]  # values still to read in each open container; the frame is one value
    shapes = [_PLAIN]  # per open container: _PLAIN, _KEYED (a map) or _HASHED (a set's items)
    ends = [-1]  # per open container: where it must end (an ext's array), else -1
    objects = 0
    pos = 0
    while pending:
        if not pending[-1]:
            pending.pop()
            shapes.pop()
            if ends.pop() not in (-1, pos):
                raise ProtocolViolation("undecodable frame: an ext's array does not fill the ext")
            continue
        shape = shapes[-1]
        if shape == _PLAIN and pending[-1] > 1 and pos < end and (fixed := _FIXED_RUNS.get(view[pos])):
            # Searched no further than the container's own elements: linear however deep.
            size, pattern = fixed
            run = pattern.match(view, pos, pos + pending[-1] * size)
            if run is not None:
                pending[-1] -= (run.end() - pos) // size
                pos = run.end()
                continue
        key = shape == _HASHED or (shape == _KEYED and not pending[-1] % 2)
        pending[-1] -= 1
        if pos >= end:
            raise ProtocolViolation("undecodable frame: truncated")
        byte = view[pos]
        if key and byte not in _KEY_LEADS:
            raise ProtocolViolation(f"a map key or set item must be str, bytes, int, bool or nil (byte {byte:#04x})")
        kind, n = lead[byte]
        pos += 1
        if kind == _SKIP:
            pos += n
            continue
        if kind == _BYTES:
            if pos + n > end:
                raise ProtocolViolation("undecodable frame: truncated")
            pos += n + _LENGTH_FIELD[n].unpack_from(view, pos)[0]
            continue
        ext_end = -1
        if kind == _EXT:
            if n < 0:
                if pos - n > end:
                    raise ProtocolViolation("undecodable frame: truncated")
                size = _LENGTH_FIELD[-n].unpack_from(view, pos)[0]
                pos -= n
            else:
                size = n
            if pos >= end:
                raise ProtocolViolation("undecodable frame: truncated")
            code = view[pos] - 256 if view[pos] > 127 else view[pos]
            pos += 1
            if code in values.CONTAINER_EXTS:
                ext_end = pos + size
                if ext_end > end or pos >= end or view[pos] not in _ARRAY_LEADS:
                    raise ProtocolViolation(f"undecodable frame: ext type {code} must hold one array")
                kind, n = lead[view[pos]]
                pos += 1
                shape = _HASHED if code in values.HASHED_EXTS else _PLAIN
            elif code in values.SCALAR_EXT_MAX_BYTES:
                if size > values.SCALAR_EXT_MAX_BYTES[code]:
                    raise ProtocolViolation(f"ext type {code} of {size} bytes is too long")
                pos += size
                continue
            else:
                raise ProtocolViolation(f"msgpack ext type {code} is not accepted")
        elif kind == _BAD:
            raise ProtocolViolation(f"undecodable frame: invalid msgpack byte {view[pos - 1]:#04x}")
        else:
            shape = _KEYED if kind == _MAP else _PLAIN
        if n < 0:
            if pos - n > end:
                raise ProtocolViolation("undecodable frame: truncated")
            width = -n
            n = _LENGTH_FIELD[width].unpack_from(view, pos)[0]
            pos += width
        if n > max_width:
            raise ProtocolViolation(f"container of {n} elements exceeds max_container_len={max_width}")
        count = 2 * n if kind == _MAP else n
        if count > end - pos:
            raise ProtocolViolation(f"undecodable frame: it announces more than it holds ({n} elements, "
                                    f"{end - pos} bytes left)")
        objects += n
        if objects > max_objects:
            raise ProtocolViolation(f"frame holds more than max_objects={max_objects} elements")
        if len(pending) > max_depth:
            raise ProtocolViolation(f"frame nesting is too deep: exceeds max_depth={max_depth}")
        pending.append(count)
        shapes.append(shape)
        ends.append(ext_end)
    if pos != end:
        problem = "truncated" if pos > end else f"{end - pos} bytes of trailing data"
        raise ProtocolViolation(f"undecodable frame: {problem}")


def decode(data: bytes | bytearray | memoryview, limits: DecodeLimits) -> object:
    """Decode one untrusted frame under `limits`; raise ProtocolViolation on any fault."""
    size = memoryview(data).nbytes
    if size > limits.max_frame_bytes:
        raise ProtocolViolation(f"frame of {size} bytes exceeds max_frame_bytes={limits.max_frame_bytes}")
    prescan(data, limits)  # everything structural, before anything is built
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

    def unpack(payload: bytes | bytearray | memoryview) -> object:
        return msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=False,  # the keys prescan let through: str, bytes, int, bool, nil
            ext_hook=lambda code, ext: values.from_ext(code, ext, unpack),
            list_hook=count_list,
            object_hook=count_map,
            max_bin_len=size,
            max_str_len=size,
            max_array_len=min(size, limits.max_container_len),
            max_map_len=min(size, limits.max_container_len),
            max_ext_len=size,
        )

    try:
        value = unpack(data)
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
    return value


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
