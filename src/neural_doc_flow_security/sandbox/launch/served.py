"""What `ndf-sandbox serve` hands the one `run` its child makes (cli_server.py).

A server's child has made its launcher's spare ahead (the clone, namespaces and
cgroup of the next sandbox) and holds the client's connection, on which the
client forwards the signals it receives (and whose end means the client is
gone). run_sandboxed takes both for its one sandbox; everywhere else there is
none, and a run makes its own launcher and takes signals itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .launcher import Launcher


@dataclass(frozen=True)
class ServedCall:
    """The prepared launcher and the client's connection (its fd) of a served run."""

    launcher: Launcher
    control_fd: int


_next: ServedCall | None = None


def serve_next_run(call: ServedCall) -> None:
    """Give `call` to the next run_sandboxed of this process."""
    global _next
    _next = call


def serving() -> bool:
    """Whether the next run is a served one (its launcher is prepared)."""
    return _next is not None


def take() -> ServedCall | None:
    """The served call for this run, once."""
    global _next
    call, _next = _next, None
    return call
