"""A test host's servers (run inside the test's own network namespace): TCP and
UDP listeners on the given addresses; every connection or datagram is logged as a
line "PROTO ADDR PORT" to LOG (host-side evidence), TCP answers b"hello\\n", UDP
echoes. Prints "ready" once every socket is bound; runs until killed.

    python3 net_listener.py LOG tcp:10.214.1.2:8080 udp:[fd8d::2]:53 ...
"""

import socket
import sys
import threading

log_path = sys.argv[1]
lock = threading.Lock()


def _log(protocol: str, address: str, port: int) -> None:
    with lock, open(log_path, "a") as f:
        f.write(f"{protocol} {address} {port}\n")


def _serve_tcp(sock: socket.socket, address: str, port: int) -> None:
    while True:
        conn, _ = sock.accept()
        _log("tcp", address, port)
        try:
            conn.sendall(b"hello\n")
        finally:
            conn.close()


def _serve_udp(sock: socket.socket, address: str, port: int) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        _log("udp", address, port)
        sock.sendto(data, peer)


for spec in sys.argv[2:]:
    protocol, rest = spec.split(":", 1)
    address, _, port_text = rest.rpartition(":")
    address = address.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, int(port_text)))
    if protocol == "tcp":
        sock.listen(16)
    target = _serve_tcp if protocol == "tcp" else _serve_udp
    threading.Thread(target=target, args=(sock, address, int(port_text)), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
