"""Network policy destinations: the text a user writes (`10.0.3.2:8080`,
`[fd00::2]:443/tcp`, `192.0.2.0/24:1000-2000/udp`, `model-server.internal:443`,
`host`) parsed into a Destination, or a ValueError saying what is wrong.

    DEST   := TARGET [":" PORTS] ["/" ("tcp" | "udp")]
    TARGET := IPv4 address or CIDR | "[" IPv6 address or CIDR "]" | "host" | a DNS name
    PORTS  := N | N "-" M            (1..65535; none: every port)

A bare IPv6 address or CIDR (no brackets) is taken without a port. No protocol:
TCP and UDP.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HOST = "host"
PROTOCOLS = ("tcp", "udp")
# Denied unless an allow entry names an address inside them (cloud metadata, link-local).
LINK_LOCAL: tuple[Network, ...] = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


@dataclass(frozen=True)
class Destination:
    """One parsed destination: an address range (`network`) or a name (`name`: a DNS
    name resolved by the host at launch, or "host"), ports (first, last; None: all)
    and the protocol (None: TCP and UDP)."""

    network: Network | None = None
    name: str | None = None
    ports: tuple[int, int] | None = None
    protocol: str | None = None

    def __str__(self) -> str:
        if self.network is not None:
            net = self.network
            text = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
            target = f"[{text}]" if net.version == 6 else text
        else:
            target = self.name or ""
        if self.ports is not None:
            first, last = self.ports
            target += f":{first}" if first == last else f":{first}-{last}"
        return target + (f"/{self.protocol}" if self.protocol else "")

    @property
    def is_host(self) -> bool:
        """Whether this names the host itself."""
        return self.name == HOST

    @property
    def names_link_local(self) -> bool:
        """Whether this names an address inside the link-local/metadata ranges (which
        only such an entry opens)."""
        net = self.network
        return net is not None and any(net.version == ll.version and net.subnet_of(ll)  # type: ignore[arg-type]
                                       for ll in LINK_LOCAL)


def _ports(text: str) -> tuple[int, int]:
    first, dash, last = text.partition("-")
    try:
        low, high = int(first), int(last if dash else first)
    except ValueError:
        raise ValueError(f"port must be N or N-M, got {text!r}") from None
    if not (1 <= low <= 65535 and 1 <= high <= 65535) or low > high:
        raise ValueError(f"ports must be 1-65535, the first not above the last, got {text!r}")
    return low, high


def _network(text: str, version: int) -> Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            raise ValueError(f"{text!r} has host bits set (write the network address)") from None
        raise ValueError(f"{text!r} is not an IPv{version} address or CIDR") from None
    if net.version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address or CIDR")
    return net


def parse_destination(text: str) -> Destination:
    """Parse one DEST (see the module docstring); ValueError says what is wrong."""
    if not isinstance(text, str) or not text or text != text.strip() or "\0" in text:
        raise ValueError(f"must be a destination like 10.0.3.2:8080, [fd00::2]:443/tcp or name.internal:443, "
                         f"got {text!r}")
    rest, protocol = text, None
    head, slash, tail = text.rpartition("/")
    if slash and tail.lower() in PROTOCOLS:
        rest, protocol = head, tail.lower()
    elif slash and tail.isalpha():
        raise ValueError(f"the protocol must be tcp or udp, got {tail!r}")
    ports_text = ""
    if rest.startswith("["):
        inner, bracket, after = rest[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(f"an IPv6 target is written [ADDR] or [ADDR]:PORT, got {text!r}")
        network: Network | None = _network(inner, 6)
        ports_text = after[1:] if after else ""
        if after and not ports_text:
            raise ValueError(f"missing port after ':' in {text!r}")
        name = None
    elif rest.count(":") >= 2:
        network, name = _network(rest, 6), None
    else:
        target, colon, ports_text = rest.partition(":")
        if colon and not ports_text:
            raise ValueError(f"missing port after ':' in {text!r}")
        if re.fullmatch(r"[0-9./]+", target):
            network, name = _network(target, 4), None
        else:
            network, name = None, target.lower()
            if not _NAME.match(name):
                raise ValueError(f"{target!r} is not an address, CIDR, 'host' or a DNS name")
    return Destination(network=network, name=name, ports=_ports(ports_text) if ports_text else None,
                       protocol=protocol)
