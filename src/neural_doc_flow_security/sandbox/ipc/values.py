"""The value types a frame may carry beyond msgpack's own, by a fixed table.

msgpack carries None, bool, int, float, str, bytes, list and map. These travel
as msgpack extension types, one code each, and are rebuilt on the receiving side
by this table only (never a class named by the peer, never pickle):

    code  type                payload
    1     tuple               one msgpack array (its items, any wire values)
    2     set                 one msgpack array of str, bytes, int, bool or None
    3     frozenset           same as set
    4     datetime.datetime   its isoformat() text (UTF-8), time zone offset kept
    5     datetime.date       its isoformat() text
    6     datetime.time       its isoformat() text
    7     decimal.Decimal     its str() text

On the sending side, a dataclass instance travels as a map of its fields (it
comes back as a dict), subclasses of the built-in types as the built-in type
(an IntEnum as its int, a namedtuple as a tuple, an OrderedDict as a dict).

Map keys and set elements are str, bytes, int, bool or None only: their hashes
are randomized (str, bytes) or collide at most a handful of times (int), so no
frame can make building a dict or set quadratic.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import msgpack

EXT_TUPLE = 1
EXT_SET = 2
EXT_FROZENSET = 3
EXT_DATETIME = 4
EXT_DATE = 5
EXT_TIME = 6
EXT_DECIMAL = 7

CONTAINER_EXTS = frozenset({EXT_TUPLE, EXT_SET, EXT_FROZENSET})
"""Codes whose payload is one msgpack array (walked by the prescan like any array)."""
HASHED_EXTS = frozenset({EXT_SET, EXT_FROZENSET})
"""Codes whose array items are hashed on arrival: key-like scalars only."""
SCALAR_EXT_MAX_BYTES: Mapping[int, int] = MappingProxyType(
    {EXT_DATETIME: 64, EXT_DATE: 16, EXT_TIME: 32, EXT_DECIMAL: 4096}
)
"""Codes whose payload is text, with its largest accepted size."""


def _text(data: bytes) -> str:
    return data.decode("utf-8")


_SCALAR_DECODERS: Mapping[int, Callable[[bytes], object]] = MappingProxyType(
    {
        EXT_DATETIME: lambda data: datetime.datetime.fromisoformat(_text(data)),
        EXT_DATE: lambda data: datetime.date.fromisoformat(_text(data)),
        EXT_TIME: lambda data: datetime.time.fromisoformat(_text(data)),
        EXT_DECIMAL: lambda data: decimal.Decimal(_text(data)),
    }
)


def to_wire(value: object) -> object:
    """msgpack's `default` hook (with strict_types): what `value` travels as.

    Raises TypeError naming the type for anything outside the table.
    """
    kind = type(value)
    if isinstance(value, tuple):
        return msgpack.ExtType(EXT_TUPLE, pack(list(value)))
    if isinstance(value, frozenset):
        return msgpack.ExtType(EXT_FROZENSET, pack(_hashed_items(value)))
    if isinstance(value, set):
        return msgpack.ExtType(EXT_SET, pack(_hashed_items(value)))
    if isinstance(value, datetime.datetime):
        return msgpack.ExtType(EXT_DATETIME, value.isoformat().encode())
    if isinstance(value, datetime.date):
        return msgpack.ExtType(EXT_DATE, value.isoformat().encode())
    if isinstance(value, datetime.time):
        return msgpack.ExtType(EXT_TIME, value.isoformat().encode())
    if isinstance(value, decimal.Decimal):
        return msgpack.ExtType(EXT_DECIMAL, str(value).encode())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    base: type[Any]
    for base in (int, float, str, bytes, dict, list):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a value of type {kind.__module__}.{kind.__qualname__} cannot be sent")


def _hashed_items(items: set[object] | frozenset[object]) -> list[object]:
    for item in items:
        if not isinstance(item, str | bytes | int) and item is not None:
            raise TypeError(f"a set holding a {type(item).__qualname__} cannot be sent "
                            "(set items: str, bytes, int, bool or None)")
    return list(items)


def pack(value: object) -> bytes:
    """Encode `value` as one msgpack value, the types above as their ext codes."""
    packed: bytes = msgpack.packb(value, use_bin_type=True, datetime=False, strict_types=True, default=to_wire)
    return packed


def from_ext(code: int, data: bytes, unpack: Callable[[bytes], object]) -> object:
    """Rebuild the value of one ext (the caller has bounded `data`); ValueError for
    an unknown code or a payload that does not parse."""
    if code in CONTAINER_EXTS:
        items = unpack(data)
        if not isinstance(items, list):
            raise ValueError(f"ext type {code} must hold an array")
        if code == EXT_TUPLE:
            return tuple(items)
        return set(items) if code == EXT_SET else frozenset(items)
    decoder = _SCALAR_DECODERS.get(code)
    if decoder is None:
        raise ValueError(f"msgpack ext type {code} is not accepted")
    return decoder(data)
