"""Network policies through the connect proxy (issue 17, the method without root):
the sandbox keeps loopback only and reaches exactly the allowed TCP endpoints
through HTTP CONNECT, plain HTTP or SOCKS5 at 127.0.0.1:3128. Run by an
unprivileged user (its default method) and by root with --net-method proxy. The
test hosts are network namespaces of the test's own (tests/net_hosts.py) with
listeners logging every connection: the evidence is on the host's side (what
reached a listener, which processes and connections are left), and no traffic
leaves this machine."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import ROOT_CALLER, UNPRIVILEGED_CALLER, SandboxCaller, _ensure_unprivileged_user, wait_until
from net_hosts import (  # noqa: F401 - fixtures
    ALLOWED,
    ALLOWED6,
    METADATA,
    OTHER,
    NetHost,
    accepted,
    host_listener_fixture,
    hosts_fixture,
    one_run_at_a_time,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(600),  # may first wait for another run of the network-policy modules (the lock)
    pytest.mark.skipif(os.geteuid() != 0, reason="builds test hosts in network namespaces (root)"),
]

PROBE = Path(__file__).with_name("net_proxy_probe.py").read_text()
PROXY_MODULE = "neural_doc_flow_security.sandbox.linux.connect_proxy"


@pytest.fixture(params=["unprivileged", "root"])
def caller(request: pytest.FixtureRequest) -> Iterator[tuple[SandboxCaller, list[str]]]:
    """Who runs `ndf-sandbox run`, and the options that choose the proxy: uid 4242
    (its default), root (--net-method proxy)."""
    if request.param == "root":
        yield ROOT_CALLER, ["--net-method", "proxy"]
        return
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    _ensure_unprivileged_user()
    yield UNPRIVILEGED_CALLER, []


def _run(caller: tuple[SandboxCaller, list[str]], policy: list[str],
         targets: list[str]) -> tuple[dict[str, str], dict[str, object]]:
    """Run the probe in a sandbox with `policy` (CLI options); its findings and the
    --json-result."""
    who, options = caller
    result_file = Path(f"/tmp/ndf-netproxy-{os.getpid()}.json")
    try:
        done = who.run([*options, *policy, "--python", "--json-result", str(result_file)],
                       ["python3", "-c", PROBE, *targets])
        assert done.returncode == 0, done.stderr.decode()
        return json.loads(done.stdout), json.loads(result_file.read_text())
    finally:
        result_file.unlink(missing_ok=True)


def _denied(result: dict[str, object]) -> dict[str, int]:
    events = result["security_events"]
    assert isinstance(events, list)
    assert all(e["kind"] == "denied_connection" for e in events)
    return {e["target"]: e["count"] for e in events}


def test_allowed_endpoint_only(caller: tuple[SandboxCaller, list[str]], hosts: dict[str, NetHost],
                               host_listener: tuple[socket.socket, socket.socket]) -> None:
    """The allowed address:port exchanges data through the proxy (HTTP CONNECT,
    SOCKS5, plain HTTP from urllib with the proxy of the environment, IPv4 and IPv6);
    the same host's other port, another test host (a private range not allowed),
    the metadata address, the host's loopback and own addresses (also written
    0.0.0.0 or ::ffff:127.0.0.1) are refused, and so is a connect() that ignores
    the proxy: their listeners see nothing; each refusal is in the result."""
    port = host_listener[0].getsockname()[1]
    before = {name: len(h.connections()) for name, h in hosts.items()}
    found, result = _run(
        caller, ["--net-allow", f"{ALLOWED}:8080/tcp", "--net-allow", f"[{ALLOWED6}]:8080"],
        [f"connect:{ALLOWED}:8080", f"socks:{ALLOWED}:8080", f"http:{ALLOWED}:8080", f"socks:[{ALLOWED6}]:8080",
         f"connect:{ALLOWED}:8081", f"socks:{ALLOWED}:8081", f"connect:[{ALLOWED6}]:8081",
         f"connect:{OTHER}:8080", f"socks:{OTHER}:8080", f"http:{OTHER}:8080",
         f"connect:{METADATA}:80", f"socks:{METADATA}:80",
         f"connect:127.0.0.1:{port}", f"socks:[::1]:{port}", f"connect:[::ffff:127.0.0.1]:{port}",
         f"socks:0.0.0.0:{port}", f"connect:10.214.1.1:{port}",
         f"direct:{ALLOWED}:8080", f"direct:{OTHER}:8080"])
    for target in (f"connect:{ALLOWED}:8080", f"socks:{ALLOWED}:8080", f"http:{ALLOWED}:8080",
                   f"socks:[{ALLOWED6}]:8080"):
        assert found.pop(target) == "ok:hello", (target, found)
    assert all(v in ("http:403", "socks:2") for k, v in found.items() if not k.startswith("direct")), found
    assert not found[f"direct:{ALLOWED}:8080"].startswith("ok") and not found[f"direct:{OTHER}:8080"].startswith("ok")
    new = {name: h.connections()[before[name]:] for name, h in hosts.items()}
    assert new == {"a": [f"tcp {ALLOWED} 8080"] * 3 + [f"tcp {ALLOWED6} 8080"], "b": [], "m": []}
    assert accepted(*host_listener) == 0
    denied = _denied(result)
    assert denied[f"{ALLOWED}:8081/tcp"] == 2 and denied[f"[{ALLOWED6}]:8081/tcp"] == 1
    assert denied[f"{OTHER}:8080/tcp"] == 3 and denied[f"{METADATA}:80/tcp"] == 2
    assert denied[f"127.0.0.1:{port}/tcp"] == 2  # ::ffff:127.0.0.1 is judged as what it reaches
    assert denied[f"[::1]:{port}/tcp"] == 1 and denied[f"0.0.0.0:{port}/tcp"] == 1
    assert denied[f"10.214.1.1:{port}/tcp"] == 1


def test_only_allowed_names_resolve(caller: tuple[SandboxCaller, list[str]], hosts: dict[str, NetHost]) -> None:
    """A name the policy allows is resolved by the proxy (to its `hosts` addresses)
    and connects; a name it does not allow gets no answer (no lookup is made, the
    other test host is not reached); the sandbox has no resolver of its own."""
    before = {name: len(h.connections()) for name, h in hosts.items()}
    found, result = _run(
        caller, ["--net-host", f"svc.ndftest.internal={ALLOWED}", "--net-host", f"other.ndftest.internal={OTHER}",
                 "--net-allow", "svc.ndftest.internal:8080"],
        ["socks:svc.ndftest.internal:8080", "connect:svc.ndftest.internal:8080", "connect:svc.ndftest.internal:8081",
         "socks:other.ndftest.internal:8080", "connect:other.ndftest.internal:8080", "dns:svc.ndftest.internal"])
    assert found == {"socks:svc.ndftest.internal:8080": "ok:hello", "connect:svc.ndftest.internal:8080": "ok:hello",
                     "connect:svc.ndftest.internal:8081": "http:403", "socks:other.ndftest.internal:8080": "socks:2",
                     "connect:other.ndftest.internal:8080": "http:403",
                     "dns:svc.ndftest.internal": found["dns:svc.ndftest.internal"]}
    assert found["dns:svc.ndftest.internal"].startswith("gaierror")
    new = {name: h.connections()[before[name]:] for name, h in hosts.items()}
    assert new == {"a": [f"tcp {ALLOWED} 8080"] * 2, "b": [], "m": []}
    assert _denied(result) == {"svc.ndftest.internal:8081/tcp": 1, "other.ndftest.internal:8080/tcp": 2}


def test_udp_and_dns_are_refused_without_root() -> None:
    """The proxy carries TCP only: without root (and with --net-method proxy) a
    policy that allows UDP, or asks for a resolver, is refused naming the field and
    the value; nothing runs."""
    from neural_doc_flow_security.sandbox import ConfigError, NetworkPolicy

    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    _ensure_unprivileged_user()
    udp = f"{ALLOWED}:5353/udp"
    done = UNPRIVILEGED_CALLER.run(["--net-allow", udp], ["true"])
    assert done.returncode != 0 and f"network.allow: cannot be enforced on this host: '{udp}' allows UDP" in \
        done.stderr.decode()
    done = UNPRIVILEGED_CALLER.run(["--net-allow", f"{ALLOWED}:8080", "--net-dns"], ["true"])
    assert done.returncode != 0 and "network.dns: cannot be enforced on this host: true" in done.stderr.decode()
    done = ROOT_CALLER.run(["--net-method", "proxy", "--net-allow", udp], ["true"])
    assert done.returncode != 0 and f"network.allow: '{udp}' allows UDP" in done.stderr.decode()
    with pytest.raises(ConfigError) as raised:
        NetworkPolicy(allow=(f"{ALLOWED}:8080",), dns=True, method="proxy")
    assert raised.value.field == "network.dns"


def _proxies_of(pid: int) -> list[int]:
    """The connect proxy processes started by process `pid`."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if PROXY_MODULE in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("end", ["timeout", "killed manager"])
