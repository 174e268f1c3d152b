"""The messages host and sandbox exchange, and their strict wire shape.

A message travels as a msgpack map: {"kind": <kind>, <field>: <value>, ...}
with exactly the fields of its kind. Byte blobs (a data message's bytes, a
call's cloudpickle payload) travel inline as msgpack bin when small, or as a
reference {"fd": index, "size": n} to a sealed memfd attached to the record.
A callable's result that is a big bytes, bytearray or str value travels the
same way, as {"kind": "result", "blob": <reference>, "text": <is str>}: its own
memfd, bounded by `max_memfd_bytes` rather than by `max_frame_bytes`; the host
copies it out (UTF-8 decoded for a str) and unmaps the memfd at once.

`IpcMessage.from_wire` validates a decoded frame against the kinds the peer may
send; any other shape is a ProtocolViolation. This module never unpickles: the
`call` payload is opaque bytes here, unpickled only by the sandbox side.
"""

from __future__ import annotations

import enum
import math
import traceback as traceback_module
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ..errors import ProtocolViolation
from .memfd import unmap

Blob = bytes | memoryview
BlobResolver = Callable[[int, int], memoryview]
"""Maps (fd index, announced size) of a blob reference to the mapped bytes."""


class ControlMessage(enum.StrEnum):
    """Commands the host sends to a running sandbox."""

    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"
    UPDATE_LIMITS = "update_limits"  # carried out by the host on the sandbox's cgroup: never sent to it


class MessageKind(enum.StrEnum):
    """What a message is; each kind has a fixed set of fields on the wire."""

    CONTROL = "control"
    STATUS = "status"
    DATA = "data"
    PROGRESS = "progress"
    LOG = "log"
    RESULT = "result"
    ERROR = "error"
    HEARTBEAT = "heartbeat"
    CALL = "call"


class ChannelRole(enum.StrEnum):
    """Which end of a channel this process holds."""

    HOST = "host"
    SANDBOX = "sandbox"


KINDS_SENT_BY: Mapping[ChannelRole, frozenset[MessageKind]] = MappingProxyType(
    {
        ChannelRole.HOST: frozenset({MessageKind.CONTROL, MessageKind.CALL, MessageKind.DATA}),
        ChannelRole.SANDBOX: frozenset(
            {
                MessageKind.STATUS,
                MessageKind.DATA,
                MessageKind.PROGRESS,
                MessageKind.LOG,
                MessageKind.RESULT,
                MessageKind.ERROR,
                MessageKind.HEARTBEAT,
            }
        ),
    }
)
"""The kinds each side may send; a receiver refuses any other kind from its peer."""

LOG_LEVELS = frozenset({"debug", "info", "warning", "error"})

_FIELDS: Mapping[MessageKind, frozenset[str]] = MappingProxyType(
    {
        MessageKind.CONTROL: frozenset({"kind", "control"}),
        MessageKind.STATUS: frozenset({"kind", "health", "heartbeat_age", "usage"}),
        MessageKind.DATA: frozenset({"kind", "tag", "data"}),
        MessageKind.PROGRESS: frozenset({"kind", "fraction", "note", "reports"}),
        MessageKind.LOG: frozenset({"kind", "level", "text"}),
        MessageKind.RESULT: frozenset({"kind", "value"}),
        MessageKind.ERROR: frozenset({"kind", "type", "message", "traceback"}),
        MessageKind.HEARTBEAT: frozenset({"kind", "sequence"}),
        MessageKind.CALL: frozenset({"kind", "payload"}),
    }
)
_RESULT_IN_MEMFD = frozenset({"kind", "blob", "text"})  # the other shape of a result: a bytes or str in a memfd

_DEPRECATED_USAGE_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "cpu_seconds": ("cpu_user_seconds", "cpu_system_seconds"),
        "memory_bytes": ("memory_current_bytes",),
        "processes": ("processes_current",),
    }
)


