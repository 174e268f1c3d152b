"""The neural-doc-flow sandbox: run untrusted plugins and parsers fenced by the kernel.

The public API is re-exported here; see README.md for a tour.
"""

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
from .result import IsolationReport, Outcome, ResourceUsage, SandboxResult

__all__ = [
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
