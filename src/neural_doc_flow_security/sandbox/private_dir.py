"""A directory of this user alone: where files that decide what a later run does
(a server's socket, a bundle's seccomp profile) may be kept under a shared /tmp."""

from __future__ import annotations

import contextlib
import os
import stat


def make_private_directory(directory: str) -> bool:
    """Make `directory` (mode 0700) if it is missing; whether it is now a real
    directory (not a symlink) owned by this process's uid that nobody else may
    enter. Never changes one that is there: another user may own it."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077
