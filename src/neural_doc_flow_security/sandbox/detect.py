"""What this host can enforce, probed once.

`detect_features()` returns a frozen `HostFeatures` report. On Linux every answer
comes from the kernel: namespaces are tried for real by unshare(2) in a forked,
throw-away child (nothing in the calling process changes), Landlock, clone3 and
pidfd_open by harmless syscalls, seccomp by prctl, capabilities from
/proc/self/status, cgroups from the cgroup backends' own probe. On macOS and
Windows it reports the OS and what the fallback backend can enforce, without
touching any Linux-only call.

`missing_for(config, features)` is the isolation floor: the protections a config
requires that this host cannot provide, one sentence each. The launcher refuses
to start a sandbox while that list is not empty; `ndf-sandbox check` prints
`format_report()` and fails when the default config is not fully enforceable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno as errno_mod
import functools
import json
import os
import platform
import select
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import CAPABILITIES, NOBODY, SandboxConfig

if TYPE_CHECKING:
    from .linux.cgroups.base import CgroupSupport
    from .linux.cgroups.delegation import Delegation

__all__ = [
    "HostFeatures",
    "NamespaceSupport",
    "detect_features",
    "format_report",
    "missing_for",
    "probe_features",
    "report_to_dict",
]

# include/uapi/linux/sched.h
NAMESPACE_FLAGS: dict[str, int] = {
    "user": 0x10000000,
    "pid": 0x20000000,
    "net": 0x40000000,
    "mnt": 0x00020000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "cgroup": 0x02000000,
}
_NAMESPACE_WORDS = {
    "user": "a user namespace",
    "pid": "a PID namespace",
    "net": "a network namespace",
    "mnt": "a mount namespace",
    "uts": "a UTS (hostname) namespace",
    "ipc": "an IPC namespace",
    "cgroup": "a cgroup namespace",
}
# Generic syscall numbers (the same on every architecture but alpha).
_SYS_PIDFD_OPEN = 434
_SYS_CLONE3 = 435
_PR_GET_SECCOMP = 21
_PR_GET_NO_NEW_PRIVS = 39
_CAP_SYS_ADMIN = CAPABILITIES["CAP_SYS_ADMIN"]
_PROBE_TIMEOUT_SECONDS = 10.0

@dataclass(frozen=True)
class NamespaceSupport:
    """Whether this process can create one namespace type.

    `creatable` is true when unshare(2) of that type worked, either alone or (for a
    non-root process) together with a new user namespace; `needs_user_ns` says it
    only worked the second way, and `lacks` names the capability whose absence
    made the first way fail. `reason` explains a failure. A network namespace
    counts only if its loopback could be brought up too (as the sandbox does).
    """

    name: str
    creatable: bool
    needs_user_ns: bool = False
    errno: int = 0
    reason: str = ""
    lacks: str = "CAP_SYS_ADMIN"


@dataclass(frozen=True)
class HostFeatures:
    """What this host can enforce. Linux-only fields are empty/False elsewhere.

    `unprivileged_user_namespaces` is None when it was not probed (not root, so the
    `namespaces` entry for "user" already answers the question for this process).
    `cgroups` is None when the cgroup probe could not run; `cgroups_reason` says why.
    `fallback` names the backend used where Linux isolation is absent and
    `fallback_enforces` what it can still enforce.
    """

    os: str
    platform: str
    machine: str
    kernel_release: str
    euid: int | None
    is_root: bool
    in_container: bool = False
    container_hints: tuple[str, ...] = ()
    namespaces: tuple[NamespaceSupport, ...] = ()
    unprivileged_user_namespaces: bool | None = None
    unprivileged_user_namespaces_reason: str = ""
    user_namespace_knobs: tuple[tuple[str, str], ...] = ()
    seccomp: bool = False
    seccomp_mode: int | None = None
    seccomp_actions: tuple[str, ...] = ()
    seccomp_reason: str = ""
    no_new_privs: bool = False
    landlock_abi: int = 0
    landlock_reason: str = ""
    cap_bounding: int = 0
    cap_effective: int = 0
    has_cap_sys_admin: bool = False
    caps_not_in_bounding: tuple[str, ...] = ()
    cgroups: CgroupSupport | None = None
    cgroups_reason: str = ""
    # A cgroup v2 subtree delegated to this process (systemd Delegate=yes), and what it offers.
    cgroup_delegation: Delegation | None = None
    pidfd_open: bool = False
    clone3: bool = False
    overlayfs: bool = False
    # A copy-on-write root (filesystem.overlay) without root: overlayfs in a user
    # namespace (kernel >= 5.11); None when not probed.
    overlayfs_in_user_namespace: bool | None = None
    overlayfs_in_user_namespace_reason: str = ""
    fallback: str = ""
    fallback_enforces: tuple[str, ...] = ()
    network_policy: str = ""  # how a network policy is enforced here ("": not at all)
    network_policy_reason: str = ""

    def namespace(self, name: str) -> NamespaceSupport | None:
        """The probe result for namespace `name` ("user", "net", ...), or None."""
        return next((ns for ns in self.namespaces if ns.name == name), None)


# --------------------------------------------------------------------------- probing


@functools.cache
def detect_features() -> HostFeatures:
    """Probe the host once per process; later calls return the same report.

    Tests (or a long-lived host after a sysctl change) call
    `detect_features.cache_clear()` or use `probe_features()` for a fresh probe.
    """
    return probe_features()


def probe_features() -> HostFeatures:
    """Probe the host now (uncached)."""
    if sys.platform == "linux":
        return _probe_linux()
    return _probe_other()


def _probe_other() -> HostFeatures:
    euid: int | None = None
    if sys.platform != "win32":
        euid = os.geteuid()
    if sys.platform == "win32":
        fallback = "windows-job-objects"
        enforces: tuple[str, ...] = (
            "memory limit (job memory)", "process limit (active processes)",
            "CPU quota (hard-capped CPU rate)", "wall timeout", "kill of the whole process tree",
            "privileges dropped (restricted token)", "UI restrictions",
        )
    else:
        fallback = "posix-rlimits"
        enforces = (
            "wall timeout", "CPU time (RLIMIT_CPU)", "open files (RLIMIT_NOFILE)",
            "kill of the process group",
        )
    return HostFeatures(
        os=sys.platform,
        platform=platform.platform(),
        machine=platform.machine(),
        kernel_release=platform.release(),
        euid=euid,
        is_root=euid == 0,
        fallback=fallback,
        fallback_enforces=enforces,
        cgroups_reason="cgroups are Linux-only",
        seccomp_reason="seccomp is Linux-only",
        landlock_reason="Landlock is Linux-only",
        unprivileged_user_namespaces_reason="namespaces are Linux-only",
    )


@functools.cache
def _libc() -> ctypes.CDLL:
    # Cached, and first called in the parent, so the probe children never run
    # find_library (which spawns ldconfig) after fork.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _errno_text(err: int) -> str:
    name = errno_mod.errorcode.get(err, str(err))
    return f"{name} ({os.strerror(err)})"


def _probe_linux() -> HostFeatures:
    if sys.platform != "linux":
        raise OSError("Linux-only probe")
    libc = _libc()
    euid = os.geteuid()
    knobs = _user_namespace_knobs()
    ns_results = _run_in_child(_namespace_probe_child, {})
    namespaces = _namespace_support(ns_results, knobs, euid)
    unpriv: bool | None = None
    unpriv_reason = ""
    if euid == 0:
        result = _run_in_child(_unprivileged_userns_probe_child, {})
        unpriv = bool(result.get("ok"))
        if not unpriv:
            unpriv_reason = _user_namespace_reason(int(result.get("errno", 0)), knobs, unprivileged=True)
    seccomp, seccomp_mode, actions, seccomp_reason = _probe_seccomp(libc)
    landlock_abi, landlock_reason = _probe_landlock()
    cap_bnd, cap_eff = _capabilities()
    cgroups, cgroups_reason = _probe_cgroups()
    in_container, hints = _container_hints()
    delegation = _probe_delegation()
    overlay_userns = _run_in_child(_overlay_in_userns_probe_child, {}) if _probe_overlayfs() else {}
    from .linux.netpolicy import available_method

    policy_method, policy_reason = available_method(euid)
    return HostFeatures(
        os="linux",
        platform=platform.platform(),
        machine=platform.machine(),
        kernel_release=platform.release(),
        euid=euid,
        is_root=euid == 0,
        in_container=in_container,
        container_hints=hints,
        namespaces=namespaces,
        unprivileged_user_namespaces=unpriv,
        unprivileged_user_namespaces_reason=unpriv_reason,
        user_namespace_knobs=tuple(sorted(knobs.items())),
        seccomp=seccomp,
        seccomp_mode=seccomp_mode,
        seccomp_actions=actions,
        seccomp_reason=seccomp_reason,
        no_new_privs=libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) >= 0,
        landlock_abi=landlock_abi,
        landlock_reason=landlock_reason,
        cap_bounding=cap_bnd,
        cap_effective=cap_eff,
        has_cap_sys_admin=bool(cap_eff >> _CAP_SYS_ADMIN & 1),
        caps_not_in_bounding=_caps_missing(cap_bnd),
        cgroups=cgroups,
        cgroups_reason=cgroups_reason,
        cgroup_delegation=delegation,
        pidfd_open=_probe_pidfd_open(),
        clone3=_probe_clone3(libc),
        overlayfs=_probe_overlayfs(),
        overlayfs_in_user_namespace=bool(overlay_userns.get("ok")) if overlay_userns else None,
        overlayfs_in_user_namespace_reason=str(overlay_userns.get("reason", overlay_userns.get("error", ""))),
        network_policy=policy_method,
        network_policy_reason=policy_reason,
    )


def _run_in_child(probe: Any, arg: dict[str, Any]) -> dict[str, Any]:
    """Fork, run `probe(arg) -> dict` in the child, return its JSON answer.

    The child only makes syscalls and exits with os._exit, so forking from a
    threaded host is safe enough; a child that does not answer in time is killed.
    """
    if sys.platform != "linux":
        raise OSError("Linux-only probe")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_fd)
            answer = json.dumps(probe(arg)).encode()
            os.write(write_fd, answer)
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            try:
                os.write(write_fd, json.dumps({"error": repr(e)}).encode())
            finally:
                os._exit(1)
        os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    try:
        while True:
            poller = select.poll()  # not select(): the fd may be above FD_SETSIZE
            poller.register(read_fd, select.POLLIN)
            if not poller.poll(_PROBE_TIMEOUT_SECONDS * 1000):
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    try:
        decoded = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        decoded = {}
    return decoded if isinstance(decoded, dict) else {}


def _namespace_probe_child(_: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - child
    """Unshare each namespace type alone, then a user namespace, then retry the
    failures inside it (what a non-root sandbox would do)."""
    libc = _libc()
    results: dict[str, Any] = {}
    others = [n for n in NAMESPACE_FLAGS if n != "user"]
    for name in others:
        ok = libc.unshare(NAMESPACE_FLAGS[name]) == 0
        err = 0 if ok else ctypes.get_errno()
        if ok and name == "net":  # the sandbox brings lo up: that needs CAP_NET_ADMIN
            err = _loopback_up_errno()
            ok = err == 0
            results["net_loopback_errno"] = err
        results[name] = [ok, err, False]
    user_ok = libc.unshare(NAMESPACE_FLAGS["user"]) == 0
    results["user"] = [user_ok, 0 if user_ok else ctypes.get_errno(), False]
    if user_ok:
        for name in others:
            if (not results[name][0] and libc.unshare(NAMESPACE_FLAGS[name]) == 0
                    and (name != "net" or _loopback_up_errno() == 0)):
                results[name] = [True, 0, True]
    return results


def _loopback_up_errno() -> int:  # pragma: no cover - child
    from .linux.network import _bring_up_loopback

    try:
        _bring_up_loopback()
    except OSError as e:
        return e.errno or errno_mod.EPERM
    return 0


def _unprivileged_userns_probe_child(_: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
    """As root: drop to nobody, then try to create a user namespace."""
    if sys.platform != "linux":
        raise OSError("Linux-only probe")
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    libc = _libc()
    ok = libc.unshare(NAMESPACE_FLAGS["user"]) == 0
    return {"ok": ok, "errno": 0 if ok else ctypes.get_errno()}


def _overlay_in_userns_probe_child(_: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - child
    """As a non-root user (root drops to nobody first): a user and mount namespace,
    a tmpfs, and on it an overlayfs with an upper layer (userxattr), as a rootless
    copy-on-write root needs."""
    if sys.platform != "linux":
        raise OSError("Linux-only probe")
    libc = _libc()
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)  # the uid change cleared it: /proc/self is ours again
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(NAMESPACE_FLAGS["user"] | NAMESPACE_FLAGS["mnt"]) != 0:
        return {"ok": False, "reason": f"no user and mount namespace: {_errno_text(ctypes.get_errno())}"}
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)
    steps = ((None, "/", None, _MS_REC | _MS_PRIVATE, None), ("tmpfs", "/tmp", "tmpfs", 0, "size=1m"))
    for source, target, fstype, flags, data in steps:
        if libc.mount(_c(source), _c(target), _c(fstype), flags, _c(data)) != 0:
            return {"ok": False, "reason": f"mount {target}: {_errno_text(ctypes.get_errno())}"}
    for name in ("lower", "upper", "work", "merged"):
        os.mkdir(f"/tmp/{name}")
    options = "lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work,userxattr"
    if libc.mount(b"overlay", b"/tmp/merged", b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        return {"ok": False, "reason": f"overlayfs in a user namespace: {_errno_text(err)} (needs kernel >= 5.11)"}
    return {"ok": True}


def _c(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


_MS_REC = 0x4000
_PR_SET_DUMPABLE = 4
_MS_PRIVATE = 1 << 18


def _user_namespace_knobs() -> dict[str, str]:
    """The sysctls that can switch user namespaces off (those present here)."""
    knobs: dict[str, str] = {}
    for key, path in (
        ("user.max_user_namespaces", "/proc/sys/user/max_user_namespaces"),
        ("kernel.unprivileged_userns_clone", "/proc/sys/kernel/unprivileged_userns_clone"),
        ("kernel.apparmor_restrict_unprivileged_userns",
         "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
    ):
        value = _read(path)
        if value is not None:
            knobs[key] = value.strip()
    return knobs


def _user_namespace_reason(err: int, knobs: dict[str, str], *, unprivileged: bool) -> str:
    """Name the knob that blocks user namespaces, else explain the errno."""
    if knobs.get("user.max_user_namespaces") == "0":
        return "user namespaces are disabled by user.max_user_namespaces=0"
    if unprivileged and knobs.get("kernel.unprivileged_userns_clone") == "0":
        return ("user namespaces for non-root users are disabled by "
                "kernel.unprivileged_userns_clone=0")
    if unprivileged and knobs.get("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return ("user namespaces for non-root users are disabled by "
                "kernel.apparmor_restrict_unprivileged_userns=1")
    if err == errno_mod.ENOSPC:
        limit = knobs.get("user.max_user_namespaces", "?")
        return (f"the user namespace limit is reached (user.max_user_namespaces={limit} "
                "here or in an enclosing user namespace)")
    if err == errno_mod.EUSERS:
        return "the user namespace nesting limit (32 levels) is reached"
    if err == errno_mod.EINVAL:
        return "unshare(CLONE_NEWUSER) failed with EINVAL: the kernel lacks CONFIG_USER_NS"
    if err == errno_mod.EPERM:
        return ("unshare(CLONE_NEWUSER) failed with EPERM: a seccomp filter or LSM of the "
                "container/host forbids it, or the process runs in a chroot")
    return f"unshare(CLONE_NEWUSER) failed: {_errno_text(err)}" if err else "probe failed"


def _namespace_support(
    results: dict[str, Any], knobs: dict[str, str], euid: int
) -> tuple[NamespaceSupport, ...]:
    out = []
    probe_error = results.get("error")
    for name in NAMESPACE_FLAGS:
        entry = results.get(name)
        if not isinstance(entry, list) or len(entry) != 3:
            reason = f"namespace probe failed: {probe_error}" if probe_error else "namespace probe failed"
            out.append(NamespaceSupport(name, False, reason=reason))
            continue
        ok, err, via_user = bool(entry[0]), int(entry[1]), bool(entry[2])
        loopback_err = int(results.get("net_loopback_errno") or 0) if name == "net" else 0
        if loopback_err:
            lo = (f"bringing its loopback up failed ({_errno_text(loopback_err)}: this process lacks "
                  "CAP_NET_ADMIN; a container needs --cap-add NET_ADMIN)")
            reason = (f"only together with a new user namespace: without one, {lo}" if ok
                      else f"unshare works, but {lo}")
            out.append(NamespaceSupport(name, ok, needs_user_ns=via_user, errno=0 if ok else loopback_err,
                                        reason=reason, lacks="CAP_NET_ADMIN"))
            continue
        if ok:
            reason = "only together with a new user namespace" if via_user else ""
        elif name == "user":
            reason = _user_namespace_reason(err, knobs, unprivileged=euid != 0)
        elif err == errno_mod.EPERM:
            reason = ("unshare failed with EPERM: this process lacks CAP_SYS_ADMIN and cannot "
                      "create a user namespace to gain it")
        elif err == errno_mod.EINVAL:
            reason = "unshare failed with EINVAL: the kernel was built without this namespace type"
        elif err == errno_mod.ENOSPC:
            reason = "unshare failed with ENOSPC: the per-user namespace limit is reached"
        else:
            reason = f"unshare failed: {_errno_text(err)}"
        out.append(NamespaceSupport(name, ok, needs_user_ns=via_user, errno=err, reason=reason))
    return tuple(out)


def _probe_seccomp(libc: ctypes.CDLL) -> tuple[bool, int | None, tuple[str, ...], str]:
    mode = libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0)
    if mode < 0:
        return False, None, (), f"prctl(PR_GET_SECCOMP) failed: {_errno_text(ctypes.get_errno())}"
    actions_text = _read("/proc/sys/kernel/seccomp/actions_avail")
    if actions_text is None:
        return False, mode, (), "no /proc/sys/kernel/seccomp/actions_avail: kernel lacks seccomp filters"
    actions = tuple(actions_text.split())
    reason = "this process already runs under a seccomp filter (filters stack)" if mode == 2 else ""
    if "errno" not in actions or "kill_process" not in actions:
        return False, mode, actions, "the kernel lacks the errno/kill_process seccomp actions"
    return True, mode, actions, reason


def _probe_landlock() -> tuple[int, str]:
    from .linux import landlock  # the one probe, shared with the launch plan

    return landlock.abi()


def _capabilities() -> tuple[int, int]:
    status = _read("/proc/self/status") or ""
    values = {"CapBnd": 0, "CapEff": 0}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in values:
            values[key] = int(value.strip(), 16)
    return values["CapBnd"], values["CapEff"]


def _caps_missing(cap_bounding: int) -> tuple[str, ...]:
    last_text = _read("/proc/sys/kernel/cap_last_cap")
    last = int(last_text) if last_text and last_text.strip().isdigit() else max(CAPABILITIES.values())
    return tuple(name for name, bit in CAPABILITIES.items()
                 if bit <= last and not cap_bounding >> bit & 1)


def _probe_cgroups() -> tuple[CgroupSupport | None, str]:
    try:
        from .linux.cgroups import probe_cgroups
    except ImportError as e:
        return None, f"cgroup support unknown: the cgroup probe is not available ({e})"
    try:
        support: CgroupSupport = probe_cgroups()
    except Exception as e:  # noqa: BLE001 - a broken probe must not break the whole report
        return None, f"cgroup support unknown: the cgroup probe failed ({e!r})"
    return support, ""


def _probe_delegation() -> Delegation | None:
    try:
        from .linux.cgroups.delegation import detect_delegation

        return detect_delegation()
    except (ImportError, OSError, ValueError):  # no cgroup module, no /proc: nothing to tell
        return None


def _probe_pidfd_open() -> bool:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return False
    try:
        fd = pidfd_open(os.getpid(), 0)
    except OSError:
        return False
    os.close(fd)
    return True


def _probe_clone3(libc: ctypes.CDLL) -> bool:
    # clone3(NULL, 0) never creates a process: a kernel that has clone3 rejects the
    # size with EINVAL; ENOSYS means no clone3 (old kernel or a container's filter).
    libc.syscall(_SYS_CLONE3, ctypes.c_void_p(None), ctypes.c_size_t(0))
    return ctypes.get_errno() != errno_mod.ENOSYS


def _probe_overlayfs() -> bool:
    text = _read("/proc/filesystems") or ""
    return any(line.split()[-1:] == ["overlay"] for line in text.splitlines())


def _container_hints() -> tuple[bool, tuple[str, ...]]:
    hints = []
    if os.path.exists("/.dockerenv"):
        hints.append("/.dockerenv exists")
    if os.path.exists("/run/.containerenv"):
        hints.append("/run/.containerenv exists (podman)")
    cgroup_text = _read("/proc/1/cgroup") or ""
    for word in ("docker", "kubepods", "containerd", "libpod", "lxc"):
        if word in cgroup_text:
            hints.append(f"/proc/1/cgroup mentions {word}")
            break
    environ = _read("/proc/1/environ") or ""
    for var in environ.split("\0"):
        if var.startswith("container="):
            hints.append(f"pid 1 has {var}")
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/" and " - " in line:
            fstype = line.split(" - ", 1)[1].split()[0]
            if fstype == "overlay":
                hints.append("the root file system is an overlay mount")
    return bool(hints), tuple(hints)


# --------------------------------------------------------------------------- floor check


def missing_for(config: SandboxConfig, features: HostFeatures) -> list[str]:
    """The protections `config` requires that this host cannot provide.

    Each entry is one sentence naming the protection (with its config field) and
    why it is unavailable. An empty list means the isolation floor is met.
    """
    if features.os != "linux":
        return _missing_non_linux(config, features)
    missing: list[str] = []
    euid = features.euid if features.euid is not None else 0
    user_wanted = config.namespaces.user_enabled(euid)
    user = features.namespace("user")
    if user_wanted and (user is None or not user.creatable):
        why = user.reason if user else "it was not probed"
        because = (" because the sandbox runs as a non-root user"
                   if config.namespaces.user is None else "")
        missing.append(f"namespaces.user: {_NAMESPACE_WORDS['user']} is required{because}, "
                       f"but this process cannot create one: {why}")
    for name in ("pid", "net", "mnt", "uts", "ipc", "cgroup"):
        if not getattr(config.namespaces, name):
            continue
        ns = features.namespace(name)
        if ns is None or not ns.creatable:
            why = ns.reason if ns else "it was not probed"
            missing.append(f"namespaces.{name}: {_NAMESPACE_WORDS[name]} is required, "
                           f"but this process cannot create one: {why}")
        elif ns.needs_user_ns and not user_wanted:
            missing.append(f"namespaces.{name}: {_NAMESPACE_WORDS[name]} can only be created "
                           f"together with a user namespace (this process lacks {ns.lacks}), "
                           "but namespaces.user = false")
    if config.uid_or_nobody != euid and euid != 0 and not (
        user_wanted and user is not None and user.creatable
    ):
        missing.append(f"uid: switching to uid {config.uid_or_nobody}/gid {config.gid_or_nobody} needs root or a "
                       "user namespace, and neither is available")
    if config.seccomp != "off" and not features.seccomp:
        missing.append(f"seccomp: a seccomp filter ({config.seccomp!r}) is required, "
                       f"but {features.seccomp_reason or 'seccomp is unavailable'}")
    if config.landlock == "required" and not features.landlock_abi:
        missing.append(f"landlock: a Landlock ruleset is required, but {features.landlock_reason}")
    if (config.filesystem.overlay or config.filesystem.image) and not features.overlayfs:
        missing.append("filesystem.overlay/image: an overlayfs root is required, but overlayfs is not in "
                       "/proc/filesystems")
    elif config.filesystem.overlay and user_wanted and features.overlayfs_in_user_namespace is False:
        missing.append("filesystem.overlay: a copy-on-write root is required, but "
                       f"{features.overlayfs_in_user_namespace_reason}")
    if config.no_new_privs and not features.no_new_privs:
        missing.append("no_new_privs: required, but prctl(PR_GET_NO_NEW_PRIVS) is not supported")
    if config.network is not None and config.network.method != "proxy" and not features.network_policy:
        missing.append(f"network: a network policy is required, but {features.network_policy_reason}")
    missing.extend(_missing_limits(config, features, user_wanted))
    return missing


def _missing_limits(config: SandboxConfig, features: HostFeatures, user_ns: bool) -> list[str]:
    """The limits neither a cgroup nor (where allowed) an rlimit can enforce here."""
    from .launch.limits import limit_problems

    _, problems = limit_problems(config, features.cgroups, user_ns,
                                 features.cgroups_reason or "cgroup support is unknown")
    return [f"{field}: required, but {why}" for field, why in problems]


def _missing_non_linux(config: SandboxConfig, features: HostFeatures) -> list[str]:
    if features.os == "win32":
        # One source of truth: the Windows backend's own fail-closed list.
        from .fallback.windows import unenforced_protections

        return [f"{name}: required, but {reason}"
                for name, reason, requested in unenforced_protections(config) if requested]
    # Elsewhere (macOS) the posix backend runs; its own list is the truth.
    from .fallback.posix import unenforced_protections as posix_gaps

    return [f"{name}: required, but {reason}"
            for name, reason, requested in posix_gaps(config, platform=features.os) if requested]


# --------------------------------------------------------------------------- output


def _yes(flag: bool | None) -> str:
    return "unknown" if flag is None else ("yes" if flag else "no")


def _report_rows(f: HostFeatures) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = [
        ("os", f.os, f.platform),
        ("kernel", f.kernel_release or "-", f.machine),
        ("root", _yes(f.is_root), f"euid {f.euid}" if f.euid is not None else ""),
    ]
    if f.os != "linux":
        rows.append(("fallback backend", f.fallback, ", ".join(f.fallback_enforces)))
        rows.append(("namespaces", "no", "Linux-only"))
        rows.append(("seccomp", "no", "Linux-only"))
        rows.append(("cgroups", "no", "Linux-only"))
        return rows
    rows.append(("in container", _yes(f.in_container), "; ".join(f.container_hints)))
    for ns in f.namespaces:
        rows.append((f"namespace {ns.name}", _yes(ns.creatable), ns.reason))
    if f.unprivileged_user_namespaces is not None:
        rows.append(("user ns for non-root users", _yes(f.unprivileged_user_namespaces),
                     f.unprivileged_user_namespaces_reason))
    rows.append(("user ns knobs", "-", ", ".join(f"{k}={v}" for k, v in f.user_namespace_knobs)))
    seccomp_detail = f.seccomp_reason or ("actions: " + " ".join(f.seccomp_actions))
    rows.append(("seccomp", _yes(f.seccomp), seccomp_detail))
    rows.append(("no_new_privs", _yes(f.no_new_privs), ""))
    rows.append(("landlock", f"ABI {f.landlock_abi}" if f.landlock_abi else "no", f.landlock_reason))
    rows.append(("network policy", _yes(bool(f.network_policy)), f.network_policy or f.network_policy_reason))
    rows.append(("CAP_SYS_ADMIN", _yes(f.has_cap_sys_admin),
                 f"CapEff={f.cap_effective:#x} CapBnd={f.cap_bounding:#x}"))
    rows.append(("caps not in bounding set", str(len(f.caps_not_in_bounding)),
                 " ".join(f.caps_not_in_bounding)))
    if f.cgroups is None:
        rows.append(("cgroups", "unknown", f.cgroups_reason))
    else:
        for c in f.cgroups.controllers:
            detail = f"{c.version} {c.parent}".strip() if c.usable else (c.reason or "not usable")
            rows.append((f"cgroup {c.name}", _yes(c.usable), detail))
    rows.append(("delegated cgroup v2", *_delegation_row(f.cgroup_delegation)))
    rows.append(("pidfd_open", _yes(f.pidfd_open), ""))
    rows.append(("clone3", _yes(f.clone3), ""))
    rows.append(("overlayfs", _yes(f.overlayfs), "" if f.overlayfs else "not in /proc/filesystems"))
    rows.append(("overlayfs without root", _yes(f.overlayfs_in_user_namespace),
                 f.overlayfs_in_user_namespace_reason or "filesystem.overlay as a non-root user"))
    return rows


def _delegation_row(delegation: Delegation | None) -> tuple[str, str]:
    if delegation is None:
        return "no", "no cgroup v2 hierarchy holds this process (or it could not be read)"
    from .linux.cgroups.delegation import describe

    return describe(delegation)


def format_report(features: HostFeatures) -> str:
    """A readable, aligned table: feature, status (yes/no/version), detail."""
    rows = _report_rows(features)
    width0 = max(len(r[0]) for r in rows)
    width1 = max(len(r[1]) for r in rows)
    lines = [f"{'feature'.ljust(width0)}  {'status'.ljust(width1)}  detail"]
    lines.append(f"{'-' * width0}  {'-' * width1}  ------")
    lines.extend(f"{a.ljust(width0)}  {b.ljust(width1)}  {c}".rstrip() for a, b, c in rows)
    missing = missing_for(SandboxConfig(), features)
    lines.append("")
    if missing:
        lines.append("The default sandbox config cannot be fully enforced here:")
        lines.extend(f"  - {m}" for m in missing)
    else:
        lines.append("The default sandbox config can be fully enforced here.")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def report_to_dict(features: HostFeatures) -> dict[str, Any]:
    """A JSON-ready dict of the report (for `ndf-sandbox check --json`), plus the
    default config's missing protections under "missing_for_default_config"."""
    data: dict[str, Any] = _jsonable(features)
    data["user_namespace_knobs"] = dict(features.user_namespace_knobs)
    data["missing_for_default_config"] = missing_for(SandboxConfig(), features)
    return data
