"""Regression tests for holes a security review found, each named after the threat."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import SANDBOX_IDS
from neural_doc_flow_security.sandbox import PluginContext
from neural_doc_flow_security.sandbox.api import SandboxManager
from neural_doc_flow_security.sandbox.config import NamespaceConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import UnsupportedError
from neural_doc_flow_security.sandbox.launch.setup_errors import parse_setup_error
from neural_doc_flow_security.sandbox.launch.supervise import run_program

NDF_SANDBOX = str(Path(sys.executable).with_name("ndf-sandbox"))
UNPRIVILEGED = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "--"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switches to uid 4242 / runs as root")


def _open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"), key=int)


@needs_root
def test_callable_holds_no_fd_of_the_launcher() -> None:
    """A Python plugin never execs: it must not inherit the set-up error pipe (it could
    forge a set-up failure, or hang the launcher by keeping it open)."""
    async def scenario() -> object:
        async with SandboxManager(status_interval=None) as manager:
            return (await manager.execute_sandboxed("fds", _open_fds)).output

    fds = asyncio.run(scenario())
    assert fds in (["0", "1", "2", "3", "4"], ["0", "1", "2", "3"]), fds  # 4: the listing itself


def test_a_forged_setup_report_cannot_crash_the_parser() -> None:
    for report in (b"x\x0099999999999\x00boom", b"x\x00" + b"9" * 5000 + b"\x00boom", b"\xff\x00\x00",
                   b"", b"stage-only"):
        error = parse_setup_error(report)
        assert error.errno == 0


@needs_root
def test_without_a_pid_namespace_and_without_a_cgroup_the_launch_is_refused() -> None:
    """Only a pid namespace or a cgroup can contain the tree (orphans, the timeout):
    unprivileged here there is no cgroup, so pid=false must be refused."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir="/var/tmp") as profile:
        profile.write("[namespaces]\npid = false\n")
        profile.flush()
        os.chmod(profile.name, 0o644)
        proc = subprocess.run([*UNPRIVILEGED, NDF_SANDBOX, "run", "--profile", profile.name, "--", "true"],
                              capture_output=True, cwd="/tmp", timeout=60)
    assert proc.returncode == 126, proc.stderr
    assert b"namespaces.pid" in proc.stderr and b"cgroup" in proc.stderr


@needs_root
def test_payload_cannot_open_init_fds_in_a_user_namespace() -> None:
    """Rootless, init and payload share a uid; init is not dumpable, so the payload
    cannot reach init's pipes to the host through /proc/1/fd."""
    proc = subprocess.run([*UNPRIVILEGED, NDF_SANDBOX, "run", "--", "sh", "-c",
                           "ls /proc/1/fd >/dev/null 2>&1 && echo OPENED || echo DENIED"],
                          capture_output=True, cwd="/tmp", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == b"DENIED"


@needs_root
def test_root_with_a_user_namespace_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedError) as e:
        run_program(SandboxConfig(namespaces=NamespaceConfig(user=True)), ["true"])
    assert e.value.protection == "namespaces.user"


@needs_root
def test_host_application_directories_stay_invisible_to_python_plugins() -> None:
    """The manager's sys.path may hold an application directory with secrets: only
    the Python installation and this package are bound into a Python sandbox."""
    app_dir = tempfile.mkdtemp(prefix="ndf-app-", dir="/var/tmp")
    secret = Path(app_dir) / ".env"
    secret.write_text("API_TOKEN=do-not-leak\n")
    os.chmod(app_dir, 0o755)
    os.chmod(secret, 0o644)
    sys.path.insert(0, app_dir)
    try:
        def look() -> str:
            try:
                return open(f"{app_dir}/.env").read()
            except OSError as e:
                return type(e).__name__

        async def scenario() -> object:
            async with SandboxManager(status_interval=None) as manager:
                return (await manager.execute_sandboxed("look", look)).output

        assert asyncio.run(scenario()) == "FileNotFoundError"
    finally:
        sys.path.remove(app_dir)
        secret.unlink()
        os.rmdir(app_dir)


def test_works_with_a_low_open_file_limit() -> None:
    """The bootstrap places its own fds just above the payload's, not at fixed high numbers."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.run([NDF_SANDBOX, "run", "--nofile", "32", "--", "true"], capture_output=True,
                          cwd="/tmp", timeout=60, preexec_fn=low_limit)
    assert proc.returncode == 0, proc.stderr


def test_host_environment_secrets_are_not_in_a_callables_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every callable is a fork of a zygote, so it holds the zygote's original
    # environment block in its memory: read that block from the host, while the
    # zygotes serve a call. (The "fork" start method forks the host itself: its
    # whole memory is the plugin's to read, as the README says.)
    import api_helpers

    secret = f"ndf-secret-{os.getpid()}-{os.urandom(4).hex()}"
    monkeypatch.setenv("NDF_TEST_HOST_TOKEN", secret)

    async def scenario() -> list[bytes]:
        async with SandboxManager(start_method="zygote") as m:
            result = await m.execute_sandboxed("env", os.getpid)
            assert result.output, result.error
            blocks = []
            zygotes = set(m._starter.pids)
            for process in api_helpers.zygote_family(os.getpid()):  # zygotes, templates, sandboxes, spares
                try:
                    with open(f"/proc/{process.pid}/environ", "rb") as f:
                        blocks.append(f.read())
                except (ProcessLookupError, FileNotFoundError):
                    assert process.pid not in zygotes  # a sandbox that ended meanwhile
            return blocks

    blocks = asyncio.run(scenario())
    assert len(blocks) >= 2 and all(b"PATH=" in block for block in blocks)
    assert not [block for block in blocks if secret.encode() in block or b"NDF_TEST_HOST_TOKEN" in block]


def test_a_launcher_with_fds_above_1024_still_gets_status_and_errors() -> None:
    # A busy zygote holds thousands of fds: the child's pipes then have numbers
    # above FD_SETSIZE, which must neither be closed in the child nor break select().
    script = """
