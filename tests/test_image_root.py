"""Image roots (issue 19, part 3): `filesystem.image` / `--image DIR` makes an
unpacked root file system (or an OCI bundle's root.path) the sandbox's read-only
root, with a fresh /proc, a minimal /dev, a private /tmp and /etc files made
where the image lacks them.

The images are built by hand from busybox-static (bin/busybox and its links) in
directories under /var/tmp that every uid may read. The image is untrusted
content: its symlinks must never point the set-up (root, before pivot_root) at a
host path. Evidence is on the host: the image directory kept its entries, the
directory a planted link aims at got none, the host's marker never showed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import api_helpers
import image_helpers
from api_helpers import LeakTracker, manager, needs_root, run
from conftest import SandboxCaller
from image_helpers import BUSYBOX, make_image, snapshot
from neural_doc_flow_security.sandbox.config import BindMount, FilesystemConfig, SandboxConfig
from neural_doc_flow_security.sandbox.errors import ConfigError
from neural_doc_flow_security.sandbox.result import Outcome

pytestmark = [pytest.mark.skipif(os.uname().sysname != "Linux", reason="Linux sandbox"),
              pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
              pytest.mark.timeout(300)]


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    return (f"exit {result.returncode}\nstdout:\n{result.stdout.decode(errors='replace')}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')}")


IMAGE_ENV = ["--env", "PATH=/bin"]
no_leaks = api_helpers.no_leaks  # fixtures of the API probes
host_tmp = image_helpers.host_tmp
method = api_helpers.method


def test_an_image_is_the_root_read_only_with_proc_dev_tmp_and_etc(sandbox_caller: SandboxCaller,
                                                                   host_tmp: Path) -> None:
    image = make_image(host_tmp / "image")
    before = snapshot(image)
    script = ("cat /marker; ls /usr 2>&1; ls /dev; grep -c root /etc/passwd; cat /etc/hostname; "
              "test -r /proc/self/status && echo proc-ok; echo x > /tmp/t && echo tmp-ok; "
              "touch /bin/new || echo refused; touch /new || echo refused; id -u")
    result = sandbox_caller.run([*IMAGE_ENV, "--image", str(image)], ["/bin/sh", "-c", script])
    assert result.returncode == 0, describe(result)
    out = result.stdout.decode()
    assert "from the image" in out
    assert "/usr: No such file or directory" in out  # the host's system directories are not there
    assert "null" in out and "urandom" in out and "proc-ok" in out and "tmp-ok" in out
    assert out.count("refused") == 2, out
    assert "sandbox\n" in out  # the synthesized /etc/hostname (the image has no /etc)
    # host-side: the set-up wrote nothing into the image (mount points, /etc files)
    assert snapshot(image) == before


def test_the_images_own_etc_files_win_over_the_synthesized_ones(root_caller: SandboxCaller,
                                                                  host_tmp: Path) -> None:
    image = make_image(host_tmp / "image")
    (image / "etc").mkdir(mode=0o755)
    (image / "etc" / "hostname").write_text("image-host\n")
    (image / "etc" / "hostname").chmod(0o644)
    result = root_caller.run([*IMAGE_ENV, "--image", str(image)],
                             ["/bin/sh", "-c", "cat /etc/hostname; grep -c '^root:' /etc/passwd"])
    assert result.returncode == 0, describe(result)
    assert result.stdout.decode().split() == ["image-host", "1"]


def test_a_bundle_runs_its_root_path(sandbox_caller: SandboxCaller, host_tmp: Path) -> None:
    bundle = host_tmp / "bundle"
    make_image(bundle / "rootfs", marker="bundle root")
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}))
    (bundle / "config.json").chmod(0o644)
    result = sandbox_caller.run([*IMAGE_ENV, "--image", str(bundle)], ["/bin/cat", "/marker"])
    assert result.returncode == 0, describe(result)
    assert result.stdout == b"bundle root\n"


def test_a_bundle_root_path_outside_the_bundle_is_refused(host_tmp: Path) -> None:
    bundle = host_tmp / "bundle"
    make_image(bundle / "rootfs")
    for path in ("../other", "/"):
        (bundle / "config.json").write_text(json.dumps({"root": {"path": path}}))
        config = SandboxConfig(filesystem=FilesystemConfig(image=str(bundle)))
        from neural_doc_flow_security.sandbox.launch.plan import plan_launch

        with pytest.raises(ConfigError, match=r"filesystem\.image: root\.path"):
            plan_launch(config)


def test_a_bundle_root_path_through_a_symlink_does_not_reach_the_host(sandbox_caller: SandboxCaller,
                                                                      host_tmp: Path) -> None:
    aimed = make_image(host_tmp / "aimed", marker="host directory the link aims at")
    bundle = host_tmp / "bundle"
    bundle.mkdir()
    bundle.chmod(0o755)
    (bundle / "rootfs").symlink_to(aimed)
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    (bundle / "config.json").chmod(0o644)
    result = sandbox_caller.run([*IMAGE_ENV, "--image", str(bundle)], ["/bin/cat", "/marker"])
    assert result.returncode == 126, describe(result)
    assert b"symlink" in result.stderr, describe(result)
    assert b"host directory" not in result.stdout


def test_symlinks_in_the_image_cannot_lead_the_set_up_to_host_paths(sandbox_caller: SandboxCaller,
                                                                     host_tmp: Path) -> None:
    """The image's `data` links to a host directory: a bind onto /data/x must not
    make its mount point there (the set-up runs as root, before pivot_root)."""
    image = make_image(host_tmp / "image")
    aimed = host_tmp / "aimed"
    aimed.mkdir()
    aimed.chmod(0o777)
    source = host_tmp / "source"
    source.mkdir()
    source.chmod(0o755)
    (image / "data").symlink_to(aimed)
    result = sandbox_caller.run([*IMAGE_ENV, "--image", str(image), "--ro-bind", f"{source}:/data/x"], ["/bin/true"])
    assert result.returncode == 126, describe(result)
    assert b"/data/x" in result.stderr and b"symlink" in result.stderr, describe(result)
    assert os.listdir(aimed) == []  # host-side: no mount point was made through the link


def test_an_image_tmp_that_is_a_symlink_is_refused(sandbox_caller: SandboxCaller, host_tmp: Path) -> None:
    image = make_image(host_tmp / "image")
    aimed = host_tmp / "aimed"
    aimed.mkdir()
    aimed.chmod(0o777)
    (image / "tmp").symlink_to(aimed)
    result = sandbox_caller.run([*IMAGE_ENV, "--image", str(image)], ["/bin/sh", "-c", "echo x > /tmp/leak"])
    assert result.returncode == 126, describe(result)
    assert b"/tmp" in result.stderr and b"symlink" in result.stderr, describe(result)
    assert os.listdir(aimed) == []


def test_a_link_in_the_image_resolves_inside_the_sandbox_not_on_the_host(sandbox_caller: SandboxCaller,
                                                                         host_tmp: Path) -> None:
    image = make_image(host_tmp / "image")
    aimed = host_tmp / "aimed"
    aimed.mkdir()
    aimed.chmod(0o755)
    (aimed / "secret").write_text("host secret\n")
    (aimed / "secret").chmod(0o644)
    (image / "etc").symlink_to(aimed)  # /etc of the image points at a host directory
    result = sandbox_caller.run([*IMAGE_ENV, "--image", str(image)],
                                ["/bin/sh", "-c", f"cat /etc/secret {aimed}/secret; readlink /etc"])
    assert b"host secret" not in result.stdout, describe(result)
    assert str(aimed).encode() in result.stdout  # the link is there, and leads nowhere inside
    assert sorted(os.listdir(aimed)) == ["secret"]


def test_a_bind_nested_in_a_writable_one_leaves_nothing_in_the_hosts_directory(sandbox_caller: SandboxCaller,
                                                                               host_tmp: Path) -> None:
    """As with the host-derived root: the set-up makes no mount point inside a
    writable bind (it would stay in the caller's directory)."""
    image = make_image(host_tmp / "image")
    work, models = host_tmp / "work", host_tmp / "models"
    for directory in (work, models):
        directory.mkdir()
        directory.chmod(0o777)
    nested = [*IMAGE_ENV, "--image", str(image), "--bind", f"{work}:/job", "--ro-bind", f"{models}:/job/in/models"]
    missing = sandbox_caller.run(nested, ["/bin/true"])
    assert missing.returncode == 126, describe(missing)
    assert b"/job/in/models" in missing.stderr, describe(missing)
    assert os.listdir(work) == []  # host-side


def test_a_writable_bind_and_landlock_follow_the_image_root(root_caller: SandboxCaller, host_tmp: Path) -> None:
    image = make_image(host_tmp / "image")
    out_dir = host_tmp / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)
    result = root_caller.run([*IMAGE_ENV, "--image", str(image), "--bind", f"{out_dir}:/out", "--landlock", "required",
                              "--json-result", str(host_tmp / "result.json")],
                             ["/bin/sh", "-c", "echo written > /out/f && cat /marker"])
    assert result.returncode == 0, describe(result)
    assert (out_dir / "f").read_text() == "written\n"
    isolation = json.loads((host_tmp / "result.json").read_text())["isolation"]
    assert isolation["landlock"].startswith("ABI") and isolation["rootfs"].startswith(f"image {image}")


