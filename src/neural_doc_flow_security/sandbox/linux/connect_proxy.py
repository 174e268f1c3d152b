"""A network policy without root (NetworkPolicy.method "proxy"): a connect proxy.

The sandbox keeps its own network namespace with loopback only. While it sets up,
the child listens on 127.0.0.1:PROXY_PORT there (launch/bootstrap.py, _child.c
STEP_PROXY_LISTENER) and hands that socket to its parent, the launcher, which
gives it to this proxy: a process of its own per sandbox, on the host's network,
as the caller's user (as root it drops to uid/gid 65534 first). The proxy accepts
the sandbox's connections on that socket; each speaks HTTP CONNECT, plain HTTP
with an absolute URI, or SOCKS5 (its first byte is 5). The destination is checked
with nftables.permits, the evaluation the veth method's rules implement (deny
wins; the host and the link-local/metadata ranges are closed unless named). A
name is resolved only if the policy allows it, to the addresses resolved when
the proxy started (`hosts` first), so the sandbox learns no other name's
address. An allowed destination is connected from the host and the bytes are
relayed both ways; every refused one is counted.

Only proxy-aware clients reach the network (the sandbox's environment names the
proxy: http_proxy, https_proxy, ALL_PROXY...); a direct connect() reaches nothing
but the sandbox's own loopback. TCP only: no UDP, no resolver inside.

The launcher and the proxy talk over a unix SOCK_SEQPACKET socket, the proxy's
stdin: the launcher sends the policy (JSON), then the listening socket
(SCM_RIGHTS); when it shuts its side down (the sandbox has ended) or dies, the
proxy closes the listening socket and every connection, answers the denied
attempts (one JSON message) and exits.

    python3 -m neural_doc_flow_security.sandbox.linux.connect_proxy   (stdin: that socket)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..result import SecurityEvent

PROXY_PORT = 3128
PROXY_ADDRESS = f"127.0.0.1:{PROXY_PORT}"
MAX_CONNECTIONS = 128  # at once; more are closed at once (the proxy runs outside the sandbox's cgroup)
MAX_TARGETS = 256  # denied targets counted (as the veth method's DENIED_SET_SIZE)
HEADER_LIMIT = 16384  # an HTTP request head, at most
HANDSHAKE_SECONDS = 30.0
CONNECT_SECONDS = 10.0
_STOP_SECONDS = 10.0
_MESSAGE = 262144  # the proxy's report: MAX_TARGETS targets of at most ~280 bytes
ENDED_EARLY = ("the connect proxy ended before its sandbox (killed, or it failed): the sandbox reached "
               "nothing through it after that, and its denied connections are not known")
# Besides the host's own addresses: what a connect() from the host reaches the host through.
_ALSO_HOST = ("0.0.0.0/8", "::/128", "127.0.0.0/8", "::1/128")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def environment() -> tuple[tuple[str, str], ...]:
    """The sandbox's environment entries that point ordinary clients (curl, urllib,
    requests, pip) at the proxy; its own loopback stays direct."""
    http = f"http://{PROXY_ADDRESS}"
    socks = f"socks5h://{PROXY_ADDRESS}"
    pairs = [("http_proxy", http), ("https_proxy", http), ("HTTP_PROXY", http), ("HTTPS_PROXY", http),
             ("all_proxy", socks), ("ALL_PROXY", socks), ("no_proxy", "localhost,127.0.0.1,::1"),
             ("NO_PROXY", "localhost,127.0.0.1,::1")]
    return tuple(pairs)


# ------------------------------------------------------------------ the launcher's side


def _module_path() -> str:
    """PYTHONPATH for a fresh interpreter that imports this package and psutil (a
    zygote's sys.path may differ from a fresh one's)."""
    import psutil

    here = os.path.abspath(__file__)
    for _ in range(4):
        here = os.path.dirname(here)
    return os.pathsep.join(dict.fromkeys([here, os.path.dirname(os.path.dirname(os.path.abspath(psutil.__file__)))]))


@dataclass
class ConnectProxy:
    """One sandbox's proxy process, from `start` until `release`."""

    process: subprocess.Popen[bytes]
    control: socket.socket
    events: tuple[SecurityEvent, ...] | None = None
    notes: tuple[str, ...] = field(default=())

    def hand_over(self, from_child: int, timeout: float = 30.0) -> bool:
        """Pass the listening socket the child sends on `from_child` to the proxy;
        False if the child sent none (it failed a stage before: its result says so)."""
        poller = select.poll()
        poller.register(from_child, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            return False
        sock = socket.socket(fileno=os.dup(from_child))
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        except OSError:
            return False
        finally:
            sock.close()
        if not fds:
            return False
        try:
            socket.send_fds(self.control, [b"p"], fds)
        except OSError:
            return False  # the proxy is gone: the sandbox reaches nothing
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def denied(self) -> tuple[SecurityEvent, ...]:
        """Stop the proxy (the sandbox has ended: its listening socket and every
        connection close) and return the denied attempts it counted (kept). A proxy
        that has not begun to serve yet has judged no connection: it is ended at
        once (a short sandbox does not wait for its start-up)."""
        if self.events is not None:
            return self.events
        self.events = ()
        try:
            self.control.shutdown(socket.SHUT_WR)
            if self.control.recv(_MESSAGE, socket.MSG_DONTWAIT) != b"ready":
                raise OSError(ENDED_EARLY)
        except BlockingIOError:
            self.process.kill()  # not serving yet: nothing to report
            return self.events
        except OSError as e:
            raise OSError(f"the connect proxy did not report its denied connections: {e}") from None
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        if not poller.poll(int(_STOP_SECONDS * 1000)):
            raise OSError(f"the connect proxy did not report its denied connections within {_STOP_SECONDS:.0f} s")
        reply = self.control.recv(_MESSAGE)
        if not reply:  # it ended without its report
            raise OSError(ENDED_EARLY)
        try:
            self.events = tuple(SecurityEvent("denied_connection", str(target), int(count), float(first))
                                for target, count, first in json.loads(reply))
        except (ValueError, TypeError) as e:
            raise OSError(f"the connect proxy did not report its denied connections: {e}") from None
        return self.events

    def release(self) -> None:
        """End the proxy process (idempotent)."""
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_WR)
        try:
            self.process.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.control.close()