class StatusUsage(Mapping[str, float]):
    """The `usage` of a status message: read-only, named as in ResourceUsage
    (`wall_seconds`, `cpu_user_seconds`, `cpu_system_seconds`, `memory_peak_bytes`,
    `processes_peak`, `io_read_bytes`, `io_write_bytes`) plus the live values
    `memory_current_bytes`, `processes_current` and `frozen`.

    The names of earlier releases (`cpu_seconds`, `memory_bytes`, `processes`)
    still read, with a DeprecationWarning; they are not listed by iteration.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, key: str) -> float:
        if key not in self._values and key in _DEPRECATED_USAGE_KEYS:
            parts = _DEPRECATED_USAGE_KEYS[key]
            warnings.warn(f"status usage key {key!r} is deprecated: use {' + '.join(parts)}",
                          DeprecationWarning, stacklevel=2)
            return sum(self._values[part] for part in parts)
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        if key in self._values:
            return True
        parts = _DEPRECATED_USAGE_KEYS.get(key) if isinstance(key, str) else None
        return parts is not None and all(part in self._values for part in parts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StatusUsage({self._values!r})"


_EMPTY_USAGE: Mapping[str, float] = StatusUsage()
_NO_LIMITS: Mapping[str, int | None] = MappingProxyType({})


@dataclass(frozen=True)
class IpcMessage:
    """One message; build it with the class-method constructors, one per kind.

    Only the fields of `kind` are meaningful; the others keep their defaults.
    A received blob (`content` of a data message, `payload` of a call) may be
    a read-only memoryview over a memfd mapping (zero copy); `bytes(blob)`
    copies it out.
    """

    kind: MessageKind
    control_message: ControlMessage | None = None
    health: str = ""
    heartbeat_age: float = 0.0
    usage: Mapping[str, float] = field(default_factory=lambda: _EMPTY_USAGE)
    content: Blob = b""
    tag: str = ""
    fraction: float = 0.0
    note: str = ""
    reports: int = 0
    level: str = ""
    text: str = ""
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    sequence: int = 0
    payload: Blob = b""
    limits: Mapping[str, int | None] = field(default_factory=lambda: _NO_LIMITS)  # an UPDATE_LIMITS control

    def __repr__(self) -> str:
        # Only the fields that are set, and blobs by size: a message may carry a gigabyte.
        parts = [f"kind={self.kind.value}"]
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if f.name in ("content", "payload"):
                size = memoryview(value).nbytes
                if size:
                    parts.append(f"{f.name}=<{size} bytes>")
            elif value != _DEFAULTS[f.name]:
                parts.append(f"{f.name}={_short(value)}")
        return f"IpcMessage({', '.join(parts)})"

    # -- constructors -------------------------------------------------------

    @classmethod
    def control(cls, command: ControlMessage) -> IpcMessage:
        """Host -> sandbox: stop, pause or resume."""
        return cls(MessageKind.CONTROL, control_message=ControlMessage(command))

    @classmethod
    def update_limits(cls, **limits: int | None) -> IpcMessage:
        """Host only: change a running sandbox's limits (SandboxHandle.update_limits'
        keywords), by send_message(). The manager carries it out on the sandbox's
        cgroup; it never reaches the sandbox, and a sandbox cannot send one."""
        return cls(MessageKind.CONTROL, control_message=ControlMessage.UPDATE_LIMITS,
                   limits=MappingProxyType(dict(limits)))

    @classmethod
    def status(
        cls, *, health: str, heartbeat_age: float = 0.0, usage: Mapping[str, float] | None = None
    ) -> IpcMessage:
        """Sandbox -> host: self-reported health (untrusted; resource truth comes from the kernel)."""
        return cls(
            MessageKind.STATUS,
            health=health,
            heartbeat_age=float(heartbeat_age),
            usage=StatusUsage(usage),
        )

    @classmethod
    def data(cls, content: bytes | bytearray | memoryview, *, tag: str = "") -> IpcMessage:
        """Either way: a chunk of bytes with a free-form tag; big chunks go by sealed memfd."""
        blob: Blob = bytes(content) if isinstance(content, bytearray) else content
        return cls(MessageKind.DATA, content=blob, tag=tag)

    @classmethod
    def progress(cls, fraction: float, note: str = "", *, reports: int = 1) -> IpcMessage:
        """Sandbox -> host: how far along the work is, 0.0 to 1.0. `reports`: how many
        report_progress() calls it stands for (the latest wins; the rest were coalesced)."""
        return cls(MessageKind.PROGRESS, fraction=float(fraction), note=note, reports=reports)

    @classmethod
    def log(cls, level: str, text: str) -> IpcMessage:
        """Sandbox -> host: a log line; level is one of debug, info, warning, error."""
        return cls(MessageKind.LOG, level=level, text=text)

    @classmethod
    def result(cls, value: Any) -> IpcMessage:
        """Sandbox -> host: the return value (msgpack types only: no pickles come back)."""
        return cls(MessageKind.RESULT, value=value)

    @classmethod
    def error(cls, error_type: str, message: str, traceback: str = "") -> IpcMessage:
        """Sandbox -> host: the payload raised; names and text only, never the exception object."""
        return cls(MessageKind.ERROR, error_type=error_type, message=message, traceback=traceback)

    @classmethod
    def from_exception(cls, exc: BaseException) -> IpcMessage:
        """Sandbox -> host: an error message describing `exc`, with its formatted traceback."""
        # "ValueError", "pypdf.errors.PdfStreamError": as Python's own tracebacks name it.
        module = type(exc).__module__
        name = type(exc).__qualname__ if module == "builtins" else f"{module}.{type(exc).__qualname__}"
        return cls.error(name, str(exc), "".join(traceback_module.format_exception(exc)))

    @classmethod
    def heartbeat(cls, sequence: int = 0) -> IpcMessage:
        """Sandbox -> host: still alive."""
        return cls(MessageKind.HEARTBEAT, sequence=sequence)

    @classmethod
    def call(cls, payload: bytes | bytearray | memoryview) -> IpcMessage:
        """Host -> sandbox: a cloudpickled call; only the sandbox side ever unpickles it."""
        blob: Blob = bytes(payload) if isinstance(payload, bytearray) else payload
        return cls(MessageKind.CALL, payload=blob)

    # -- wire form ----------------------------------------------------------

    def to_wire(self, *, inline_limit: int) -> tuple[dict[str, object], list[Blob]]:
        """Return the msgpack-able map and the blobs that must travel as memfds.

        A blob larger than `inline_limit` bytes is replaced by {"fd": i, "size": n},
        where i indexes the returned blob list.
        """
        spilled: list[Blob] = []

        def blob(value: Blob) -> object:
            size = memoryview(value).nbytes
            if size <= inline_limit:
                return value
            spilled.append(value)
            return {"fd": len(spilled) - 1, "size": size}

        kind = self.kind
        wire: dict[str, object] = {"kind": kind.value}
        if kind is MessageKind.CONTROL:
            if self.control_message is None:
                raise ValueError("control message without a command")
            if self.control_message is ControlMessage.UPDATE_LIMITS:
                raise ValueError("update_limits is carried out by the host, never sent to a sandbox")
            wire["control"] = self.control_message.value
        elif kind is MessageKind.STATUS:
            wire.update(health=self.health, heartbeat_age=self.heartbeat_age, usage=dict(self.usage))
        elif kind is MessageKind.DATA:
            wire.update(tag=self.tag, data=blob(self.content))
        elif kind is MessageKind.PROGRESS:
            wire.update(fraction=self.fraction, note=self.note, reports=self.reports)
        elif kind is MessageKind.LOG:
            wire.update(level=self.level, text=self.text)
        elif kind is MessageKind.RESULT:
            big = _big_result(self.value, inline_limit)
            if big is None:
                wire["value"] = self.value
            else:
                wire.update(blob=blob(big), text=isinstance(self.value, str))
        elif kind is MessageKind.ERROR:
            wire.update(type=self.error_type, message=self.message, traceback=self.traceback)
        elif kind is MessageKind.HEARTBEAT:
            wire["sequence"] = self.sequence
        elif kind is MessageKind.CALL:
            wire["payload"] = blob(self.payload)
        return wire, spilled

    @classmethod
    def from_wire(
        cls, obj: object, *, accept: frozenset[MessageKind], resolve_blob: BlobResolver
    ) -> IpcMessage:
        """Validate a decoded frame and build the message; ProtocolViolation on any wrong shape."""
        if not isinstance(obj, dict):
            raise ProtocolViolation(f"message must be a map, got {type(obj).__name__}")
        if not all(isinstance(key, str) for key in obj):  # values may have other keys; messages not
            raise ProtocolViolation("message fields must be named by strings")
        raw_kind = obj.get("kind")
        try:
            if not isinstance(raw_kind, str):
                raise ValueError(raw_kind)
            kind = MessageKind(raw_kind)
        except ValueError:
            raise ProtocolViolation(f"unknown message kind {_short(raw_kind)}") from None
        if kind not in accept:
            raise ProtocolViolation(f"peer may not send {kind.value!r} messages")
        keys = frozenset(obj)
        if kind is MessageKind.RESULT and keys == _RESULT_IN_MEMFD:
            return cls.result(_result_from_memfd(obj, resolve_blob))
        if keys != _FIELDS[kind]:
            extra = sorted(keys - _FIELDS[kind])
            missing = sorted(_FIELDS[kind] - keys)
            raise ProtocolViolation(f"{kind.value} message fields wrong: extra {extra}, missing {missing}")

        if kind is MessageKind.CONTROL:
            command = _str(obj, "control")
            try:
                control = ControlMessage(command)
            except ValueError:
                raise ProtocolViolation(f"unknown control command {_short(command)}") from None
            if control is ControlMessage.UPDATE_LIMITS:  # the host's own, never on a channel
                raise ProtocolViolation(f"unknown control command {_short(command)}")
            return cls.control(control)
        if kind is MessageKind.STATUS:
            usage = obj["usage"]
            if not isinstance(usage, dict) or not all(isinstance(name, str) for name in usage):
                raise ProtocolViolation("status.usage must be a map with string keys")
            checked = {name: _number(usage, name, f"status.usage.{name}") for name in usage}
            age = _number(obj, "heartbeat_age", "status.heartbeat_age")
            if age < 0:
                raise ProtocolViolation("status.heartbeat_age must not be negative")
            return cls.status(health=_str(obj, "health"), heartbeat_age=age, usage=checked)
        if kind is MessageKind.DATA:
            return cls(MessageKind.DATA, tag=_str(obj, "tag"), content=_blob(obj, "data", resolve_blob))
        if kind is MessageKind.PROGRESS:
            fraction = _number(obj, "fraction", "progress.fraction")
            if not 0.0 <= fraction <= 1.0:
                raise ProtocolViolation("progress.fraction must be within 0..1")
            reports = obj["reports"]
            if isinstance(reports, bool) or not isinstance(reports, int) or reports < 1:
                raise ProtocolViolation("progress.reports must be a positive integer")
            return cls.progress(fraction, _str(obj, "note"), reports=reports)
        if kind is MessageKind.LOG:
            level = _str(obj, "level")
            if level not in LOG_LEVELS:
                raise ProtocolViolation(f"unknown log level {_short(level)}")
            return cls.log(level, _str(obj, "text"))
        if kind is MessageKind.RESULT:
            return cls.result(obj["value"])
        if kind is MessageKind.ERROR:
            return cls.error(_str(obj, "type"), _str(obj, "message"), _str(obj, "traceback"))
        if kind is MessageKind.HEARTBEAT:
            sequence = obj["sequence"]
            if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
                raise ProtocolViolation("heartbeat.sequence must be a non-negative integer")
            return cls.heartbeat(sequence)
        return cls(MessageKind.CALL, payload=_blob(obj, "payload", resolve_blob))


_DEFAULTS: Mapping[str, object] = MappingProxyType(
    {
        f.name: f.default_factory() if f.default_factory is not MISSING else f.default
        for f in fields(IpcMessage)
    }
)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _str(obj: dict[str, object], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ProtocolViolation(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _number(obj: Mapping[str, object], key: str, label: str) -> float:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolViolation(f"{label} must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolViolation(f"{label} must be finite")
    return value


def _blob(obj: dict[str, object], key: str, resolve_blob: BlobResolver) -> Blob:
    value = obj[key]
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict) and frozenset(value) == {"fd", "size"}:
        index, size = value["fd"], value["size"]
        if (
            isinstance(index, int)
            and isinstance(size, int)
            and not isinstance(index, bool)
            and not isinstance(size, bool)
            and index >= 0
            and size >= 0
        ):
            return resolve_blob(index, size)
    raise ProtocolViolation(f"field {key!r} must be bytes or a memfd reference")


def _big_result(value: Any, inline_limit: int) -> Blob | None:
    """The bytes a result travels as in a memfd of its own (a bytes, bytearray or str
    over `inline_limit`), or None: it goes in the frame."""
    if isinstance(value, bytes | bytearray) and len(value) > inline_limit:
        return value if isinstance(value, bytes) else memoryview(value)
    if isinstance(value, str) and len(value) > inline_limit:
        return value.encode()  # UnicodeEncodeError (a lone surrogate) is a ValueError: not sendable
    return None


def _result_from_memfd(obj: dict[str, object], resolve_blob: BlobResolver) -> bytes | str:
    """A result sent in a memfd of its own, copied out; the mapping goes at once."""
    text = obj["text"]
    if not isinstance(text, bool):
        raise ProtocolViolation("result.text must be true or false")
    view = _blob(obj, "blob", resolve_blob)
    try:
        if not text:
            return bytes(view)
        try:
            return str(view, "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(f"result text is not UTF-8: {exc.reason} at byte {exc.start}") from None
    finally:
        if isinstance(view, memoryview):
            unmap(view)