def test_a_python_callable_cannot_run_in_an_image_root(host_tmp: Path) -> None:
    with pytest.raises(ConfigError, match=r"filesystem\.image"):
        FilesystemConfig(image=str(host_tmp), python=True)


def test_image_config_errors_name_the_field(host_tmp: Path) -> None:
    with pytest.raises(ConfigError, match=r"filesystem\.image: must be an absolute path"):
        FilesystemConfig(image="relative/dir")
    with pytest.raises(ConfigError, match=r"filesystem\.image: not a directory"):
        from neural_doc_flow_security.sandbox.launch.plan import plan_launch

        plan_launch(SandboxConfig(filesystem=FilesystemConfig(image=str(host_tmp / "missing"))))
    config = SandboxConfig.from_dict({"filesystem": {"image": str(host_tmp), "overlay": True}})
    assert config.filesystem.image == str(host_tmp) and config.filesystem.overlay


@needs_root
def test_api_execute_command_in_an_image(method: str, no_leaks: LeakTracker, host_tmp: Path) -> None:
    image = make_image(host_tmp / "image")
    out_dir = host_tmp / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)
    config = SandboxConfig(environment=(("PATH", "/bin"),), filesystem=FilesystemConfig(
        image=str(image), bind_mounts=(BindMount(str(out_dir), "/out", read_only=False),)))

    async def scenario() -> list[object]:
        async with manager(method) as m:
            # twice: the second launch may take a spare that built the same root ahead
            return [await m.execute_command("img", ["/bin/sh", "-c", "cat /marker; ls /usr || echo no-usr"],
                                            sandbox_config=config) for _ in range(2)]

    for result in run(scenario()):
        assert result.outcome is Outcome.OK, result  # type: ignore[attr-defined]
        assert result.stdout == b"from the image\nno-usr\n", result  # type: ignore[attr-defined]
