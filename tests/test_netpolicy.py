"""Network policies (issue 17), as root: a sandbox reaches exactly the endpoints it
is allowed. The test hosts are network namespaces of the test's own (tests/
net_hosts.py) with listeners logging every connection: the evidence is on the
host's side (what reached a listener, what the host still holds), and no traffic
leaves this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT_CALLER, processes_with_argument, unique_marker, wait_until
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
    pytest.mark.timeout(600),  # may first wait for another run of this module (the lock below)
    pytest.mark.skipif(os.geteuid() != 0, reason="network policies are enforced as root"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian package nftables)"),
]

PROBE = Path(__file__).with_name("net_probe.py").read_text()
def _host_addresses() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = [m.get_attr("IFA_ADDRESS") for m in ipr.get_addr()]
    return [a for a in found if a and not a.startswith(("fe80", "10.214.", "fd8d:f1c3:b1e2", "169.254."))]


def _run(policy: list[str], targets: list[str], *extra: str) -> tuple[dict[str, str], dict[str, object]]:
    """Run the probe in a sandbox with `policy` (CLI options); its findings and the
    --json-result."""
    result_file = Path(f"/tmp/ndf-netpolicy-{os.getpid()}.json")
    try:
        done = ROOT_CALLER.run([*policy, "--python", "--json-result", str(result_file), *extra],
                               ["python3", "-c", PROBE, *targets])
        assert done.returncode == 0, done.stderr.decode()
        return json.loads(done.stdout), json.loads(result_file.read_text())
    finally:
        result_file.unlink(missing_ok=True)


def _host_entries() -> list[tuple[int, str]]:
    """Network-policy links and nft tables on the host: (holder pid, name)."""
    import re

    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    found = [(int(m.group(1), 16), m.group(0)) for m in re.finditer(r"\bndf([0-9a-f]+)-[0-9a-f]+\b", links)]
    found += [(int(m.group(1)), m.group(0)) for m in re.finditer(r"\bndf_([0-9]+)_[0-9]+\b", tables)]
    return found


def _leftovers() -> list[str]:
    """What network-policy sandboxes left on the host: links and nft tables whose
    holder is gone (another run's live sandboxes are theirs)."""
    return [name for pid, name in _host_entries() if not os.path.exists(f"/proc/{pid}")]


def test_allowed_endpoint_only(hosts: dict[str, NetHost], host_listener: tuple[socket.socket, socket.socket]) -> None:
    """The allowed address:port connects and exchanges data (TCP and UDP); the same
    host's other ports, another test host, the metadata address, the host's own
    addresses and loopback are refused: their listeners see nothing."""
    port = host_listener[0].getsockname()[1]
    host_targets = [f"tcp:{a if ':' not in a else f'[{a}]'}:{port}" for a in _host_addresses()]
    before = {name: len(h.connections()) for name, h in hosts.items()}
    found, result = _run(
        ["--net-allow", f"{ALLOWED}:8080/tcp", "--net-allow", f"{ALLOWED}:5353/udp"],
        [f"tcp:{ALLOWED}:8080", f"udp:{ALLOWED}:5353", f"tcp:{ALLOWED}:8081", f"udp:{ALLOWED}:5354",
         f"tcp:{OTHER}:8080", f"udp:{OTHER}:5353", f"tcp:{METADATA}:80", f"tcp:127.0.0.1:{port}",
         "tcp:10.214.1.1:22", *host_targets])
    assert found.pop(f"tcp:{ALLOWED}:8080") == "ok:hello"
    assert found.pop(f"udp:{ALLOWED}:5353") == "ok:ping"
    assert all(not v.startswith("ok") for v in found.values()), found
    new = {name: h.connections()[before[name]:] for name, h in hosts.items()}
    assert new == {"a": [f"tcp {ALLOWED} 8080", f"udp {ALLOWED} 5353"], "b": [], "m": []}
    assert accepted(*host_listener) == 0
    denied = {e["target"]: e for e in result["security_events"]}  # type: ignore[union-attr]
    for target in (f"{ALLOWED}:8081/tcp", f"{ALLOWED}:5354/udp", f"{OTHER}:8080/tcp", f"{METADATA}:80/tcp"):
        assert denied[target]["kind"] == "denied_connection" and denied[target]["count"] >= 1
    assert not _leftovers()


def test_ipv6(hosts: dict[str, NetHost], host_listener: tuple[socket.socket, socket.socket]) -> None:
    """IPv6 likewise: the allowed [address]:port only."""
    port = host_listener[0].getsockname()[1]
    before = len(hosts["a"].connections())
    found, result = _run(["--net-allow", f"[{ALLOWED6}]:8080/tcp"],
                         [f"tcp:[{ALLOWED6}]:8080", f"tcp:[{ALLOWED6}]:8081", f"udp:[{ALLOWED6}]:5353",
                          f"tcp:{ALLOWED}:8080", f"tcp:[::1]:{port}"])
    assert found.pop(f"tcp:[{ALLOWED6}]:8080") == "ok:hello"
    assert all(not v.startswith("ok") for v in found.values()), found
    assert hosts["a"].connections()[before:] == [f"tcp {ALLOWED6} 8080"]
    assert accepted(*host_listener) == 0
    assert f"[{ALLOWED6}]:8081/tcp" in {e["target"] for e in result["security_events"]}  # type: ignore[union-attr]


def test_cidr_and_port_range(hosts: dict[str, NetHost]) -> None:
    """A CIDR with a port range; a deny entry wins over the allow entry."""
    before = len(hosts["a"].connections())
    found, _ = _run(["--net-allow", "10.214.0.0/16:8080-8081/tcp", "--net-deny", f"{OTHER}"],
                    [f"tcp:{ALLOWED}:8080", f"tcp:{ALLOWED}:8081", f"tcp:{OTHER}:8080", f"udp:{ALLOWED}:5353"])
    assert found == {f"tcp:{ALLOWED}:8080": "ok:hello", f"tcp:{ALLOWED}:8081": "ok:hello",
                     f"tcp:{OTHER}:8080": "ECONNREFUSED", f"udp:{ALLOWED}:5353": "EPERM"}
    assert hosts["a"].connections()[before:] == [f"tcp {ALLOWED} 8080", f"tcp {ALLOWED} 8081"]
    assert hosts["b"].connections() == []


def test_payload_cannot_change_the_network(hosts: dict[str, NetHost]) -> None:
    """No CAP_NET_ADMIN, no raw sockets, no spoofed source: a payload that tries
    routes, addresses, rules, raw packets and another source address gets nowhere."""
    script = (
        "import socket, subprocess, json\n"
        "out = {}\n"
        "out['cap_eff'] = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
        "try:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP); out['raw'] = 'ok'\n"
        "except OSError as e:\n    out['raw'] = e.errno\n"
        "for name, argv in (('route', ['ip', 'route', 'replace', 'default', 'dev', 'lo']),\n"
        "                   ('addr', ['ip', 'addr', 'add', '10.214.2.9/24', 'dev', 'eth0']),\n"
        "                   ('nft', ['nft', 'flush', 'ruleset'])):\n"
        "    try:\n        out[name] = subprocess.run(argv, capture_output=True).returncode\n"
        "    except OSError as e:\n        out[name] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    done = ROOT_CALLER.run(["--net-allow", f"{ALLOWED}:8080/tcp", "--python"], ["python3", "-c", script])
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout)
    assert int(out["cap_eff"], 16) == 0
    assert out["raw"] != "ok"
    assert all(out[k] != 0 for k in ("route", "addr", "nft")), out
    before = len(hosts["a"].connections())
    found, _ = _run(["--net-allow", f"{ALLOWED}:8080/tcp"],
                    [f"spoof:10.214.1.77:{ALLOWED}:8080", f"spoof:{OTHER}:{ALLOWED}:8080", f"tcp:{ALLOWED}:8080"])
    assert found[f"tcp:{ALLOWED}:8080"] == "ok:hello"  # the policy still holds after the attempts
    assert not found[f"spoof:10.214.1.77:{ALLOWED}:8080"].startswith("ok")
    assert not found[f"spoof:{OTHER}:{ALLOWED}:8080"].startswith("ok")
    assert hosts["a"].connections()[before:] == [f"tcp {ALLOWED} 8080"]


def _kill_a_manager() -> int:
    """Start `ndf-sandbox run` with a policy, SIGKILL it once its sandbox runs: its
    host table stays (the namespace, and with it the veth pair, goes with the sandbox)."""
    marker = unique_marker()
    manager = ROOT_CALLER.popen(["--net-allow", f"{ALLOWED}:8080/tcp"], ["sleep", marker])
    try:
        # Once the payload runs (the sandbox's init has armed its parent-death signal).
        assert wait_until(lambda: processes_with_argument(marker), timeout=30)
        assert any(pid == manager.pid for pid, _ in _host_entries())
        manager.send_signal(signal.SIGKILL)
    finally:
        manager.wait()
    assert wait_until(lambda: not processes_with_argument(marker), timeout=30)
    assert wait_until(lambda: [n for n in _leftovers() if not n.startswith("ndf_")] == [], timeout=30)
    assert f"ndf_{manager.pid}_" in " ".join(_leftovers())
    return manager.pid


def test_nothing_left_after_a_killed_manager() -> None:
    """Every CLI run's link, addresses, host table and slot go with it; what a
    SIGKILLed manager left is removed by the next start of a sandbox with a policy,
    and by `ndf-sandbox cleanup`."""
    for _ in range(3):
        done = ROOT_CALLER.run(["--net-allow", f"{ALLOWED}:8080/tcp"], ["true"])
        assert done.returncode == 0, done.stderr.decode()
    assert not _leftovers()
    _kill_a_manager()
    done = ROOT_CALLER.run(["--net-allow", f"{ALLOWED}:8080/tcp"], ["true"])
    assert done.returncode == 0, done.stderr.decode()
    assert not _leftovers()
    _kill_a_manager()
    done = subprocess.run([ROOT_CALLER.program[0], "cleanup"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not _leftovers()


def test_veth_refused_without_root() -> None:
    """Unprivileged, the veth method cannot be had: asked for, the config is refused,
    naming `network.method` (the default takes the connect proxy: test_netpolicy_proxy.py)."""
    from conftest import UNPRIVILEGED_CALLER, _ensure_unprivileged_user

    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    _ensure_unprivileged_user()
    done = UNPRIVILEGED_CALLER.run(["--net-allow", f"{ALLOWED}:8080/tcp", "--net-method", "veth"], ["true"])
    assert done.returncode != 0
    assert b"network.method: cannot be enforced" in done.stderr


def test_dns_answers_only_the_allowed_names(hosts: dict[str, NetHost], tmp_path: Path) -> None:
    """With dns = true the sandbox's resolver answers the allowed name (with the
    addresses the host resolved at launch) and NXDOMAIN for any other; the name
    connects, the other host stays unreached."""
    profile = tmp_path / "p.toml"
    profile.write_text(
        '[network]\nallow = ["svc.ndftest.internal:8080/tcp"]\ndns = true\n'
        f'hosts = {{ "svc.ndftest.internal" = ["{ALLOWED}", "{ALLOWED6}"], "other.ndftest.internal" = ["{OTHER}"] }}\n')
    before = len(hosts["a"].connections())
    found, _ = _run(["--profile", str(profile)],
                    ["dns:svc.ndftest.internal", "dns:other.ndftest.internal", "dns:example.com",
                     "tcp:svc.ndftest.internal:8080"])
    assert found == {"dns:svc.ndftest.internal": f"ok:{ALLOWED},{ALLOWED6}",
                     "dns:other.ndftest.internal": f"gaierror:{socket.EAI_NONAME}",
                     "dns:example.com": f"gaierror:{socket.EAI_NONAME}",
                     "tcp:svc.ndftest.internal:8080": "ok:hello"}
    assert hosts["a"].connections()[before:] == [f"tcp {ALLOWED} 8080"]
    assert hosts["b"].connections() == []
    assert not _leftovers()


def test_without_dns_nothing_resolves(hosts: dict[str, NetHost]) -> None:
    found, _ = _run(["--net-allow", f"{ALLOWED}:8080/tcp"], ["dns:example.com"])
    assert found["dns:example.com"].startswith("gaierror")


def test_check_says_which_method_is_in_force() -> None:
    from conftest import UNPRIVILEGED_CALLER, _ensure_unprivileged_user

    done = subprocess.run([ROOT_CALLER.program[0], "check", "--json"], capture_output=True, text=True, check=False)
    assert json.loads(done.stdout)["features"]["network_policy"].startswith("veth pair + nftables (as root")
    if not shutil.which("setpriv"):
        return
    _ensure_unprivileged_user()
    done = subprocess.run([*UNPRIVILEGED_CALLER.prefix, ROOT_CALLER.program[0], "check", "--json"],
                          capture_output=True, text=True, check=False, cwd="/tmp")
    features = json.loads(done.stdout)["features"]
    assert features["network_policy"].startswith("connect proxy on the host")
    assert "pasta/slirp4netns not used (evaluated: " in features["network_policy"]


def connect_to(address: str, port: int) -> str:
    try:
        socket.create_connection((address, port), timeout=3).close()
    except OSError as e:
        return e.strerror or str(e)
    return "connected"


@pytest.mark.parametrize("method", ["zygote", "fork"])
def test_api_results_carry_the_denied_connections(method: str) -> None:
    """Through the manager (both start methods), a callable's and a program's result
    lists each denied attempt once, counted; nothing is left on the host."""
    import api_helpers
    from neural_doc_flow_security.sandbox import NetworkPolicy, SandboxConfig

    config = SandboxConfig(network=NetworkPolicy(allow=(f"{ALLOWED}:8080/tcp",)))

    async def go() -> tuple[object, object]:
        async with api_helpers.manager(method) as m:
            called = await m.with_options(sandbox_config=config).execute_sandboxed("net", connect_to, OTHER, 8080)
            program = await m.execute_command(
                "net", ["python3", "-c", f"import socket\nfor _ in range(3):\n    try: socket.create_connection("
                                         f"('{OTHER}', 8081), timeout=3)\n    except OSError: pass"],
                sandbox_config=config)
            return called, program

    import logging

    from neural_doc_flow_security.sandbox import audit

    events: list[dict[str, object]] = []
    handler = logging.Handler()
    handler.emit = lambda record: events.append(record.audit_event)  # type: ignore[method-assign,attr-defined]
    logger = logging.getLogger(audit.LOGGER_NAME)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        called, program = api_helpers.run(go())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    audited = [(e["target"], e["count"]) for e in events if e["event"] == "denied_connection"]
    assert audited == [(f"{OTHER}:8080/tcp", 1), (f"{OTHER}:8081/tcp", 3)]
    assert called.output == "Connection refused", api_helpers.describe(called)  # type: ignore[attr-defined]
    [event] = called.security_events  # type: ignore[attr-defined]
    assert (event.kind, event.target, event.count) == ("denied_connection", f"{OTHER}:8080/tcp", 1)
    [event] = program.security_events  # type: ignore[attr-defined]
    assert (event.target, event.count) == (f"{OTHER}:8081/tcp", 3)
    assert not _leftovers()


def own_address(toward: str) -> str:
    """The sandbox's own address toward `toward` (a UDP connect sends nothing)."""
    import time

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((toward, 9))
    time.sleep(0.3)  # overlap with the other sandboxes of the batch
    return str(sock.getsockname()[0])


def _held(slots: set[int]) -> list[int]:
    """Which of these slots' locks are held."""
    import fcntl

    held = []
    for slot in slots:
        with open(f"/run/ndf-sandbox/net/{slot}") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(slot)
    return held


def test_a_hundred_sandboxes_get_their_own_links_and_leave_nothing() -> None:
    """100 sandboxes, 10 at a time: each live one has an address of its own; when
    they have ended no link, address, table or slot of theirs is left."""
    import asyncio

    import api_helpers
    from neural_doc_flow_security.sandbox import NetworkPolicy, SandboxConfig

    config = SandboxConfig(network=NetworkPolicy(allow=(f"{ALLOWED}:8080/tcp",)))

    async def go() -> list[list[object]]:
        async with api_helpers.manager("zygote") as m:
            calls = m.with_options(sandbox_config=config)
            return [list(await asyncio.gather(*(calls.execute_sandboxed("net", own_address, ALLOWED)
                                                 for _ in range(10)))) for _ in range(10)]

    batches = api_helpers.run(go())
    for batch in batches:
        assert all(r.ok for r in batch), [api_helpers.describe(r) for r in batch]  # type: ignore[attr-defined]
        addresses = {r.output for r in batch}  # type: ignore[attr-defined]
        assert len(addresses) == 10 and all(a.startswith("10.213.") for a in addresses)
    assert not _leftovers()
    import ipaddress

    ours = {str(r.output) for batch in batches for r in batch}  # type: ignore[attr-defined]
    base = int(ipaddress.ip_address("10.213.0.0"))
    assert not _held({(int(ipaddress.ip_address(a)) - base) // 4 for a in ours})
    addresses_left = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    gateways = {str(ipaddress.ip_address(a) - 1) for a in ours}
    assert not [line for line in addresses_left.splitlines() if any(f" {g}/" in line for g in gateways)]


def test_the_next_start_removes_a_dead_holders_leftovers_and_slots_are_not_shared(tmp_path: Path) -> None:
    """A range of one slot: what a dead holder of it left (its link and host table) is
    removed by the next sandbox that takes it; while a sandbox holds it, another
    launch is refused naming the range."""
    profile = tmp_path / "one.toml"
    profile.write_text(f'[network]\nallow = ["{ALLOWED}:8080/tcp"]\nipv4_range = "10.215.0.0/30"\n'
                       'ipv6_range = "fd8d:f1c3:a1e3::/126"\n')
    subprocess.run(["nft", "add", "table", "inet", "ndf_1_0"], check=True)
    subprocess.run(["ip", "link", "add", "ndf1-0", "type", "veth", "peer", "name", "ndt1-0p"], check=True)
    try:
        done = ROOT_CALLER.run(["--profile", str(profile)], ["true"])
        assert done.returncode == 0, done.stderr.decode()
        assert not _leftovers()
        marker = unique_marker()
        holder = ROOT_CALLER.popen(["--profile", str(profile)], ["sleep", marker])
        try:
            assert wait_until(lambda: processes_with_argument(marker), timeout=30)
            assert (holder.pid, f"ndf_{holder.pid}_0") in _host_entries()
            second = ROOT_CALLER.run(["--profile", str(profile)], ["true"])
            assert second.returncode == 126 and b"network.ipv4_range" in second.stderr, second.stderr
        finally:
            holder.kill()
            holder.wait()
            assert wait_until(lambda: not processes_with_argument(marker), timeout=30)
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "ndf_1_0"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", "ndf1-0"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", "ndt1-0p"], capture_output=True, check=False)
        subprocess.run([ROOT_CALLER.program[0], "cleanup"], capture_output=True, check=False)
    assert not _leftovers()


def test_host_and_metadata_only_when_named(hosts: dict[str, NetHost],
                                           host_listener: tuple[socket.socket, socket.socket]) -> None:
    """"host:PORT" opens the host's own addresses on that port (nothing else of the
    host); an allow entry naming 169.254.169.254 opens it, while 0.0.0.0/0 does not."""
    port = host_listener[0].getsockname()[1]
    address = next(a for a in _host_addresses() if ":" not in a and not a.startswith("127."))
    before = len(hosts["m"].connections())
    found, _ = _run(["--net-allow", f"host:{port}/tcp", "--net-allow", f"{METADATA}:80/tcp"],
                    [f"tcp:{address}:{port}", f"tcp:{address}:{port + 1 if port < 65535 else port - 1}",
                     f"tcp:{METADATA}:80"])
    assert found[f"tcp:{address}:{port}"] == "ok:", found  # our listener sends nothing
    assert not list(found.values())[1].startswith("ok")
    assert found[f"tcp:{METADATA}:80"] == "ok:hello"
    assert accepted(*host_listener) == 1
    assert hosts["m"].connections()[before:] == [f"tcp {METADATA} 80"]
    found, _ = _run(["--net-allow", "0.0.0.0/0:80/tcp"], [f"tcp:{METADATA}:80", f"tcp:{address}:{port}"])
    assert all(not v.startswith("ok") for v in found.values()), found
    assert hosts["m"].connections()[before:] == [f"tcp {METADATA} 80"]
    assert accepted(*host_listener) == 0


def test_a_kernel_without_ipv6_force_forwarding_is_stated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before Linux 6.17 no per-interface IPv6 forwarding exists: the lease says so
    (the result's isolation.not_enforced carries it), and still cleans up."""
    from neural_doc_flow_security.sandbox import NetworkPolicy
    from neural_doc_flow_security.sandbox.linux import netpolicy

    real_exists = os.path.exists
    monkeypatch.setattr(netpolicy.os.path, "exists",
                        lambda path: False if str(path).endswith("force_forwarding") else real_exists(path))
    lease = netpolicy.setup(NetworkPolicy(allow=(f"{ALLOWED}:8080/tcp",)))
    try:
        assert any("IPv6 is not forwarded" in note for note in lease.notes)
        assert [pid for pid, _ in _host_entries()].count(os.getpid()) == 2  # its link and table
    finally:
        lease.release()
    assert os.getpid() not in [pid for pid, _ in _host_entries()]


def test_the_resolver_imports_nothing_from_the_callers_directory(hosts: dict[str, NetHost]) -> None:
    """`python -m` puts the working directory first on sys.path: a json.py in the
    caller's directory (anyone who can write there could leave one) must not run in
    the sandbox's resolver (root, on the host); the resolver answers regardless."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        marker = Path(directory) / "ran"
        (Path(directory) / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('planted')\n")
        manager = ROOT_CALLER.popen(["--net-allow", "svc.ndftest.internal:8080/tcp", "--net-dns", "--net-host",
                                     f"svc.ndftest.internal={ALLOWED}", "--python"],
                                    ["python3", "-c", PROBE, "dns:svc.ndftest.internal"], cwd=directory,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = manager.communicate(timeout=300)
        assert not marker.exists()
        assert manager.returncode == 0, err.decode()
        assert json.loads(out) == {"dns:svc.ndftest.internal": f"ok:{ALLOWED}"}
