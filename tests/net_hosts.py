"""Test hosts for the network-policy tests: each a network namespace of the test's
own, linked to the host by a veth pair (addresses of the test's own ranges), with
tests/net_listener.py serving inside it. No traffic leaves this machine."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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
