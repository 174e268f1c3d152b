"""The neural-doc-flow sandbox: run untrusted plugins and parsers fenced by the kernel.

The public API is re-exported here; see README.md for a tour.
"""

from typing import TYPE_CHECKING, Any

from .config import (
    BindMount,
    CapabilityConfig,
    FilesystemConfig,
    NamespaceConfig,
    NetworkPolicy,
    SandboxConfig,
)
from .errors import (
    ConfigError,
    HostLimitError,
    OutcomeError,
    ProtocolViolation,
    RemoteTraceback,
    SandboxError,
    SetupError,
    UnsupportedError,
)
from .result import (
    FileChange,
    FilesystemChanges,
    IsolationReport,
    Outcome,
    ResourceUsage,
    SandboxResult,
    SecurityEvent,
)

if TYPE_CHECKING:
    from .api import Health, ManagerStats, SandboxCalls, SandboxHandle, SandboxInfo, SandboxManager
    from .executor import SandboxExecutor, SandboxFuture
    from .ipc.limits import DecodeLimits
    from .ipc.messages import ControlMessage, IpcMessage, MessageKind, StatusUsage
    from .launch.python_worker import PluginContext
    from .live_limits import LimitUpdate, LimitUpdateError
    from .workers import KeyedWorkerCalls, WorkerPool

# The asyncio API is imported on first use, so that `ndf-sandbox run` (which
# does not need it) starts fast.
_LAZY = {
    "Health": ".api", "ManagerStats": ".api", "SandboxHandle": ".api", "SandboxInfo": ".api",
    "SandboxManager": ".api", "SandboxCalls": ".api", "SandboxExecutor": ".executor", "SandboxFuture": ".executor",
    "ControlMessage": ".ipc.messages", "IpcMessage": ".ipc.messages", "MessageKind": ".ipc.messages",
    "StatusUsage": ".ipc.messages",
    "PluginContext": ".launch.python_worker",
    "LimitUpdate": ".live_limits", "LimitUpdateError": ".live_limits",
    "WorkerPool": ".workers", "KeyedWorkerCalls": ".workers", "DecodeLimits": ".ipc.limits",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ControlMessage",
    "DecodeLimits",
    "Health",
    "IpcMessage",
    "KeyedWorkerCalls",
    "LimitUpdate",
    "LimitUpdateError",
    "ManagerStats",
    "MessageKind",
    "PluginContext",
    "SandboxCalls",
    "SandboxExecutor",
    "SandboxFuture",
    "SandboxHandle",
    "SandboxInfo",
    "SandboxManager",
    "WorkerPool",
    "BindMount",
    "CapabilityConfig",
    "ConfigError",
    "FileChange",
    "FilesystemChanges",
    "FilesystemConfig",
    "IsolationReport",
    "NamespaceConfig",
    "NetworkPolicy",
    "Outcome",
    "HostLimitError",
    "OutcomeError",
    "ProtocolViolation",
    "RemoteTraceback",
    "ResourceUsage",
    "SandboxConfig",
    "SandboxError",
    "SandboxResult",
    "SecurityEvent",
    "SetupError",
    "StatusUsage",
    "UnsupportedError",
]
