"""The isolation floor, end to end: when the host cannot provide a protection the
config requires, the launch is refused before anything runs, with an error that
names the protection and why; the CLI exits 126 with that message.

User namespaces are made unavailable for real, without touching the host: a
forked child enters a fresh user namespace (where it is unmapped, so not root)
and sets user.max_user_namespaces=0 there; the sysctl is per namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

import pytest

from neural_doc_flow_security.sandbox.config import NamespaceConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import SetupError, UnsupportedError
from neural_doc_flow_security.sandbox.launch.supervise import run_program

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="Linux namespaces"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the limited user namespace"),
]
CLONE_NEWUSER = 0x10000000
libc = ctypes.CDLL(None, use_errno=True)


def _in_limited_user_namespace(config: SandboxConfig) -> dict[str, object]:
    """Try to run /bin/true under `config` where user namespaces are disabled."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        answer: dict[str, object]
        try:
            os.close(read_fd)
            assert libc.unshare(CLONE_NEWUSER) == 0
            with open("/proc/sys/user/max_user_namespaces", "w") as f:
                f.write("0")
            try:
                result = run_program(config, ["/bin/true"])
                answer = {"ran": True, "outcome": result.outcome.value, "error": result.error}
            except UnsupportedError as e:
                answer = {"ran": False, "protection": e.protection, "message": str(e)}
            except SetupError as e:  # a set-up step the launcher itself could not do: nothing ran
                answer = {"ran": False, "setup_error": str(e)}
        except BaseException as e:  # noqa: BLE001
            answer = {"crashed": repr(e)}
        os.write(write_fd, json.dumps(answer).encode())
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def test_default_profile_is_refused_when_user_namespaces_are_disabled() -> None:
    with open("/proc/sys/user/max_user_namespaces") as f:
        host_value = f.read()
    answer = _in_limited_user_namespace(SandboxConfig())
    assert "crashed" not in answer, answer
    assert answer["ran"] is False, answer
    assert answer["protection"] == "namespaces.user"
    message = str(answer["message"])
    assert "user.max_user_namespaces=0" in message and "non-root" in message
    with open("/proc/sys/user/max_user_namespaces") as f:
        assert f.read() == host_value  # the host's knob was never touched


def test_without_privilege_for_the_requested_setup_nothing_runs() -> None:
    """Without a user namespace, a non-root launcher (here: a process that holds
    capabilities only in its own user namespace) cannot finish the set-up (the
    root and the uid change need host privileges): the launch fails closed with
    a sandbox error; the payload never runs (had /bin/true run, the outcome would
    be ok)."""
    answer = _in_limited_user_namespace(SandboxConfig(namespaces=NamespaceConfig(user=False)))
    assert "crashed" not in answer, answer
    if answer["ran"]:
        assert answer["outcome"] == "sandbox_error", answer
    elif "setup_error" in answer:
        # Which step fails first depends on what an earlier run left: e.g. the shared
        # cgroup parent, which this process cannot make.
        assert "sandbox setup failed" in str(answer["setup_error"]), answer
    else:
        assert str(answer["protection"]).startswith("namespaces."), answer
