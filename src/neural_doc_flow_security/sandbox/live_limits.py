"""Live limits: the cgroup limits a running sandbox's host may change
(SandboxHandle.update_limits), what such a change did, and why one was refused.

Only the host changes them: the request goes from the manager to the sandbox's
launcher, never through the sandbox's channel (a sandbox cannot send control
messages). A lowered memory limit is the kernel's to enforce: cgroup v2 reclaims
and, failing that, OOM-kills in the sandbox (its result is then `oom`); cgroup
v1 reclaims and, failing that, refuses the new limit (EBUSY: the old one stays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import SandboxConfig
from .errors import ConfigError, SandboxError

LIVE_FIELDS = ("memory_limit_mb", "cpu_quota_percent", "max_processes", "io_read_bps", "io_write_bps")


class LimitUpdateError(SandboxError):
    """A live limit change was refused (nothing of it was applied): `field` names the
    config field, as in ConfigError."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class LimitUpdate:
    """What update_limits() did. `previous`/`applied`: the changed fields before and
    after (None: no limit). `memory_current_bytes`: the cgroup's memory use right
    after; `oom_kills`: processes the kernel OOM-killed in the sandbox while the new
    memory limit was applied (then its result is `oom`)."""

    previous: Mapping[str, int | None]
    applied: Mapping[str, int | None]
    memory_current_bytes: int = 0
    oom_kills: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {"previous": dict(self.previous), "applied": dict(self.applied),
                "memory_current_bytes": self.memory_current_bytes, "oom_kills": self.oom_kills}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LimitUpdate:
        """Rebuild from to_dict() output (from the trusted launcher, never a sandbox)."""
        return cls(previous=dict(data["previous"]), applied=dict(data["applied"]),
                   memory_current_bytes=int(data["memory_current_bytes"]), oom_kills=int(data["oom_kills"]))


def checked_changes(config: SandboxConfig, changes: Mapping[str, Any]) -> tuple[SandboxConfig, dict[str, Any]]:
    """The config with `changes` applied, validated like any config (a ConfigError
    names the field and value), and the changes themselves."""
    unknown = [name for name in changes if name not in LIVE_FIELDS]
    if unknown:
        raise ConfigError(unknown[0], f"cannot be changed while the sandbox runs; live limits: "
                                      f"{', '.join(LIVE_FIELDS)}")
    if not changes:
        raise ConfigError("update_limits", f"no limit given; live limits: {', '.join(LIVE_FIELDS)}")
    return dataclasses.replace(config, **changes), dict(changes)
