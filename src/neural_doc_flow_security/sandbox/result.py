"""What a sandbox run hands back: outcome, output, resources used, isolation in force."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from .errors import OutcomeError, RemoteTraceback


class Outcome(enum.StrEnum):
    """How a run ended."""

    OK = "ok"                      # exited 0 / callable returned
    ERROR = "error"                # non-zero exit / callable raised
    TIMEOUT = "timeout"            # wall timeout fired, tree killed
    OOM = "oom"                    # the kernel OOM-killed inside the sandbox's cgroup
    KILLED = "killed"              # ended by a signal (or stopped by the host)
    PROTOCOL_VIOLATION = "protocol_violation"  # sent bytes the host refused
    SANDBOX_ERROR = "sandbox_error"  # a protection could not be applied; payload never ran


# Exit codes of `ndf-sandbox run` for outcomes that have no code of their own.
EXIT_TIMEOUT = 124
EXIT_OOM = 125
EXIT_SANDBOX_ERROR = 126
EXIT_PROTOCOL_VIOLATION = 123


@dataclass(frozen=True)
class ResourceUsage:
    """Resources the run used, as measured by the kernel (cgroup files, rusage).

    The limits it ran into (cgroup only, else 0): `oom_kills`, processes the kernel
    OOM-killed at its memory limit; `pids_limit_hits`, forks refused at
    max_processes (pids.events); `cpu_throttled_periods` / `cpu_throttled_seconds`,
    scheduler periods in which its CPU quota stopped it, and for how long (cpu.stat)."""

    wall_seconds: float = 0.0
    cpu_user_seconds: float = 0.0
    cpu_system_seconds: float = 0.0
    memory_peak_bytes: int = 0
    processes_peak: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    oom_kills: int = 0
    pids_limit_hits: int = 0
    cpu_throttled_periods: int = 0
    cpu_throttled_seconds: float = 0.0


@dataclass(frozen=True)
class IsolationReport:
    """Which protections were actually in force for a run, and which were not."""

    backend: str = "linux"
    namespaces: tuple[str, ...] = ()
    rootfs: str = ""
    uid: int | None = None
    gid: int | None = None
    capabilities: tuple[str, ...] = ()
    no_new_privs: bool = False
    seccomp: str = "off"
    landlock: str = "off"  # "ABI 7" when a Landlock ruleset was in force
    cgroup: str = ""
    limits: tuple[str, ...] = ()
    not_enforced: tuple[str, ...] = ()
    # A reused worker (WorkerPool, max_tasks_per_child): its sandbox id and which of
    # its calls this was (1: its first); None and 0 for a sandbox used once.
    worker_id: int | None = None
    worker_call: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IsolationReport:
        """Rebuild from to_dict() output (from the trusted launcher, never a sandbox)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


