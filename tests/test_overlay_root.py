"""A copy-on-write root (issue 19, part 1): `filesystem.overlay` / `--overlay`.

Writes anywhere in the root succeed and land in a tmpfs inside the sandbox: the
host's /usr/lib, /etc and the image stay as they were (checked on the host).
"report" lists exactly what changed, "keep" copies it into a new host directory
without device nodes, set-id bits or symlink following; a write beyond the size
cap fails with ENOSPC, and the tmpfs is charged to the sandbox's memory cgroup.
The payload runs as uid 0 (of the sandbox) so that it owns the root's files, as
a legacy parser in a container would; its capabilities are dropped as always.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

import api_helpers
import image_helpers
from api_helpers import LeakTracker, manager, needs_root, run
from conftest import SandboxCaller
from image_helpers import BUSYBOX, make_image, snapshot
from neural_doc_flow_security.sandbox import FileChange
from neural_doc_flow_security.sandbox.config import FilesystemConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import ConfigError
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

pytestmark = [pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox"),
              pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
              pytest.mark.timeout(300)]

no_leaks = api_helpers.no_leaks  # fixtures
method = api_helpers.method
host_tmp = image_helpers.host_tmp
AS_ROOT = ["--uid", "0", "--gid", "0"]


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    return (f"exit {result.returncode}\nstdout:\n{result.stdout.decode(errors='replace')}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')}")


def mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" - ")[0].split(" ", 4)[4] for line in f)


def owned_image(host_tmp: Path, caller: SandboxCaller) -> Path:
    """A busybox image owned by the caller: its uid 0 in the sandbox owns the files."""
    image = make_image(host_tmp / "image")
    (image / "etc").mkdir()
    (image / "etc" / "motd").write_text("image motd\n")
    for path in [image, *image.rglob("*")]:
        os.chown(path, caller.uid, caller.uid, follow_symlinks=False)
    return image


def test_host_root_writes_to_usr_lib_etc_and_home_never_reach_the_host(root_caller: SandboxCaller,
                                                                       host_tmp: Path) -> None:
    name = f"ndf-overlay-{secrets.token_hex(6)}"
    before = mounts()
    script = (f"echo lib > /usr/lib/{name} && echo etc > /etc/{name} && mkdir -p $HOME && echo home > $HOME/{name} "
              f"&& rm /usr/bin/dirname && cat /usr/lib/{name} /etc/{name} $HOME/{name} && ls /usr/bin/dirname")
    result = root_caller.run([*AS_ROOT, "--overlay", "--env", "HOME=/root", "--env", "PATH=/usr/bin:/bin"],
                             ["/bin/sh", "-c", script])
    assert result.returncode != 0, describe(result)  # the final ls: dirname is gone inside
    assert result.stdout == b"lib\netc\nhome\n", describe(result)
    # host-side: nothing was written, nothing removed, no mount left
    assert not os.path.lexists(f"/usr/lib/{name}") and not os.path.lexists(f"/etc/{name}")
    assert not os.path.lexists(f"/root/{name}")
    assert os.path.exists("/usr/bin/dirname")
    assert mounts() == before


def test_an_image_root_is_copy_on_write_for_every_caller(sandbox_caller: SandboxCaller, host_tmp: Path) -> None:
    image = owned_image(host_tmp, sandbox_caller)
    before = snapshot(image)
    result_file = host_tmp / "result.json"
    host_tmp.chmod(0o777)  # the unprivileged CLI writes its JSON result here
    script = "echo new > /bin/new && echo changed >> /etc/motd && rm /bin/ls && mkdir /var && cat /etc/motd"
    result = sandbox_caller.run([*AS_ROOT, "--env", "PATH=/bin", "--image", str(image), "--overlay",
                                 "--overlay-changes", "report", "--json-result", str(result_file)],
                                ["/bin/sh", "-c", script])
    assert result.returncode == 0, describe(result)
    assert result.stdout == b"image motd\nchanged\n"
    assert snapshot(image) == before  # host-side: the image is unchanged
    changes = json.loads(result_file.read_text())["filesystem_changes"]
    assert changes["complete"] and changes["error"] is None
    assert {(c["path"], c["change"], c["kind"], c["size"]) for c in changes["changes"]} == {
        ("/bin/new", "created", "file", 4), ("/etc/motd", "modified", "file", 19),
        ("/bin/ls", "deleted", "symlink", 0), ("/var", "created", "directory", 0)}


def test_a_write_beyond_the_cap_fails_with_enospc(sandbox_caller: SandboxCaller, host_tmp: Path) -> None:
    image = owned_image(host_tmp, sandbox_caller)
    result = sandbox_caller.run([*AS_ROOT, "--env", "PATH=/bin", "--image", str(image), "--overlay",
                                 "--overlay-size", "4M"],
                                ["/bin/sh", "-c", "dd if=/dev/zero of=/big bs=1M count=16; echo rc=$?"])
    assert b"No space left on device" in result.stderr, describe(result)
    assert b"rc=1" in result.stdout
    assert not (image / "big").exists()


@needs_root
def test_report_lists_exactly_the_changes_and_nothing_leaks(method: str, no_leaks: LeakTracker,
                                                            host_tmp: Path) -> None:
    config = SandboxConfig(uid=0, gid=0, environment=(("PATH", "/usr/bin:/bin"), ("HOME", "/root")),
                           filesystem=FilesystemConfig(overlay=True, overlay_changes="report"))
    before = mounts()
    script = ("echo 12345 > /etc/created && printf ab >> /etc/hostname && rm /usr/bin/dirname && "
              "mkdir -p /usr/lib/ndf-dir && ln -s /etc/passwd /usr/lib/ndf-dir/link")

    async def scenario() -> SandboxResult:
        async with manager(method) as m:
            return await m.execute_command("cow", ["/bin/sh", "-c", script], sandbox_config=config)

    result = run(scenario())
    assert result.outcome is Outcome.OK, result
    assert result.filesystem_changes is not None and result.filesystem_changes.complete
    hostname_size = len(b"sandbox\n") + 2
    assert set(result.filesystem_changes.changes) == {
        FileChange("/etc/created", "created", "file", 6),
        FileChange("/etc/hostname", "modified", "file", hostname_size),
        FileChange("/usr/bin/dirname", "deleted", "file", 0),
        FileChange("/usr/lib/ndf-dir", "created", "directory", 0),
        FileChange("/usr/lib/ndf-dir/link", "created", "symlink", len("/etc/passwd")),
    }
    assert os.path.exists("/usr/bin/dirname") and not os.path.lexists("/usr/lib/ndf-dir")
    assert mounts() == before


@needs_root
def test_the_overlay_is_charged_to_the_sandboxs_memory_cgroup(host_tmp: Path) -> None:
    """tmpfs pages are charged to the cgroup of the process that writes them: the
    kernel's peak of the sandbox's memory cgroup counts what the payload wrote."""
    base = SandboxConfig(uid=0, gid=0, memory_limit_mb=256, environment=(("PATH", "/usr/bin:/bin"),))
    cow = SandboxConfig(uid=0, gid=0, memory_limit_mb=256, environment=(("PATH", "/usr/bin:/bin"),),
                        filesystem=FilesystemConfig(overlay=True, overlay_size_mb=128))

    async def scenario() -> tuple[SandboxResult, SandboxResult]:
        async with manager("zygote") as m:
            write = ["/bin/sh", "-c", "dd if=/dev/zero of=/usr/big bs=1M count=64 2>/dev/null"]
            return (await m.execute_command("plain", ["/bin/true"], sandbox_config=base),
                    await m.execute_command("cow", write, sandbox_config=cow))

    plain, written = run(scenario())
    assert plain.outcome is Outcome.OK and written.outcome is Outcome.OK, (plain, written)
    assert written.resource_usage.memory_peak_bytes >= 64 << 20, written.resource_usage
    assert written.resource_usage.memory_peak_bytes > plain.resource_usage.memory_peak_bytes + (48 << 20)


@needs_root
def test_keep_copies_without_set_id_bits_fifos_or_following_links(host_tmp: Path) -> None:
    aimed = host_tmp / "aimed"
    aimed.mkdir()
    kept = host_tmp / "kept"
    # seccomp off: the default profile refuses set-id bits on chmod; the copy must drop them itself
    config = SandboxConfig(uid=0, gid=0, seccomp="off", environment=(("PATH", "/usr/bin:/bin"),),
                           filesystem=FilesystemConfig(overlay=True, overlay_changes="keep",
                                                       overlay_keep_dir=str(kept)))
    script = (f"echo data > /etc/setid && chmod 6755 /etc/setid && mkfifo /etc/fifo && "
              f"ln -s {aimed} /etc/link && mkdir /etc/link2 && echo x > /etc/link2/f")

    async def scenario() -> SandboxResult:
        async with manager("fork") as m:
            return await m.execute_command("keep", ["/bin/sh", "-c", script], sandbox_config=config)

    result = run(scenario())
    assert result.outcome is Outcome.OK, result
    assert result.filesystem_changes is not None and result.filesystem_changes.kept_in == str(kept)
    st = os.stat(kept / "etc" / "setid")
    assert (kept / "etc" / "setid").read_text() == "data\n"
    assert stat.S_IMODE(st.st_mode) == 0o755  # no set-uid, no set-gid
    assert not os.path.lexists(kept / "etc" / "fifo")
    assert os.readlink(kept / "etc" / "link") == str(aimed) and os.listdir(aimed) == []
    assert (kept / "etc" / "link2" / "f").read_text() == "x\n"
    assert {c.path for c in result.filesystem_changes.changes} >= {"/etc/setid", "/etc/fifo", "/etc/link"}


@needs_root
def test_keep_as_a_tar_archive(host_tmp: Path) -> None:
    archive = host_tmp / "changes.tar"
    config = SandboxConfig(uid=0, gid=0, seccomp="off", environment=(("PATH", "/usr/bin:/bin"),),
                           filesystem=FilesystemConfig(overlay=True, overlay_changes="keep",
                                                       overlay_keep_dir=str(archive)))
    script = "echo data > /etc/setid && chmod 4755 /etc/setid && mkfifo /etc/fifo && ln -s /etc/shadow /usr/l"

    async def scenario() -> SandboxResult:
        async with manager("fork") as m:
            return await m.execute_command("keep", ["/bin/sh", "-c", script], sandbox_config=config)

    result = run(scenario())
    assert result.filesystem_changes is not None and result.filesystem_changes.kept_in == str(archive), result
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"etc", "etc/setid", "usr/l"}, members  # no fifo; /usr is a layer's root
        assert members["etc/setid"].mode == 0o755 and members["etc/setid"].isreg()
        assert members["usr/l"].issym() and members["usr/l"].linkname == "/etc/shadow"
        extracted = tar.extractfile("etc/setid")
        assert extracted is not None and extracted.read() == b"data\n"


def _bytes_on_disk(path: Path) -> int:
    if path.is_file():
        return os.stat(path).st_blocks * 512
    return sum(os.lstat(Path(top) / name).st_blocks * 512
               for top, dirs, files in os.walk(path) for name in dirs + files)


@needs_root
@pytest.mark.parametrize("kept_as", ["directory", "changes.tar"])
@pytest.mark.parametrize("script", [
    "truncate -s 64M /etc/sparse",  # a hole takes no tmpfs page
    "head -c 3M /dev/zero > /etc/data && for i in 1 2 3 4 5 6 7 8 9 10; do ln /etc/data /etc/data$i; done",
], ids=["sparse", "hard-links"])
def test_keep_writes_no_more_than_the_overlay_holds(host_tmp: Path, kept_as: str, script: str) -> None:
    """A 16 MiB overlay cannot make the host write 64 MiB (a sparse file written out
    in full, a file hard-linked ten times copied ten times): the keep stops, saying why."""
    kept = host_tmp / kept_as
    config = SandboxConfig(uid=0, gid=0, environment=(("PATH", "/usr/bin:/bin"),),
                           filesystem=FilesystemConfig(overlay=True, overlay_size_mb=16, overlay_changes="keep",
                                                       overlay_keep_dir=str(kept)))

    async def scenario() -> SandboxResult:
        async with manager("fork", config=config) as m:
            return await m.execute_command("keep", ["/bin/sh", "-c", script])

    result = run(scenario())
    assert result.outcome is Outcome.OK, result
    assert _bytes_on_disk(kept) <= 16 << 20, f"{_bytes_on_disk(kept)} bytes kept on the host"
    changes = result.filesystem_changes
    assert changes is not None and changes.kept_in is None and not changes.complete, changes
    assert "overlay_keep_dir" in (changes.error or "") and "more bytes than the overlay" in (changes.error or "")


def _write_etc_x_keeping_into(kept: Path) -> SandboxResult:
    """Run `echo x > /etc/x` as root on a copy-on-write root kept into `kept`."""
    config = SandboxConfig(uid=0, gid=0, filesystem=FilesystemConfig(
        overlay=True, overlay_changes="keep", overlay_keep_dir=str(kept)))

    async def scenario() -> SandboxResult:
        async with manager("fork", config=config) as m:
            return await m.execute_command("keep", ["/bin/sh", "-c", "echo x > /etc/x"])

    return run(scenario())


@needs_root
def test_keep_into_an_existing_directory_says_so(host_tmp: Path) -> None:
    kept = host_tmp / "kept"
    kept.mkdir()
    result = _write_etc_x_keeping_into(kept)
    assert result.filesystem_changes is not None and result.filesystem_changes.kept_in is None
    assert "overlay_keep_dir" in (result.filesystem_changes.error or "") and os.listdir(kept) == []


@needs_root
def test_keep_holds_only_what_changed(host_tmp: Path) -> None:
    """The copy held an empty usr/ (the upper layer of the /usr overlay) although
    nothing below /usr changed and the report listed nothing there."""
    kept = host_tmp / "kept"
    result = _write_etc_x_keeping_into(kept)
    assert result.outcome is Outcome.OK, result
    assert result.filesystem_changes is not None and result.filesystem_changes.kept_in == str(kept)
    assert [c.path for c in result.filesystem_changes.changes] == ["/etc/x"]
    assert os.listdir(kept) == ["etc"] and os.listdir(kept / "etc") == ["x"]


def test_overlay_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"filesystem\.overlay_changes: 'report' needs overlay = true"):
        FilesystemConfig(overlay_changes="report")
    with pytest.raises(ConfigError, match=r"filesystem\.overlay_changes: must be one of"):
        FilesystemConfig(overlay=True, overlay_changes="save")
    with pytest.raises(ConfigError, match=r"filesystem\.overlay_keep_dir"):
        FilesystemConfig(overlay=True, overlay_changes="keep")
    with pytest.raises(ConfigError, match=r"filesystem\.overlay_size_mb: must be > 0"):
        FilesystemConfig(overlay=True, overlay_size_mb=0)
    config = SandboxConfig.from_dict({"filesystem": {"overlay": True, "overlay_size_mb": 32,
                                                     "overlay_changes": "report"}})
    assert config.filesystem.overlay_mb == 32


@pytest.mark.skipif(os.geteuid() != 0, reason="checks as root and as uid 4242")
@pytest.mark.parametrize("as_user", [False, True], ids=["root", "unprivileged"])
def test_check_says_whether_a_rootless_copy_on_write_root_works(as_user: bool) -> None:
    from conftest import NDF_SANDBOX, UNPRIVILEGED_CALLER, ndf_host_env

    prefix = list(UNPRIVILEGED_CALLER.prefix) if as_user else []
    done = subprocess.run([*prefix, NDF_SANDBOX, "check", "--json"], capture_output=True, env=ndf_host_env(),
                          cwd="/tmp", timeout=120, check=False)
    report = json.loads(done.stdout)["features"]
    assert report["overlayfs"] is True
    assert report["overlayfs_in_user_namespace"] is True, report.get("overlayfs_in_user_namespace_reason")
