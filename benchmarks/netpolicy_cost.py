"""What a network policy costs per launch (issue 17), as root.

    python benchmarks/netpolicy_cost.py [--rounds 30]

Two tables, median and p90 over interleaved rounds:
- `ndf-sandbox run -- /bin/true` end to end: no policy (the network namespace is
  made ahead while the CLI imports), a policy (`--net-allow 10.214.250.2:80/tcp`),
  a policy with its resolver (`--net-dns` and an allowed name), and a policy
  through the connect proxy (`--net-method proxy`, the method without root);
- the policy's own parts in this process: `netpolicy.setup()` (slot, namespace,
  veth pair, addresses, routes, both nftables tables; with dns also the resolver
  process) and `release()` (removal); the connect proxy's `start()` (the launch
  waits for this only), the time until it serves (overlapped with the sandbox's
  own start), and its stop once serving (`denied()` + `release()`).
Nothing is sent anywhere; the allowed address need not exist.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import interleaved, runner, summary  # noqa: E402

from neural_doc_flow_security.sandbox import NetworkPolicy  # noqa: E402

NDF = str(Path(sys.executable).with_name("ndf-sandbox"))
ALLOW = "10.214.250.2:80/tcp"


def _row(name: str, samples: list[float]) -> str:
    s = summary(samples)
    return f"| {name} | {s['n']} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} |"


def _proxy_parts(rounds: int) -> dict[str, list[float]]:
    """The connect proxy's start, its start-up until it serves, and its stop, with a
    listening socket of this process standing in for the sandbox's."""
    from neural_doc_flow_security.sandbox.linux import connect_proxy

    policy = NetworkPolicy(allow=(ALLOW,), method="proxy")
    parts: dict[str, list[float]] = {"proxy start": [], "proxy serving (from start)": [], "proxy stop": []}
    for _ in range(rounds):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            ours, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            start = time.perf_counter()
            proxy = connect_proxy.start(policy)
            started = time.perf_counter()
            socket.send_fds(child, [b"p"], [listener.fileno()])
            proxy.hand_over(ours.fileno())
            poller = select.poll()
            poller.register(proxy.control, select.POLLIN)
            poller.poll(30_000)  # its "ready"
            serving = time.perf_counter()
            proxy.denied()
            proxy.release()
            parts["proxy start"].append(started - start)
            parts["proxy serving (from start)"].append(serving - start)
            parts["proxy stop"].append(time.perf_counter() - serving)
            ours.close()
            child.close()
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (a network policy is enforced as root)", file=sys.stderr)
        return 2
    profile = Path(f"/tmp/ndf-netpolicy-bench-{os.getpid()}.toml")
    profile.write_text(f'[network]\nallow = ["{ALLOW}", "svc.bench.internal:80"]\ndns = true\n'
                       'hosts = { "svc.bench.internal" = ["10.214.250.3"] }\n')
    try:
        cli = interleaved({
            "no policy": runner([NDF, "run", "--", "/bin/true"]),
            "policy": runner([NDF, "run", "--net-allow", ALLOW, "--", "/bin/true"]),
            "policy + dns": runner([NDF, "run", "--profile", str(profile), "--", "/bin/true"]),
            "policy (proxy)": runner([NDF, "run", "--net-method", "proxy", "--net-allow", ALLOW, "--",
                                      "/bin/true"]),
        }, args.rounds)
    finally:
        profile.unlink(missing_ok=True)
    from neural_doc_flow_security.sandbox.linux import netpolicy

    parts: dict[str, list[float]] = {"setup": [], "release": [], "setup (dns)": [], "release (dns)": []}
    for dns, suffix in ((False, ""), (True, " (dns)")):
        policy = NetworkPolicy(allow=(ALLOW,), dns=dns)
        for _ in range(args.rounds):
            start = time.perf_counter()
            lease = netpolicy.setup(policy)
            middle = time.perf_counter()
            lease.release()
            parts["setup" + suffix].append(middle - start)
            parts["release" + suffix].append(time.perf_counter() - middle)
    parts.update(_proxy_parts(args.rounds))
    print("| ndf-sandbox run -- /bin/true | n | median ms | p90 ms |\n|---|---|---|---|")
    print("\n".join(_row(name, samples) for name, samples in cli.items()))
    print("\n| netpolicy (in process) | n | median ms | p90 ms |\n|---|---|---|---|")
    print("\n".join(_row(name, samples) for name, samples in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
