"""Run inside a sandbox whose network policy is enforced by the connect proxy
(python3 -c): try each target, print one JSON object {target: "ok:<reply>" | what
went wrong}. Targets (IPv6 as [ADDR]):

    connect:HOST:PORT   HTTP CONNECT through the proxy at 127.0.0.1:3128
    socks:HOST:PORT     SOCKS5 CONNECT through it (a name is sent as a name)
    http:HOST:PORT      urllib GET http://HOST:PORT/ with the proxy from the environment
    direct:ADDR:PORT    connect() straight to ADDR, ignoring the proxy
    dns:NAME            the sandbox's own resolver
    hold:HOST:PORT      CONNECT, send b"held\\n", then keep the connection open forever
"""

import errno
import http.client
import ipaddress
import json
import socket
import sys
import time
import urllib.request

PROXY = ("127.0.0.1", 3128)


def _split(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _recv(sock):
    sock.settimeout(5)
    return sock.recv(64).decode(errors="replace").strip()


def _connect(host, port):
    sock = socket.create_connection(PROXY, timeout=5)
    shown = f"[{host}]" if ":" in host else host
    sock.sendall(f"CONNECT {shown}:{port} HTTP/1.1\r\nHost: {shown}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    status = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "none"
    if status != "200":
        return sock, f"http:{status}"
    return sock, None


def _socks(host, port):
    sock = socket.create_connection(PROXY, timeout=5)
    sock.sendall(b"\x05\x01\x00")
    if sock.recv(2) != b"\x05\x00":
        return "socks:no method"
    try:
        address = ipaddress.ip_address(host)
        kind, raw = (b"\x01", address.packed) if address.version == 4 else (b"\x04", address.packed)
    except ValueError:
        kind, raw = b"\x03", bytes([len(host)]) + host.encode()
    sock.sendall(b"\x05\x01\x00" + kind + raw + port.to_bytes(2, "big"))
    reply = sock.recv(10)
    if len(reply) < 2 or reply[1] != 0:
        return f"socks:{reply[1] if len(reply) > 1 else 'none'}"
    return "ok:" + _recv(sock)


def probe(target):
    kind, rest = target.split(":", 1)
    try:
        if kind == "dns":
            return "ok:" + ",".join(sorted({i[4][0] for i in socket.getaddrinfo(rest, 80, type=socket.SOCK_STREAM)}))
        host, port = _split(rest)
        if kind == "connect":
            sock, refused = _connect(host, port)
            return refused or "ok:" + _recv(sock)
        if kind == "socks":
            return _socks(host, port)
        if kind == "http":
            shown = f"[{host}]" if ":" in host else host
            try:
                urllib.request.urlopen(f"http://{shown}:{port}/", timeout=5)
            except http.client.BadStatusLine as e:  # the test listener answers "hello", not HTTP
                return "ok:" + str(e.args[0]).strip().strip("'")
            except urllib.error.HTTPError as e:
                return f"http:{e.code}"
            return "ok:http"
        if kind == "direct":
            sock = socket.create_connection((host, port), timeout=3)
            return "ok:" + _recv(sock)
        if kind == "hold":
            sock, refused = _connect(host, port)
            if refused:
                return refused
            sock.sendall(b"held\n")
            print("holding", flush=True)
            while True:
                time.sleep(60)
        return "unknown target"
    except OSError as e:
        if isinstance(e, socket.gaierror):
            return f"gaierror:{e.args[0]}"
        return errno.errorcode.get(e.errno or 0, "timeout" if isinstance(e, TimeoutError) else str(e))


print(json.dumps({t: probe(t) for t in sys.argv[1:]}))
