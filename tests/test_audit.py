"""The audit log records what each sandbox really had: on Linux the namespaces and
limits in force; on the posix fallback every protection it ran without."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from neural_doc_flow_security.sandbox.api import SandboxManager
from neural_doc_flow_security.sandbox.audit import LOGGER_NAME
from neural_doc_flow_security.sandbox.config import NamespaceConfig, SandboxConfig

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs sandboxes as root")


def _records(caplog: pytest.LogCaptureFixture, prefix: str) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()[len(prefix):]) for r in caplog.records
            if r.name == LOGGER_NAME and r.getMessage().startswith(prefix)]


def test_linux_sandbox_start_and_end_are_audited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)

    async def scenario() -> None:
        async with SandboxManager(start_method="fork", status_interval=None) as manager:
            result = await manager.execute_sandboxed("audited", lambda: 1)
            assert result.ok
        # the sandbox answered first and was reaped in the background; shutdown waited for it

    asyncio.run(scenario())
    started = _records(caplog, "sandbox started ")
    ended = _records(caplog, "sandbox ended ")
    assert [s["name"] for s in started] == ["audited"]
    assert started[0]["backend"] == "linux" and started[0]["not_enforced"] == []
    assert set(started[0]["namespaces"]) >= {"pid", "net", "mnt"}  # type: ignore[arg-type]
    assert [e["name"] for e in ended] == ["audited"]


def test_posix_fallback_audits_what_it_does_not_enforce(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    config = SandboxConfig(namespaces=NamespaceConfig(pid=False, net=True, mnt=False, uts=False, ipc=False,
                                                      cgroup=False, user=False))

    async def scenario() -> None:
        async with SandboxManager(config, start_method="posix", status_interval=None,
                                  allow_unenforced=("all",)) as manager:
            assert (await manager.execute_sandboxed("degraded", lambda: 2)).output == 2

    asyncio.run(scenario())
    started = _records(caplog, "sandbox started ")
    assert started and started[0]["backend"] == "posix"
    missing = " ".join(str(x) for x in started[0]["not_enforced"])  # type: ignore[union-attr]
    assert "namespaces.net" in missing and "seccomp" in missing
    warnings = [r for r in caplog.records if r.name == LOGGER_NAME and r.levelno == logging.WARNING]
    assert warnings and "WITHOUT" in warnings[0].getMessage()
