"""Which syscalls the payload kinds make, against the built-in seccomp allow-list.

    python benchmarks/syscall_usage.py      # needs strace, pdftotext, pdftoppm

Runs, each under `strace -f` on the host (no sandbox): a Python program that does
what payloads do (threads, subprocesses, sockets, files, asyncio, mmap,
cloudpickle, msgpack, multiprocessing), `pdftotext` and `pdftoppm` on the
package's sample PDFs. Prints, per program, the syscalls it made and the ones the
allow-list (linux/seccomp.py ALLOW_LIST) does not allow; the list was built from
this output (and widened to the families of the calls seen).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from neural_doc_flow_security.sandbox.linux import seccomp

SAMPLES = Path(seccomp.__file__).parents[1] / "samples"
PAYLOAD = r"""
import asyncio, concurrent.futures, hashlib, mmap, multiprocessing, os, pathlib, select, shutil, signal
import socket, subprocess, tempfile, threading, time
import cloudpickle, msgpack
d = tempfile.mkdtemp()
p = pathlib.Path(d, "x.txt"); p.write_text("hi"); p.read_text(); os.stat(p); os.chmod(p, 0o600)
os.rename(p, p.with_suffix(".y")); list(os.scandir(d)); shutil.rmtree(d)
a, b = socket.socketpair(); a.sendall(b"x"); b.recv(1); a.close(); b.close()
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
c = socket.create_connection(s.getsockname()); x, _ = s.accept(); c.send(b"1"); x.recv(1)
t = threading.Thread(target=time.sleep, args=(0.01,)); t.start(); t.join()
with concurrent.futures.ThreadPoolExecutor(2) as ex: list(ex.map(abs, range(10)))
subprocess.run(["true"]); subprocess.run("echo hi | cat > /dev/null", shell=True)
asyncio.run(asyncio.sleep(0.01))
m = mmap.mmap(-1, 1 << 20); m[0] = 1; m.close(); bytearray(50 << 20)
os.urandom(8); hashlib.sha256(b"x").hexdigest(); select.select([], [], [], 0)
signal.signal(signal.SIGUSR1, lambda *a: None); os.kill(os.getpid(), signal.SIGUSR1)
msgpack.unpackb(msgpack.packb({"a": 1})); cloudpickle.loads(cloudpickle.dumps(lambda: 1))()
os.sched_getaffinity(0); os.memfd_create("x"); time.process_time()
with multiprocessing.get_context("fork").Pool(1) as pool: pool.map(abs, [1])
"""


def traced(argv: list[str], workdir: str) -> set[str]:
    log = Path(workdir, "trace")
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), *argv], check=True, cwd=workdir,
                   stdout=subprocess.DEVNULL)
    return set(re.findall(r"^\d+ +(?:<\.\.\. )?([a-z0-9_]+)", log.read_text(), re.MULTILINE))


def main() -> int:
    programs = {
        "python payload": [sys.executable, "-c", PAYLOAD],
        "pdftotext": ["pdftotext", str(SAMPLES / "report.pdf"), "-"],
        "pdftoppm": ["pdftoppm", "-r", "50", "-png", str(SAMPLES / "invoice.pdf"), "page"],
    }
    outside = 0
    with tempfile.TemporaryDirectory() as workdir:
        for name, argv in programs.items():
            used = traced(argv, workdir)
            missing = sorted(used - seccomp.ALLOW_LIST - {"clone3", "openat2"})  # ENOSYS: libc falls back
            outside += len(missing)
            print(f"{name}: {len(used)} syscalls; not in the allow-list: {', '.join(missing) or 'none'}")
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