import os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (5000, 5000))
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1500)]
from neural_doc_flow_security.sandbox.config import SandboxConfig
from neural_doc_flow_security.sandbox.launch.supervise import run_program
ok = run_program(SandboxConfig(), ["/bin/sh", "-c", "exit 7"])
bad = run_program(SandboxConfig(), ["/nonexistent-program"])
print(ok.exit_code, bad.outcome.value, "cannot execute" in (bad.error or ""))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["7", "sandbox_error", "True"]


# ------------------------------------------------- found by the review of the C child (second session)


def test_nul_bytes_in_paths_and_arguments_are_refused() -> None:
    from neural_doc_flow_security.sandbox.config import BindMount
    from neural_doc_flow_security.sandbox.errors import ConfigError
    from neural_doc_flow_security.sandbox.launch.bootstrap import ExecPayload
    from neural_doc_flow_security.sandbox.linux import steps

    # A C string ends at the first NUL: "/srv/shared/\0bob" would bind all of /srv/shared.
    with pytest.raises(ConfigError, match="filesystem.binds"):
        BindMount("/tmp/shared/\0bob", read_only=False)
    with pytest.raises(ConfigError, match="argv"):
        ExecPayload(("/bin/echo", "ok\0; rm -rf /"))
    with pytest.raises(ConfigError, match="cwd"):
        ExecPayload(("/bin/true",), cwd="/\0x")
    # The extension refuses them too, before any clone.
    with pytest.raises(ValueError, match="NUL"):
        steps.spawn(0, None, 2, ((steps.Step.CHDIR, b"/tmp\0/x"), (steps.Step.EXEC_PROGRAM,)), (b"/bin/true",))
    with pytest.raises(ValueError, match="NUL"):
        steps.spawn(0, None, 2, ((steps.Step.EXEC_PROGRAM,),), (b"/bin/true\0x",))


def test_a_bad_request_does_not_end_the_zygote_or_its_sandboxes() -> None:
    async def scenario() -> list[object]:
        async with SandboxManager() as m:
            running = asyncio.create_task(m.execute_command("long", ["/bin/sh", "-c", "sleep 1; echo done"]))
            await asyncio.sleep(0.3)
            try:
                await m.execute_command("bad", ["/bin/true"], cwd="/\0x")
                refused = False
            except Exception:  # noqa: BLE001 - any clear error will do
                refused = True
            long = await running
            after = await m.execute_command("after", ["/bin/true"])
            return [refused, long.outcome.value, long.stdout, after.outcome.value]

    assert asyncio.run(scenario()) == [True, "ok", b"done\n", "ok"]


def test_an_init_that_cannot_wait_reports_a_sandbox_error_never_success(tmp_path: Path) -> None:
    # A custom profile can deny what init needs (it confines itself before spawning the program).
    profile = tmp_path / "deny-wait.toml"
    profile.write_text('deny = ["wait4", "waitid"]\n')
    result = run_program(SandboxConfig(seccomp=str(profile)), ["/bin/sh", "-c", "sleep 0.2; exit 3"])
    assert result.outcome.value == "sandbox_error", result
    assert "init failed at waitpid" in (result.error or "")


def test_a_file_can_be_bound_over_a_file_of_the_root(tmp_path: Path) -> None:
    from neural_doc_flow_security.sandbox.config import BindMount, FilesystemConfig

    source = tmp_path / "os-release"
    source.write_text("ndf-test-release\n")
    source.chmod(0o644)
    tmp_path.chmod(0o755)
    config = SandboxConfig(filesystem=FilesystemConfig(
        read_only_binds=(BindMount(str(source), "/etc/os-release"),)))
    r, w = os.pipe()
    saved = os.dup(1)
    os.dup2(w, 1)
    os.close(w)
    try:
        result = run_program(config, ["/bin/cat", "/etc/os-release"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    out = os.read(r, 4096)
    os.close(r)
    assert result.outcome.value == "ok", result
    assert out == b"ndf-test-release\n"


def test_init_of_a_callable_sandbox_runs_as_the_payload_uid_without_capabilities() -> None:
    # Read from the host: the sandbox's pid 1 (it forked the Python payload) kept
    # neither uid 0 nor any capability; signalling its own payload needs none.
    from api_helpers import async_wait_until, proc_status_fields

    def wait_for_stop(ctx: PluginContext) -> str:
        ctx.wait_for_stop()
        return "stopped"

    def status() -> dict[str, str]:
        with open(f"/proc/{handle.pid}/status") as f:
            return proc_status_fields(f.read())

    async def scenario() -> tuple[dict[str, str], object]:
        nonlocal handle
        async with SandboxManager() as m:
            handle = await m.spawn("idle", wait_for_stop)
            # Init drops its identity right after it forked the payload, which may be just now.
            await async_wait_until(lambda: status()["Uid"].split() != ["0"] * 4, timeout=10)
            fields = status()
            await handle.stop()
            result = await handle.wait()
            return fields, result.output

    handle: Any = None
    fields, output = asyncio.run(scenario())
    uid = fields["Uid"].split()[0]
    assert int(uid) in SANDBOX_IDS and fields["Uid"].split() == [uid] * 4 and fields["Gid"].split() == [uid] * 4
    assert int(fields["CapPrm"], 16) == 0 and int(fields["CapEff"], 16) == 0 and int(fields["CapAmb"], 16) == 0
    assert fields["NoNewPrivs"] == "1"
    assert output == "stopped"  # init still forwards the stop and reaps the payload