def start(policy: Any) -> ConnectProxy:
    """Start the proxy process for `policy` (a NetworkPolicy); it resolves the
    policy's names meanwhile and waits for the sandbox's listening socket
    (ConnectProxy.hand_over)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # -P and cwd "/": `-m` would put the caller's working directory first on sys.path,
        # and run a json.py planted there (by anyone who can write there) as us.
        process = subprocess.Popen([sys.executable, "-P", "-m", __name__], stdin=theirs.fileno(), cwd="/",
                                   stdout=subprocess.DEVNULL, start_new_session=True,
                                   env={"PATH": "/usr/bin:/bin", "PYTHONPATH": _module_path()})
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    proxy = ConnectProxy(process, ours)
    try:
        ours.sendall(json.dumps({"allow": policy.allow, "deny": policy.deny, "hosts": policy.hosts,
                                 "ranges": [policy.ipv4_range, policy.ipv6_range]}).encode())
    except OSError:
        proxy.release()
        raise
    return proxy


# ------------------------------------------------------------------ the proxy process


class Refused(Exception):
    """A destination the policy does not allow (or cannot be reached)."""


@dataclass
class Policy:
    """The policy as the proxy applies it."""

    resolved: Any  # nftables.Resolved
    allowed_names: frozenset[str]
    denied: dict[str, list[float]] = field(default_factory=dict)  # target -> [count, first seen]

    def addresses(self, host: str, port: int) -> list[Address]:
        """Where host:port may be reached (the policy's order); Refused (counted) if nowhere."""
        from .nftables import permits

        try:
            address: Address | None = ipaddress.ip_address(host.strip("[]").split("%")[0])
        except ValueError:
            address = None
        if address is not None:
            address = _reached(address)
            target = f"[{address}]:{port}/tcp" if address.version == 6 else f"{address}:{port}/tcp"
            candidates = [address]
        else:
            name = host.rstrip(".").lower()
            if not _is_name(name):
                name = "(not a name)"  # the sandbox's text goes into the result only as a valid name
            target = f"{name}:{port}/tcp"
            # A name's addresses too (`hosts`, or DNS): ::ffff:169.254.169.254 is the metadata address.
            candidates = [_reached(a) for a in self.resolved.names.get(name, ())] if name in self.allowed_names else []
        allowed = [a for a in candidates if 1 <= port <= 65535 and permits(self.resolved, a, port, "tcp")]
        if not allowed:
            self.count(target)
            raise Refused(target)
        return allowed

    def count(self, target: str) -> None:
        entry = self.denied.get(target)
        if entry is not None:
            entry[0] += 1
        elif len(self.denied) < MAX_TARGETS:
            self.denied[target] = [1, time.time()]


def _reached(address: Address) -> Address:
    """What a connect() from the host to `address` reaches: an IPv4-mapped IPv6
    address reaches the IPv4 address, so it is judged (and connected) as that."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_name(text: str) -> bool:
    from ..netdest import parse_destination

    try:
        parsed = parse_destination(text)
    except ValueError:
        return False
    return parsed.name is not None and parsed.ports is None and parsed.protocol is None


def _resolved(message: dict[str, Any]) -> tuple[Any, frozenset[str]]:
    from ..config import NetworkPolicy
    from ..netdest import parse_destination
    from .netpolicy import resolve_names
    from .nftables import Resolved

    policy = NetworkPolicy(allow=tuple(message["allow"]), deny=tuple(message["deny"]),
                           hosts=tuple((k, tuple(v)) for k, v in message["hosts"]), method="proxy")
    import psutil

    host: list[Any] = [ipaddress.ip_network(n) for n in (*_ALSO_HOST, *message["ranges"])]
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                host.append(ipaddress.ip_network(entry.address.split("%")[0]))
    resolved = Resolved(deny=tuple(map(parse_destination, policy.deny)),
                        allow=tuple(map(parse_destination, policy.allow)),
                        names=resolve_names(policy), host_addresses=tuple(host), dns=False)
    return resolved, frozenset(policy.names)


async def _read_head(reader: asyncio.StreamReader, first: bytes) -> bytes:
    try:
        return first + await reader.readuntil(b"\r\n\r\n")
    except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
        raise Refused("a malformed request") from None


def _split_host_port(text: str, default: int | None) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text and default is None:
        raise Refused(f"no port in {text[:100]!r}")
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        raise Refused(f"a bad port in {text[:100]!r}") from None
    if not host or port is None:
        raise Refused(f"a bad destination {text[:100]!r}")
    return host, port


async def _http(first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                policy: Policy) -> tuple[list[Address], int, bytes, bytes]:
    """An HTTP request head: the destination's addresses, port, what to reply once
    connected, what to send ahead to the destination."""
    head = await _read_head(reader, first)
    request, *headers = head[:-4].decode("latin-1").split("\r\n")
    parts = request.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise Refused("a malformed request")
    method, target, version = parts
    if method.upper() == "CONNECT":
        host, port = _split_host_port(target, None)
        return policy.addresses(host, port), port, b"HTTP/1.1 200 Connection established\r\n\r\n", b""
    if not target.lower().startswith("http://"):
        raise Refused("not a proxy request (CONNECT host:port or an absolute http:// URI)")
    authority, slash, path = target[len("http://"):].partition("/")
    host, port = _split_host_port(authority.rpartition("@")[2], 80)
    addresses = policy.addresses(host, port)
    dropped = ("proxy-connection", "proxy-authorization", "connection", "keep-alive")
    kept = [h for h in headers if h.split(":", 1)[0].strip().lower() not in dropped]
    ahead = "\r\n".join([f"{method} /{path if slash else ''} {version}", *kept, "Connection: close", "", ""]
                        ).encode("latin-1")
    return addresses, port, b"", ahead


async def _socks5(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  policy: Policy) -> tuple[list[Address], int, bytes, bytes]:
    """A SOCKS5 handshake (no authentication, CONNECT): the destination's addresses."""
    count = (await reader.readexactly(1))[0]
    methods = await reader.readexactly(count)
    if 0 not in methods:
        writer.write(b"\x05\xff")
        raise Refused("no SOCKS5 method we speak")
    writer.write(b"\x05\x00")
    version, command, _, kind = await reader.readexactly(4)
    if kind == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif kind == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif kind == 3:
        host = (await reader.readexactly((await reader.readexactly(1))[0])).decode("ascii", "replace")
    else:
        writer.write(b"\x05\x08\x00\x01" + bytes(6))
        raise Refused("a SOCKS5 address type we do not know")
    port = int.from_bytes(await reader.readexactly(2), "big")
    if version != 5 or command != 1:
        writer.write(b"\x05\x07\x00\x01" + bytes(6))
        raise Refused("a SOCKS5 command other than CONNECT")
    try:
        addresses = policy.addresses(host, port)
    except Refused:
        writer.write(b"\x05\x02\x00\x01" + bytes(6))  # not allowed by ruleset
        raise
    return addresses, port, b"\x05\x00\x00\x01" + bytes(6), b""


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, policy: Policy) -> None:
    upstream: asyncio.StreamWriter | None = None
    try:
        first = await asyncio.wait_for(reader.readexactly(1), HANDSHAKE_SECONDS)
        handshake = _socks5(reader, writer, policy) if first == b"\x05" else _http(first, reader, writer, policy)
        try:
            addresses, port, reply, ahead = await asyncio.wait_for(handshake, HANDSHAKE_SECONDS)
        except Refused as e:
            if first != b"\x05":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                             b"refused by the sandbox's network policy: " + str(e).encode() + b"\n")
            await writer.drain()
            return
        up_reader: asyncio.StreamReader | None = None
        for address in addresses:
            try:
                up_reader, upstream = await asyncio.wait_for(asyncio.open_connection(str(address), port),
                                                             CONNECT_SECONDS)
                break
            except (TimeoutError, OSError):
                continue
        if up_reader is None or upstream is None:
            writer.write(b"\x05\x05\x00\x01" + bytes(6) if first == b"\x05" else
                         b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        writer.write(reply)
        upstream.write(ahead)
        await asyncio.gather(_relay(reader, upstream), _relay(up_reader, writer))
    except (TimeoutError, OSError, asyncio.IncompleteReadError, UnicodeError, ValueError):
        pass
    finally:
        for end in (writer, upstream):
            if end is not None:
                end.close()


async def _run(control: socket.socket, listener: socket.socket, policy: Policy) -> None:
    loop = asyncio.get_running_loop()
    live: set[asyncio.Task[None]] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(live) >= MAX_CONNECTIONS:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        live.add(task)
        try:
            await _serve(reader, writer, policy)
        finally:
            live.discard(task)

    control.sendall(b"ready")  # before any connection is accepted (ConnectProxy.denied)
    server = await asyncio.start_server(accept, sock=listener, limit=HEADER_LIMIT)
    control.setblocking(False)
    while await loop.sock_recv(control, _MESSAGE):
        pass  # nothing more is sent: EOF (the sandbox ended, or the launcher died) stops us
    server.close()
    for task in live:
        task.cancel()


def _drop_privileges() -> None:
    from . import syscalls as sc

    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    sc.prctl(sc.PR_SET_DUMPABLE, 0)  # again: a change of uid resets it
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)


def serve() -> None:
    """The proxy process: read the policy and the listening socket from stdin, relay
    until stdin ends, answer the denied attempts."""
    from . import syscalls as sc

    # Not dumpable, first: a process of our uid (a sandbox's, without root) that can name
    # us must not ptrace us or open /proc/<pid>/mem and use our host network.
    sc.prctl(sc.PR_SET_DUMPABLE, 0)
    control = socket.socket(fileno=os.dup(0))
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)
    message = json.loads(control.recv(_MESSAGE))
    resolved, names = _resolved(message)
    _drop_privileges()
    policy = Policy(resolved, names)
    _, fds, _, _ = socket.recv_fds(control, 1, 1)
    if fds:
        listener = socket.socket(fileno=fds[0])
        asyncio.run(_run(control, listener, policy))
        listener.close()
    control.setblocking(True)
    with contextlib.suppress(OSError):
        control.sendall(json.dumps([[t, c, f] for t, (c, f) in policy.denied.items()]).encode())
    control.close()


if __name__ == "__main__":
    serve()
    os._exit(0)  # every socket closes with the process; the interpreter's teardown would only delay it
