"""The neural-doc-flow sandbox: run untrusted plugins and parsers fenced by the kernel.

The public API is re-exported here; see README.md for a tour.
"""

from .api import Health, SandboxHandle, SandboxInfo, SandboxManager
from .config import (
    BindMount,
    CapabilityConfig,
    FilesystemConfig,
    NamespaceConfig,
    SandboxConfig,
)
from .errors import (
    ConfigError,
    OutcomeError,
    ProtocolViolation,
    SandboxError,
    SetupError,
    UnsupportedError,
)
from .executor import SandboxExecutor
from .ipc.messages import ControlMessage, IpcMessage
from .launch.python_worker import PluginContext
from .result import IsolationReport, Outcome, ResourceUsage, SandboxResult

__all__ = [
    "ControlMessage",
    "Health",
    "IpcMessage",
    "PluginContext",
    "SandboxExecutor",
    "SandboxHandle",
    "SandboxInfo",
    "SandboxManager",
    "BindMount",
    "CapabilityConfig",
    "ConfigError",
    "FilesystemConfig",
    "IsolationReport",
    "NamespaceConfig",
    "Outcome",
    "OutcomeError",
    "ProtocolViolation",
    "ResourceUsage",
    "SandboxConfig",
    "SandboxError",
    "SandboxResult",
    "SetupError",
    "UnsupportedError",
]
