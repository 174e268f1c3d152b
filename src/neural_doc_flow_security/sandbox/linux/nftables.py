"""The nftables rulesets of a network policy, applied and read with Debian's `nft`
tool (nftables package): one table inside the sandbox's network namespace, one on
the host for the sandbox's end of its link.

Both implement the same policy, default drop: explicit denies first, then what
only an allow entry that names it opens (the host, link-local/metadata
addresses), then the other allows; replies of allowed connections come back
(ct established,related). Inside the sandbox a denied attempt is rejected (the
program sees ECONNREFUSED at once) and counted in a dynamic set keyed by
address . protocol . port (bounded: DENIED_SET_SIZE targets); the host drops
whatever gets past it (it cannot, without CAP_NET_ADMIN in that namespace),
refuses source addresses that are not the sandbox's, and masquerades what it
forwards.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SetupError
from ..netdest import LINK_LOCAL, Destination
from ..result import SecurityEvent

SANDBOX_TABLE = "ndf"
DENIED_SET_SIZE = 256
_DENIED_TIMEOUT = 7 * 24 * 3600  # elements expire long after any sandbox: `expires` dates the first attempt
_ND = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Link:
    """The sandbox's link to the host: interface names and both ends' addresses."""

    host_if: str
    host4: ipaddress.IPv4Address
    sandbox4: ipaddress.IPv4Address
    host6: ipaddress.IPv6Address
    sandbox6: ipaddress.IPv6Address
    sandbox_if: str = "eth0"


@dataclass(frozen=True)
class Resolved:
    """A policy with its names resolved (at launch) and the host's addresses."""

    deny: tuple[Destination, ...]
    allow: tuple[Destination, ...]
    names: dict[str, tuple[Address, ...]]
    host_addresses: tuple[Network, ...]
    dns: bool


def _transport(dest: Destination) -> str:
    protocol = dest.protocol or "{ tcp, udp }"
    text = f"meta l4proto {protocol}"
    if dest.ports is not None:
        first, last = dest.ports
        text += f" th dport {first}" if first == last else f" th dport {first}-{last}"
    return text


def _networks(dest: Destination, resolved: Resolved) -> list[Network]:
    if dest.network is not None:
        return [dest.network]
    if dest.is_host:
        return list(resolved.host_addresses)
    return [ipaddress.ip_network(a) for a in resolved.names.get(dest.name or "", ())]


def _matches(dest: Destination, resolved: Resolved) -> list[str]:
    """One nft match per address family of the destination's addresses."""
    out = []
    for version in (4, 6):
        nets = _set_of(_networks(dest, resolved), version)
        if nets:
            out.append(f"{'ip' if version == 4 else 'ip6'} daddr {nets} {_transport(dest)}")
    return out


def _collapsed(nets: Iterable[Network], version: int) -> list[str]:
    """The networks of one version without overlaps (an nft set refuses them)."""
    return [str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == version)]  # type: ignore[type-var]


def _set_of(nets: Iterable[Network], version: int) -> str:
    chosen = _collapsed(nets, version)
    return f"{{ {', '.join(chosen)} }}" if chosen else ""


Rule = tuple[tuple[Network, ...], Destination | None, bool]


def ordered_rules(resolved: Resolved) -> list[Rule]:
    """The policy in the order it is evaluated, by nftables (policy_rules) and by the
    connect proxy (permits) alike: (addresses, the entry whose ports and protocol
    must match too (None: any), allowed); the first rule that matches decides, and
    what none matches is denied. Explicit denies first, then what only an allow
    entry that names it opens (the host, link-local/metadata addresses), then the
    other allows."""
    rules: list[Rule] = [(tuple(_networks(dest, resolved)), dest, False) for dest in resolved.deny]
    named = [d for d in resolved.allow if d.is_host or d.names_link_local]
    rules += [(tuple(_networks(dest, resolved)), dest, True) for dest in named]
    rules.append(((*resolved.host_addresses, *LINK_LOCAL), None, False))
    rules += [(tuple(_networks(dest, resolved)), dest, True) for dest in resolved.allow if dest not in named]
    return rules


def permits(resolved: Resolved, address: Address, port: int, protocol: str) -> bool:
    """Whether the policy lets a connection to address:port/protocol through."""
    for networks, dest, allowed in ordered_rules(resolved):
        if not any(address.version == net.version and address in net for net in networks):
            continue
        if dest is not None and dest.protocol not in (None, protocol):
            continue
        if dest is not None and dest.ports is not None and not dest.ports[0] <= port <= dest.ports[1]:
            continue
        return allowed
    return False


def policy_rules(resolved: Resolved, verdict: str, denied: str) -> list[str]:
    """The policy (ordered_rules) as nft rules ending in `denied` (a goto or a drop)."""
    rules: list[str] = []
    for networks, dest, allowed in ordered_rules(resolved):
        action = verdict if allowed else denied
        for version, family in ((4, "ip"), (6, "ip6")):
            nets = _set_of(networks, version)
            if nets:
                rules.append(f"{family} daddr {nets}{' ' + _transport(dest) if dest is not None else ''} {action}")
    rules.append(denied)
    return rules


def _dns_rules(link: Link) -> list[str]:
    return [f"ip daddr {link.host4} udp dport 53 accept", f"ip6 daddr {link.host6} udp dport 53 accept"]


