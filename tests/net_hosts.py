"""Test hosts for the network-policy tests: each a network namespace of the test's
own, linked to the host by a veth pair (addresses of the test's own ranges), with
tests/net_listener.py serving inside it. No traffic leaves this machine."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from neural_doc_flow_security.sandbox.linux.netpolicy import in_netns
from neural_doc_flow_security.sandbox.linux.network import NetworkNamespaceMaker

LISTENER = str(Path(__file__).with_name("net_listener.py"))
_NODAD = 0x02


class NetHost:
    """A namespace with address `address` (IPv4 or IPv6 `prefix` network: the host's
    end takes the first address of it) and listeners `services` ("tcp:PORT",
    "udp:PORT"); `connections()` lists what reached them."""

    def __init__(self, tag: str, network: str, address: str, services: Sequence[str], log_dir: Path,
                 address6: str | None = None, network6: str | None = None) -> None:
        from pyroute2 import IPRoute

        self.address, self.address6 = address, address6
        self.host_if = f"ndt{os.getpid() % 100000}{tag}"[:15]
        self.log = log_dir / f"{self.host_if}.log"
        self.log.write_text("")
        self.netns = NetworkNamespaceMaker().result()
        self.process: subprocess.Popen[str] | None = None
        net = ipaddress.ip_network(network)
        net6 = ipaddress.ip_network(network6) if network6 else None
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.netns})
            index = ipr.link_lookup(ifname=self.host_if)[0]
            ipr.addr("add", index=index, address=str(net.network_address + 1), prefixlen=net.prefixlen)
            if net6 is not None:
                ipr.addr("add", index=index, address=str(net6.network_address + 1), prefixlen=net6.prefixlen,
                         flags=_NODAD)
            ipr.link("set", index=index, state="up")
        # Replies to what the host forwarded come back through this link.
        with open(f"/proc/sys/net/ipv4/conf/{self.host_if}/forwarding", "w") as f:
            f.write("1")
        six = f"/proc/sys/net/ipv6/conf/{self.host_if}/force_forwarding"
        if os.path.exists(six):
            with open(six, "w") as f:
                f.write("1")
        specs = [f"{s.split(':')[0]}:{address}:{s.split(':')[1]}" for s in services]
        specs += [f"{s.split(':')[0]}:[{address6}]:{s.split(':')[1]}" for s in services] if address6 else []

        def inside() -> subprocess.Popen[str]:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=index, address=address, prefixlen=net.prefixlen)
                if address6 and net6 is not None:
                    ipr.addr("add", index=index, address=address6, prefixlen=net6.prefixlen, flags=_NODAD)
                ipr.link("set", index=index, state="up")
            return subprocess.Popen([sys.executable, LISTENER, str(self.log), *specs], stdout=subprocess.PIPE,
                                    text=True)

        self.process = in_netns(self.netns, inside)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def connections(self) -> list[str]:
        """What reached the listeners: lines "PROTO ADDR PORT"."""
        return self.log.read_text().splitlines()

    def close(self) -> None:
        from pyroute2 import IPRoute

        if self.process is not None:
            self.process.kill()
            self.process.wait()
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=self.host_if):
                ipr.link("del", index=index)
        os.close(self.netns)


# Fixtures of the network-policy test modules (test_netpolicy.py, test_netpolicy_proxy.py): import them.
ALLOWED = "10.214.1.2"
ALLOWED6 = "fd8d:f1c3:b1e2:1::2"
OTHER = "10.214.2.2"
METADATA = "169.254.169.254"

LOCK = "/run/lock/ndf-netpolicy-tests.lock"


@pytest.fixture(scope="module", autouse=True)
def one_run_at_a_time() -> Iterator[None]:
    """Other runs of this module on the machine (engineers, CI) would make test hosts
    with the same addresses (169.254.169.254 can only be one's): one at a time."""
    import fcntl

    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module", name="hosts")
def hosts_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NetHost]]:
    """Test host A (IPv4 and IPv6: TCP 8080 and 8081, UDP 5353 and 5354), test host B
    (another private range), and one that owns the metadata address."""
    logs = tmp_path_factory.mktemp("nethosts")
    made: dict[str, NetHost] = {}
    try:
        made["a"] = NetHost("a", "10.214.1.0/24", ALLOWED, ["tcp:8080", "tcp:8081", "udp:5353", "udp:5354"],
                             logs, address6=ALLOWED6, network6="fd8d:f1c3:b1e2:1::/64")
        made["b"] = NetHost("b", "10.214.2.0/24", OTHER, ["tcp:8080", "udp:5353"], logs)
        made["m"] = NetHost("m", "169.254.169.0/24", METADATA, ["tcp:80"], logs)
        yield made
    finally:
        for host in made.values():
            host.close()


@pytest.fixture(name="host_listener")
def host_listener_fixture() -> Iterator[tuple[socket.socket, socket.socket]]:
    """TCP listeners of the host itself on every IPv4 and IPv6 address, one port."""
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v4.bind(("0.0.0.0", 0))
    port = v4.getsockname()[1]
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.bind(("::", port))
    for sock in (v4, v6):
        sock.listen(16)
        sock.setblocking(False)
    yield v4, v6
    v4.close()
    v6.close()


def accepted(*listeners: socket.socket) -> int:
    """How many connections reached these (non-blocking) listeners: each is accepted and closed."""
    count = 0
    for sock in listeners:
        while True:
            try:
                sock.accept()[0].close()
                count += 1
            except BlockingIOError:
                break
    return count


