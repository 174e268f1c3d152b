"""Root file systems for the image-root and copy-on-write tests: busybox-static
images built by hand (bin/busybox and its applets as links)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BUSYBOX = "/bin/busybox"

APPLETS = ("sh", "cat", "ls", "echo", "id", "touch", "mkdir", "rm", "dd", "grep", "stat", "true", "readlink",
           "hostname", "wc", "find", "ln")


def make_image(root: Path, *, marker: str = "from the image") -> Path:
    """A busybox root under `root` (made): bin/busybox, its applets as links, a marker file."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "marker").write_text(marker + "\n")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` (without following links): mode, size, mtime."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def host_tmp() -> Iterator[Path]:
    """A directory under /var/tmp every uid may read (the unprivileged caller too)."""
    path = Path(tempfile.mkdtemp(prefix="ndf-image-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


