"""The neural-doc-flow sandbox: run untrusted plugins and parsers fenced by the kernel.

The public API is re-exported here; see README.md for a tour.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Health, ManagerStats, SandboxCalls, SandboxHandle, SandboxInfo, SandboxManager
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
    from .executor import SandboxExecutor, SandboxFuture
    from .ipc.limits import DecodeLimits
    from .ipc.messages import ControlMessage, IpcMessage, MessageKind, StatusUsage
    from .launch.python_worker import PluginContext
    from .live_limits import LimitUpdate, LimitUpdateError
    from .result import (
        FileChange,
        FilesystemChanges,
        IsolationReport,
        Outcome,
        ResourceUsage,
        SandboxResult,
        SecurityEvent,
    )
    from .workers import KeyedWorkerCalls, WorkerPool

# Every name is imported on first use, so that `ndf-sandbox run` (which needs
# neither the asyncio API nor most of the rest) starts fast.
_LAZY = {
    "BindMount": ".config", "CapabilityConfig": ".config", "FilesystemConfig": ".config",
    "NamespaceConfig": ".config", "NetworkPolicy": ".config", "SandboxConfig": ".config",
    "ConfigError": ".errors", "HostLimitError": ".errors", "OutcomeError": ".errors",
    "ProtocolViolation": ".errors", "RemoteTraceback": ".errors", "SandboxError": ".errors",
    "SetupError": ".errors", "UnsupportedError": ".errors",
    "FileChange": ".result", "FilesystemChanges": ".result", "IsolationReport": ".result", "Outcome": ".result",
    "ResourceUsage": ".result", "SandboxResult": ".result", "SecurityEvent": ".result",
    "Health": ".api", "ManagerStats": ".api", "SandboxHandle": ".api", "SandboxInfo": ".api",
    "SandboxManager": ".api", "SandboxCalls": ".api", "SandboxExecutor": ".executor", "SandboxFuture": ".executor",
    "ControlMessage": ".ipc.messages", "IpcMessage": ".ipc.messages", "MessageKind": ".ipc.messages",
    "StatusUsage": ".ipc.messages",
    "PluginContext": ".launch.python_worker",
    "LimitUpdate": ".live_limits", "LimitUpdateError": ".live_limits",
    "WorkerPool": ".workers", "KeyedWorkerCalls": ".workers", "DecodeLimits": ".ipc.limits",
}


_SUBMODULES = ("config", "errors", "result")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    if name in _SUBMODULES:  # `sandbox.config` without importing it first worked when it was eager
        return importlib.import_module(f".{name}", __name__)
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
