"""Shared pieces of the cgroup backend tests: gated children and bounded hostile bodies.

Every hostile body is bounded (attempts, bytes, wall time), so a broken sandbox
costs a little CPU or memory, never the machine.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import signal
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

from neural_doc_flow_security.sandbox.linux.cgroups import probe_cgroups

Body = Callable[["Child"], int]


class Child:
    """A forked child that blocks on a pipe until release(); then runs `body(self)`.

    The child reports to the parent through `say()`; the parent reads with `hear()`.
    A second gate (`wait_gate()` in the child, `release()` again in the parent) lets a
    test inspect the cgroup while the child is parked mid-way.
    """

    def __init__(self, body: Body) -> None:
        gate_r, gate_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 99
            try:
                os.close(gate_w)
                os.close(rep_r)
                self._gate_r, self._rep_w = gate_r, rep_w
                if os.read(gate_r, 1) == b"g":
                    code = body(self)
            except BaseException:
                code = 98
            finally:
                os._exit(code)
        os.close(gate_r)
        os.close(rep_w)
        self.pid = pid
        self._gate_w: int | None = gate_w
        self._rep_r = rep_r
        self._buf = b""
        self.status: int | None = None

    # child side
    def say(self, text: str) -> None:
        os.write(self._rep_w, text.encode() + b"\n")

    def wait_gate(self) -> bool:
        return os.read(self._gate_r, 1) == b"g"

    # parent side
    def release(self) -> None:
        assert self._gate_w is not None
        os.write(self._gate_w, b"g")

    def hear(self, timeout: float = 60.0) -> str | None:
        """The next line the child said, or None on EOF/timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._rep_r], [], [], left)[0]:
                return None
            chunk = os.read(self._rep_r, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def has_said(self) -> bool:
        return b"\n" in self._buf or bool(select.select([self._rep_r], [], [], 0)[0])

    def wait(self) -> int:
        """Reap the child; returns the raw wait status."""
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
        return self.status

    def cleanup(self) -> None:
        if self.status is None:
            # Still our unreaped child, so the pid cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()
        if self._gate_w is not None:
            os.close(self._gate_w)
            self._gate_w = None
        os.close(self._rep_r)


@contextlib.contextmanager
def children() -> Iterator[Callable[[Body], Child]]:
    made: list[Child] = []

    def spawn(body: Body) -> Child:
        made.append(Child(body))
        return made[-1]

    try:
        yield spawn
    finally:
        for c in made:
            c.cleanup()


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll until true (a generous deadline, never an assertion about speed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---- bounded hostile bodies --------------------------------------------------------

def memory_hog(child: Child) -> int:
    """Allocate and touch 1 MiB at a time; gives up (exit 0) after 1 GiB."""
    chunks = []
    for _ in range(1024):
        chunks.append(b"\x01" * (1 << 20))
    return 0


def cpu_spinner(child: Child) -> int:
    """Spin for at most 60 s of wall time."""
    child.say("spinning")
    end = time.monotonic() + 60
    while time.monotonic() < end:
        pass
    return 0


def fork_bomb(attempts: int) -> Body:
    """Fork up to `attempts` sleeping children; report forked/refused; wait for the gate."""
    def body(child: Child) -> int:
        hold_r, hold_w = os.pipe()
        kids, refused = [], 0
        for _ in range(attempts):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                os.close(hold_w)
                os.read(hold_r, 1)  # EOF when the bomb exits
                os._exit(0)
            kids.append(pid)
        child.say(f"{len(kids)} {refused}")
        child.wait_gate()
        os.close(hold_w)
        for pid in kids:
            os.waitpid(pid, 0)
        return 0
    return body


def forker(child: Child) -> int:
    """Try one fork per gate; report "ok" or the errno name."""
    while child.wait_gate():
        try:
            pid = os.fork()
        except OSError as e:
            child.say(errno.errorcode[e.errno or 0])
            continue
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        child.say("ok")
    return 0


def direct_writer(path: str, size: int, offset: int = 0) -> Body:
    """Write `size` bytes with O_DIRECT at `offset` (bypassing the page cache, so the
    block throttle sees them); says "start" before and "done" after."""
    def body(child: Child) -> int:
        flags = os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
        if not path.startswith("/dev/"):
            flags |= os.O_CREAT
        fd = os.open(path, flags, 0o600)
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
        buf.write(b"\xa5" * size)
        child.say("start")
        written = os.pwrite(fd, buf, offset)
        os.close(fd)
        child.say(f"done {written}")
        return 0
    return body


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2]


def whole_disk_of(path: str) -> str | None:
    """"MAJ:MIN" of the whole block device that holds `path`, or None (tmpfs, overlay...)."""
    st = os.stat(path)
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    sys_dir = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    if not os.path.exists(sys_dir):
        return None
    if os.path.exists(os.path.join(sys_dir, "partition")):
        with open(os.path.join(sys_dir, "..", "dev")) as f:
            return f.read().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


def ndf_leftovers() -> list[str]:
    """ndf-* cgroups of this test process (or of the fake dead owners tests create)."""
    found = []
    me = f"ndf-{os.getpid()}-"
    parents = {c.parent for c in probe_cgroups().controllers if c.parent}
    unified = "/sys/fs/cgroup/unified"
    if os.path.isdir(unified):
        parents.add(os.path.join(unified, "neural-doc-flow"))
    for parent in parents:
        with contextlib.suppress(FileNotFoundError):
            found += [os.path.join(parent, e) for e in os.listdir(parent)
                      if e.startswith(me) or e.endswith("-ndftest")]
    return found


def devnull_fds() -> tuple[tuple[int, int], ...]:
    """An fd map giving a sandbox /dev/null as stdin, stdout and stderr (close the fd after the launch)."""
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return ((0, fd), (1, fd), (2, fd))


def start_memory_hog(launcher: Any, sandbox_id: int, limit_mb: int = 64) -> Any:
    """Start, through `launcher` (a Launcher), a program that touches 256 MiB under a
    `limit_mb` memory limit: the kernel OOM-kills it."""
    from neural_doc_flow_security.sandbox.config import FilesystemConfig, SandboxConfig
    from neural_doc_flow_security.sandbox.launch.launcher import LaunchRequest
    from neural_doc_flow_security.sandbox.launch.payload import ExecPayload

    config = SandboxConfig(memory_limit_mb=limit_mb, max_processes=16, filesystem=FilesystemConfig(python=True))
    hog = ExecPayload(("python3", "-c", "x = bytearray(256 << 20); x[::4096] = b'1' * len(x[::4096])"))
    fds = devnull_fds()
    try:
        return launcher.start(sandbox_id, LaunchRequest(config, hog, "hog", fds))
    finally:
        os.close(fds[0][1])
