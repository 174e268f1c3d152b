"""A sandbox whose parent dies before releasing it ends, even when the parent dies
before the sandbox's init has armed its parent-death signal: the init closes its
inherited copy of the parent's end of the sync pipe, so the parent's death is a
hang-up it sees (before, it waited for the parent's token forever, holding its
sandbox id, its network-policy slot and namespace; found by test_netpolicy's
killed manager). The parent's death is simulated exactly as the child sees it: the
parent closes its end without sending a token."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="clones the sandbox's namespaces as root")

SCRIPT = textwrap.dedent("""
    import os, select, sys
    from neural_doc_flow_security.sandbox.config import SandboxConfig
    from neural_doc_flow_security.sandbox.launch import bootstrap
    from neural_doc_flow_security.sandbox.launch.payload import ExecPayload
    from neural_doc_flow_security.sandbox.launch.plan import plan_launch
    from neural_doc_flow_security.sandbox.launch.spawn import clone_child

    plan = plan_launch(SandboxConfig(uid=65534, gid=65534))
    sync_read, sync_write = os.pipe2(os.O_CLOEXEC)
    error_read, error_write = os.pipe2(os.O_CLOEXEC)
    status_read, status_write = os.pipe2(os.O_CLOEXEC)
    pipes = bootstrap.ChildPipes(sync_read, error_write, status_write)
    steps = bootstrap.child_steps(plan, True, pipes, ((0, 0), (1, 1), (2, 2)), None, sync_write)
    pid, pidfd = clone_child(None, plan.namespaces.clone_flags, None, error_write, steps,
                             (sync_read, status_write, 0, 1, 2), ExecPayload(("true",)), plan.environment)
    for fd in (sync_read, error_write, status_write):
        os.close(fd)
    os.close(sync_write)  # the parent is gone, as far as the child can tell: no token will come
    ended = select.select([pidfd], [], [], 30)[0]
    if not ended:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    error = os.read(error_read, 4096)
    print("ended" if ended else "waited forever", error.decode(errors="replace"))
""")


def test_a_sandbox_released_by_nobody_ends() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ended"), done.stdout
    assert "parent exited" in done.stdout
