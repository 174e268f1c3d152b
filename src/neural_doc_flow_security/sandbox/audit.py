"""The audit log: one JSON-lines stream of everything security-relevant.

Every event is one record on the `neural_doc_flow_security.audit` logger whose
message is the event as one line of JSON (a plain `%(message)s` handler writes
JSON lines); the dict itself is the record's `audit_event` attribute. Events
are produced by the process that owns the sandboxes (the SandboxManager, or
`ndf-sandbox run`), from what that process knows to be true: never inside a
zygote, never from what a sandbox says about itself. `host_pid` names it.

Every event has `schema_version`, `event`, `time` (UTC, RFC 3339) and
`host_pid`; sandbox events add `sandbox_id` (unique within `host_pid`) and
`plugin_id`, and, for a reused worker (WorkerPool, max_tasks_per_child),
`worker_call`: which of its calls it was serving (1: its first; 0: none yet).
The event kinds and their fields are in `audit.schema.json` (JSON Schema,
shipped in the package; see SCHEMA_VERSION and the README's "Audit log").

Nothing is built when nobody listens: each event first asks the logger whether
it records at that level, and a program that never imported `logging` (the
`ndf-sandbox run` fast path) cannot have enabled it, so it is not imported
here either. Sinks: add_file_sink (rotated), add_stderr_sink, add_syslog_sink.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

    from .config import SandboxConfig
    from .live_limits import LimitUpdate
    from .result import IsolationReport, SandboxResult

LOGGER_NAME = "neural_doc_flow_security.audit"
SCHEMA_VERSION = 1
SCHEMA_FILE = "audit.schema.json"  # beside this module
ERROR_TEXT_LIMIT = 500  # characters of an error message kept in an event

# logging's levels, by value (logging itself may not be imported)
INFO, WARNING, ERROR = 20, 30, 40

_logger_cache: list[Any] = []


def _logger(level: int) -> Any:
    """The audit logger if it records `level`, else None."""
    if "logging" not in sys.modules:
        return None  # nobody configured logging: nobody can listen
    if not _logger_cache:
        import logging

        _logger_cache.append(logging.getLogger(LOGGER_NAME))
    logger = _logger_cache[0]
    return logger if logger.isEnabledFor(level) else None


def enabled(level: int = INFO) -> bool:
    """Whether an event at `level` would be recorded (check before building costly fields)."""
    return _logger(level) is not None


def emit(event: str, level: int = INFO, **fields: Any) -> None:
    """Record one event (`fields` must be JSON-ready and match the schema of `event`)."""
    logger = _logger(level)
    if logger is None:
        return
    import datetime
    import json

    record = {"schema_version": SCHEMA_VERSION, "event": event,
              "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
              "host_pid": os.getpid(), **fields}
    line = json.dumps(record, default=str)
    logger.log(level, "%s", line, extra={"audit_event": json.loads(line)})  # exactly what the line says


def schema_path() -> str:
    """The path of the JSON Schema every event validates against."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), SCHEMA_FILE)


def config_digest(config: SandboxConfig) -> str:
    """"sha256:<hex>" of the config's canonical JSON: equal configs, equal digests."""
    import dataclasses
    import hashlib
    import json

    canonical = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _error_text(text: str | None) -> str | None:
    return None if text is None else text[:ERROR_TEXT_LIMIT]


def _ids(sandbox_id: int, plugin_id: str, worker_call: int | None) -> dict[str, Any]:
    """The fields naming a sandbox event's sandbox (`worker_call`: None unless a reused worker's)."""
    ids: dict[str, Any] = {"sandbox_id": sandbox_id, "plugin_id": plugin_id}
    if worker_call is not None:
        ids["worker_call"] = worker_call
    return ids


# -- the events ---------------------------------------------------------------

def sandbox_started(sandbox_id: int, plugin_id: str, pid: int, isolation: IsolationReport, *,
                    config: SandboxConfig, kind: str, start_method: str,
                    argv: list[str] | None = None, worker_call: int | None = None) -> None:
    """A sandbox runs: its config's digest and the isolation actually in force (a
    warning when a protection is not enforced); `argv`: the program it runs;
    `worker_call`: a reused worker's call number (here 0), None for any other sandbox."""
    level = WARNING if isolation.not_enforced else INFO
    if not enabled(level):
        return
    emit("sandbox_start", level, **_ids(sandbox_id, plugin_id, worker_call), pid=pid, kind=kind,
         start_method=start_method, config_digest=config_digest(config), isolation=isolation.to_dict(),
         not_enforced=list(isolation.not_enforced), **({} if argv is None else {"argv": list(argv)}))


