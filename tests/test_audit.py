"""The audit log: the manager (or `ndf-sandbox run`) produces every event, in its own
process, from what it knows to be true; every event validates against the schema
(conftest.py's `audit_events` fixture checks each one any test produces)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import NDF_SANDBOX, ndf_host_env
from neural_doc_flow_security.sandbox import audit
from neural_doc_flow_security.sandbox.api import SandboxManager
from neural_doc_flow_security.sandbox.config import NamespaceConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import ConfigError
from neural_doc_flow_security.sandbox.result import IsolationReport, Outcome, SandboxResult, SecurityEvent

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs sandboxes as root")
Event = dict[str, Any]


def _of(events: list[Event], kind: str, plugin_id: str | None = None) -> list[Event]:
    return [e for e in events if e["event"] == kind and (plugin_id is None or e.get("plugin_id") == plugin_id)]


def _hog() -> None:
    block = bytearray(400 << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1


@needs_root
@pytest.mark.parametrize("start_method", ["zygote", "fork"])
def test_each_outcome_is_audited_by_the_manager_and_true(start_method: str,
                                                         audit_events: list[Event]) -> None:
    # What a new user does: nothing but logging.basicConfig-like INFO (conftest's handler).
    async def scenario() -> None:
        async with SandboxManager(start_method=start_method, status_interval=None) as m:  # type: ignore[arg-type]
            assert (await m.execute_sandboxed("ok-call", lambda: 1)).outcome is Outcome.OK
            hog = m.with_options(sandbox_config=SandboxConfig(memory_limit_mb=64))
            assert (await hog.execute_sandboxed("oom-call", _hog)).outcome is Outcome.OOM
            timed = await m.execute_command("slow-command", ["/bin/sleep", "30"], timeout=0.5)
            assert timed.outcome is Outcome.TIMEOUT
            assert (await m.execute_command("true-command", ["/bin/true"])).outcome is Outcome.OK
            with pytest.raises(ConfigError):
                await m.execute_command("refused", ["/bin/true"], timeout=-1)

    asyncio.run(scenario())
    assert {e["host_pid"] for e in audit_events} == {os.getpid()}  # the manager's, not a zygote's
    for plugin, kind in [("ok-call", "callable"), ("oom-call", "callable"), ("slow-command", "command"),
                         ("true-command", "command")]:
        [start] = _of(audit_events, "sandbox_start", plugin)
        [end] = _of(audit_events, "sandbox_end", plugin)
        assert start["kind"] == kind and start["start_method"] == start_method
        assert start["sandbox_id"] == end["sandbox_id"] and start["pid"] > 0
        assert set(start["isolation"]["namespaces"]) >= {"pid", "net", "mnt"} and start["not_enforced"] == []
        assert audit_events.index(start) < audit_events.index(end)
    ok = _of(audit_events, "sandbox_end", "ok-call")[0]
    assert (ok["outcome"], ok["signal"], ok["error"]) == ("ok", None, None)  # fork: not "killed, signal 9"
    assert _of(audit_events, "sandbox_end", "true-command")[0]["exit_code"] == 0
    assert _of(audit_events, "sandbox_end", "oom-call")[0]["outcome"] == "oom"
    [oom] = _of(audit_events, "limit_hit", "oom-call")
    assert oom["limit"] == "memory" and oom["count"] >= 1
    assert _of(audit_events, "sandbox_end", "slow-command")[0]["outcome"] == "timeout"
    assert len(_of(audit_events, "timeout", "slow-command")) == 1
    [refused] = _of(audit_events, "launch_refused", "refused")
    assert refused["field"] == "timeout_seconds" and refused["error_type"] == "ConfigError"
    assert not _of(audit_events, "sandbox_start", "refused")
    digests = {e["plugin_id"]: e["config_digest"] for e in _of(audit_events, "sandbox_start")}
    assert digests["ok-call"] != digests["oom-call"]  # 64 MiB is another config


@needs_root
def test_an_unsupported_protection_is_an_audited_refusal(audit_events: list[Event]) -> None:
    config = SandboxConfig(namespaces=NamespaceConfig(pid=False, net=True, mnt=False, uts=False, ipc=False,
                                                      cgroup=False, user=False))

    async def scenario() -> None:
        async with SandboxManager(config, start_method="posix", status_interval=None) as m:
            with pytest.raises(Exception) as refused:
                await m.execute_sandboxed("needs-more", lambda: 1)
            assert "namespaces" in str(refused.value) or "seccomp" in str(refused.value)

    asyncio.run(scenario())
    [event] = _of(audit_events, "launch_refused", "needs-more")
    assert event["host_pid"] == os.getpid() and event["error_type"] == "UnsupportedError"
    assert not _of(audit_events, "sandbox_start")


@needs_root
def test_the_posix_fallback_start_names_what_it_does_not_enforce(audit_events: list[Event],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=audit.LOGGER_NAME)
    config = SandboxConfig(namespaces=NamespaceConfig(pid=False, net=True, mnt=False, uts=False, ipc=False,
                                                      cgroup=False, user=False))

    async def scenario() -> None:
        async with SandboxManager(config, start_method="posix", status_interval=None,
                                  allow_unenforced=("all",)) as m:
            assert (await m.execute_sandboxed("degraded", lambda: 2)).output == 2

    asyncio.run(scenario())
    [start] = _of(audit_events, "sandbox_start", "degraded")
    assert start["isolation"]["backend"] == "posix" and start["start_method"] == "posix"
    missing = " ".join(start["not_enforced"])
    assert "namespaces.net" in missing and "seccomp" in missing
    [record] = [r for r in caplog.records if r.name == audit.LOGGER_NAME and '"sandbox_start"' in r.getMessage()]
    assert record.levelno == logging.WARNING  # a start without a protection is a warning
    assert _of(audit_events, "sandbox_end", "degraded")[0]["outcome"] == "ok"


def _violate() -> None:
    os.write(3, struct.pack(">I", 0xFFFFFFF0))  # a frame far over any limit: the host refuses it
    import time
    time.sleep(60)


@needs_root
def test_kills_stops_and_protocol_violations_are_audited(audit_events: list[Event]) -> None:
    async def scenario() -> tuple[SandboxResult, SandboxResult, SandboxResult]:
        async with SandboxManager(status_interval=None) as m:
            sleeper = await m.spawn("to-kill", lambda: __import__("time").sleep(60))
            killed = await asyncio.wait_for(sleeper.kill(), 60)
            stopper = await m.spawn("to-stop", lambda: __import__("time").sleep(60))
            stopped = await asyncio.wait_for(stopper.stop(grace_seconds=0.2), 60)
            violator = await m.spawn("violator", _violate)
            violated = await asyncio.wait_for(violator.wait(), 60)
            return killed, stopped, violated

    killed, stopped, violated = asyncio.run(scenario())
    assert killed.outcome is Outcome.KILLED and stopped.outcome is Outcome.KILLED
    assert violated.outcome is Outcome.PROTOCOL_VIOLATION
    assert [e["reason"] for e in _of(audit_events, "kill", "to-kill")] == ["kill"]
    assert [e["reason"] for e in _of(audit_events, "kill", "to-stop")] == ["stop"]
    assert [e["reason"] for e in _of(audit_events, "kill", "violator")] == ["protocol_violation"]
    assert len(_of(audit_events, "protocol_violation", "violator")) == 1
    for plugin, outcome in [("to-kill", "killed"), ("to-stop", "killed"), ("violator", "protocol_violation")]:
        assert [e["outcome"] for e in _of(audit_events, "sandbox_end", plugin)] == [outcome]


def test_security_events_of_a_result_are_audited(audit_events: list[Event]) -> None:
    result = SandboxResult(Outcome.OK, isolation=IsolationReport(), security_events=(
        SecurityEvent("denied_syscall", "ptrace", 3, 1.5), SecurityEvent("denied_connection", "10.0.3.2:443/tcp")))
    audit.sandbox_ended(7, "plugin", result)
    kinds = [e["event"] for e in audit_events]
    assert kinds == ["denied_syscall", "denied_connection", "sandbox_end"]
    assert audit_events[0]["target"] == "ptrace" and audit_events[0]["count"] == 3
    assert audit_events[2]["security_events"] == 2


def test_nothing_is_built_when_nobody_listens(monkeypatch: pytest.MonkeyPatch,
                                              audit_events: list[Event]) -> None:
    logger = logging.getLogger(audit.LOGGER_NAME)
    monkeypatch.setattr(logger, "level", logging.ERROR)
    logger.manager._clear_cache()  # type: ignore[attr-defined]

    def costly(config: object) -> str:
        raise AssertionError("an event was built although nobody listens")

    monkeypatch.setattr(audit, "config_digest", costly)
    try:
        audit.sandbox_started(1, "p", 1, IsolationReport(), config=SandboxConfig(), kind="callable",
                              start_method="zygote")
        audit.sandbox_ended(1, "p", SandboxResult(Outcome.OK))
    finally:
        logger.manager._clear_cache()  # type: ignore[attr-defined]
    assert audit_events == []


def test_the_schema_is_in_the_package_and_refuses_bad_events() -> None:
    with open(audit.schema_path()) as f:
        schema = json.load(f)
    validator = jsonschema.Draft202012Validator(schema)
    good = {"schema_version": audit.SCHEMA_VERSION, "event": "kill", "time": "2026-01-01T00:00:00+00:00",
            "host_pid": 1, "sandbox_id": 1, "plugin_id": "p", "reason": "kill"}
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "reason": "whim"})
    assert not validator.is_valid({**good, "unknown_field": 1})
    assert not validator.is_valid({**good, "event": "sandbox_end"})  # its fields are missing


def test_a_file_sink_writes_json_lines_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = audit.add_file_sink(str(path), max_bytes=600, backup_count=2)
    try:
        for i in range(6):
            audit.sandbox_killed(i + 1, f"plugin-{i}", "kill")
    finally:
        audit.remove_sink(sink)
    files = sorted(tmp_path.iterdir())
    assert len(files) > 1, "no rotation"
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(e["sandbox_id"] for e in lines) == [1, 2, 3, 4, 5, 6][-len(lines):]
    assert all(e["event"] == "kill" for e in lines)


@needs_root
def test_cli_audit_log_records_the_run_and_a_refusal(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    env = ndf_host_env()
    ran = subprocess.run([NDF_SANDBOX, "run", "--audit-log", str(log), "--", "/bin/sh", "-c", "exit 3"],
                         env=env, capture_output=True, timeout=60)
    assert ran.returncode == 3, ran.stderr
    refused = subprocess.run([NDF_SANDBOX, "run", "--audit-log", str(log), "--memory", "0", "--", "/bin/true"],
                             env=env, capture_output=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    with open(audit.schema_path()) as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    for event in events:
        validator.validate(event)
    assert [e["event"] for e in events] == ["sandbox_start", "sandbox_end", "launch_refused"]
    start, end, refusal = events
    assert start["argv"] == ["/bin/sh", "-c", "exit 3"] and start["host_pid"] == end["host_pid"] != os.getpid()
    assert (end["outcome"], end["exit_code"]) == ("error", 3)
    assert refusal["field"] == "memory_limit_mb"


@needs_root
def test_cli_run_without_audit_log_does_not_import_logging() -> None:
    code = ("import sys; from neural_doc_flow_security.sandbox import cli; "
            "status = cli.main(['run', '--', '/bin/true']); print(status, 'logging' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=ndf_host_env())
    assert out.stdout.split() == ["0", "False"], out


def test_syslog_and_stderr_sinks_carry_the_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    address = str(tmp_path / "log")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(30)
    syslog = audit.add_syslog_sink(address)
    stderr = audit.add_stderr_sink()
    try:
        audit.sandbox_killed(3, "plugin", "stop")
    finally:
        audit.remove_sink(syslog)
        audit.remove_sink(stderr)
    datagram = receiver.recv(65536).decode()
    receiver.close()
    assert "ndf-sandbox-audit: " in datagram
    sent = json.loads(datagram.split("ndf-sandbox-audit: ", 1)[1].rstrip("\x00"))
    written = json.loads(capsys.readouterr().err.strip())
    assert sent == written and (sent["event"], sent["reason"]) == ("kill", "stop")
