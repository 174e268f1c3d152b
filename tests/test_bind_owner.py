"""A writable bind whose files belong to the caller (BindMount.owner = "caller",
`--bind-owner caller`): an idmapped mount as root, the user namespace's own map
without root. The evidence is on the host: who owns the files the sandbox made,
and that nothing else changed owner.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import api_helpers
from api_helpers import LeakTracker, describe, make_host_dir, manager, run
from conftest import ROOT_CALLER, ROOT_SPARE_CALLER, SandboxCaller
from neural_doc_flow_security.sandbox.cli import build_parser, config_from_args
from neural_doc_flow_security.sandbox.config import BindMount, FilesystemConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import ConfigError, UnsupportedError
from neural_doc_flow_security.sandbox.fallback.posix import check_enforceable
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

SAMPLE_PDF = Path(__file__).resolve().parents[1] / "src/neural_doc_flow_security/sandbox/samples/report.pdf"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
method = api_helpers.method
no_leaks = api_helpers.no_leaks


@pytest.fixture
def caller_dirs(sandbox_caller: SandboxCaller) -> Iterator[tuple[Path, Path]]:
    """(input, output) host directories of the caller, mode 0755: the output is
    writable by the caller only, not by a sandbox id of root's range."""
    base = Path(tempfile.mkdtemp(prefix="ndf-owner-"))
    base.chmod(0o755)
    inputs, outputs = base / "in", base / "out"
    inputs.mkdir(mode=0o755)
    outputs.mkdir(mode=0o755)
    shutil.copy(SAMPLE_PDF, inputs / "report.pdf")
    (inputs / "report.pdf").chmod(0o644)
    for path in (base, inputs, outputs, inputs / "report.pdf"):
        os.chown(path, sandbox_caller.uid, sandbox_caller.uid)
    yield inputs, outputs
    shutil.rmtree(base, ignore_errors=True)


def _ownership(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="pdftotext is not installed (poppler-utils)")
def test_pdftotext_output_belongs_to_the_caller(sandbox_caller: SandboxCaller,
                                                 caller_dirs: tuple[Path, Path]) -> None:
    inputs, outputs = caller_dirs
    done = sandbox_caller.run(["--ro-bind", f"{inputs}:/in", "--bind", f"{outputs}:/out", "--bind-owner", "caller"],
                              ["pdftotext", "/in/report.pdf", "/out/report.txt"])
    assert done.returncode == 0, done.stderr.decode()
    text = outputs / "report.txt"
    assert text.read_text().strip(), "pdftotext wrote nothing"
    assert _ownership(text) == (sandbox_caller.uid, sandbox_caller.uid)


def test_shell_output_belongs_to_the_caller(sandbox_caller: SandboxCaller, caller_dirs: tuple[Path, Path]) -> None:
    _, outputs = caller_dirs
    done = sandbox_caller.run(["--bind", f"{outputs}:/out", "--bind-owner", "caller"],
                              ["/bin/sh", "-c", "mkdir /out/sub && echo made > /out/sub/file && id -u"])
    assert done.returncode == 0, done.stderr.decode()
    # The sandbox keeps its own unprivileged uid; only the files belong to the caller.
    assert sandbox_caller.payload_uid_ok(int(done.stdout.split()[-1])) or not sandbox_caller.is_root
    assert int(done.stdout.split()[-1]) != 0
    for path in (outputs / "sub", outputs / "sub/file"):
        assert _ownership(path) == (sandbox_caller.uid, sandbox_caller.uid), path
    assert (outputs / "sub/file").read_text() == "made\n"


def test_without_owner_the_sandbox_uid_cannot_write_the_callers_directory(
        sandbox_caller: SandboxCaller, caller_dirs: tuple[Path, Path]) -> None:
    """The default (owner "sandbox"): as root the sandbox's own id cannot write a 0755
    directory of root's. Without root the sandbox's uid is the caller's already."""
    _, outputs = caller_dirs
    done = sandbox_caller.run(["--bind", f"{outputs}:/out"], ["/bin/sh", "-c", "echo x > /out/file"])
    if sandbox_caller.is_root:
        assert done.returncode != 0
        assert b"Permission denied" in done.stderr
        assert not (outputs / "file").exists()
    else:
        assert done.returncode == 0, done.stderr.decode()
        assert _ownership(outputs / "file") == (sandbox_caller.uid, sandbox_caller.uid)


@needs_root
@pytest.mark.parametrize("caller", [ROOT_CALLER, ROOT_SPARE_CALLER], ids=["root", "root-spare"])
def test_sandbox_cannot_chown_through_the_mapping(caller: SandboxCaller, tmp_path: Path) -> None:
    """Even with CAP_CHOWN the sandbox can give files no owner but the caller: no
    other id is mapped. A file of another user stays out of its reach, and nothing
    outside the bind changes owner."""
    tmp_path.chmod(0o755)
    outputs = tmp_path / "out"
    outputs.mkdir(mode=0o755)
    theirs = outputs / "theirs"
    theirs.write_text("theirs\n")
    os.chown(theirs, 4242, 4242)
    theirs.chmod(0o644)
    outside = tmp_path / "outside"
    outside.write_text("outside\n")
    before = {path: _ownership(path) for path in (tmp_path, outputs, theirs, outside)}
    script = ("echo mine > /out/mine; "
              "for id in 0 4242 12345 65534; do chown $id /out/mine && echo chowned-to-$id; "
              "chown :$id /out/mine && echo chgrp-to-$id; done; "
              "chown 0:0 /out/theirs && echo chowned-theirs; echo more >> /out/theirs && echo wrote-theirs; "
              "chown 12345 /out && echo chowned-bind; true")
    done = caller.run(["--bind", f"{outputs}:/out", "--bind-owner", "caller", "--cap", "CAP_CHOWN"],
                      ["/bin/sh", "-c", script])
    assert done.returncode == 0, done.stderr.decode()
    # Only what maps back to the caller: chown to the sandbox's own ids, which it sees as nothing else.
    assert b"chowned" not in done.stdout and b"chgrp" not in done.stdout and b"wrote" not in done.stdout, \
        done.stdout.decode()
    assert _ownership(outputs / "mine") == (0, 0)
    assert {path: _ownership(path) for path in before} == before
    assert theirs.read_text() == "theirs\n"


