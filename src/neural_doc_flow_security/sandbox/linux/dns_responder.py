"""The resolver of a sandbox with a network policy and `dns = true`: a small process
on the host's end of the sandbox's link that answers A and AAAA queries for the
names the policy allows, with the addresses the host resolved at launch, and
NXDOMAIN for every other name. It never forwards a query anywhere.

It is started per sandbox (`start`), binds UDP port 53 on the link's host
addresses as root, then drops to uid/gid 65534 with no_new_privs before it reads
a packet (dnslib parses them). It exits when its stdin reaches end of file: when
the launcher stops it or dies.

    python3 -m neural_doc_flow_security.sandbox.linux.dns_responder ADDR [ADDR...]
        (stdin: one JSON line {"name": ["address", ...]}, then kept open)
"""

from __future__ import annotations

import ipaddress
import json
import os
import selectors
import socket
import subprocess
import sys

TTL = 60
_MAX_PACKET = 4096
# Queries answered per second at most (a burst of as many): the responder runs on the
# host, outside the sandbox's cgroup, so a flood must not become the host's CPU work.
RATE = 200


def answer(packet: bytes, names: dict[str, list[str]]) -> bytes | None:
    """The reply to one query packet (None: not a query we answer)."""
    from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

    try:
        query = DNSRecord.parse(packet)
    except Exception:  # noqa: BLE001 - dnslib raises several kinds on garbage
        return None
    if query.header.qr or len(query.questions) != 1:
        return None
    reply = query.reply()
    question = query.q
    name = str(question.qname).rstrip(".").lower()
    addresses = names.get(name)
    if addresses is None:
        reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())
    for text in addresses:
        address = ipaddress.ip_address(text)
        if address.version == 4 and question.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(text), ttl=TTL))
        elif address.version == 6 and question.qtype in (QTYPE.AAAA, QTYPE.ANY):
            reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(text), ttl=TTL))
    return bytes(reply.pack())


def _drop_privileges() -> None:
    from . import syscalls as sc

    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)


def serve(addresses: list[str]) -> None:
    """Bind, drop privileges, answer until stdin closes."""
    names: dict[str, list[str]] = json.loads(sys.stdin.buffer.readline())
    sockets = []
    for text in addresses:
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((text, 53))
        sock.setblocking(False)
        sockets.append(sock)
    _drop_privileges()
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    selector.register(sys.stdin.buffer, selectors.EVENT_READ)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    import time

    tokens, last = float(RATE), time.monotonic()
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin.buffer:
                if not os.read(sys.stdin.fileno(), 4096):
                    return
                continue
            sock = key.fileobj  # type: ignore[assignment]
            try:
                packet, peer = sock.recvfrom(_MAX_PACKET)
            except BlockingIOError:
                continue
            now = time.monotonic()
            tokens, last = min(float(RATE), tokens + (now - last) * RATE), now
            if tokens < 1:
                continue  # over the rate: dropped, as a busy resolver would
            tokens -= 1
            try:
                reply = answer(packet, names)
            except Exception:  # noqa: BLE001 - one odd packet must not end the resolver
                reply = None
            if reply is not None:
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    pass  # the sandbox went away


def start(addresses: list[str], names: dict[str, list[str]]) -> subprocess.Popen[bytes]:
    """Start a responder on `addresses` (port 53) answering `names`; returns once it
    serves. Stop it with stop()."""
    import dnslib

    # Where this package and dnslib are installed (a zygote's sys.path may differ from a fresh one's).
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    path = os.pathsep.join(dict.fromkeys([here, os.path.dirname(os.path.dirname(os.path.abspath(dnslib.__file__)))]))
    # -P and cwd "/": `-m` would put the caller's working directory first on sys.path,
    # and run a json.py planted there (by anyone who can write there) as root.
    process = subprocess.Popen([sys.executable, "-P", "-m", __name__, *addresses], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": path})
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(names).encode() + b"\n")
    process.stdin.flush()
    if process.stdout.readline() != b"ready\n":
        stop(process)
        error = process.stderr.read().decode(errors="replace") if process.stderr else ""
        raise OSError(f"the sandbox's resolver did not start: {error.strip()[-500:]}")
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a responder (closing its stdin ends it; killed if it lingers)."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


if __name__ == "__main__":
    serve(sys.argv[1:])
