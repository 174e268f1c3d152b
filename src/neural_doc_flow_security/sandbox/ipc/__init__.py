"""Host <-> sandbox IPC: one SOCK_SEQPACKET socketpair per sandbox, msgpack frames
under hard limits, big payloads as sealed memfds."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .channel import AsyncChannel, SyncChannel, create_channel_pair
    from .limits import DecodeLimits
    from .memfd import read_sealed, seal_bytes
    from .messages import ChannelRole, ControlMessage, IpcMessage, MessageKind

# Imported on first use: `ndf-sandbox run` needs ipc.memfd only, not msgpack and the channel.
_LAZY = {
    "AsyncChannel": ".channel", "SyncChannel": ".channel", "create_channel_pair": ".channel",
    "DecodeLimits": ".limits", "read_sealed": ".memfd", "seal_bytes": ".memfd",
    "ChannelRole": ".messages", "ControlMessage": ".messages", "IpcMessage": ".messages",
    "MessageKind": ".messages",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncChannel",
    "ChannelRole",
    "ControlMessage",
    "DecodeLimits",
    "IpcMessage",
    "MessageKind",
    "SyncChannel",
    "create_channel_pair",
    "read_sealed",
    "seal_bytes",
]