@needs_root
def test_a_file_system_without_idmapped_mounts_fails_closed(tmp_path: Path) -> None:
    """ramfs cannot be idmapped: the launch fails naming the field and the file
    system, and the payload never runs."""
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ndf-test", str(mount_point)], check=True)
    try:
        done = ROOT_CALLER.run(["--bind", f"{mount_point}:/out", "--bind-owner", "caller"],
                               ["/bin/sh", "-c", "echo ran > /out/ran"])
        assert done.returncode == 126, done.stderr.decode()
        assert b'owner = "caller"' in done.stderr and b"ramfs" in done.stderr, done.stderr.decode()
        assert not (mount_point / "ran").exists()
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@needs_root
def test_callable_output_belongs_to_the_caller(method: str, no_leaks: LeakTracker) -> None:
    directory = make_host_dir(no_leaks, mode=0o755)

    def write(path: str) -> int:
        with open(path, "w") as f:
            f.write("result")
        return os.getuid()

    def config(owner: str) -> SandboxConfig:
        return SandboxConfig(filesystem=FilesystemConfig(binds=(BindMount(str(directory), read_only=False,
                                                                           owner=owner),)))

    async def main() -> tuple[SandboxResult, SandboxResult]:
        async with manager(method) as m:
            mine = await m.with_options(sandbox_config=config("caller")).execute_sandboxed(
                "w", write, str(directory / "mine"))
            default = await m.with_options(sandbox_config=config("sandbox")).execute_sandboxed(
                "w", write, str(directory / "x"))
            return mine, default

    mine, default = run(main())
    assert mine.outcome is Outcome.OK, describe(mine)
    assert mine.output != 0
    assert _ownership(directory / "mine") == (0, 0)
    assert f"idmapped (owner = caller): {directory}, the sandbox's uid/gid mapped to 0/0" in mine.isolation.rootfs
    assert "idmapped" not in default.isolation.rootfs
    assert default.outcome is Outcome.ERROR, describe(default)
    assert "PermissionError" in (default.error or ""), describe(default)
    assert not (directory / "x").exists()


# --- configuration -------------------------------------------------------------------

def test_owner_is_checked_where_it_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"filesystem.binds: owner must be 'sandbox' or 'caller', got 'me'"):
        BindMount("/srv/out", read_only=False, owner="me")
    with pytest.raises(ConfigError, match=r"filesystem.read_only_binds: owner = 'caller' is for a writable bind"):
        BindMount("/srv/in", owner="caller")
    with pytest.raises(ConfigError, match=r"filesystem: a bind with owner = 'caller' needs seccomp"):
        SandboxConfig(seccomp="off", filesystem=FilesystemConfig(
            binds=(BindMount("/srv/out", read_only=False, owner="caller"),)))
    profile = tmp_path / "p.toml"
    profile.write_text('[filesystem]\nbinds = [{source = "/srv/out", owner = "caller"}]\n'
                       'bind_mounts = [{source = "/srv/b", read_only = false, owner = "caller"}]\n')
    fs = SandboxConfig.from_toml(profile).filesystem
    assert [(b.source, b.read_only, b.owner) for b in fs.all_binds] == [("/srv/out", False, "caller"),
                                                                         ("/srv/b", False, "caller")]
    profile.write_text('[filesystem]\nread_only_binds = [{source = "/srv/in", owner = "caller"}]\n')
    with pytest.raises(ConfigError, match=r"filesystem.read_only_binds: unknown key 'owner'"):
        SandboxConfig.from_toml(profile)


def test_cli_flag_sets_the_owner_of_writable_binds_only() -> None:
    args = build_parser().parse_args(["run", "--ro-bind", "/srv/in:/in", "--bind", "/srv/out:/out",
                                       "--bind-owner", "caller", "--", "true"])
    binds = config_from_args(args).filesystem.all_binds
    assert [(b.target, b.owner) for b in binds] == [("/in", "sandbox"), ("/out", "caller")]


def test_posix_fallback_refuses_owner_it_cannot_honour() -> None:
    config = SandboxConfig(filesystem=FilesystemConfig(binds=(BindMount("/srv/out", read_only=False,
                                                                        owner="caller"),)))
    with pytest.raises(UnsupportedError, match=r"filesystem.binds.owner: no idmapped binds: files the payload "
                                               r"creates belong to uid 65534, not to the caller \(uid 0\)"):
        check_enforceable(config, ["filesystem"], euid=0, egid=0, platform="darwin")
    # Without root the payload runs as the caller: its files are the caller's.
    with contextlib.suppress(UnsupportedError):
        check_enforceable(config, ["filesystem"], euid=4242, egid=4242, platform="darwin")
    assert all("filesystem.binds.owner" not in line
               for line in _requested(config, euid=4242))


def _requested(config: SandboxConfig, euid: int) -> list[str]:
    from neural_doc_flow_security.sandbox.fallback.posix import unenforced_protections

    return [name for name, _, requested in unenforced_protections(config, euid=euid, egid=euid, platform="darwin")
            if requested]