def sandbox_ruleset(link: Link, resolved: Resolved) -> str:
    """The table inside the sandbox's namespace: what may leave, what comes back."""
    denied_set = f"size {DENIED_SET_SIZE}; flags dynamic,timeout; timeout {_DENIED_TIMEOUT}s; counter;"
    output = ["type filter hook output priority 0; policy drop;", "oif lo accept",
              "ct state established,related accept", f"oif {link.sandbox_if} {_ND} accept"]
    output += _dns_rules(link) if resolved.dns else []
    output += policy_rules(resolved, "accept", "goto denied")
    lines = [
        f"table inet {SANDBOX_TABLE} {{",
        f"  set denied4 {{ type ipv4_addr . inet_proto . inet_service; {denied_set} }}",
        f"  set denied6 {{ type ipv6_addr . inet_proto . inet_service; {denied_set} }}",
        "  chain denied {",
        "    meta nfproto ipv4 tcp flags & (syn | ack) == syn add @denied4 { ip daddr . meta l4proto . th dport }",
        "    meta nfproto ipv4 meta l4proto udp add @denied4 { ip daddr . meta l4proto . th dport }",
        "    meta nfproto ipv6 tcp flags & (syn | ack) == syn add @denied6 { ip6 daddr . meta l4proto . th dport }",
        "    meta nfproto ipv6 meta l4proto udp add @denied6 { ip6 daddr . meta l4proto . th dport }",
        "    meta l4proto tcp reject with tcp reset",
        "    reject",
        "  }",
        "  chain output {", *(f"    {r}" for r in output), "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        "    iif lo accept",
        "    ct state established,related accept",
        f"    iif {link.sandbox_if} {_ND} accept",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def host_input_rules(resolved: Resolved) -> list[str]:
    """What the sandbox may send to the host itself (the input hook: whatever
    arrives there is the host's, so only "host" entries open anything)."""
    rules: list[str] = []
    for dest in resolved.deny:
        if dest.is_host:
            rules.append(f"{_transport(dest)} drop")
        else:
            rules += [f"{m} drop" for m in _matches(dest, resolved)]
    rules += [f"{_transport(dest)} accept" for dest in resolved.allow if dest.is_host]
    rules.append("drop")
    return rules


def host_ruleset(table: str, link: Link, resolved: Resolved) -> str:
    """The host's table for the sandbox's link: the policy again (for what it
    forwards and what reaches the host itself), source checks, masquerading."""
    h = link.host_if
    spoof = [f"meta nfproto ipv4 ip saddr != {link.sandbox4} drop",
             f"meta nfproto ipv6 ip6 saddr != {link.sandbox6} drop",
             "ct state established,related accept"]
    to_host = [f"{_ND} accept", *spoof, *(_dns_rules(link) if resolved.dns else []), *host_input_rules(resolved)]
    forward = spoof + policy_rules(resolved, "accept", "drop")
    lines = [
        f"table inet {table} {{",
        "  chain from_sandbox {", *(f"    {r}" for r in forward), "  }",
        "  chain to_host {", *(f"    {r}" for r in to_host), "  }",
        "  chain input {",
        "    type filter hook input priority -10; policy accept;",
        f"    iifname \"{h}\" jump to_host",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority -10; policy accept;",
        f"    iifname \"{h}\" jump from_sandbox",
        f"    oifname \"{h}\" ct state established,related accept",
        f"    oifname \"{h}\" drop",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    ip saddr {link.sandbox4} oifname != \"{h}\" masquerade",
        f"    ip6 saddr {link.sandbox6} oifname != \"{h}\" masquerade",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nft_path() -> str | None:
    """The nft tool (a zygote's PATH has no sbin directories)."""
    import shutil

    return shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")


def nft(args: list[str], stdin: str | None = None, what: str = "network policy") -> str:
    """Run `nft` (in the calling thread's network namespace); its output."""
    try:
        done = subprocess.run([nft_path() or "nft", *args], input=stdin, capture_output=True, text=True,
                              timeout=30, check=False)
    except FileNotFoundError:
        raise SetupError(what, "the nft tool is missing (Debian package nftables): a network policy needs it"
                         ) from None
    if done.returncode != 0:
        raise SetupError(what, f"nft {' '.join(args)} failed: {done.stderr.strip()[:2000]}")
    return done.stdout


def apply(ruleset: str, what: str) -> None:
    """Load a ruleset (atomically: all or nothing)."""
    nft(["-f", "-"], ruleset, what)


def tables() -> list[str]:
    """The names of this namespace's inet tables."""
    data = json.loads(nft(["-j", "list", "tables", "inet"]) or "{}")
    return [item["table"]["name"] for item in data.get("nftables", ()) if "table" in item]


def delete_table(name: str) -> None:
    """Remove an inet table (if it is there)."""
    try:
        nft(["delete", "table", "inet", name])
    except SetupError as e:
        if "No such file or directory" not in str(e):
            raise


def denied_events(listing: str, now: float | None = None) -> tuple[SecurityEvent, ...]:
    """SecurityEvents from `nft -j list table inet ndf` of a sandbox: one per
    address:port/protocol refused, with its count and first attempt."""
    now = time.time() if now is None else now
    events = []
    for item in json.loads(listing or "{}").get("nftables", ()):
        found = item.get("set")
        if not found or found.get("name") not in ("denied4", "denied6"):
            continue
        timeout = found.get("timeout", _DENIED_TIMEOUT)
        for entry in found.get("elem", ()):
            elem = entry.get("elem", entry) if isinstance(entry, dict) else {}
            value = elem.get("val", {}).get("concat") if isinstance(elem, dict) else None
            if not value or len(value) != 3:
                continue
            address, protocol, port = value
            host = f"[{address}]" if ":" in str(address) else str(address)
            count = int(elem.get("counter", {}).get("packets", 1))
            first = now - (timeout - int(elem.get("expires", timeout)))
            events.append(SecurityEvent("denied_connection", f"{host}:{port}/{protocol}", count, first))
    return tuple(sorted(events, key=lambda e: (e.first_seen, e.target)))
