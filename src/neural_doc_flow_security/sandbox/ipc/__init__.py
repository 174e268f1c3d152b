"""Host <-> sandbox IPC: one SOCK_SEQPACKET socketpair per sandbox, msgpack frames
under hard limits, big payloads as sealed memfds."""

from .channel import AsyncChannel, SyncChannel, create_channel_pair
from .limits import DecodeLimits
from .memfd import read_sealed, seal_bytes
from .messages import ChannelRole, ControlMessage, IpcMessage, MessageKind

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
