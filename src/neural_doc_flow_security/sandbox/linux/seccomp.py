"""Seccomp: compile a syscall filter once in the parent, install it in the child with one syscall.

The filter is built with libseccomp (through pyseccomp) and exported as raw
classic-BPF bytes by :func:`compile_profile`, which caches the result. The
sandbox child (linux/_child.c, the SECCOMP step) hands those bytes to
``seccomp(SECCOMP_SET_MODE_FILTER)``: the child never calls into libseccomp,
allocates no filter database and parses no profile. :func:`install_program`
does the same from Python, for a process of one's own (the tests use it to
check the filter outside a sandbox).

Profiles
    ``"deny-list"`` (``"default"`` here; SandboxConfig's "default" is the allow-list
    for callables and this for programs)
        Allow by default and deny, with ``EPERM``, the calls Docker's default
        profile keeps from an unprivileged container: mounts and the new mount
        API, namespaces (``unshare``, ``setns``, ``clone`` with any
        ``CLONE_NEW*`` flag), ``ptrace`` and cross-process memory access,
        kernel keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd``,
        ``io_uring``, kernel modules, ``kexec``, ``reboot``, swap, accounting,
        clock setting, file handles, ``syslog``, port I/O, NUMA placement,
        ``memfd_secret``, ``statmount``/``listmount``, terminal input injection
        and line disciplines (``ioctl`` ``TIOCSTI``/``TIOCLINUX``/``TIOCSETD``/
        ``TIOCCONS``) and ``personality`` values outside Docker's safe set.
        Set-user-ID and set-group-ID bits cannot be set or created (``chmod``
        family, ``open``/``openat``/``creat`` with ``O_CREAT`` or ``O_TMPFILE``,
        ``mkdir``, ``mknod``), nor device nodes made, so nothing set-id can be
        planted on the host through a writable bind. Sockets: only ``AF_UNIX``,
        ``AF_INET``, ``AF_INET6`` and ``AF_NETLINK`` with ``NETLINK_ROUTE``
        (what libc's resolver and ``if_nameindex`` use); other families, which
        network namespaces do not fence (``AF_VSOCK``) or which open kernel
        surface (``AF_PACKET``, ``AF_ALG``, generic netlink...), fail with
        ``EAFNOSUPPORT`` (other netlink protocols ``EPROTONOSUPPORT``),
        ``socketpair`` is ``AF_UNIX`` only. ``clone3`` and ``openat2`` get
        ``ENOSYS`` so libc falls back to ``clone`` and ``openat``, whose
        arguments the filter can see. Only the native architecture is in the
        filter: a call through a foreign ABI (i386 ``int 0x80``, x32) kills the
        process.
    ``"allow-list"``
        Only :data:`ALLOW_LIST` (what the payload kinds were measured to use);
        every other syscall, known or not, gets ``ENOSYS``. Every rule of the
        deny-list stays: built as the deny-list plus an ``ENOSYS`` rule for each
        native syscall outside the list, so the argument checks keep applying to
        the allowed calls (libseccomp would let an unconditional allow rule
        override them) and allowed calls stay in the kernel's per-syscall cache.
    ``"learn"``
        The deny-list, then a second filter that refers every other call to the
        sandbox's listener, which records it and lets it continue
        (:func:`learn_program`, :func:`learned_profile_text`).
    ``"off"``
        No filter: returns :data:`NO_FILTER`, which :func:`install_program`
        skips, so callers never need a ``None`` check.
    ``/absolute/path.toml`` or ``.json``
        A profile file, see :func:`load_profile_file`.

Reports: every program with ``action = "errno"`` has a variant
(``SeccompProgram.reported_bpf``) whose refusals return ``SECCOMP_RET_USER_NOTIF``;
the sandbox's init holds the listener and answers each with the errno the rule
stands for (``SeccompProgram.notify_errnos``), counting it (linux/_child.c). The
answers that mimic a kernel without the feature (``clone3``/``openat2`` ``ENOSYS``,
refused socket families) stay in the filter, unreported.

Syscalls newer than the system libseccomp (2.5.4 knows nothing after
``fchmodat2``/``map_shadow_stack``) are denied by their number, from
:data:`NEWER_SYSCALLS` (the numbers shared by every architecture with the
generic syscall table since Linux 5.1), and every number above the newest of
them gets ``ENOSYS``: a syscall added to the kernel later is not allowed
unreviewed. Names that are still unknown, or that
do not exist on the native architecture, never break the default profile: they
are skipped and listed in the program's description (which the isolation
report shows).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno as errno_mod
import os
import struct
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from neural_doc_flow_security.sandbox.errors import ConfigError, SetupError

STAGE: Final = "seccomp"
"""Name of the bootstrap stage, used in SetupError and the isolation report."""

DOCKER_SAFE_PERSONALITIES: Final = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
"""personality() values allowed by the default profile (Docker's list; 0xffffffff only queries)."""

CLONE_NAMESPACE_FLAGS: Final[dict[str, int]] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    # CLONE_NEWTIME (0x80) overlaps the exit-signal byte of clone(); only clone3 and
    # unshare accept it, and both are refused outright.
}
"""clone() flags that the default profile refuses (any one of them makes clone fail with EPERM)."""
_TTY_IOCTLS: Final = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C, "TIOCCONS": 0x541D, "TIOCSETD": 0x5423}
"""ioctl requests the default profile refuses: input injection, console redirection and
line-discipline changes (which load rarely used kernel code, N_GSM, N_HDLC...)."""
_LOW32: Final = 0xFFFFFFFF

