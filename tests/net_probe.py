"""Run inside a sandbox (python3 -c): try each target, print one JSON object
{target: "ok:<reply>" | "<errno name or error>"}. Targets: tcp:ADDR:PORT,
udp:ADDR:PORT (IPv6 as [ADDR]), dns:NAME, spoof:SRC:ADDR:PORT (TCP from a source
address that is not the sandbox's, bound with IP_FREEBIND)."""

import errno
import json
import socket
import sys


def _split(text):
    address, _, port = text.rpartition(":")
    return address.strip("[]"), int(port)


def _family(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def probe(target):
    kind, rest = target.split(":", 1)
    try:
        if kind == "dns":
            return "ok:" + ",".join(sorted({i[4][0] for i in socket.getaddrinfo(rest, 80, type=socket.SOCK_STREAM)}))
        if kind == "spoof":
            source, rest = rest.split(":", 1)
            address, port = _split(rest)
            sock = socket.socket(_family(address), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            sock.bind((source, 0))
            sock.settimeout(2)
            sock.connect((address, port))
            return "ok:" + sock.recv(16).decode()
        address, port = _split(rest)
        sock = socket.socket(_family(address), socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        sock.settimeout(3)
        sock.connect((address, port))
        if kind == "udp":
            sock.send(b"ping")
        elif kind == "tcp":
            sock.settimeout(1)
            try:
                return "ok:" + sock.recv(16).decode().strip()
            except TimeoutError:
                return "ok:"  # connected; the listener sent nothing
        return "ok:" + sock.recv(16).decode().strip()
    except OSError as e:
        if isinstance(e, socket.gaierror):
            return f"gaierror:{e.args[0]}"
        return errno.errorcode.get(e.errno or 0, "timeout" if isinstance(e, TimeoutError) else str(e))


print(json.dumps({t: probe(t) for t in sys.argv[1:]}))
