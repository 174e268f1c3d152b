"""Escapes through kernel surfaces the seccomp filter closes (issue 23 items 4, 5, 16):
set-id files and device nodes planted on the host through a writable bind,
socket families that network namespaces do not fence (AF_VSOCK), and newer
syscalls (memfd_secret, statmount, listmount, open_tree_attr).

Each CLI probe runs with `ndf-sandbox` started by root, by uid 4242 and by root
from a spare (the `sandbox_caller` fixture), the set-id probe through the API
too. Host-side evidence: the host's stat() of the files the payload made, the
host binding the vsock port the payload tried to hold. Hostile programs stay
harmless if the sandbox were broken: they only touch files in the test's own
temp dir (removed at the end) and a vsock port the test picked.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import subprocess
from pathlib import Path

import pytest

import api_helpers
from api_helpers import LeakTracker, make_host_dir, method, rw_bind_config  # noqa: F401 - fixtures
from conftest import SandboxCaller
from test_escape import PY, SYSCALL_PRELUDE, describe, out, probes, python

pytestmark = pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox")
no_leaks = api_helpers.no_leaks

SETID = stat.S_ISUID | stat.S_ISGID


@pytest.fixture(params=["deny-list", "allow-list"])
def seccomp_profile(request: pytest.FixtureRequest) -> str:
    """Each built-in seccomp profile: the allow-list keeps every rule of the deny list."""
    return str(request.param)

# Everything a payload may try to leave set-id (or as a device) in a writable bind `d`.
PLANT_SETID = """
import errno, os, shutil
def attempt(name, fn):
    try:
        fn()
        print("PROBE", name, "rc=0 errno=0", flush=True)
    except OSError as e:
        print("PROBE", name, "rc=-1", "errno=" + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
shutil.copy("/bin/true", f"{d}/s")
attempt("chmod_4755", lambda: os.chmod(f"{d}/s", 0o4755))
attempt("chmod_2755", lambda: os.chmod(f"{d}/s", 0o2755))
fd = os.open(f"{d}/s", os.O_RDONLY)
attempt("fchmod_6755", lambda: os.fchmod(fd, 0o6755))
os.close(fd)
attempt("open_creat_4755", lambda: os.close(os.open(f"{d}/o", os.O_CREAT | os.O_WRONLY, 0o4755)))
attempt("open_tmpfile_2755", lambda: os.close(os.open(d, os.O_TMPFILE | os.O_RDWR, 0o2755)))
attempt("mkdir_2775", lambda: os.mkdir(f"{d}/g", 0o2775))
os.makedirs(f"{d}/g2", exist_ok=True)
attempt("chmod_dir_2775", lambda: os.chmod(f"{d}/g2", 0o2775))
attempt("mknod_char", lambda: os.mknod(f"{d}/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
attempt("mknod_setuid_file", lambda: os.mknod(f"{d}/m", stat.S_IFREG | 0o4755))
attempt("link_setuid_binary", lambda: os.link(setuid_binary, f"{d}/su"))
attempt("link_root_file", lambda: os.link(f"{d}/root-owned", f"{d}/root-link"))
print("DONE", flush=True)
"""

PLANT_PROBES = ("chmod_4755", "chmod_2755", "fchmod_6755", "open_creat_4755", "open_tmpfile_2755",
                "mkdir_2775", "chmod_dir_2775", "mknod_char", "mknod_setuid_file")


def _setuid_binary() -> str:
    for path in ("/usr/bin/passwd", "/usr/bin/su", "/usr/bin/chfn", "/usr/bin/newgrp", "/usr/bin/gpasswd"):
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & stat.S_ISUID:
                return path
    pytest.skip("no set-uid binary under /usr/bin to try a hard link to")


def _prepare_bind(directory: Path) -> None:
    root_owned = directory / "root-owned"  # a file the payload neither owns nor may write
    root_owned.write_text("host file\n")
    root_owned.chmod(0o644)


def _assert_nothing_set_id(directory: Path) -> list[str]:
    """Host-side evidence: no set-id file or device node anywhere in the bind."""
    bad = []
    found = []
    for top, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            found.append(os.path.relpath(path, directory))
            if st.st_mode & SETID or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                bad.append(f"{path}: {stat.filemode(st.st_mode)} ({oct(st.st_mode)})")
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                bad.append(f"{path}: a hard link ({st.st_nlink} links)")
    assert not bad, bad
    return found


def _assert_refused(found: dict[str, tuple[int, str]]) -> None:
    for name in PLANT_PROBES:
        assert found.get(name) == (-1, "EPERM"), (name, found.get(name))
    # hard links: EXDEV across mounts (the kernel's own rule), EPERM by protected_hardlinks
    assert found["link_setuid_binary"] == (-1, "EXDEV"), found
    # (EOVERFLOW for an unprivileged caller: root is not mapped in its user namespace)
    assert found["link_root_file"] in ((-1, "EPERM"), (-1, "EOVERFLOW")), found


def test_cannot_plant_set_id_files_through_a_writable_bind(sandbox_caller: SandboxCaller, shared_host_dir: Path,
                                                           seccomp_profile: str) -> None:
    _prepare_bind(shared_host_dir)
    code = f"import stat\nd = {str(shared_host_dir)!r}\nsetuid_binary = {_setuid_binary()!r}\n" + PLANT_SETID
    result = sandbox_caller.run([*PY, "--seccomp", seccomp_profile, "--bind", str(shared_host_dir)], python(code))
    assert result.returncode == 0 and "DONE" in out(result), describe(result)
    found = _assert_nothing_set_id(shared_host_dir)
    assert "s" in found and "g2" in found, found  # the payload did write to the host directory
    _assert_refused(probes(out(result)))
    # the same with the coreutils a script would use
    shell = sandbox_caller.run(["--seccomp", seccomp_profile, "--bind", str(shared_host_dir)],
                               ["sh", "-c", f"cd {shared_host_dir} && cp /bin/true t && chmod 4755 t; "
                                            "chmod u+s t; chmod g+s t; mkdir -m 2755 k; echo DONE"])
    assert b"DONE" in shell.stdout, describe(shell)
    assert "t" in _assert_nothing_set_id(shared_host_dir)


@api_helpers.linux_only
@api_helpers.needs_root
def test_api_callable_cannot_plant_set_id_files(method: str, no_leaks: LeakTracker,  # noqa: F811
                                                seccomp_profile: str) -> None:
    directory = make_host_dir(no_leaks)
    _prepare_bind(directory)
    namespace: dict[str, object] = {}
    code = f"import stat\nd = {str(directory)!r}\nsetuid_binary = {_setuid_binary()!r}\n" + PLANT_SETID

    def plant() -> str:
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(code, namespace)  # noqa: S102 - the test's own probe
        return buffer.getvalue()

    async def main() -> object:
        async with api_helpers.manager(method) as m:
            config = rw_bind_config(directory, seccomp=seccomp_profile)
            return await m.with_options(sandbox_config=config).execute_sandboxed("plant", plant)

    result = api_helpers.run(main())  # type: ignore[arg-type]
    assert result.outcome.value == "ok", api_helpers.describe(result)  # type: ignore[attr-defined]
    found = _assert_nothing_set_id(directory)
    assert "s" in found, found
    _assert_refused(probes(result.output))  # type: ignore[attr-defined]


# --- socket families -------------------------------------------------------------------------

def _host_vsock_usable() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (OSError, AttributeError):
        return False
    return True


HOLD_VSOCK_PORT = """
import errno, socket, sys
try:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, {port}))
    s.listen(1)
    print("LISTENING", flush=True)
except OSError as e:
    print("REFUSED", errno.errorcode.get(e.errno, e.errno), flush=True)
sys.stdin.read()   # hold the port until the test closes our stdin
"""


def test_cannot_listen_on_vsock(sandbox_caller: SandboxCaller) -> None:
    if not _host_vsock_usable():
        pytest.skip("no vsock transport on this host (/dev/vsock, vsock modules)")
    port = random.randrange(20000, 60000)
    proc = sandbox_caller.popen([*PY], python(HOLD_VSOCK_PORT.format(port=port)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline().decode()
        # host-side evidence: the port is still free for the host
        host = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            host.bind((socket.VMADDR_CID_ANY, port))
        except OSError as e:
            pytest.fail(f"the sandbox holds vsock port {port} (host bind: {e}); sandbox said {first!r}")
        finally:
            host.close()
        assert first.split() == ["REFUSED", "EAFNOSUPPORT"], first
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait(timeout=60)


def test_only_unix_inet_and_route_netlink_sockets(sandbox_caller: SandboxCaller, seccomp_profile: str) -> None:
    code = """
import errno, socket
NETLINK_GENERIC, NETLINK_SOCK_DIAG, NETLINK_KOBJECT_UEVENT = 16, 4, 15
tries = (("vsock", socket.AF_VSOCK, socket.SOCK_STREAM, 0),
         ("packet", socket.AF_PACKET, socket.SOCK_DGRAM, 0),
         ("alg", socket.AF_ALG, socket.SOCK_SEQPACKET, 0),
         ("bluetooth", 31, socket.SOCK_STREAM, 0),
         ("genl", socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC),
         ("sock_diag", socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG),
         ("uevent", socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT),
         ("unix", socket.AF_UNIX, socket.SOCK_STREAM, 0),
         ("inet", socket.AF_INET, socket.SOCK_STREAM, 0),
         ("inet6", socket.AF_INET6, socket.SOCK_DGRAM, 0),
         ("route", socket.AF_NETLINK, socket.SOCK_RAW, 0))
for name, family, kind, proto in tries:
    try:
        socket.socket(family, kind, proto).close()
        print("PROBE", name, "rc=0 errno=0")
    except OSError as e:
        print("PROBE", name, "rc=-1", "errno=" + errno.errorcode.get(e.errno, str(e.errno)))
try:
    socket.socketpair(socket.AF_INET)
    print("PROBE socketpair_inet rc=0 errno=0")
except OSError as e:
    print("PROBE socketpair_inet rc=-1", "errno=" + errno.errorcode.get(e.errno, str(e.errno)))
print("PROBE getaddrinfo rc=%d errno=0" % len(socket.getaddrinfo("localhost", 80)))
print("PROBE if_nameindex rc=%d errno=0" % len(socket.if_nameindex()))
"""
    result = sandbox_caller.run([*PY, "--seccomp", seccomp_profile], python(code))
    assert result.returncode == 0, describe(result)
    found = probes(out(result))
    for name in ("vsock", "packet", "alg", "bluetooth", "socketpair_inet"):
        assert found[name] == (-1, "EAFNOSUPPORT"), (name, found)
    for name in ("genl", "sock_diag", "uevent"):
        assert found[name] == (-1, "EPROTONOSUPPORT"), (name, found)
    for name in ("unix", "inet", "inet6", "route"):
        assert found[name] == (0, "0"), (name, found)
    assert found["getaddrinfo"][0] > 0 and found["if_nameindex"][0] == 1, found


# --- newer syscalls ---------------------------------------------------------------------------

def test_newer_kernel_surfaces_are_refused(sandbox_caller: SandboxCaller, seccomp_profile: str) -> None:
    # x86_64 numbers; bad pointers and unknown flags, so a broken filter does no harm
    code = SYSCALL_PRELUDE + """
BAD = 1
report("memfd_secret", *sys_call(447, 0xFFFF))
report("statmount", *sys_call(457, BAD, BAD, 0, 0))
report("listmount", *sys_call(458, BAD, BAD, 0, 0))
report("open_tree_attr", *sys_call(467, -1, BAD, 0, BAD, 0))
report("lsm_set_self_attr", *sys_call(460, 0, BAD, 0, 0))
report("openat2", *sys_call(437, -100, BAD, BAD, 24))
print("DONE")
"""
    if os.uname().machine != "x86_64":
        pytest.skip("x86_64 syscall numbers")
    result = sandbox_caller.run([*PY, "--seccomp", seccomp_profile], python(code))
    assert result.returncode == 0 and "DONE" in out(result), describe(result)
    found = probes(out(result))
    assert found.pop("openat2") == (-1, "ENOSYS")  # libc falls back to openat
    assert found == dict.fromkeys(("memfd_secret", "statmount", "listmount", "open_tree_attr",
                                   "lsm_set_self_attr"), (-1, "EPERM")), found
