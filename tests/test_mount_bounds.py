"""The file systems a sandbox may fill are bounded in what the host pays for them,
not only in bytes: its tmpfs mounts (/tmp, /dev/shm, a copy-on-write root's layer)
hold no more inodes than pages (an empty file, a directory or a link takes no page,
and without a memory cgroup nothing charges their kernel memory), and its devpts
hands out a few pseudo-terminals, not the host's shared pool. The evidence is read
on the host, from the sandbox's own mounts and open files.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import SandboxCaller, processes_with_argument, unique_marker, wait_until
from neural_doc_flow_security.sandbox.linux.rootfs import MAX_PTYS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux sandbox")

# Opens pseudo-terminals until refused (at most 64), says how many, then sleeps holding them.
HOLD_PTYS = """
import os, sys, time
fds = []
while len(fds) < 64:
    try:
        fds.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        break
print(len(fds), flush=True)
time.sleep(float(sys.argv[1]))
"""


def _ptys_held(pid: int) -> int:
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += os.readlink(f"/proc/{pid}/fd/{fd}") in ("/dev/ptmx", "/dev/pts/ptmx")
        except OSError:
            continue
    return held


def test_tmpfs_inodes_and_ptys_are_bounded(sandbox_caller: SandboxCaller) -> None:
    marker = unique_marker()
    proc = sandbox_caller.popen(["--overlay", "--tmpfs-size", "8M"],
                                ["python3", "-c", HOLD_PTYS, marker], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        def payload() -> list[int]:  # the sandboxed python (the caller's own command line has the marker too)
            return [p.pid for p in processes_with_argument(marker, program=None)
                    if p.cmdline()[1:3] == ["-c", HOLD_PTYS]]

        assert wait_until(payload)
        pid = payload()[0]
        root = f"/proc/{pid}/root"
        tmp, shm, top = (os.statvfs(f"{root}{path}") for path in ("/tmp", "/dev/shm", "/"))
        assert tmp.f_files <= max(1024, 8 * 256), tmp
        assert shm.f_files <= 64 * 256, shm
        assert top.f_files <= max(1024, 8 * 256), top  # the copy-on-write root's upper layer
        assert _ptys_held(pid) <= MAX_PTYS
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
        for leftover in processes_with_argument(marker, program=None):
            leftover.kill()