def test_nothing_outlives_the_sandbox(end: str) -> None:
    """A connection relayed to an allowed endpoint (the test's own listener on the
    host: "host:PORT") is closed, and the proxy process is gone, when the sandbox
    ends: killed at its timeout, or with its manager (`ndf-sandbox run`, uid 4242)
    SIGKILLed."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    _ensure_unprivileged_user()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(60)
    timeout = ["--timeout", "3"] if end == "timeout" else []
    manager = UNPRIVILEGED_CALLER.popen([*timeout, "--net-allow", f"host:{port}/tcp", "--python"],
                                        ["python3", "-c", PROBE, f"hold:127.0.0.1:{port}"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        connection, _ = listener.accept()
        connection.settimeout(60)
        assert connection.recv(16) == b"held\n"
        [proxy] = _proxies_of(manager.pid)
        if end == "killed manager":
            manager.send_signal(signal.SIGKILL)
        manager.wait(timeout=60)
        assert connection.recv(16) == b""  # closed by the proxy as it ended
        assert wait_until(lambda: _gone(proxy), timeout=30)
        connection.close()
    finally:
        if manager.poll() is None:
            manager.kill()
        manager.communicate()
        listener.close()


def connect_through_proxy(host: str, port: int) -> str:
    """In the sandbox: HTTP CONNECT to host:port; the status, then what the endpoint sent."""
    sock = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    status = data.split(b" ")[1].decode() if b" " in data else "none"
    return status + ":" + (sock.recv(16).decode().strip() if status == "200" else "")


@pytest.mark.parametrize("method", ["zygote", "fork"])
def test_api_results_carry_the_denied_connections(method: str, hosts: dict[str, NetHost],
                                                  audit_events: list[dict[str, object]]) -> None:
    """Through the manager (both start methods), a callable's and a program's
    result list each denied attempt, counted, as the audit log does, and the
    allowed one connects; no proxy process is left."""
    import api_helpers
    from neural_doc_flow_security.sandbox import NetworkPolicy, SandboxConfig

    config = SandboxConfig(network=NetworkPolicy(allow=(f"{ALLOWED}:8080/tcp",), method="proxy"))
    before = {name: len(h.connections()) for name, h in hosts.items()}

    async def go() -> tuple[object, object, object]:
        async with api_helpers.manager(method) as m:
            calls = m.with_options(sandbox_config=config)
            allowed = await calls.execute_sandboxed("net", connect_through_proxy, ALLOWED, 8080)
            denied = await calls.execute_sandboxed("net", connect_through_proxy, OTHER, 8080)
            program = await m.execute_command(
                "net", ["python3", "-c", PROBE, f"connect:{OTHER}:8080", f"socks:{OTHER}:8080",
                        f"connect:{ALLOWED}:8081"], sandbox_config=config)
            return allowed, denied, program

    allowed, denied, program = api_helpers.run(go())
    assert allowed.output == "200:hello", api_helpers.describe(allowed)  # type: ignore[attr-defined]
    assert allowed.security_events == ()  # type: ignore[attr-defined]
    assert denied.output == "403:", api_helpers.describe(denied)  # type: ignore[attr-defined]
    [event] = denied.security_events  # type: ignore[attr-defined]
    assert (event.kind, event.target, event.count) == ("denied_connection", f"{OTHER}:8080/tcp", 1)
    assert {(e.target, e.count) for e in program.security_events} == {  # type: ignore[attr-defined]
        (f"{OTHER}:8080/tcp", 2), (f"{ALLOWED}:8081/tcp", 1)}
    audited = sorted((e["target"], e["count"]) for e in audit_events if e["event"] == "denied_connection")
    assert audited == [(f"{ALLOWED}:8081/tcp", 1), (f"{OTHER}:8080/tcp", 1), (f"{OTHER}:8080/tcp", 2)]
    new = {name: h.connections()[before[name]:] for name, h in hosts.items()}
    assert new == {"a": [f"tcp {ALLOWED} 8080"], "b": [], "m": []}
    assert _proxies_of(os.getpid()) == []


UNPRIVILEGED_MANAGER = f"""
import asyncio, json, socket
from neural_doc_flow_security.sandbox import NetworkPolicy, SandboxConfig, SandboxManager