NEWER_SYSCALLS: Final[dict[str, int]] = {
    # Debian's 2.5.4 knows 451-456, upstream releases before 2.5.5 do not: without them
    # fchmodat2 (452) could not be named, and its set-id rule would be skipped.
    "cachestat": 451,
    "fchmodat2": 452,
    "map_shadow_stack": 453,
    "futex_wake": 454,
    "futex_wait": 455,
    "futex_requeue": 456,
    "statmount": 457,
    "listmount": 458,
    "lsm_get_self_attr": 459,
    "lsm_set_self_attr": 460,
    "lsm_list_modules": 461,
    "mseal": 462,
    "setxattrat": 463,
    "getxattrat": 464,
    "listxattrat": 465,
    "removexattrat": 466,
    "open_tree_attr": 467,
    "file_getattr": 468,
    "file_setattr": 469,
}
"""Syscalls that a libseccomp may not know (after upstream 2.5.4's table), by their number in the
generic table (x86_64 and the asm-generic architectures share numbers from 424 on)."""
_UNIFIED_NUMBERS_ARCHES: Final = ("x86_64", "aarch64", "riscv64")

S_ISUID: Final = 0o4000
S_ISGID: Final = 0o2000
_S_IFMT: Final = 0o170000
_S_IFCHR: Final = 0o020000
_S_IFBLK: Final = 0o060000
_O_CREAT: Final = 0o100
_O_TMPFILE_BIT: Final = 0o20000000  # __O_TMPFILE: O_TMPFILE is this | O_DIRECTORY
_SETID_MODE_ARG: Final = {
    "chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "creat": 1, "mkdir": 1, "mkdirat": 2,
}
"""Which argument carries the mode, for calls refused when it has a set-id bit."""
_SETID_CREATE_ARGS: Final = {"open": (1, 2), "openat": (2, 3)}
"""(flags, mode) arguments of the calls whose mode counts only with O_CREAT or O_TMPFILE."""
_MKNOD_MODE_ARG: Final = {"mknod": 1, "mknodat": 2}

AF_UNIX: Final = 1
AF_INET: Final = 2
AF_INET6: Final = 10
AF_NETLINK: Final = 16
NETLINK_ROUTE: Final = 0
SOCKET_FAMILIES: Final = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
"""socket() families the default profile allows; AF_NETLINK only with NETLINK_ROUTE."""

# How a denied syscall is matched.
_Match = Literal[
    "always", "clone_new_flags", "tty_ioctls", "unsafe_personality", "enosys",
    "setid_mode", "setid_create", "device_node", "socket_family", "socketpair_family",
]

_DEFAULT_DENY: Final[dict[str, _Match]] = {
    # filesystems and mounts
    **dict.fromkeys(
        (
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "chroot",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "open_by_handle_at",
            "name_to_handle_at",
            "quotactl",
            "quotactl_fd",
            "swapon",
            "swapoff",
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "lookup_dcookie",
            "statmount",
            "listmount",
            "open_tree_attr",
        ),
        "always",
    ),
    "openat2": "enosys",  # its mode and flags are in a struct the filter cannot read
    # set-id files and device nodes (a writable bind reaches the host's file system)
    **dict.fromkeys(_SETID_MODE_ARG, "setid_mode"),
    **dict.fromkeys(_SETID_CREATE_ARGS, "setid_create"),
    **dict.fromkeys(_MKNOD_MODE_ARG, "device_node"),
    # socket families that network namespaces do not fence, or that open kernel surface
    "socket": "socket_family",
    "socketpair": "socketpair_family",
    # namespaces and other processes
    **dict.fromkeys(
        (
            "unshare",
            "setns",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "pidfd_getfd",
        ),
        "always",
    ),
    "clone": "clone_new_flags",
    "clone3": "enosys",
    # kernel attack surface that an unprivileged container does not need
    **dict.fromkeys(
        (
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "acct",
            "syslog",
            "vhangup",
            "iopl",
            "ioperm",
            "vm86",
            "vm86old",
            "lsm_set_self_attr",
            "memfd_secret",
        ),
        "always",
    ),
    # clocks
    **dict.fromkeys(
        ("settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex"),
        "always",
    ),
    # NUMA placement (Docker: only with CAP_SYS_NICE)
    **dict.fromkeys(
        ("mbind", "set_mempolicy", "set_mempolicy_home_node", "migrate_pages", "move_pages"),
        "always",
    ),
    "ioctl": "tty_ioctls",
    "personality": "unsafe_personality",
}

SANDBOX_OWN: Final[frozenset[str]] = frozenset({
    # What the sandbox itself does under the filter: the payload hands the listener to
    # init (sendmsg, close); init (which, for a program, installs the filter on itself)
    # answers notifications, reaps, forwards signals, reports and starts the program.
    "sendmsg", "recvmsg", "close", "close_range", "ioctl", "ppoll", "poll", "wait4", "kill", "getrusage",
    "write", "exit", "exit_group", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "prctl", "clock_gettime",
    "getpid", "clone", "vfork", "execve", "newfstatat", "access", "faccessat", "faccessat2", "chdir",
    "restart_syscall",
})
"""Syscalls every allow-list profile allows: without them the sandbox's own init and
launch would block on their own listener or fail."""

