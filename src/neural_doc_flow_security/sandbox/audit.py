"""The audit log: one record when a sandbox starts and one when it ends, on the
`neural_doc_flow_security.audit` logger, with the isolation actually in force
and every protection that was not enforced (a fallback backend, or a limit the
caller allowed to degrade). Configure that logger to keep the records."""

from __future__ import annotations

import sys
from typing import Any

from .result import IsolationReport, SandboxResult

LOGGER_NAME = "neural_doc_flow_security.audit"


def _logger() -> Any:
    """The audit logger if it records INFO, else None (the records are INFO first).
    A program that never imported logging cannot have enabled it: `ndf-sandbox run`
    starts without importing logging."""
    if "logging" not in sys.modules:
        return None
    import logging

    logger = logging.getLogger(LOGGER_NAME)
    return logger if logger.isEnabledFor(logging.INFO) else None


def sandbox_started(name: str, pid: int, isolation: IsolationReport) -> None:
    """Record a start: which backend, namespaces, limits, and what is NOT enforced."""
    logger = _logger()
    if logger is None:
        return
    import json

    logger.info("sandbox started %s", json.dumps({
        "name": name, "pid": pid, "backend": isolation.backend, "namespaces": isolation.namespaces,
        "seccomp": isolation.seccomp.split(":")[0], "uid": isolation.uid, "cgroup": bool(isolation.cgroup),
        "limits": isolation.limits, "not_enforced": isolation.not_enforced}))
    if isolation.not_enforced:
        logger.warning("sandbox %s runs WITHOUT: %s", name, "; ".join(isolation.not_enforced))


def sandbox_ended(name: str, result: SandboxResult) -> None:
    """Record an end: outcome and the kernel's resource figures."""
    logger = _logger()
    if logger is None:
        return
    import json

    usage = result.resource_usage
    logger.info("sandbox ended %s", json.dumps({
        "name": name, "outcome": result.outcome.value, "exit_code": result.exit_code, "signal": result.signal,
        "wall_seconds": round(usage.wall_seconds, 6), "cpu_seconds": round(usage.cpu_user_seconds
                                                                           + usage.cpu_system_seconds, 6),
        "memory_peak_bytes": usage.memory_peak_bytes, "error": (result.error or "")[:500]}))



def zygote_replaced(old_pid: int | None, how: str, new_pid: int | None, restarts: int) -> None:
    """Record that a manager replaced a zygote that died (`how`: its exit status)."""
    logger = _logger()
    if logger is not None:
        import json

        logger.warning("zygote replaced %s", json.dumps({"old_pid": old_pid, "how": how, "new_pid": new_pid,
                                                         "restarts": restarts}))


def zygote_given_up(why: str) -> None:
    """Record that a manager stopped restarting a zygote that keeps dying at start."""
    logger = _logger()
    if logger is not None:
        import json

        logger.error("zygote given up %s", json.dumps({"why": why}))
