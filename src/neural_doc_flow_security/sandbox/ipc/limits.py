"""Hard limits on what the host accepts from a sandbox over IPC, and the rate limiter.

Everything a sandbox sends is hostile; these numbers bound the memory, CPU and
file descriptors one sandbox can make the host spend on decoding its messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from ..errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied when decoding messages from the peer of a channel.

    Attributes:
        max_inline_bytes: largest socket record accepted (one SOCK_SEQPACKET
            message). Senders spill bigger frames and blobs into sealed memfds.
        max_frame_bytes: largest msgpack frame decoded, inline or from a memfd
            (a callable's result is one frame, unless it is a big bytes or str:
            see max_memfd_bytes; the sandbox is told both limits, and a result
            over them comes back as an error naming the limit).
        max_depth: deepest container nesting in a frame (the message map is depth 1,
            a callable's result starts at depth 2; a tuple or set is one level).
        max_container_len: most elements in one array or map.
        max_objects: most container elements in one frame, summed over all
            containers (bounds the Python objects one frame can allocate).
        max_total_bytes: most bytes (records, spilled frames, memfd blobs)
            accepted over the channel's lifetime.
        max_messages_per_second: sustained message rate (token bucket refill).
        burst_messages: token bucket capacity.
        max_fds_per_message: most file descriptors attached to one record.
        max_memfd_bytes: largest memfd blob accepted: a data message's bytes, a
            call's payload, or a callable's result that is bytes, bytearray or
            str of over max_inline_bytes / 2 (it travels in a sealed memfd of its
            own, which the host checks (seals, size, no holes) before mapping it,
            copies out and unmaps at once; a str is decoded as UTF-8). Every
            byte also counts toward max_total_bytes.
    """

    max_inline_bytes: int = 64 * KiB
    max_frame_bytes: int = 16 * MiB
    max_depth: int = 256
    max_container_len: int = 100_000
    max_objects: int = 1_000_000
    max_total_bytes: int = 1 * GiB
    max_messages_per_second: float = 2000.0
    burst_messages: int = 4000
    max_fds_per_message: int = 4
    max_memfd_bytes: int = 1 * GiB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"ipc.{f.name}", f"must be a positive number, got {value!r}")
        # A record carries a one-byte header, and a spilled-frame record needs two fds
        # (the frame and one blob).
        if self.max_inline_bytes < 2:
            raise ConfigError("ipc.max_inline_bytes", "must be at least 2")
        if self.max_fds_per_message < 2:
            raise ConfigError("ipc.max_fds_per_message", "must be at least 2")


class MessageRateLimiter:
    """A token bucket: `burst` messages at once, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def try_acquire(self) -> bool:
        """Take one token; False when the bucket is empty (the peer is flooding)."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def refund(self) -> None:
        """Give back one token (a message that was asked for)."""
        self._tokens = min(self._burst, self._tokens + 1.0)