ALLOW_LIST: Final[frozenset[str]] = SANDBOX_OWN | frozenset({
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync", "mlock", "mlock2",
    "munlock", "mlockall", "munlockall", "membarrier", "memfd_create", "pkey_alloc", "pkey_free",
    "pkey_mprotect", "get_mempolicy",
    # files (open/openat/creat, chmod..., mkdir, mknod keep the deny list's argument checks)
    "read", "readv", "pread64", "preadv", "preadv2", "write", "writev", "pwrite64", "pwritev", "pwritev2",
    "open", "openat", "creat", "close", "lseek", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs",
    "fstatfs", "readlink", "readlinkat", "getdents", "getdents64", "getcwd", "fchdir", "mkdir",
    "mkdirat", "rmdir", "rename", "renameat", "renameat2", "link", "linkat", "unlink", "unlinkat",
    "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown",
    "fchownat", "umask", "truncate", "ftruncate", "fallocate", "fsync", "fdatasync", "sync", "syncfs",
    "sync_file_range", "utime", "utimes", "utimensat", "futimesat", "fadvise64", "readahead", "flock",
    "fcntl", "dup", "dup2", "dup3", "pipe", "pipe2", "sendfile", "splice", "tee", "vmsplice",
    "copy_file_range", "mknod", "mknodat", "getxattr", "lgetxattr", "fgetxattr", "listxattr",
    "llistxattr", "flistxattr", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr", "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    # waiting for events
    "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "epoll_pwait2", "eventfd", "eventfd2", "signalfd", "signalfd4", "timerfd_create", "timerfd_settime",
    "timerfd_gettime",
    # time
    "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time", "times", "getitimer",
    "setitimer", "alarm", "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun",
    "timer_delete",
    # processes, threads, signals (clone keeps its namespace-flag check; clone3 gets ENOSYS)
    "fork", "execveat", "waitid", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "rt_sigpending", "rt_sigtimedwait", "rt_sigsuspend", "sigaltstack", "pause", "gettid", "getppid",
    "getpgid", "getpgrp", "setpgid", "getsid", "setsid", "getuid", "geteuid", "getgid", "getegid",
    "getresuid", "getresgid", "getgroups", "capget", "arch_prctl", "set_tid_address", "set_robust_list",
    "get_robust_list", "rseq", "futex", "futex_waitv", "sched_yield", "sched_getaffinity",
    "sched_setaffinity", "sched_getparam", "sched_getscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "sched_rr_get_interval", "sched_getattr", "getpriority", "getrlimit",
    "setrlimit", "prlimit64", "sysinfo", "uname", "getcpu", "personality", "pidfd_open",
    "pidfd_send_signal", "getrandom", "seccomp", "landlock_create_ruleset", "landlock_add_rule",
    "landlock_restrict_self",
    # sockets (socket and socketpair keep the family checks)
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "getsockname",
    "getpeername", "sendto", "recvfrom", "sendmmsg", "recvmmsg", "shutdown", "setsockopt", "getsockopt",
    # System V and POSIX IPC (the sandbox's own IPC namespace)
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl", "msgget", "msgsnd",
    "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
})
"""The built-in allow-list: what the Python payload (the interpreter, threads, subprocesses,
cloudpickle, msgpack, the channel), pdftotext and pdftoppm were measured to use (strace -f, see
benchmarks/syscall_usage.py), widened to their families so that an ordinary library does not trip
on a sibling call (pread64 and preadv, epoll_wait and epoll_pwait). Every other syscall,
known or not yet invented, gets ENOSYS (so libc falls back where it can); the deny list's
argument checks (clone flags, tty ioctls, socket families, set-id modes, device nodes,
personality) still apply to the calls allowed here."""

_PROFILE_KEYS: Final = ("extends", "deny", "allow", "action", "errno")
_BPF_MAX_INSNS: Final = 4096
_SOCK_FILTER_SIZE: Final = 8

# libseccomp's __NR_SCMP_ERROR; pseudo numbers (< -1) mean "known, not on this arch".
_NR_UNKNOWN: Final = -1
_RET_USER_NOTIF: Final = 0x7FC00000  # SECCOMP_RET_USER_NOTIF


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


