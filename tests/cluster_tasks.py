"""The tasks of the Dask and Ray integration tests (module-level: Dask workers
import this module by name; Ray and the sandboxes get the functions by value).
Hostile ones stay harmless unsandboxed: they touch only the marker path, the
listener and the sentinel the test passes in."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any


def probe(marker: str) -> dict[str, Any]:
    """What a task sees of its process: namespaces, capabilities, interfaces, a host file."""
    with open("/proc/self/status") as f:
        cap_eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return {"pid_ns": os.readlink("/proc/self/ns/pid"), "net_ns": os.readlink("/proc/self/ns/net"),
            "cap_eff": cap_eff, "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "sees_marker": os.path.exists(marker)}


def hostile(port: int, marker: str, sentinel_pid: int) -> list[str]:
    """Phone home, write a marker file on the host, signal a sentinel: what got through."""
    done = []
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"out")
        done.append("connected")
    with contextlib.suppress(OSError), open(marker, "x") as f:
        f.write("a task wrote this\n")
        done.append("wrote")
    with contextlib.suppress(OSError):
        os.kill(sentinel_pid, signal.SIGTERM)
        done.append("signalled")
    return done


def fail(text: str) -> None:
    raise ValueError(text)


def eat_memory(max_mb: int) -> int:
    hoard = [b"\x01" * (1 << 20) for _ in range(max_mb)]
    return len(hoard)


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def killed_the_first_time(state_dir: str) -> str:
    """SIGKILLs itself unless its state file exists (it creates it first)."""
    first = os.path.join(state_dir, "attempted")
    if not os.path.exists(first):
        Path(first).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return "second attempt"


def word_count(text: str) -> int:
    return len(text.split())


def pid_namespace(_: Any) -> str:
    return os.readlink("/proc/self/ns/pid")


async def write_marker_async(marker: str) -> str:
    """A coroutine task: Dask runs these on the worker's event loop."""
    Path(marker).write_text("a coroutine task ran here\n")
    return "ran"
