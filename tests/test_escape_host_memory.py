"""What a sandbox can learn about the host from the memory it starts with (issue 23,
items 9 to 11).

A callable's process is a fork of the zygote's template, and a sandbox's init a
clone of the process that started it: whatever those held is readable by the
payload. The host plants secrets where an application keeps them (a file named
customer-secret-<random>.csv in its working and script directory, a PYTHON*
variable, a file name on the CLI's command line); the payload searches its own
memory for them. The secrets are never handed to the payload: it gets their
SHA-256 digests and checks every candidate it finds against them. A control
secret it does get (as an argument) proves that the search finds what is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI_TIMEOUT, ROOT_SPARE_CALLER, SandboxCaller, ndf_host_env

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox")

# The payload's search: every readable region of its own memory (bounded), its
# environment and command line. Prefixes are known to it; what follows must hash to
# a digest it was given.
SCAN = r'''
def scan(wanted, control=None):
    import os, sys
    # Import only from directories that exist here: a path the sandbox cannot see
    # would make the import system list it again (empty), dropping what it held.
    saved = sys.path[:]
    sys.path[:] = [path for path in saved if os.path.isdir(path)]
    try:
        import ctypes, hashlib, re
    finally:
        sys.path[:] = saved
    found = {name: 0 for name in wanted}
    pattern = re.compile(rb"(customer-secret-|envsecret-|ctl-secret-)([0-9a-f]{24})")
    by_digest = {digest: name for name, digest in wanted.items()}

    def search(data):
        for match in pattern.finditer(data):
            name = by_digest.get(hashlib.sha256(match.group(0)).hexdigest())
            if name is not None:
                found[name] += 1

    scanned = 0
    for path in ("/proc/self/environ", "/proc/self/cmdline", "/proc/1/cmdline"):
        try:
            with open(path, "rb") as f:
                search(f.read())
        except OSError:
            pass
    # Read in place (the payload is not dumpable: /proc/self/mem is root's), into one
    # buffer made beforehand, so that the search maps or unmaps nothing meanwhile.
    chunk = 1 << 20
    buffer = bytearray(chunk + 64)
    window = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for fields in regions:
        perms = fields[1]
        name = fields[5] if len(fields) > 5 else ""
        if perms[0] != "r" or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
            continue
        if name.startswith("/") and perms[1] != "w":
            continue  # a file's text or constants: no run-time data
        start, end = (int(x, 16) for x in fields[0].split("-"))
        end = min(end, start + (256 << 20))
        position = start
        while position < end and scanned < (2 << 30):
            begin = max(start, position - 64)  # a secret across the chunk boundary
            size = min(position + chunk, end) - begin
            ctypes.memmove(window, begin, size)
            search(memoryview(buffer)[:size])
            scanned += size
            position = begin + size
    return {"found": found, "scanned": scanned}
'''

APP = SCAN + r'''
import asyncio, json, sys
from neural_doc_flow_security.sandbox.api import SandboxManager


async def main():
    wanted = json.loads(sys.argv[1])
    control = sys.argv[2]
    async with SandboxManager() as manager:
        result = await manager.execute_sandboxed("scan", scan, wanted, control)
    print(json.dumps({"ok": result.ok, "output": result.output, "error": str(result.error)}))


asyncio.run(main())
'''


def _secret(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture
def app_dir() -> Iterator[Path]:
    """The application's directory: its script and working directory, readable by
    the unprivileged caller."""
    path = Path(tempfile.mkdtemp(prefix="ndf-app-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_callable_memory_holds_no_host_file_names_or_python_variables(
        sandbox_caller: SandboxCaller, app_dir: Path) -> None:
    if sandbox_caller is ROOT_SPARE_CALLER:
        pytest.skip("a manager's callable: started by root or by the unprivileged user")
    file_secret, env_secret, control = _secret("customer-secret-"), _secret("envsecret-"), _secret("ctl-secret-")
    (app_dir / f"{file_secret}.csv").write_text("id,name\n")
    script = app_dir / "app.py"
    script.write_text(APP)
    wanted = {"file": _digest(file_secret), "env": _digest(env_secret), "control": _digest(control)}
    env = ndf_host_env(PYTHONSECRET=env_secret)
    result = subprocess.run([*sandbox_caller.prefix, sys.executable, str(script), json.dumps(wanted), control],
                            cwd=app_dir, env=env, capture_output=True, timeout=CLI_TIMEOUT * 3, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout.decode().splitlines()[-1])
    assert report["ok"], report
    found, scanned = report["output"]["found"], report["output"]["scanned"]
    assert found["control"] >= 1, report  # the search finds what is in its memory
    assert scanned > 1 << 20, report
    assert found["file"] == 0, f"the application's file name is in the callable's memory: {report}"
    assert found["env"] == 0, f"a PYTHON* variable of the host is in the callable's memory: {report}"


def test_cli_command_line_and_environment_are_not_readable_from_init(sandbox_caller: SandboxCaller) -> None:
    secret = _secret("customer-secret-")
    result_file = Path(tempfile.gettempdir()) / f"{secret}.json"
    env = ndf_host_env(NDF_TEST_SECRET=secret)
    try:
        result = sandbox_caller.run(
            ["--json-result", str(result_file)],
            ["sh", "-c", "cat /proc/1/cmdline; echo; echo CMDLINE-READ; cat /proc/1/environ; echo; "
                         "cat /proc/self/environ; echo; echo DONE"], env=env)
        output = result.stdout.decode(errors="replace")
        assert "DONE" in output and "CMDLINE-READ" in output, result
        assert secret not in output, f"the host's command line or environment is readable: {output!r}"
        assert result_file.exists()  # the host side did get the name: the CLI wrote its result there
    finally:
        result_file.unlink(missing_ok=True)


CMDLINE_APP = r'''
import asyncio, json
from neural_doc_flow_security.sandbox.api import SandboxManager


def read():
    out = {}
    for path in ("/proc/1/cmdline", "/proc/self/cmdline", "/proc/1/environ", "/proc/self/environ"):
        try:
            with open(path, "rb") as f:
                out[path] = f.read().strip(b"\0").decode(errors="replace")
        except OSError as e:
            out[path] = type(e).__name__
    return out


async def main():
    async with SandboxManager() as manager:
        result = await manager.execute_sandboxed("read", read)
    print(json.dumps({"ok": result.ok, "output": result.output, "error": str(result.error)}))


asyncio.run(main())
'''


def test_callable_sees_no_command_line_of_its_starters(sandbox_caller: SandboxCaller, app_dir: Path) -> None:
    if sandbox_caller is ROOT_SPARE_CALLER:
        pytest.skip("a manager's callable: started by root or by the unprivileged user")
    script = app_dir / "app.py"
    script.write_text(CMDLINE_APP)
    result = subprocess.run([*sandbox_caller.prefix, sys.executable, str(script)], cwd=app_dir,
                            env=ndf_host_env(), capture_output=True, timeout=CLI_TIMEOUT * 3, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout.decode().splitlines()[-1])
    assert report["ok"], report
    seen = report["output"]
    assert seen["/proc/1/cmdline"] == "" and seen["/proc/self/cmdline"] == "", seen  # the zygote's argv
    assert seen["/proc/1/environ"] in ("", "PermissionError"), seen
    assert seen["/proc/self/environ"] in ("", "PermissionError"), seen
