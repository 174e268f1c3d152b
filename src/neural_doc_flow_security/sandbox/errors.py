"""The exception hierarchy: everything the sandbox raises derives from SandboxError."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .result import SandboxResult


class SandboxError(Exception):
    """Base class of every error raised by the sandbox.

    Every subclass pickles with its attributes (`outcome`, `result`, `field`...),
    so an error travels intact from a Dask or Ray worker to the client: the
    default reduction would call `cls(*args)` with the formatted message alone,
    which these constructors do not take."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_error, (type(self), self.args), self.__dict__ or None


def _rebuild_error(cls: type[SandboxError], args: tuple[Any, ...]) -> SandboxError:
    """Unpickle a SandboxError without running its __init__ (its state follows)."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


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
    """Raised by SandboxResult.raise_for_outcome() when a run did not end ok.

    `outcome` says how it ended; `error_type` is the class name of the exception
    the plugin raised (None when it did not raise: timeout, oom...); `result` is
    the whole SandboxResult (stdout, stderr, resource usage)."""

    def __init__(self, outcome: str, message: str, *, error_type: str | None = None,
                 result: SandboxResult | None = None) -> None:
        super().__init__(f"sandbox outcome {outcome}: {message}")
        self.outcome = outcome
        self.error_type = error_type
        self.result = result


class RemoteTraceback(Exception):  # noqa: N818 - named like concurrent.futures' own
    """The traceback of an exception raised inside a sandbox, as text (the
    `__cause__` of the exception re-raised on the host)."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'


class ProtocolViolation(SandboxError):
    """The sandbox sent bytes the host refuses to decode (too big, too deep, too many)."""