@dataclass(frozen=True)
class SeccompProgram:
    """A compiled seccomp filter: raw classic-BPF bytes ready for ``seccomp(2)``.

    ``name`` is the spec it was compiled from ("default", "off" or the profile
    path); ``description`` is a one-line summary for the isolation report;
    ``denied`` lists the syscalls the filter refuses; ``skipped`` the names that
    were requested but are unknown to libseccomp or absent on this architecture.
    An empty ``bpf`` (the "off" program) means no filter.

    The ``struct sock_fprog`` handed to the kernel is built once, here, so a
    forked child pays for one syscall and no allocation or copy-on-write faults.
    """

    name: str
    description: str
    bpf: bytes = field(repr=False)
    instructions: int
    denied: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    reported_bpf: bytes = field(default=b"", repr=False)
    notify_errnos: bytes = field(default=b"", repr=False)
    learn_bpf: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if len(self.bpf) % _SOCK_FILTER_SIZE or len(self.bpf) // _SOCK_FILTER_SIZE != self.instructions:
            raise ValueError(f"seccomp program {self.name!r}: BPF size does not match instruction count")
        if self.instructions > _BPF_MAX_INSNS:
            raise ValueError(f"seccomp program {self.name!r}: {self.instructions} > {_BPF_MAX_INSNS} insns")
        insns = (_SockFilter * self.instructions).from_buffer_copy(self.bpf)
        fprog = _SockFprog(self.instructions, ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
        object.__setattr__(self, "_kernel_args", (insns, fprog, ctypes.byref(fprog)))

    _kernel_args: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # The ctypes structures cannot be pickled; rebuild them from the public fields.
        return (
            SeccompProgram,
            (self.name, self.description, self.bpf, self.instructions, self.denied, self.skipped,
             self.reported_bpf, self.notify_errnos, self.learn_bpf),
        )

    @property
    def enabled(self) -> bool:
        """True when installing this program adds a filter."""
        return self.instructions > 0

    @property
    def reports(self) -> bool:
        """True when the program has a variant whose refusals a listener answers and counts
        (``reported_bpf``: the same rules, with SECCOMP_RET_USER_NOTIF where ``bpf``
        returns the errno; ``notify_errnos``: the errno per syscall number, int32 each)."""
        return bool(self.reported_bpf)

    @property
    def learns(self) -> bool:
        """True for the "learn" program: ``bpf`` (the deny list) and then ``learn_bpf``,
        which sends every other syscall to the listener, which records and continues it."""
        return bool(self.learn_bpf)


NO_FILTER: Final = SeccompProgram(name="off", description="off: no seccomp filter", bpf=b"", instructions=0)
"""The program for spec "off": install_program() does nothing with it."""


@dataclass(frozen=True)
class SeccompProfile:
    """A validated profile: which syscalls to deny and what a denied call gets.

    ``action`` is "errno" (the call fails with ``errno``) or "kill" (the whole
    process is killed with SIGSYS). ``clone3`` and ``openat2`` keep ``ENOSYS``
    either way unless a profile denies them explicitly, so libc falls back to
    ``clone`` and ``openat``; refused socket families keep ``EAFNOSUPPORT``
    (netlink protocols ``EPROTONOSUPPORT``), the answers of a kernel without them.
    Syscall numbers above ``newest_syscall`` (when set) get ``ENOSYS`` too: calls
    added to the kernel after this filter was written are not let through
    unreviewed.
    """

    name: str
    deny: Mapping[str, _Match]
    action: Literal["errno", "kill"] = "errno"
    errno: int = errno_mod.EPERM
    newest_syscall: int | None = None
    allow: frozenset[str] | None = None
    """None: a deny-list (allow what is not denied). A set: an allow-list: every other
    syscall gets ``ENOSYS``; ``deny`` still applies (its argument checks to allowed calls)."""


# --------------------------------------------------------------------------------------------------
# compiling (parent / zygote side; uses libseccomp)
# --------------------------------------------------------------------------------------------------

_cache: dict[tuple[str, int, int, int], SeccompProgram] = {}
_cache_lock = threading.Lock()


def _pyseccomp() -> Any:
    """Import pyseccomp. It locates libc and libseccomp with ctypes.util.find_library,
    which runs `ldconfig -p` in a subprocess (tens of milliseconds, on every
    `ndf-sandbox run`); the glibc sonames are tried first."""
    import sys

    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    import ctypes.util

    original = ctypes.util.find_library
    sonames = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
    ctypes.util.find_library = lambda name: sonames.get(name) or original(name)
    try:
        import pyseccomp
    except OSError:  # not those sonames here: let find_library search
        sys.modules.pop("pyseccomp", None)
        ctypes.util.find_library = original
        import pyseccomp
    finally:
        ctypes.util.find_library = original
    return pyseccomp


BUILTIN_PROFILES: Final = ("deny-list", "allow-list")
"""The built-in profiles by name; "default" is the deny-list here (SandboxConfig's
"default" picks per payload kind, see config.SandboxConfig.seccomp)."""


def compile_profile(spec: str) -> SeccompProgram:
    """Compile ``spec`` ("deny-list", "allow-list", "learn", "default" (the deny-list),
    "off" or an absolute profile path) to a SeccompProgram.

    Results are cached by the spec and, for files, their inode, mtime and size:
    compiling the same unchanged spec again returns the same object. The default
    program is also kept on disk between processes (linux/seccomp_cache.py). Call this in
    the parent or zygote; the child only installs ``program.bpf``.

    Raises ConfigError("seccomp", ...) for an invalid spec or profile file.
    """
    if spec == "off":
        return NO_FILTER
    if spec == "default":
        spec = "deny-list"
    if spec in ("learn", *BUILTIN_PROFILES):
        key = (spec, 0, 0, 0)
    elif os.path.isabs(spec):
        try:
            st = os.stat(spec)
        except OSError as exc:
            raise ConfigError(STAGE, f"{spec}: cannot read profile file: {exc.strerror}") from exc
        key = (spec, st.st_ino, st.st_mtime_ns, st.st_size)
    else:
        raise ConfigError(
            STAGE, "expected 'default', 'deny-list', 'allow-list', 'learn', 'off' or an absolute path "
                   f"to a .toml/.json profile, got {spec!r}"
        )
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        if spec == "learn":
            program = learn_program()
        elif spec in BUILTIN_PROFILES:  # unchanged from the last run's compile, read back from disk
            from .seccomp_cache import load_or_compile

            build = default_profile if spec == "deny-list" else allow_list_profile
            program = load_or_compile(spec, lambda: build_program(build()))
        else:
            program = build_program(load_profile_file(spec))
        _cache[key] = program
        return program


def profile_for(spec: str) -> SeccompProfile:
    """The profile a spec names: "default", "deny-list" and "learn" (whose rules are the
    deny list's) the deny-list, "allow-list" the allow-list, else the file at `spec`."""
    if spec == "allow-list":
        return allow_list_profile()
    return default_profile() if spec in ("default", "deny-list", "learn") else load_profile_file(spec)


def default_profile() -> SeccompProfile:
    """The built-in deny-list profile (see the module docstring)."""
    return SeccompProfile(name="deny-list", deny=dict(_DEFAULT_DENY), newest_syscall=_newest_reviewed())


def allow_list_profile(allow: frozenset[str] = ALLOW_LIST, name: str = "allow-list") -> SeccompProfile:
    """An allow-list profile: ``allow`` (with SANDBOX_OWN) and the deny list's rules."""
    return SeccompProfile(name=name, deny=dict(_DEFAULT_DENY), newest_syscall=_newest_reviewed(),
                          allow=frozenset(allow) | SANDBOX_OWN)


def learned_profile_text(counts: Mapping[str, int], command: list[str]) -> str:
    """The TOML allow-list profile (``extends = "minimal"``) of the syscalls in ``counts``
    (name -> calls seen, from ``--seccomp learn``), for ``--seccomp FILE``."""
    import json

    names = sorted(name for name in counts if syscall_number(name) >= 0)
    lines = [
        "# seccomp allow-list learned by `ndf-sandbox run --seccomp learn` from:",
        "#   " + " ".join(command).replace("\n", " "),
        "# Every syscall not listed (and every one the deny list refuses or checks the",
        "# arguments of) stays refused; the program must be run on inputs that take every path.",
        'extends = "minimal"',
        "allow = [",
        *(f"    {json.dumps(name)},  # {counts[name]} calls" for name in names),
        "]",
        "",
    ]
    return "\n".join(lines)


def learn_program() -> SeccompProgram:
    """The "learn" program: the deny list, then a filter that sends every syscall but the
    listener hand-over's (sendmsg, close) to the sandbox's listener, which records it and
    lets it continue (SECCOMP_USER_NOTIF_FLAG_CONTINUE)."""
    base = build_program(default_profile())
    scmp = _pyseccomp()
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    own = [syscall_number(name) for name in ("sendmsg", "close")]
    # 0 ld nr, 1.. jeq own -> allow, then ret notify, ret allow
    insns = [(ld_abs, 0, 0, 0)]
    for i, nr in enumerate(own):
        insns.append((jeq, len(own) - i, 0, nr))
    insns += [(ret, 0, 0, _RET_USER_NOTIF), (ret, 0, 0, int(scmp.ALLOW))]
    learn = b"".join(struct.pack("=HBBI", *insn) for insn in insns)
    return dataclasses.replace(
        base, name="learn", learn_bpf=learn, reported_bpf=b"", notify_errnos=b"",
        description="learn: every syscall is recorded and let through, except what the deny list refuses")


def _newest_reviewed() -> int | None:
    """The highest syscall number this module has reviewed, on an architecture with the
    generic numbers (elsewhere None: no guard)."""
    return max(NEWER_SYSCALLS.values()) if os.uname().machine in _UNIFIED_NUMBERS_ARCHES else None


def load_profile_file(path: str) -> SeccompProfile:
    """Read and validate a TOML or JSON profile file (chosen by extension).

    Keys (all optional)::

        extends = "deny-list"      # ("default" is the same); or "none": start from an empty deny list;
                                   # or "allow-list" / "minimal": an allow-list, below
        deny = ["name", ...]       # syscalls to refuse in full (added to the inherited list)
        allow = ["name", ...]      # remove inherited denials, e.g. "ptrace", "clone" (its flag check)
        action = "errno"           # or "kill": kill the process with SIGSYS
        errno = "EPERM"            # errno name or number, only with action = "errno"

    With ``extends = "allow-list"`` (the built-in ALLOW_LIST) or ``"minimal"`` (only
    SANDBOX_OWN, what the sandbox itself needs; ``ndf-sandbox run --seccomp learn``
    writes such files), ``allow`` adds syscalls to the allowed set and every other
    syscall gets ENOSYS. The deny list's rules all stay (its argument checks apply to
    the allowed calls); naming one of its fully refused calls in ``allow`` is an error.

    Raises ConfigError("seccomp", "<file>: ...") naming the bad key, value or
    syscall, with a suggestion for misspelled keys and syscall names.
    """
    data = _read_profile_data(path)

    def fail(message: str) -> ConfigError:
        return ConfigError(STAGE, f"{path}: {message}")

    for key in data:
        if key not in _PROFILE_KEYS:
            raise fail(f"unknown key {key!r}{_did_you_mean(str(key), _PROFILE_KEYS)}")

    extends = data.get("extends", "deny-list")
    bases = ("deny-list", "default", "none", "allow-list", "minimal")
    if extends not in bases:
        raise fail(f"extends must be one of {', '.join(map(repr, bases))}, got {extends!r}")
    deny: dict[str, _Match] = dict(_DEFAULT_DENY) if extends != "none" else {}

    deny_names = _syscall_list(data, "deny", fail)
    allow_names = _syscall_list(data, "allow", fail)
    both = sorted(set(deny_names) & set(allow_names))
    if both:
        raise fail(f"syscalls both denied and allowed: {', '.join(both)}")
    allowed: frozenset[str] | None = None
    if extends in ("allow-list", "minimal"):
        refused = sorted(name for name in allow_names if _DEFAULT_DENY.get(name) in ("always", "enosys"))
        if refused:
            raise fail(f"allow: {', '.join(refused)} stay refused in an allow-list profile (the deny list's "
                       "rules are kept); lift them with extends = 'deny-list' instead")
        allowed = (ALLOW_LIST if extends == "allow-list" else SANDBOX_OWN) | frozenset(allow_names)
        allowed -= frozenset(deny_names)
    else:
        for name in allow_names:
            deny.pop(name, None)
    for name in deny_names:
        deny[name] = "always"

    action = data.get("action", "errno")
    if action not in ("errno", "kill"):
        raise fail(f"action must be 'errno' or 'kill', got {action!r}")
    if "errno" in data and action != "errno":
        raise fail("errno is only meaningful with action = 'errno'")
    err = _parse_errno(data.get("errno", "EPERM"), fail)
    newest = _newest_reviewed() if extends != "none" else None
    return SeccompProfile(name=path, deny=deny, action=action, errno=err, newest_syscall=newest, allow=allowed)


def build_program(profile: SeccompProfile) -> SeccompProgram:
    """Compile a validated profile with libseccomp and export it as raw BPF, with its
    reported variant (see SeccompProgram.reports) when its refusals are errnos."""
    flt, denied, skipped, _ = _build_filter(profile)
    bpf = _with_prefixes(profile, _export(flt), notify=False)
    reported_bpf, errnos = b"", b""
    if profile.action == "errno":
        reported, _, _, table = _build_filter(profile, notify=True)
        reported_bpf = _with_prefixes(profile, _export(reported), notify=True)
        if profile.deny.get("personality") == "unsafe_personality":
            table[syscall_number("personality")] = profile.errno
        errnos = b"".join(struct.pack("=i", table.get(nr, 0)) for nr in range(max(table, default=-1) + 1))

    instructions = len(bpf) // _SOCK_FILTER_SIZE
    what = f"{profile.action} {errno_mod.errorcode.get(profile.errno, profile.errno)}"
    if profile.action == "kill":
        what = "kill process"
    label = os.path.basename(profile.name) if profile.name.startswith("/") else profile.name
    if profile.allow is None:
        parts = [f"{label}: allow by default, {len(denied)} syscalls denied ({what})"]
    else:
        parts = [f"{label}: allow-list of {len(profile.allow)} syscalls, every other one -> ENOSYS, "
                 f"{len(denied)} denied ({what})"]
    enosys = [name for name in denied if profile.deny.get(name) == "enosys"]
    if enosys:
        parts.append("/".join(enosys) + " -> ENOSYS")
    conditional = [name for name in denied if profile.deny.get(name) not in (None, "always", "enosys")]
    if conditional:
        parts.append("argument checks on " + "/".join(conditional))
    if profile.newest_syscall is not None:
        parts.append(f"syscalls above {profile.newest_syscall} -> ENOSYS")
    parts.append("foreign ABIs (i386, x32) kill the process")
    parts.append(f"{instructions} BPF instructions")
    if skipped:
        parts.append("skipped (" + "; ".join(skipped) + ")")
    return SeccompProgram(
        name=profile.name,
        description="; ".join(parts),
        bpf=bpf,
        instructions=instructions,
        denied=tuple(denied),
        skipped=tuple(skipped),
        reported_bpf=reported_bpf,
        notify_errnos=errnos,
    )


def _export(flt: Any) -> bytes:
    fd = os.memfd_create("ndf-seccomp-bpf", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "rb", closefd=False) as sink:
            flt.export_bpf(sink)
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    except OSError as exc:
        raise SetupError(STAGE, f"exporting the filter from libseccomp failed: {exc}", exc.errno or 0) from (
            exc
        )
    finally:
        os.close(fd)


def _with_prefixes(profile: SeccompProfile, bpf: bytes, notify: bool) -> bytes:
    """The hand-written checks libseccomp cannot express, ahead of its program."""
    scmp = _pyseccomp()
    if profile.deny.get("personality") == "unsafe_personality":
        action = _RET_USER_NOTIF if notify else _deny_action(scmp, profile)
        bpf = _personality_prefix(scmp, action) + bpf
    if profile.newest_syscall is not None:
        bpf = _newer_syscalls_prefix(scmp, profile.newest_syscall, notify) + bpf
    return bpf


def build_libseccomp_filter(profile: SeccompProfile) -> Any:
    """Return the pyseccomp SyscallFilter for ``profile`` (without the personality check).

    For diagnostics and benchmarks (``export_pfc``, ``load``); the sandbox itself
    installs the exported program (``SeccompProgram.bpf``).
    """
    return _build_filter(profile)[0]


def syscall_name(nr: int) -> str:
    """The native name of syscall number ``nr``, or "syscall_<nr>" for one unknown here."""
    if 0 <= nr < 4096:
        with contextlib.suppress(ValueError):
            return str(_pyseccomp().resolve_syscall(_pyseccomp().Arch.NATIVE, nr).decode())
        for name, number in NEWER_SYSCALLS.items():
            if number == nr and os.uname().machine in _UNIFIED_NUMBERS_ARCHES:
                return name
    return f"syscall_{nr}"


def known_syscalls() -> tuple[str, ...]:
    """The syscall names libseccomp knows for the native architecture, sorted."""
    return _native_syscall_names()


def libseccomp_version() -> str:
    """The version of the system libseccomp, e.g. "2.5.4"."""

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    library = getattr(_pyseccomp(), "_libseccomp", None)  # the one pyseccomp loaded
    if library is None:
        return "unknown"
    fn = library.seccomp_version
    fn.restype = ctypes.POINTER(_Version)
    v = fn().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def _build_filter(profile: SeccompProfile,
                  notify: bool = False) -> tuple[Any, list[str], list[str], dict[int, int]]:
    """The libseccomp filter, the denied and skipped names, and (with ``notify``: every
    refusal that would return the profile's errno, or an allow-list's ENOSYS, returns
    SECCOMP_RET_USER_NOTIF instead) the errno the listener answers per syscall number."""
    scmp = _pyseccomp()

    deny_action = _deny_action(scmp, profile)
    notified: dict[int, int] = {}
    flt = scmp.SyscallFilter(scmp.ALLOW)
    # Only the native arch is in the filter; everything else (i386 via int 0x80, and x32
    # numbers, which libseccomp checks for on x86_64) takes this action.
    flt.set_attr(scmp.Attr.ACT_BADARCH, scmp.KILL_PROCESS)
    with contextlib.suppress(OSError):  # binary tree, O(log n) per syscall; libseccomp >= 2.5
        flt.set_attr(scmp.Attr.CTL_OPTIMIZE, 2)

    def add(action: int, name: str, nr: int, args: tuple[Any, ...]) -> None:
        # A program's init installs the filter on itself and holds its listener: a call of
        # its own (SANDBOX_OWN) refused in full must get its errno directly, or init would
        # wait for itself. (It never matches an argument check: no namespace flag, no tty.)
        if (notify and action == deny_action and profile.action == "errno"
                and (args or name not in SANDBOX_OWN)):
            notified[nr] = profile.errno
            action = _RET_USER_NOTIF
        flt.add_rule(action, nr, *args)

    denied: list[str] = []
    unknown: list[str] = []
    foreign: list[str] = []
    for name, match in sorted(profile.deny.items()):
        nr = syscall_number(name)
        if nr == _NR_UNKNOWN:
            unknown.append(name)
            continue
        if nr < 0:
            foreign.append(name)
            continue
        if profile.allow is not None and name not in profile.allow and match not in ("always", "enosys"):
            continue  # not allowed at all: the allow-list's ENOSYS below, not an argument check
        for action, args in _rules(scmp, name, match, deny_action):
            add(action, name, nr, args)
        denied.append(name)
    if profile.allow is not None:
        enosys = int(scmp.ERRNO(errno_mod.ENOSYS))
        for name in _native_syscall_names():
            nr = syscall_number(name)
            if nr < 0 or name in profile.allow or name in denied:
                continue
            if notify:
                notified[nr] = errno_mod.ENOSYS
            flt.add_rule(_RET_USER_NOTIF if notify else enosys, nr)
    skipped: list[str] = []
    if unknown:
        skipped.append(f"unknown to libseccomp {libseccomp_version()}: {', '.join(unknown)}")
    if foreign:
        skipped.append(f"not syscalls on {os.uname().machine}: {', '.join(foreign)}")
    return flt, denied, skipped, notified


def _rules(scmp: Any, name: str, match: _Match, deny: int) -> list[tuple[int, tuple[Any, ...]]]:
    """The libseccomp rules (action, argument comparisons) that deny ``name`` as ``match`` says.

    Each rule is an AND of comparisons, the rules of a syscall an OR. Masked
    comparisons look at the bits that matter only, so high bits set in a 32-bit
    argument cannot slip past; a plain comparison (the socket family) refuses a
    value with high bits set, as it is not one of the allowed ones.
    """
    def masked(arg: int, mask: int, value: int) -> Any:
        return scmp.Arg(arg, scmp.MASKED_EQ, mask, value)

    setid = (S_ISUID, S_ISGID)
    if match == "always":
        return [(deny, ())]
    if match == "enosys":
        return [(int(scmp.ERRNO(errno_mod.ENOSYS)), ())]
    if match == "clone_new_flags":
        return [(deny, (masked(0, flag, flag),)) for flag in CLONE_NAMESPACE_FLAGS.values()]
    if match == "tty_ioctls":  # the kernel's ioctl cmd is an unsigned int: the low 32 bits
        return [(deny, (masked(1, _LOW32, request),)) for request in _TTY_IOCTLS.values()]
    if match == "setid_mode":
        return [(deny, (masked(_SETID_MODE_ARG[name], bit, bit),)) for bit in setid]
    if match == "setid_create":
        flags, mode = _SETID_CREATE_ARGS[name]
        return [(deny, (masked(flags, creating, creating), masked(mode, bit, bit)))
                for creating in (_O_CREAT, _O_TMPFILE_BIT) for bit in setid]
    if match == "device_node":
        mode = _MKNOD_MODE_ARG[name]
        kinds = [masked(mode, _S_IFMT, kind) for kind in (_S_IFCHR, _S_IFBLK)]
        return [(deny, (comparison,)) for comparison in kinds + [masked(mode, bit, bit) for bit in setid]]
    if match == "socket_family":
        refused = int(scmp.ERRNO(errno_mod.EAFNOSUPPORT))
        rules: list[tuple[int, tuple[Any, ...]]] = [
            (refused, (masked(0, mask, value),)) for mask, value in _blocks_outside(SOCKET_FAMILIES)
        ]
        rules.append((refused, (scmp.Arg(0, scmp.GT, max(SOCKET_FAMILIES)),)))
        rules.append((int(scmp.ERRNO(errno_mod.EPROTONOSUPPORT)),
                      (scmp.Arg(0, scmp.EQ, AF_NETLINK), scmp.Arg(2, scmp.NE, NETLINK_ROUTE))))
        return rules
    if match == "socketpair_family":
        return [(int(scmp.ERRNO(errno_mod.EAFNOSUPPORT)), (scmp.Arg(0, scmp.NE, AF_UNIX),))]
    return []  # "unsafe_personality": a hand-written BPF prefix, see _personality_prefix


def _blocks_outside(allowed: tuple[int, ...]) -> list[tuple[int, int]]:
    """(mask, value) pairs, each an aligned power-of-two block of 64-bit values, that
    together cover exactly the values in [0, max(allowed)] not in ``allowed``.

    libseccomp 2.5 allows one comparison per argument in a rule, so "not one of
    these" is written as a few masked equalities (plus "greater than the largest").
    """
    blocks: list[tuple[int, int]] = []
    value, top = 0, max(allowed)
    while value <= top:
        if value in allowed:
            value += 1
            continue
        size = 1
        while (value % (size * 2) == 0 and value + size * 2 - 1 <= top
               and not any(value <= a < value + size * 2 for a in allowed)):
            size *= 2
        blocks.append(((~(size - 1)) & 0xFFFFFFFFFFFFFFFF, value))
        value += size
    return blocks


def syscall_number(name: str) -> int:
    """The native number of ``name``: libseccomp's, else NEWER_SYSCALLS' (on an
    architecture with the generic numbers), else libseccomp's negative answer."""
    scmp = _pyseccomp()
    nr = int(scmp.resolve_syscall(scmp.Arch.NATIVE, name))
    if nr == _NR_UNKNOWN and name in NEWER_SYSCALLS and os.uname().machine in _UNIFIED_NUMBERS_ARCHES:
        return NEWER_SYSCALLS[name]
    return nr


def _deny_action(scmp: Any, profile: SeccompProfile) -> int:
    return int(scmp.KILL_PROCESS) if profile.action == "kill" else int(scmp.ERRNO(profile.errno))


def _personality_prefix(scmp: Any, deny_action: int) -> bytes:
    """BPF that denies personality() unless the persona is in DOCKER_SAFE_PERSONALITIES.

    libseccomp 2.5 rules are ORs of ANDs with at most one comparison per
    argument, so "not one of five values" cannot be written as deny rules in an
    allow-by-default filter; these few instructions run before libseccomp's
    program. Every jump out of the prefix lands on libseccomp's first
    instruction, which re-checks the architecture. The kernel takes the persona
    as an unsigned int, so only the low 32 bits of args[0] are compared.
    """
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    arg0_low = 16 if sys.byteorder == "little" else 20  # offsetof(seccomp_data, args[0]) + endianness
    nr = scmp.resolve_syscall(scmp.Arch.NATIVE, "personality")
    safe = DOCKER_SAFE_PERSONALITIES
    # Layout: 0 ld arch, 1 jeq, 2 ld nr, 3 jeq, 4 ld arg0, 5.. jeq safe values, then ret deny.
    length = 5 + len(safe) + 1
    insns: list[tuple[int, int, int, int]] = [
        (ld_abs, 0, 0, 4),
        (jeq, 0, length - 2, scmp.system_arch()),
        (ld_abs, 0, 0, 0),
        (jeq, 0, length - 4, nr),
        (ld_abs, 0, 0, arg0_low),
    ]
    for i, value in enumerate(safe):
        pc = 5 + i
        insns.append((jeq, length - pc - 1, 0, value))
    insns.append((ret, 0, 0, deny_action))
    assert len(insns) == length
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


_X32_SYSCALL_BIT: Final = 0x40000000


def _newer_syscalls_prefix(scmp: Any, newest: int, notify: bool = False) -> bytes:
    """BPF that answers ENOSYS to native syscall numbers above ``newest`` (and below
    the x32 bit, whose numbers libseccomp's program kills). Every other call jumps
    to the next instruction after the prefix. The kernel's per-syscall cache still
    sees a constant answer for every number, so allowed calls never run the filter.
    """
    ld_abs, jeq, jge, jgt, ret = 0x20, 0x15, 0x35, 0x25, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JGT}|K, RET|K
    enosys = _RET_USER_NOTIF if notify else int(scmp.ERRNO(errno_mod.ENOSYS))
    # Layout: 0 ld arch, 1 jeq native, 2 ld nr, 3 jge x32 bit, 4 jgt newest, 5 ret ENOSYS; 6 = past the prefix.
    insns = [
        (ld_abs, 0, 0, 4),
        (jeq, 0, 4, scmp.system_arch()),
        (ld_abs, 0, 0, 0),
        (jge, 2, 0, _X32_SYSCALL_BIT),
        (jgt, 0, 1, newest),
        (ret, 0, 0, enosys),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


_native_names: tuple[str, ...] | None = None


def _native_syscall_names() -> tuple[str, ...]:
    global _native_names
    if _native_names is None:
        scmp = _pyseccomp()

        names: set[str] = set()
        for nr in range(1024):
            try:
                names.add(scmp.resolve_syscall(scmp.Arch.NATIVE, nr).decode())
            except ValueError:
                continue
        if os.uname().machine in _UNIFIED_NUMBERS_ARCHES:
            names.update(NEWER_SYSCALLS)
        _native_names = tuple(sorted(names))
    return _native_names


def _read_profile_data(path: str) -> dict[str, Any]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".json"):
        raise ConfigError(STAGE, f"{path}: profile files must end in .toml or .json, not {ext or '(none)'!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(STAGE, f"{path}: cannot read profile file: {exc.strerror}") from exc
    try:
        import json  # profile files only: keeps the default path's imports small
        import tomllib

        data: Any = tomllib.loads(raw.decode()) if ext == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(STAGE, f"{path}: not valid {ext[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(STAGE, f"{path}: the top level must be a table/object, got {type(data).__name__}")
    return data


def _syscall_list(data: Mapping[str, Any], key: str, fail: Any) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(f"{key} must be a list of syscall names")
    for name in value:
        if syscall_number(name) == _NR_UNKNOWN:
            raise fail(f"{key}: unknown syscall {name!r}{_did_you_mean(name, _native_syscall_names())}")
    return list(dict.fromkeys(value))


def _parse_errno(value: Any, fail: Any) -> int:
    if isinstance(value, bool):
        raise fail(f"errno must be a name like 'EPERM' or a number, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= 4095:
            raise fail(f"errno must be between 1 and 4095, got {value}")
        return value
    if isinstance(value, str):
        number = getattr(errno_mod, value, None)
        if not value.startswith("E") or not isinstance(number, int):
            names = sorted(errno_mod.errorcode.values())
            raise fail(f"unknown errno {value!r}{_did_you_mean(value, names)}")
        return number
    raise fail(f"errno must be a name like 'EPERM' or a number, got {value!r}")


def _did_you_mean(word: str, candidates: tuple[str, ...] | list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------
# installing (child side; libc only)
# --------------------------------------------------------------------------------------------------


_SECCOMP_SET_MODE_FILTER: Final = 1
_PR_SET_SECCOMP: Final = 22
_SECCOMP_MODE_FILTER: Final = 2
_NR_SECCOMP: Final = {"x86_64": 317, "aarch64": 277, "i686": 354, "riscv64": 277}.get(os.uname().machine, -1)

# Resolved at import, in the parent, so the child does no dlopen/dlsym work.
_libc = ctypes.CDLL(None, use_errno=True)
_libc_syscall = _libc.syscall
_libc_syscall.restype = ctypes.c_long
_libc_prctl = _libc.prctl
_libc_prctl.restype = ctypes.c_int
_C_NR_SECCOMP: Final = ctypes.c_long(_NR_SECCOMP)
_C_SET_MODE_FILTER: Final = ctypes.c_long(_SECCOMP_SET_MODE_FILTER)
_C_ZERO: Final = ctypes.c_long(0)


def install_program(program: SeccompProgram) -> None:
    """Install ``program`` on the calling thread with one ``seccomp(2)`` call.

    Does nothing for the "off" program. The kernel accepts a filter only from a
    process with no_new_privs set or CAP_SYS_ADMIN in its user namespace; the
    child bootstrap sets no_new_privs in an earlier stage. The filter is
    inherited by children and kept across execve; it cannot be removed.

    Raises SetupError("seccomp", ..., errno) if the kernel refuses the filter.
    """
    if not program.enabled:
        return
    prog_ref = program._kernel_args[2]
    ctypes.set_errno(0)
    if _NR_SECCOMP >= 0:
        rc = _libc_syscall(_C_NR_SECCOMP, _C_SET_MODE_FILTER, _C_ZERO, prog_ref)
        err = ctypes.get_errno() if rc != 0 else 0
    else:
        rc, err = -1, errno_mod.ENOSYS
    if rc != 0 and err == errno_mod.ENOSYS:  # kernel < 3.17: only the prctl interface
        rc = _libc_prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), prog_ref)
        err = ctypes.get_errno() if rc != 0 else 0
    if rc != 0:
        hint = ""
        if err == errno_mod.EACCES:
            hint = " (no_new_privs is not set and the process lacks CAP_SYS_ADMIN)"
        raise SetupError(STAGE, f"installing filter {program.name!r} failed: {os.strerror(err)}{hint}", err)
