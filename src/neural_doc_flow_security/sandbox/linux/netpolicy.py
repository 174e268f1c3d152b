"""A network policy in force, as root: the sandbox's network namespace gets a veth
pair to the host, addresses of its own, a default route through the host, and
the nftables tables of linux/nftables.py on both ends.

Each live sandbox with a policy holds a slot: a /30 of `NetworkPolicy.ipv4_range`
and a /126 of `ipv6_range`, taken by locking /run/ndf-sandbox/net/<slot> with
flock for as long as the sandbox lives (like linux/ids.py: every process on the
host takes slots the same way, and the kernel releases the lock of a holder that
dies). What the host side is made of is named after the holder's pid and the
slot: the link `ndf<pid hex>-<slot hex>` and the table `inet ndf_<pid>_<slot>`.
The namespace goes with the sandbox's last process, and with it the veth pair;
the host's table would stay after a killed manager: the next process to start a
sandbox with a policy (once, at its first), whoever takes the slot next, and
`ndf-sandbox cleanup` remove what dead holders left.

Forwarding: the host forwards what comes from the sandbox's link (that link's
own `forwarding`, IPv6 `force_forwarding`); replies from elsewhere come back
only through interfaces that forward (the host's uplink must, as for any
router). The host's global forwarding switch is never changed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..config import NetworkPolicy
from ..errors import SandboxError, SetupError
from ..netdest import parse_destination
from ..result import SecurityEvent
from . import dns_responder, flock, nftables
from . import syscalls as sc
from .network import NetworkNamespaceMaker

NET_DIRECTORY = "/run/ndf-sandbox/net"
MAX_SLOTS = 65536
_LINK = re.compile(r"^ndf[0-9a-f]+-([0-9a-f]+)$")
_TABLE = re.compile(r"^ndf_[0-9]+_([0-9]+)$")
_IFA_F_NODAD = 0x02
T = TypeVar("T")


ROOTLESS_REASON = "without root no veth pair and no nftables rules can be made for the sandbox"
PROXY_METHOD = ("connect proxy on the host (HTTP CONNECT, SOCKS5; TCP only, for proxy-aware clients; "
                "no UDP, no dns)")


def rootless_evaluation() -> str:
    """Why pasta (Debian's passt) and slirp4netns are not used: both give a user
    namespace's network namespace a tap device, which needs /dev/net/tun openable by
    the user."""
    import shutil

    tools = [name for name in ("pasta", "slirp4netns") if shutil.which(name, path="/usr/bin:/bin:/usr/sbin")]
    tun = os.access("/dev/net/tun", os.R_OK | os.W_OK)
    found = f"{' and '.join(tools)} installed" if tools else "neither pasta (passt) nor slirp4netns installed"
    return f"evaluated: {found}, /dev/net/tun {'usable' if tun else 'not openable by this user'}"


def available_method(euid: int) -> tuple[str, str]:
    """How a network policy with method "auto" is enforced by a process of `euid`
    here: (method, "") or ("", why it cannot be)."""
    if euid != 0:
        return (f"{PROXY_METHOD}: {ROOTLESS_REASON}; pasta/slirp4netns not used ({rootless_evaluation()})", "")
    if nftables.nft_path() is None:
        return "", "the nft tool is missing (Debian package nftables); network.method 'proxy' works without it"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "", "the pyroute2 module is missing (pip install pyroute2); network.method 'proxy' works without it"
    return f"veth pair + nftables (as root; network.method 'proxy': the {PROXY_METHOD})", ""


def slot_count(policy: NetworkPolicy) -> int:
    """How many sandboxes of this policy's ranges may live at once."""
    v4 = ipaddress.ip_network(policy.ipv4_range).num_addresses // 4
    v6 = ipaddress.ip_network(policy.ipv6_range).num_addresses // 4
    return min(v4, v6, MAX_SLOTS)


def in_thread(work: Callable[[], T], netns_fd: int | None = None) -> T:
    """Run `work` in a thread of its own, in the network namespace `netns_fd` if
    given (a subprocess it starts runs there too); its result or its exception.
    pyroute2's synchronous API runs an event loop of its own: never in a thread
    whose loop runs already (the `fork` start method's manager)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            if netns_fd is not None:
                sc.setns(netns_fd, sc.CLONE_NEWNET)
            box["value"] = work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="ndf-netpolicy", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def in_netns(netns_fd: int, work: Callable[[], T]) -> T:
    """Run `work` in a thread that has joined the network namespace `netns_fd`."""
    return in_thread(work, netns_fd)


def _sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _host_addresses(ipr: Any) -> tuple[nftables.Network, ...]:
    found: list[nftables.Network] = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    for msg in ipr.get_addr():
        address = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
        if address:
            found.append(ipaddress.ip_network(address.split("%")[0]))
    return tuple(found)


def resolve_names(policy: NetworkPolicy) -> dict[str, tuple[nftables.Address, ...]]:
    """Every name of the policy (allow and deny) with its addresses: from
    `policy.hosts`, else the host's resolver now. A name that does not resolve
    has none (nothing is allowed for it; the resolver answers NXDOMAIN)."""
    fixed = dict(policy.hosts)
    names = [d.name for d in map(parse_destination, policy.allow + policy.deny)
             if d.name is not None and not d.is_host]
    out: dict[str, tuple[nftables.Address, ...]] = {}
    for name in dict.fromkeys(names):
        if name in fixed:
            out[name] = tuple(ipaddress.ip_address(a) for a in fixed[name])
            continue
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            infos = []
        out[name] = tuple(dict.fromkeys(ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos))
    return out


@dataclass
class NetworkLease:
    """The link, tables and slot of one sandbox's network policy, until `release`."""

    slot: int
    lock_fd: int
    link: nftables.Link
    table: str
    resolved: nftables.Resolved
    netns_fd: int = -1  # our own reference to the sandbox's namespace
    events: tuple[SecurityEvent, ...] | None = None
    notes: tuple[str, ...] = field(default=())
    resolver: subprocess.Popen[bytes] | None = None  # linux/dns_responder.py, with dns = true

    @property
    def resolv_conf(self) -> bytes:
        """The sandbox's /etc/resolv.conf (its resolver: the host's end of the link)."""
        return f"nameserver {self.link.host4}\nnameserver {self.link.host6}\noptions attempts:1\n".encode()

    def denied(self) -> tuple[SecurityEvent, ...]:
        """The denied connection attempts counted so far in the sandbox's namespace
        (read once its payload has ended: kept for later calls)."""
        if self.events is None:
            if self.netns_fd < 0:
                return ()
            listing = in_netns(self.netns_fd, lambda: nftables.nft(["-j", "list", "table", "inet",
                                                                    nftables.SANDBOX_TABLE]))
            self.events = nftables.denied_events(listing)
        return self.events

    def release(self) -> None:
        """Remove the host's link and table, close the namespace, free the slot
        (idempotent; errors are logged, the slot is freed regardless)."""
        if self.lock_fd < 0:
            return
        try:
            if self.resolver is not None:
                dns_responder.stop(self.resolver)
                self.resolver = None
            in_thread(lambda: _remove_slot(self.slot))
        except (SandboxError, OSError) as e:
            import logging

            logging.getLogger(__name__).error("network policy: cannot remove slot %s: %s", self.slot, e)
        finally:
            if self.netns_fd >= 0:
                os.close(self.netns_fd)
                self.netns_fd = -1
            os.close(self.lock_fd)
            self.lock_fd = -1


def _remove_slot(slot: int, *, links: bool = True) -> None:
    """Remove the host's links and tables of `slot` (any holder's: the caller holds
    its lock, so whoever made them is gone or is the caller)."""
    for table in nftables.tables():
        match = _TABLE.match(table)
        if match and int(match.group(1)) == slot:
            nftables.delete_table(table)
    if not links:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME") or ""
            match = _LINK.match(name)
            if match and int(match.group(1), 16) == slot:
                with contextlib.suppress(Exception):  # gone with its namespace meanwhile
                    ipr.link("del", index=msg["index"])


def _acquire_slot(policy: NetworkPolicy) -> tuple[int, int]:
    import random

    count = slot_count(policy)
    start = random.randrange(count)
    for i in range(count):
        slot = (start + i) % count
        fd = flock.try_lock(NET_DIRECTORY, slot, "network")
        if fd is not None:
            return slot, fd
    raise SandboxError(f"network.ipv4_range: all {count} link addresses of {policy.ipv4_range} are in use by "
                       "live sandboxes (make the range larger, or wait for some to end)")


def _link_for(policy: NetworkPolicy, slot: int) -> nftables.Link:
    net4 = ipaddress.ip_network(policy.ipv4_range)
    net6 = ipaddress.ip_network(policy.ipv6_range)
    base4 = net4.network_address + 4 * slot
    base6 = net6.network_address + 4 * slot
    return nftables.Link(host_if=f"ndf{os.getpid():x}-{slot:x}", host4=base4 + 1, sandbox4=base4 + 2,  # type: ignore[arg-type]
                         host6=base6 + 1, sandbox6=base6 + 2)  # type: ignore[arg-type]


def _configure_sandbox_side(link: nftables.Link, ruleset: str) -> None:
    """In the sandbox's namespace (a thread that joined it): address, route, table."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=link.sandbox_if)[0]
        ipr.addr("add", index=index, address=str(link.sandbox4), prefixlen=30)
        ipr.addr("add", index=index, address=str(link.sandbox6), prefixlen=126, flags=_IFA_F_NODAD)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(link.host4))
        ipr.route("add", dst="::/0", gateway=str(link.host6), family=socket.AF_INET6)
    nftables.apply(ruleset, "network policy (the sandbox's table)")


def setup(policy: NetworkPolicy) -> NetworkLease:
    """Make a network namespace with the policy in force (as root, in the host's
    network namespace). The lease's `netns_fd` is the namespace for the clone."""
    return in_thread(lambda: _setup(policy))


_swept = False  # this process has removed what dead holders left (once, at its first policy)


def _setup(policy: NetworkPolicy) -> NetworkLease:
    from pyroute2 import IPRoute

    global _swept
    if not _swept:
        _swept = True
        try:
            _cleanup()
        except (SandboxError, OSError) as e:
            import logging

            logging.getLogger(__name__).warning("network policy: cannot remove leftovers of dead holders: %s", e)
    slot, lock_fd = _acquire_slot(policy)
    lease: NetworkLease | None = None
    try:
        _remove_slot(slot)  # what a dead holder of the slot left
        link = _link_for(policy, slot)
        netns_fd = NetworkNamespaceMaker().result()
        with IPRoute() as ipr:
            resolved = nftables.Resolved(
                deny=tuple(map(parse_destination, policy.deny)),
                allow=tuple(map(parse_destination, policy.allow)),
                names=resolve_names(policy), dns=policy.dns,
                # the sandboxes' ranges too: other sandboxes' ends of their links are the host's
                host_addresses=_host_addresses(ipr) + (ipaddress.ip_network(policy.ipv4_range),
                                                       ipaddress.ip_network(policy.ipv6_range)))
            lease = NetworkLease(slot, lock_fd, link, f"ndf_{os.getpid()}_{slot}", resolved, netns_fd)
            ipr.link("add", ifname=link.host_if, kind="veth",
                     peer={"ifname": link.sandbox_if, "net_ns_fd": netns_fd})
            index = ipr.link_lookup(ifname=link.host_if)[0]
            ipr.addr("add", index=index, address=str(link.host4), prefixlen=30)
            ipr.addr("add", index=index, address=str(link.host6), prefixlen=126, flags=_IFA_F_NODAD)
        conf = f"/proc/sys/net/ipv4/conf/{link.host_if}"
        _sysctl(f"{conf}/forwarding", "1")
        _sysctl(f"{conf}/rp_filter", "1")
        six = f"/proc/sys/net/ipv6/conf/{link.host_if}/force_forwarding"
        if os.path.exists(six):
            _sysctl(six, "1")
        else:
            lease.notes += ("network: IPv6 is not forwarded (this kernel has no per-interface "
                            "force_forwarding, before Linux 6.17)",)
        nftables.apply(nftables.host_ruleset(lease.table, link, resolved), "network policy (the host's table)")
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=link.host_if)[0], state="up")
        in_netns(netns_fd, lambda: _configure_sandbox_side(link, nftables.sandbox_ruleset(link, resolved)))
        if policy.dns:
            answers = {name: [str(a) for a in resolved.names.get(name, ())] for name in policy.names}
            lease.resolver = dns_responder.start([str(link.host4), str(link.host6)], answers)
    except BaseException as e:
        if lease is not None:
            lease.release()
        else:
            os.close(lock_fd)
        if isinstance(e, (SandboxError, KeyboardInterrupt, SystemExit)):
            raise
        raise SetupError("network policy", f"cannot set up the sandbox's link: {e}",
                         getattr(e, "errno", 0) or 0) from e
    return lease


def cleanup() -> list[str]:
    """Remove what dead holders left on the host (links, tables of slots nobody
    holds); what was removed."""
    return in_thread(_cleanup)


def _cleanup() -> list[str]:
    removed: list[str] = []
    slots: set[int] = set()
    for table in nftables.tables():
        match = _TABLE.match(table)
        if match:
            slots.add(int(match.group(1)))
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.get_links():
            match = _LINK.match(msg.get_attr("IFLA_IFNAME") or "")
            if match:
                slots.add(int(match.group(1), 16))
    for slot in sorted(slots):
        fd = flock.try_lock(NET_DIRECTORY, slot, "network")
        if fd is None:
            continue  # a live sandbox's
        try:
            _remove_slot(slot)
            removed.append(f"network slot {slot}")
        finally:
            os.close(fd)
    return removed