@dataclass(frozen=True)
class SecurityEvent:
    """Something the sandbox tried that a protection stopped, counted per target:
    `kind` "denied_syscall" (`target` the syscall's name) or "denied_connection"
    (`target` like "10.0.3.2:443/tcp"); `first_seen` is the host's time.time() of
    the first attempt. Produced by the host's own observers, never by the sandbox."""

    kind: str
    target: str
    count: int = 1
    first_seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FileChange:
    """One path the payload changed on a copy-on-write root: `change` is "created",
    "modified" or "deleted"; `kind` "file", "directory", "symlink" or "other"; `size`
    in bytes (a file's, a link's text; 0 otherwise)."""

    path: str
    change: str
    kind: str
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FilesystemChanges:
    """What a copy-on-write root's payload changed (filesystem.overlay_changes "report"
    or "keep"), read by the host from the overlay's upper layer after the payload
    ended. `complete` is False when the listing stopped at its bound (`error` says
    why); `kept_in` is the host directory the changes were copied into ("keep")."""

    changes: tuple[FileChange, ...] = ()
    complete: bool = True
    kept_in: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {"changes": [change.to_dict() for change in self.changes], "complete": self.complete,
                "kept_in": self.kept_in, "error": self.error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FilesystemChanges:
        """Rebuild from to_dict() output (from the trusted launcher, never a sandbox)."""
        return cls(tuple(FileChange(**change) for change in data["changes"]), data["complete"],
                   data["kept_in"], data["error"])


@dataclass(frozen=True)
class SandboxResult:
    """The result of one sandboxed run.

    When a callable raised, `error_type` is its exception's class name as the
    sandbox reported it ("ValueError", "pypdf.errors.PdfStreamError"),
    `error_message` its text and `traceback` the sandbox's formatted traceback:
    plain text, never an exception object. `stdout`/`stderr` hold at most the
    manager's `output_limit` bytes each (1 MiB by default); `stdout_truncated`/
    `stderr_truncated` say whether more was written and dropped; `stdout_text`/
    `stderr_text` decode them with `encoding` (execute_command's `encoding=`).
    """

    outcome: Outcome
    exit_code: int | None = None
    signal: int | None = None
    output: Any = None
    error: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    resource_usage: ResourceUsage = field(default_factory=ResourceUsage)
    isolation: IsolationReport = field(default_factory=IsolationReport)
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    encoding: str = "utf-8"
    security_events: tuple[SecurityEvent, ...] = ()
    filesystem_changes: FilesystemChanges | None = None  # a copy-on-write root's, when asked for

    @property
    def stdout_text(self) -> str:
        """stdout decoded with `encoding` (undecodable bytes replaced: it may be cut)."""
        return self.stdout.decode(self.encoding, "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded with `encoding` (undecodable bytes replaced: it may be cut)."""
        return self.stderr.decode(self.encoding, "replace")

    @property
    def ok(self) -> bool:
        """Whether the outcome is `ok`."""
        return self.outcome is Outcome.OK

    def raise_for_outcome(self) -> SandboxResult:
        """Return self when the outcome is ok, else raise OutcomeError (with this
        result as `.result`, the plugin's exception class name as `.error_type`
        and, when the plugin raised, its traceback text as `__cause__`)."""
        if self.outcome is not Outcome.OK:
            detail = self.error or (
                f"killed by signal {self.signal}" if self.signal else f"exit code {self.exit_code}"
            )
            error = OutcomeError(self.outcome.value, detail, error_type=self.error_type, result=self)
            raise error from (RemoteTraceback(self.traceback) if self.traceback else None)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stdout/stderr/output left out; use the attributes)."""
        return {
            "outcome": self.outcome.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "resource_usage": dataclasses.asdict(self.resource_usage),
            "isolation": self.isolation.to_dict(),
            "security_events": [event.to_dict() for event in self.security_events],
            "filesystem_changes": self.filesystem_changes.to_dict() if self.filesystem_changes else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxResult:
        """Rebuild a result from to_dict() output (from the trusted zygote, never a sandbox)."""
        return cls(
            outcome=Outcome(data["outcome"]),
            exit_code=data["exit_code"],
            signal=data["signal"],
            error=data["error"],
            resource_usage=ResourceUsage(**data["resource_usage"]),
            isolation=IsolationReport.from_dict(data["isolation"]),
            security_events=tuple(SecurityEvent(**event) for event in data.get("security_events", ())),
            filesystem_changes=FilesystemChanges.from_dict(data["filesystem_changes"])
            if data.get("filesystem_changes") else None,
        )

    def cli_exit_status(self) -> int:
        """The exit status `ndf-sandbox run` returns for this result."""
        if self.outcome is Outcome.TIMEOUT:
            return EXIT_TIMEOUT
        if self.outcome is Outcome.OOM:
            return EXIT_OOM
        if self.outcome is Outcome.SANDBOX_ERROR:
            return EXIT_SANDBOX_ERROR
        if self.outcome is Outcome.PROTOCOL_VIOLATION:
            return EXIT_PROTOCOL_VIOLATION
        if self.signal:
            return 128 + self.signal
        return self.exit_code or 0
