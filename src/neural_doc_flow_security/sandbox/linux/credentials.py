"""Credentials: switch to the sandbox's unprivileged uid/gid."""

from __future__ import annotations

import os

from . import syscalls as sc


def drop_to(uid: int, gid: int, *, in_user_namespace: bool) -> None:
    """setgroups/setresgid/setresuid. The permitted capability set survives the uid
    change (keep-caps) so that the capability stage can shrink it as configured.
    In a user namespace setgroups is denied (the kernel rule for unprivileged
    gid maps) and the ids are already the mapped ones."""
    sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    if not in_user_namespace:
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"uid/gid are {os.getresuid()}/{os.getresgid()}, wanted {uid}/{gid}")
