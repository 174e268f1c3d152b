"""Network namespaces made ahead of the clone.

Creating a network namespace is the most expensive part of a clone (about
0.6 ms here, the kernel serializes it). As root, a short-lived thread makes the
next sandbox's namespace, with loopback up, while this process does other work
(the CLI imports and plans; a zygote waits for its next request); the child
then joins it (setns) instead of cloning one. Each namespace is made for one
sandbox and never reused; a spare one lives only as long as this process (the
zygote or the CLI, never the host application). Otherwise, and without root (a
user namespace owns the sandbox's namespaces), the clone creates it and the
child brings lo up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading

from ..errors import SetupError
from . import syscalls as sc

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _bring_up_loopback() -> None:
    """Set IFF_UP on `lo` (the only interface of a fresh network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | _IFF_UP))


class NetworkNamespaceMaker:
    """Makes one empty network namespace (lo up) in a thread; `result()` joins it
    and returns the namespace as an fd (or raises what the thread met)."""

    def __init__(self) -> None:
        self._fd = -1
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._make, name="ndf-netns", daemon=True)
        self._thread.start()

    def _make(self) -> None:
        # unshare() moves only this thread; the thread ends right after.
        try:
            sc.unshare(sc.CLONE_NEWNET)
            self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            _bring_up_loopback()
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self._error = e

    def result(self) -> int:
        self._thread.join()
        if self._error is not None:
            self.discard()
            err = getattr(self._error, "errno", 0) or 0
            hint = (" (a new network namespace with loopback up needs CAP_SYS_ADMIN and CAP_NET_ADMIN;"
                    " a container needs --cap-add SYS_ADMIN,NET_ADMIN: see `ndf-sandbox check`)"
                    if err == errno.EPERM else "")
            raise SetupError("network namespace", f"{self._error}{hint}", err) from self._error
        return self._fd

    def discard(self) -> None:
        """Join the thread and close the namespace (a launch that failed otherwise)."""
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def can_prepare(names: tuple[str, ...]) -> bool:
    """Whether this process can make the sandbox's network namespace ahead of the
    clone (root, and no user namespace that would have to own it)."""
    return "net" in names and "user" not in names and os.geteuid() == 0


_spare: NetworkNamespaceMaker | None = None


def make_ahead() -> bool:
    """Start making a namespace for the next launch (as root; idempotent). Whether
    one was started."""
    global _spare
    if _spare is not None or os.geteuid() != 0:
        return False
    _spare = NetworkNamespaceMaker()
    return True


def settle() -> None:
    """Let a namespace being made ahead finish (kept for a later launch): no thread
    may be running while this process clones."""
    if _spare is not None:
        _spare._thread.join()


def take() -> int | None:
    """The network namespace made ahead (fd, lo up), if any; None: let the clone make one."""
    global _spare
    maker, _spare = _spare, None
    return maker.result() if maker is not None else None