def sandbox_ended(sandbox_id: int, plugin_id: str, result: SandboxResult, *,
                  worker_call: int | None = None) -> None:
    """A sandbox has ended: first what it hit (timeout, limits: OOM kills, forks
    refused at pids.max, CPU throttling; denied syscalls and connections), then its
    end (outcome, usage) as the caller got it."""
    if not enabled(INFO) and not enabled(WARNING):
        return
    import dataclasses

    ids = _ids(sandbox_id, plugin_id, worker_call)
    usage = result.resource_usage
    outcome = result.outcome.value
    if outcome == "timeout":
        emit("timeout", WARNING, **ids, error=_error_text(result.error))
    oom_kills = usage.oom_kills or (1 if outcome == "oom" else 0)  # without a cgroup: the outcome says
    if oom_kills:
        emit("limit_hit", WARNING, **ids, limit="memory", count=oom_kills, error=_error_text(result.error))
    if usage.pids_limit_hits:
        emit("limit_hit", WARNING, **ids, limit="pids", count=usage.pids_limit_hits)
    if usage.cpu_throttled_periods:
        emit("limit_hit", INFO, **ids, limit="cpu", count=usage.cpu_throttled_periods,
             throttled_seconds=round(usage.cpu_throttled_seconds, 6))
    for attempt in result.security_events:
        emit(attempt.kind, WARNING, **ids, target=attempt.target, count=attempt.count,
             first_seen=attempt.first_seen)
    emit("sandbox_end", INFO, **ids, outcome=outcome, exit_code=result.exit_code, signal=result.signal,
         error=_error_text(result.error), error_type=result.error_type, usage=dataclasses.asdict(usage),
         security_events=len(result.security_events))


def launch_refused(plugin_id: str, error: BaseException, *, sandbox_id: int | None = None) -> None:
    """A launch was refused (an invalid config, a protection this host cannot enforce,
    no zygote, no fds): nothing ran."""
    if not enabled(WARNING):
        return
    fields: dict[str, Any] = {"plugin_id": plugin_id, "error_type": type(error).__name__,
                              "error": _error_text(str(error)),
                              "field": getattr(error, "field", None) or getattr(error, "protection", None)}
    if sandbox_id is not None:
        fields["sandbox_id"] = sandbox_id
    emit("launch_refused", WARNING, **fields)


def sandbox_killed(sandbox_id: int, plugin_id: str, reason: str, *, worker_call: int | None = None) -> None:
    """The host ends a sandbox before it ended by itself (`reason`: "kill", "stop",
    "protocol_violation", "cancelled", "shutdown")."""
    emit("kill", WARNING, **_ids(sandbox_id, plugin_id, worker_call), reason=reason)


def protocol_violation(sandbox_id: int, plugin_id: str, what: str, *, worker_call: int | None = None) -> None:
    """The sandbox sent bytes the host refused (it is killed)."""
    emit("protocol_violation", WARNING, **_ids(sandbox_id, plugin_id, worker_call), error=_error_text(what))


def limits_updated(sandbox_id: int, plugin_id: str, update: LimitUpdate, *,
                   worker_call: int | None = None) -> None:
    """The host changed a running sandbox's limits (a warning when the kernel
    OOM-killed in it to enforce a lowered memory limit)."""
    emit("limits_updated", WARNING if update.oom_kills else INFO, **_ids(sandbox_id, plugin_id, worker_call),
         **update.to_dict())


def limits_update_refused(sandbox_id: int, plugin_id: str, changes: dict[str, int | None], field: str,
                          error: str, *, worker_call: int | None = None) -> None:
    """A live limit change was refused; nothing of it was applied."""
    emit("limits_update_refused", WARNING, **_ids(sandbox_id, plugin_id, worker_call), changes=changes,
         field=field, error=_error_text(error))


def zygote_replaced(old_pid: int | None, how: str, new_pid: int | None, restarts: int) -> None:
    """A manager replaced a zygote that died (`how`: its exit status)."""
    emit("zygote_restart", WARNING, old_pid=old_pid, status=how, new_pid=new_pid, restarts=restarts)


def zygote_given_up(why: str) -> None:
    """A manager stopped restarting a zygote that keeps dying at start."""
    emit("zygote_given_up", ERROR, error=_error_text(why))


# -- sinks ----------------------------------------------------------------------

def _add(handler: logging.Handler) -> logging.Handler:
    import logging

    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def add_file_sink(path: str, *, max_bytes: int = 0, backup_count: int = 5) -> logging.Handler:
    """Append events to `path` as JSON lines. `max_bytes` > 0: rotated by size
    (RotatingFileHandler, `backup_count` old files); else reopened when an external
    logrotate moves it (WatchedFileHandler). Returns the handler (remove_sink())."""
    import logging.handlers

    if max_bytes > 0:
        return _add(logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backup_count,
                                                         encoding="utf-8"))
    return _add(logging.handlers.WatchedFileHandler(path, encoding="utf-8"))


def add_stderr_sink() -> logging.Handler:
    """Write events to stderr as JSON lines."""
    import logging

    return _add(logging.StreamHandler(sys.stderr))


def add_syslog_sink(address: str | tuple[str, int] = "/dev/log", facility: str = "authpriv") -> logging.Handler:
    """Send events to syslog (tagged `ndf-sandbox-audit:`); `facility` by name."""
    import logging
    import logging.handlers

    handler = logging.handlers.SysLogHandler(address, facility=facility)
    _add(handler)
    handler.setFormatter(logging.Formatter("ndf-sandbox-audit: %(message)s"))
    return handler


def remove_sink(handler: logging.Handler) -> None:
    """Detach and close a sink added above."""
    import logging

    logging.getLogger(LOGGER_NAME).removeHandler(handler)
    handler.close()