{inspect.getsource(connect_through_proxy)}

async def main():
    config = SandboxConfig(network=NetworkPolicy(allow=("{ALLOWED}:8080/tcp",)))
    async with SandboxManager() as m:
        calls = m.with_options(sandbox_config=config)
        results = [await calls.execute_sandboxed("net", connect_through_proxy, host, 8080)
                   for host in ("{ALLOWED}", "{OTHER}")]
    print(json.dumps([[r.outcome.value, r.output, r.error, [[e.target, e.count] for e in r.security_events]]
                      for r in results]))

asyncio.run(main())
"""


def test_unprivileged_manager(hosts: dict[str, NetHost]) -> None:
    """A SandboxManager run by an unprivileged user (uid 4242, zygote start method)
    enforces a policy through the proxy by default."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    _ensure_unprivileged_user()
    before = {name: len(h.connections()) for name, h in hosts.items()}
    done = subprocess.run([*UNPRIVILEGED_CALLER.prefix, sys.executable, "-c", UNPRIVILEGED_MANAGER],
                          capture_output=True, text=True, timeout=300, cwd="/tmp", check=False)
    assert done.returncode == 0, done.stderr
    allowed, denied = json.loads(done.stdout)
    assert allowed == ["ok", "200:hello", None, []]
    assert denied == ["ok", "403:", None, [[f"{OTHER}:8080/tcp", 1]]]
    new = {name: h.connections()[before[name]:] for name, h in hosts.items()}
    assert new == {"a": [f"tcp {ALLOWED} 8080"], "b": [], "m": []}


