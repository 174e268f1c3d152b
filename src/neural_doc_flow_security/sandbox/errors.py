"""The exception hierarchy: everything the sandbox raises derives from SandboxError."""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error raised by the sandbox."""


class ConfigError(SandboxError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsupportedError(SandboxError):
    """A protection was asked for that this host cannot enforce (fail closed)."""

    def __init__(self, protection: str, reason: str) -> None:
        super().__init__(f"{protection}: cannot be enforced on this host: {reason}")
        self.protection = protection
        self.reason = reason


class HostLimitError(SandboxError):
    """The host ran out of something a launch needs (file descriptors); nothing was started."""


class SetupError(SandboxError):
    """A bootstrap stage failed inside the child before the payload started."""

    def __init__(self, stage: str, message: str, errno: int = 0) -> None:
        super().__init__(f"sandbox setup failed at stage {stage!r}: {message}")
        self.stage = stage
        self.errno = errno


class OutcomeError(SandboxError):
    """Raised by SandboxResult.raise_for_outcome() when a run did not end ok."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(f"sandbox outcome {outcome}: {message}")
        self.outcome = outcome


class ProtocolViolation(SandboxError):
    """The sandbox sent bytes the host refuses to decode (too big, too deep, too many)."""
