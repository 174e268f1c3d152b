"""Binds against a sandbox that prepares the next launch (issue 23, items 1-3), paths
with ':', and what the directories made only for a mount point show.

A writable bind is ground the sandbox controls at its next launch: a run plants a
symlink there, and the next launch's set-up (as root, before pivot_root) must not
follow it, neither for a bind's target nor for its source. Every CLI probe runs as
root, as uid 4242 and from a spare (`sandbox_caller`); the API probes run through
each start method, where a plan is cached between calls. Evidence is on the host:
the directory a planted link aims at got no entry, the host file kept its content,
the other directory's marker was never printed.

The directories a link aims at live under /var/tmp: an absolute link into /tmp
would resolve, during the set-up, into the root being built, not the host's /tmp.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import api_helpers
from api_helpers import LeakTracker, manager, needs_root, run
from conftest import SandboxCaller
from neural_doc_flow_security.sandbox.cli import build_parser, config_from_args
from neural_doc_flow_security.sandbox.config import BindMount, FilesystemConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import ConfigError
from neural_doc_flow_security.sandbox.linux.rootfs import plan_rootfs
from neural_doc_flow_security.sandbox.result import Outcome

pytestmark = [pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox"), pytest.mark.timeout(300)]

no_leaks = api_helpers.no_leaks  # fixtures of the API probes
method = api_helpers.method
describe_result = api_helpers.describe

HostDirs = Callable[[str], Path]


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    return (f"exit {result.returncode}\nstdout:\n{result.stdout.decode(errors='replace')}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')}")


def _make_dir(name: str, made: list[Path]) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"ndf-binds-{name}-", dir="/var/tmp"))
    path.chmod(0o777)  # the sandbox's uid (65534, or 4242 through its user namespace) may write
    made.append(path)
    return path


@pytest.fixture
def host_dirs() -> Iterator[HostDirs]:
    """Makes host directories under /var/tmp that every uid may write; all removed after."""
    made: list[Path] = []
    yield lambda name: _make_dir(name, made)
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _new_dir(path: Path, mode: int = 0o777) -> Path:
    path.mkdir()
    path.chmod(mode)  # not through mkdir's mode: the umask would apply
    return path


def _writable_file(path: Path, content: str) -> Path:
    path.write_text(content)
    path.chmod(0o666)
    return path


# --- item 1: targets ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_symlink_planted_in_a_writable_bind_cannot_lead_a_nested_target_out(
        sandbox_caller: SandboxCaller, host_dirs: HostDirs, kind: str) -> None:
    work, aimed, nested = host_dirs("work"), host_dirs("aimed"), host_dirs("nested")
    source = nested if kind == "directory" else _writable_file(nested / "file", "nested\n")
    plant = sandbox_caller.run(["--bind", f"{work}:/tmp/job"], ["ln", "-s", str(aimed), "/tmp/job/d"])
    assert plant.returncode == 0, describe(plant)
    assert (work / "d").is_symlink()  # the first run did plant it, on the host

    second = sandbox_caller.run(["--bind", f"{work}:/tmp/job", "--bind", f"{source}:/tmp/job/d/sub"], ["true"])
    assert second.returncode == 126, describe(second)
    assert b"/tmp/job/d/sub" in second.stderr and b"symlink" in second.stderr, describe(second)
    # host-side: the set-up created nothing where the link aims
    assert os.listdir(aimed) == []


@needs_root
def test_api_a_symlink_planted_in_a_writable_bind_cannot_lead_a_nested_target_out(
        method: str, no_leaks: LeakTracker, host_dirs: HostDirs) -> None:
    work, aimed, nested = host_dirs("work"), host_dirs("aimed"), host_dirs("nested")
    config = SandboxConfig(filesystem=FilesystemConfig(binds=(
        BindMount(str(work), "/tmp/job", read_only=False), BindMount(str(nested), "/tmp/job/d/sub", read_only=False))))

    async def scenario() -> tuple[object, ...]:
        async with manager(method) as m:
            plant = await m.execute_command("plant", ["ln", "-s", str(aimed), "/tmp/job/d"],
                                            sandbox_config=SandboxConfig(filesystem=FilesystemConfig(
                                                binds=(BindMount(str(work), "/tmp/job", read_only=False),))))
            nested_run = await m.execute_command("nested", ["true"], sandbox_config=config)
            return plant, nested_run

    plant, nested_run = run(scenario())
    assert plant.outcome is Outcome.OK, describe_result(plant)
    assert nested_run.outcome is Outcome.SANDBOX_ERROR, describe_result(nested_run)
    assert "/tmp/job/d/sub" in (nested_run.error or "")
    assert os.listdir(aimed) == []


# --- item 2: order -----------------------------------------------------------------

@pytest.mark.parametrize("order", ["writable first", "read-only first"])
def test_a_read_only_bind_inside_a_writable_one_stays_read_only(
        sandbox_caller: SandboxCaller, host_dirs: HostDirs, order: str) -> None:
    work = host_dirs("work")
    _new_dir(work / "config")
    settings = _writable_file(work / "config" / "settings", "original\n")
    options = [["--bind", f"{work}:/tmp/job"], ["--ro-bind", f"{work}/config:/tmp/job/config"]]
    if order == "read-only first":
        options.reverse()
    result = sandbox_caller.run([*options[0], *options[1]],
                                ["sh", "-c", "echo changed > /tmp/job/config/settings; echo written > /tmp/job/out"])
    assert result.returncode == 0, describe(result)  # the last write, to the writable parent, worked
    assert b"Read-only file system" in result.stderr, describe(result)
    assert settings.read_text() == "original\n"  # host-side: the read-only part kept its content
    assert (work / "out").read_text() == "written\n"


@needs_root
def test_api_a_read_only_bind_inside_a_writable_one_stays_read_only(
        method: str, no_leaks: LeakTracker, host_dirs: HostDirs) -> None:
    work = host_dirs("work")
    _new_dir(work / "config")
    settings = _writable_file(work / "config" / "settings", "original\n")
    # The two-list form, read-only child listed first: the parent is still mounted first.
    config = SandboxConfig(filesystem=FilesystemConfig(
        read_only_binds=(BindMount(f"{work}/config", "/tmp/job/config"),),
        binds=(BindMount(str(work), "/tmp/job", read_only=False),)))

    async def scenario() -> object:
        async with manager(method) as m:
            return await m.execute_command("w", ["sh", "-c", "echo changed > /tmp/job/config/settings"],
                                           sandbox_config=config)

    result = run(scenario())
    assert result.outcome is Outcome.ERROR and b"Read-only file system" in result.stderr, describe_result(result)
    assert settings.read_text() == "original\n"


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_bind_nested_in_a_writable_one_leaves_nothing_in_the_hosts_directory(
        sandbox_caller: SandboxCaller, host_dirs: HostDirs, kind: str) -> None:
    work, models = host_dirs("work"), host_dirs("models")
    weights = _writable_file(models / "weights", "weights\n")
    source, readable = ((models, "/tmp/job/in/models/weights") if kind == "directory"
                        else (weights, "/tmp/job/in/models"))
    nested = ["--bind", f"{work}:/tmp/job", "--ro-bind", f"{source}:/tmp/job/in/models"]
    missing = sandbox_caller.run(nested, ["true"])
    assert missing.returncode == 126, describe(missing)
    assert b"/tmp/job/in/models" in missing.stderr and b"must exist" in missing.stderr, describe(missing)
    assert os.listdir(work) == []  # host-side: no mount point was made in the caller's directory

    _new_dir(work / "in")
    (_new_dir(work / "in" / "models") if kind == "directory" else _writable_file(work / "in" / "models", ""))
    present = sandbox_caller.run(nested, ["cat", readable])
    assert present.returncode == 0 and present.stdout == b"weights\n", describe(present)
    assert sorted(os.listdir(work)) == ["in"] and os.listdir(work / "in") == ["models"]


def test_plan_mounts_a_parent_before_anything_below_it() -> None:
    fs = FilesystemConfig(
        read_only_binds=(BindMount("/srv/job/config", "/job/config"), BindMount("/a", "/x")),
        binds=(BindMount("/srv/job", "/job", read_only=False), BindMount("/b", "/x", read_only=False)))
    targets = [(b.target, b.read_only) for b in plan_rootfs(fs, uid=65534, gid=65534, hostname="h").binds
               if b.target in ("/job", "/job/config", "/x")]
    # a parent first; of two binds on one target, the later (on top) keeps its place
    assert targets == [("/x", True), ("/job", False), ("/x", False), ("/job/config", True)]


# --- item 3: sources ---------------------------------------------------------------

def test_a_bind_source_swapped_for_a_symlink_is_refused(sandbox_caller: SandboxCaller, host_dirs: HostDirs) -> None:
    work, other = host_dirs("work"), host_dirs("other")
    _new_dir(work / "in")
    _writable_file(work / "in" / "marker", "bound input\n")
    secret = f"other-{secrets.token_hex(8)}"
    (other / "marker").write_text(secret)
    (other / "marker").chmod(0o644)
    options = ["--bind", f"{work}:/tmp/job", "--ro-bind", f"{work}/in:/tmp/in"]
    first = sandbox_caller.run(options, ["sh", "-c", f"cat /tmp/in/marker && rm -r /tmp/job/in && "
                                                     f"ln -s {other} /tmp/job/in"])
    assert first.stdout == b"bound input\n" and first.returncode == 0, describe(first)
    assert (work / "in").is_symlink()

    second = sandbox_caller.run(options, ["cat", "/tmp/in/marker"])
    assert second.returncode == 126, describe(second)
    assert f"bind source {work}/in".encode() in second.stderr and b"symlink" in second.stderr, describe(second)
    assert secret.encode() not in second.stdout + second.stderr


@needs_root
def test_api_a_bind_source_swapped_for_a_symlink_is_refused_with_a_cached_plan(
        method: str, no_leaks: LeakTracker, host_dirs: HostDirs) -> None:
    work, other = host_dirs("work"), host_dirs("other")
    _new_dir(work / "in")
    _writable_file(work / "in" / "marker", "bound input\n")
    secret = f"other-{secrets.token_hex(8)}"
    (other / "marker").write_text(secret)
    (other / "marker").chmod(0o644)
    config = SandboxConfig(filesystem=FilesystemConfig(read_only_binds=(BindMount(f"{work}/in", "/tmp/in"),),
                                                       binds=(BindMount(str(work), "/tmp/job", read_only=False),)))

    async def scenario() -> tuple[object, ...]:
        async with manager(method) as m:
            before = await m.execute_command("read", ["cat", "/tmp/in/marker"], sandbox_config=config)
            swap = await m.execute_command("swap", ["sh", "-c", f"rm -r /tmp/job/in && ln -s {other} /tmp/job/in"],
                                           sandbox_config=config)
            after = await m.execute_command("read", ["cat", "/tmp/in/marker"], sandbox_config=config)
            return before, swap, after

    before, swap, after = run(scenario())
    assert before.stdout == b"bound input\n", describe_result(before)
    assert swap.outcome is Outcome.OK and swap.exit_code == 0, describe_result(swap)
    assert after.outcome is Outcome.SANDBOX_ERROR, describe_result(after)
    assert f"{work}/in" in (after.error or "")
    assert secret.encode() not in after.stdout + after.stderr


# --- paths with ':' (issue 21) ------------------------------------------------------

def test_paths_with_a_colon_can_be_bound(sandbox_caller: SandboxCaller, host_dirs: HostDirs) -> None:
    inputs, outputs = host_dirs("in") / "a:b", host_dirs("out") / "c:d"
    _new_dir(inputs, 0o755)
    _new_dir(outputs)
    (inputs / "x").write_text("through a colon\n")
    (inputs / "x").chmod(0o644)
    result = sandbox_caller.run(["--ro-bind-to", str(inputs), "/in:put", "--bind-to", str(outputs), "/out:put"],
                                ["sh", "-c", "cat '/in:put/x' > '/out:put/copy'"])
    assert result.returncode == 0, describe(result)
    assert (outputs / "copy").read_text() == "through a colon\n"


def test_a_profile_binds_a_path_with_a_colon(sandbox_caller: SandboxCaller, host_dirs: HostDirs) -> None:
    base = host_dirs("profile")
    outputs = base / "c:d"
    _new_dir(outputs)
    profile = base / "profile.toml"
    profile.write_text(f'[[filesystem.bind_mounts]]\nsource = "{outputs}"\ntarget = "/out:put"\nread_only = false\n')
    profile.chmod(0o644)
    result = sandbox_caller.run(["--profile", str(profile)], ["sh", "-c", "echo hi > '/out:put/m'"])
    assert result.returncode == 0, describe(result)
    assert (outputs / "m").read_text() == "hi\n"


# --- directories made for a mount point (issue 20, item 6) --------------------------

def test_directories_made_for_a_mount_point_cannot_be_listed(sandbox_caller: SandboxCaller,
                                                             host_dirs: HostDirs) -> None:
    # As an interpreter under /root/.pyenv would be bound: /root and /root/.pyenv are made for it.
    interpreter = host_dirs("interpreter")
    (interpreter / "marker").write_text("reachable\n")
    (interpreter / "marker").chmod(0o644)
    script = ("ls -A /root /root/.pyenv; echo ls=$?; stat -c %a /root /root/.pyenv; "
              "cat /root/.pyenv/versions/probe/marker; ls -A /etc >/dev/null; echo etc=$?")
    result = sandbox_caller.run(["--ro-bind", f"{interpreter}:/root/.pyenv/versions/probe"], ["sh", "-c", script])
    out = result.stdout.decode()
    assert result.returncode == 0, describe(result)
    assert ".pyenv" not in out and "versions" not in out, describe(result)
    assert "ls=2" in out and b"Permission denied" in result.stderr, describe(result)
    assert "111\n111\n" in out  # crossed, never listed
    assert "reachable" in out and "etc=0" in out  # the bind itself and /etc are as usual


# --- the config forms ----------------------------------------------------------------

def test_profile_bind_mounts_keep_their_order_and_reject_unknown_keys() -> None:
    config = SandboxConfig.from_dict({"filesystem": {
        "binds": ["/srv/a:/a"],
        "bind_mounts": [{"source": "/srv/x:y", "target": "/job", "read_only": False},
                        {"source": "/srv/x:y/config", "target": "/job/config"}]}})
    assert config.filesystem.all_binds == (BindMount("/srv/a", "/a", read_only=False),
                                           BindMount("/srv/x:y", "/job", read_only=False),
                                           BindMount("/srv/x:y/config", "/job/config"))
    for bad, message in [
        ({"bind_mounts": [{"source": "/a", "targt": "/b"}]}, "filesystem.bind_mounts: unknown key 'targt'"),
        ({"binds": [{"source": "/a", "read_only": True}]}, "filesystem.binds: unknown key 'read_only'"),
        ({"bind_mounts": [{"source": "/a", "read_only": "no"}]}, "filesystem.bind_mounts: read_only must be"),
        ({"bind_mounts": ["/a:/b"]}, "filesystem.bind_mounts: entries must be a table"),
        ({"bind_mounts": [{"source": "a"}]}, "filesystem.bind_mounts: source must be an absolute path"),
        ({"read_only_binds": "/srv/models"}, "filesystem.read_only_binds: must be a list"),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            SandboxConfig.from_dict({"filesystem": bad})


def test_cli_binds_keep_the_command_line_order() -> None:
    args = build_parser().parse_args(["run", "--bind", "/w:/job", "--ro-bind-to", "/w/c:d", "/job/c:d",
                                      "--ro-bind", "/m", "--bind-to", "/o", "/out:put", "--", "true"])
    assert config_from_args(args).filesystem.all_binds == (
        BindMount("/w", "/job", read_only=False), BindMount("/w/c:d", "/job/c:d"), BindMount("/m"),
        BindMount("/o", "/out:put", read_only=False))


def test_the_set_up_writes_nothing_into_a_file_bound_over_one_of_the_roots(sandbox_caller: SandboxCaller,
                                                                          host_dirs: HostDirs) -> None:
    # /etc/hosts is a file the set-up writes into the root; a writable bind on it is the user's.
    hosts = _writable_file(host_dirs("hosts") / "hosts", "10.0.0.1 from-the-user\n")
    result = sandbox_caller.run(["--bind", f"{hosts}:/etc/hosts"], ["cat", "/etc/hosts"])
    assert result.returncode == 0, describe(result)
    assert result.stdout == b"10.0.0.1 from-the-user\n", describe(result)
    assert hosts.read_text() == "10.0.0.1 from-the-user\n"  # host-side: the host file kept its content