def _exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` to the proxy, then read what it answers until it closes."""
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


def test_the_proxy_refuses_what_it_does_not_speak() -> None:
    """The proxy on its own (the test stands in for the sandbox, on loopback): an
    oversized or malformed request head, a plain request without an absolute URI, a
    SOCKS5 command other than CONNECT and a destination that is not a name are
    refused and reach nothing; only the allowed CONNECT reaches the endpoint. A
    refused name is reported as "(not a name)", never as the sandbox's text."""
    from neural_doc_flow_security.sandbox import NetworkPolicy
    from neural_doc_flow_security.sandbox.linux import connect_proxy

    endpoint = socket.create_server(("127.0.0.1", 0))
    endpoint.setblocking(False)
    port = endpoint.getsockname()[1]
    sandbox_side = socket.create_server(("127.0.0.1", 0))
    proxy = connect_proxy.start(NetworkPolicy(allow=(f"host:{port}/tcp",), method="proxy"))
    ours, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        socket.send_fds(child, [b"p"], [sandbox_side.fileno()])
        assert proxy.hand_over(ours.fileno())
        address = sandbox_side.getsockname()
        assert _exchange(address, b"CONNECT " + b"a" * 20000 + b":80 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 403")
        assert _exchange(address, b"CONNECT " + b"x" * 300 + b":80 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 403")
        assert _exchange(address, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").startswith(b"HTTP/1.1 403")
        assert _exchange(address, b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")
                         ).startswith(b"\x05\x00\x05\x07")  # BIND: command not supported
        assert _exchange(address, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 403")
        assert accepted(endpoint) == 0
        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nrelayed".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n") and (chunk := sock.recv(1)):
                head += chunk
            assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
            endpoint.settimeout(30)
            connection, _ = endpoint.accept()
            connection.settimeout(30)
            assert connection.recv(16) == b"relayed"
            connection.close()
            assert sock.recv(16) == b""  # the endpoint's end, relayed
        endpoint.setblocking(False)
        assert accepted(endpoint) == 0
        assert {e.target: e.count for e in proxy.denied()} == {"(not a name):80/tcp": 1}
    finally:
        proxy.release()
        for sock in (ours, child, sandbox_side, endpoint):
            sock.close()


# In the sandbox: a connection through the proxy held until the proxy ends (the test kills
# it), then a second attempt; prints what each got.
HELD_THEN_AGAIN = """
import socket, sys
def connect(port):
    sock = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n\\r\\n".encode())
    head = b""
    while not head.endswith(b"\\r\\n\\r\\n") and (chunk := sock.recv(1)):
        head += chunk
    return sock, head
port = int(sys.argv[1])
sock, head = connect(port)
sock.sendall(b"held\\n")
sock.settimeout(120)
first = sock.recv(16)
try:
    again = repr(connect(port)[1])
except OSError as e:
    again = type(e).__name__
print(head.split(b" ")[1].decode(), repr(first), again)
"""


def test_a_killed_proxy_fails_closed_and_is_reported(caller: tuple[SandboxCaller, list[str]]) -> None:
    """The proxy killed while its sandbox runs (as anyone of its uid could): the held
    connection closes, nothing more reaches the allowed endpoint (a new attempt is
    refused), and the result says the proxy ended early (its denied connections are not
    known), not only the launcher's log."""
    who, options = caller
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(60)
    result_file = Path(f"/tmp/ndf-netproxy-killed-{os.getpid()}.json")
    manager = who.popen([*options, "--net-allow", f"host:{port}/tcp", "--python", "--json-result", str(result_file)],
                        ["python3", "-c", HELD_THEN_AGAIN, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        connection, _ = listener.accept()
        connection.settimeout(60)
        assert connection.recv(16) == b"held\n"
        [proxy] = _proxies_of(manager.pid)
        os.kill(proxy, signal.SIGKILL)
        assert connection.recv(16) == b""
        out, err = manager.communicate(timeout=120)
        assert manager.returncode == 0, err.decode()
        status, first, again = out.decode().split()
        # Refused, or reset: a connect racing the proxy's exit is queued, then dropped with the socket.
        assert (status, first) == ("200", "b''") and again in ("ConnectionRefusedError", "ConnectionResetError",
                                                                "b''"), out
        listener.setblocking(False)
        assert accepted(listener) == 0
        notes = json.loads(result_file.read_text())["isolation"]["not_enforced"]
        assert any("the connect proxy ended before its sandbox" in n for n in notes), notes
        connection.close()
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.communicate()
        listener.close()
        result_file.unlink(missing_ok=True)


# Run as uid 4242: a proxy serving (it has answered one request), its pid printed; it ends
# when stdin does.
SERVING_PROXY = """
import socket, sys
from neural_doc_flow_security.sandbox import NetworkPolicy
from neural_doc_flow_security.sandbox.linux import connect_proxy
proxy = connect_proxy.start(NetworkPolicy(allow=("host:1/tcp",), method="proxy"))
sandbox_side = socket.create_server(("127.0.0.1", 0))
ours, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
socket.send_fds(child, [b"p"], [sandbox_side.fileno()])
assert proxy.hand_over(ours.fileno())
with socket.create_connection(sandbox_side.getsockname(), timeout=30) as sock:
    sock.sendall(b"garbage\\r\\n\\r\\n")
    assert sock.recv(12) == b"HTTP/1.1 403"
print(proxy.process.pid, flush=True)
sys.stdin.read()
proxy.release()
"""

# Run as uid 4242 too (a process of the proxy's uid, as a sandbox that can see it would
# be): PTRACE_ATTACH to the proxy and open its memory; prints what each got.
ATTACH = """
import ctypes, os, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
attached = libc.ptrace(16, pid, 0, 0) == 0
error = ctypes.get_errno()
if attached:
    os.waitpid(pid, 0x40000000)
    libc.ptrace(17, pid, 0, 0)
try:
    os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR))
    mem = "opened"
except OSError as e:
    mem = e.__class__.__name__
print("attached" if attached else os.strerror(error), mem)
"""


def test_the_proxy_cannot_be_traced_by_its_uid() -> None:
    """The proxy of an unprivileged caller runs as the caller's uid, the uid its
    sandbox's processes have on the host: it is not dumpable, so a process of that uid
    that can name it (a sandbox without a pid namespace, or with Landlock missing)
    can neither ptrace it nor open its memory, and so cannot use its host network."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    _ensure_unprivileged_user()
    prefix = list(UNPRIVILEGED_CALLER.prefix)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    serving = subprocess.Popen([*prefix, sys.executable, "-c", SERVING_PROXY], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, cwd="/tmp", env=env)
    try:
        assert serving.stdout is not None and serving.stdin is not None
        pid = int(serving.stdout.readline())
        assert psutil.Process(pid).uids().real == UNPRIVILEGED_CALLER.uid
        done = subprocess.run([*prefix, sys.executable, "-c", ATTACH, str(pid)], capture_output=True, text=True,
                              cwd="/tmp", env=env, timeout=60, check=True)
        assert done.stdout.split() == ["Operation", "not", "permitted", "PermissionError"], done.stdout
        with open(f"/proc/{pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
        serving.stdin.close()
        assert serving.wait(timeout=60) == 0
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()


def test_the_proxy_imports_nothing_from_the_callers_directory(caller: tuple[SandboxCaller, list[str]],
                                                              hosts: dict[str, NetHost]) -> None:
    """`python -m` puts the working directory first on sys.path: a json.py there (a
    directory others, or a sandbox through a writable bind, can write to) must not
    run in the proxy (as root before its drop, on the host's network). The caller's
    directory holds one that would leave a marker; the proxy serves regardless."""
    who, options = caller
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # the caller (uid 4242) can enter it
        planted = Path(directory)
        planted.chmod(0o777)
        marker = planted / "ran"
        (planted / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('planted')\n")
        manager = who.popen([*options, "--net-allow", f"{ALLOWED}:8080/tcp", "--python"],
                            ["python3", "-c", PROBE, f"connect:{ALLOWED}:8080"], cwd=directory,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = manager.communicate(timeout=300)
        assert manager.returncode == 0, err.decode()
        assert not marker.exists()
        assert json.loads(out) == {f"connect:{ALLOWED}:8080": "ok:hello"}


def test_a_name_with_a_mapped_address_is_judged_as_what_it_reaches(
        caller: tuple[SandboxCaller, list[str]], hosts: dict[str, NetHost],
        host_listener: tuple[socket.socket, socket.socket]) -> None:
    """An allowed name whose address (from `hosts`, or the DNS of a name the policy
    trusts) is an IPv4-mapped IPv6 address: the proxy's connect from the host reaches
    the IPv4 address, so it is judged as that: ::ffff:127.0.0.1 is the host and
    ::ffff:169.254.169.254 the metadata address, both closed unless named."""
    port = host_listener[0].getsockname()[1]
    before = len(hosts["m"].connections())
    found, result = _run(
        caller, ["--net-host", "loop.ndftest.internal=::ffff:127.0.0.1", "--net-allow", f"loop.ndftest.internal:{port}",
                 "--net-host", f"meta.ndftest.internal=::ffff:{METADATA}", "--net-allow", "meta.ndftest.internal:80"],
        [f"connect:loop.ndftest.internal:{port}", f"socks:loop.ndftest.internal:{port}",
         "connect:meta.ndftest.internal:80"])
    assert found == {f"connect:loop.ndftest.internal:{port}": "http:403",
                     f"socks:loop.ndftest.internal:{port}": "socks:2", "connect:meta.ndftest.internal:80": "http:403"}
    assert accepted(*host_listener) == 0
    assert hosts["m"].connections()[before:] == []
    assert _denied(result) == {f"loop.ndftest.internal:{port}/tcp": 2, "meta.ndftest.internal:80/tcp": 1}
