"""What runs once every protection is in place: a program or a Python callable.

Kept apart from the bootstrap (which plans the steps): a payload process is a
fork of the template (launch/template.py), whose image holds only what
payloads need.
"""

from __future__ import annotations

import _signal
import os
from dataclasses import dataclass
from typing import NoReturn

from ..errors import ConfigError
from ..result import EXIT_SANDBOX_ERROR


class Payload:
    """What runs once every protection is in place. `run` must not return."""

    needs_python = False

    def run(self, environment: tuple[bytes, ...]) -> NoReturn:
        raise NotImplementedError


@dataclass(frozen=True)
class ExecPayload(Payload):
    """Execute a program (looked up in the sandbox's PATH). On Linux the child
    execs it from C (bootstrap.child_steps); `run` serves the posix fallback."""

    argv: tuple[str, ...]
    cwd: str = "/"

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(arg, str) and "\0" not in arg for arg in self.argv):
            raise ConfigError("argv", f"must be a non-empty list of strings without NUL bytes, got {self.argv!r}")
        if not isinstance(self.cwd, str) or not self.cwd.startswith("/") or "\0" in self.cwd:
            raise ConfigError("cwd", f"must be an absolute path without NUL bytes, got {self.cwd!r}")

    def run(self, environment: tuple[bytes, ...]) -> NoReturn:
        env = dict(entry.decode().split("=", 1) for entry in environment)
        os.chdir(self.cwd)
        os.execvpe(self.argv[0], list(self.argv), env)


def environment_entries(pairs: tuple[tuple[str, str], ...]) -> tuple[bytes, ...]:
    """A config's environment as the payload gets it ("NAME=value" entries)."""
    return tuple(f"{name}={value}".encode() for name, value in pairs)


def run_payload(payload: Payload, environment: tuple[bytes, ...], handled: tuple[int, ...]) -> NoReturn:
    """In a callable's payload process, every protection in place: make Python's
    signal view agree with the C child's (which reset them all; `handled`: the
    ones Python has handlers for), run the payload and exit; never unwind into
    the parent's code."""
    try:
        for sig in handled:
            _signal.signal(sig, _signal.SIG_DFL)  # signal.signal's enum conversions cost ~50 copied pages
        payload.run(environment)
    finally:
        os._exit(EXIT_SANDBOX_ERROR)
