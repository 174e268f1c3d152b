"""The compiled built-in seccomp programs (deny-list, allow-list), kept on disk between runs.

Compiling the default profile means importing pyseccomp (which loads libseccomp
through ctypes.util) and building the filter: several milliseconds, paid by every
`ndf-sandbox run`, for a program that only changes when its inputs do. The first
compile writes it next to the installed modules, in this package's
``linux/__pycache__/``; later runs read it back when every input of the compile is
unchanged:

- the machine architecture and the kernel release (libseccomp probes the kernel's
  seccomp API level),
- the libseccomp this process would load (its file's device, inode, size and
  mtime, found by loading it by its soname, as pyseccomp does),
- the modules that define the profile (seccomp.py and this file: an upgrade or a
  reinstall changes their stat).

Why there and not in the user's cache directory: whoever can write the file decides
the filter of every later sandbox, and a sandbox can write where the user can (a
writable bind of the home or cache directory, an ``owner = "caller"`` bind, an
unprivileged caller whose sandbox uid maps to the user). The installation's own
directory is trusted exactly as much as the code beside it: a sandbox that could
write it could rewrite seccomp.py as well. So the file is trusted only if it and its
directory belong to the owner of this module's file and are writable by nobody else,
and it is written only by that owner (an installation the caller cannot write
compiles every time). Only the built-in profiles (deny-list, allow-list) are cached, one
file each; profile files are compiled each time (their own in-memory cache aside). Anything that does not parse
is compiled fresh. Nothing here fails a launch: a cache that cannot be read or
written is no cache.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .seccomp import SeccompProgram

FORMAT = "ndf-seccomp-program 2"
LIBSECCOMP_SONAME = "libseccomp.so.2"
_DIR_NAME = "neural-doc-flow-security"


def cache_dir() -> str | None:
    """Where the cache lives: beside this module, in the installation (see the module
    docstring for why), or None if its directory cannot be told."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "__pycache__") if os.path.isabs(here) else None


def cache_file(spec: str = "deny-list") -> str | None:
    """The cache file of built-in program `spec` of this installation on this architecture, or None."""
    directory = cache_dir()
    if directory is None:
        return None
    return os.path.join(directory, f"seccomp-{spec}-{os.uname().machine}.ndfcache")


def _code_owner() -> int:
    """Who owns this module's file: the only writer the cache may have."""
    return os.stat(__file__).st_uid


def _libseccomp_file() -> str:
    """The path of the libseccomp the dynamic loader gives this process."""
    ctypes.CDLL(LIBSECCOMP_SONAME)  # as pyseccomp loads it; a no-op once loaded
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if os.path.basename(path).startswith(b"libseccomp.so"):
                return os.fsdecode(path)
    raise OSError(f"{LIBSECCOMP_SONAME} is not mapped after loading it")


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def cache_key() -> str:
    """Every input of the default program's compile that can change on this host."""
    from . import seccomp

    uname = os.uname()
    return "|".join((uname.machine, uname.release, _stamp(_libseccomp_file()),
                     _stamp(seccomp.__file__), _stamp(__file__)))


def load(key: str, spec: str = "deny-list") -> SeccompProgram | None:
    """The cached built-in program `spec` compiled for `key`, or None."""
    path = cache_file(spec)
    if path is None:
        return None
    try:
        data = _read_trusted(path)
    except OSError:
        return None
    return None if data is None else _parse(data, key)


def store(key: str, program: SeccompProgram, spec: str = "deny-list") -> None:
    """Keep `program` (built-in `spec`, compiled for `key`) for later runs; best effort."""
    path = cache_file(spec)
    fields = [FORMAT, key, program.name, program.description, " ".join(program.denied),
              "\x1f".join(program.skipped), str(program.instructions), program.bpf.hex(),
              program.reported_bpf.hex(), program.notify_errnos.hex()]
    if path is None or any("\n" in f for f in fields):
        return
    directory = os.path.dirname(path)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        if os.geteuid() != _code_owner():
            return  # only the installation's owner writes beside its code
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if not _owned_by_us(os.lstat(directory), directory=True):
            return
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, ("\n".join(fields) + "\n").encode())
        finally:
            os.close(fd)
        os.rename(temporary, path)  # whole or not at all, for a run reading meanwhile
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass


def load_or_compile(spec: str, compile_builtin: Callable[[], SeccompProgram]) -> SeccompProgram:
    """Built-in program `spec`: from the cache if its inputs are unchanged, else
    `compile_builtin()`, which is then cached."""
    try:
        key = cache_key()
    except OSError:  # no libseccomp to identify: compiling says what is wrong
        return compile_builtin()
    program = load(key, spec)
    if program is None:
        program = compile_builtin()
        store(key, program, spec)
    return program


def _owned_by_us(st: os.stat_result, *, directory: bool) -> bool:
    """Whether `st` is of the right kind, belongs to the code's owner and nobody else may write it."""
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind_ok and st.st_uid == _code_owner() and not st.st_mode & 0o022


def _read_trusted(path: str) -> bytes | None:
    """The file's content if it and its directory are the code owner's alone, else None."""
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not _owned_by_us(os.fstat(dir_fd), directory=True):
            return None
        fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not _owned_by_us(st, directory=False) or st.st_size > 1 << 20:
            return None
        return os.read(fd, st.st_size + 1)
    finally:
        os.close(fd)


def _parse(data: bytes, key: str) -> SeccompProgram | None:
    from .seccomp import SeccompProgram

    try:
        lines = data.decode().split("\n")
        if len(lines) != 11 or lines[0] != FORMAT or lines[1] != key or lines[10]:
            return None
        name, description, denied, skipped, instructions, bpf, reported_bpf, notify_errnos = lines[2:10]
        return SeccompProgram(name=name, description=description, bpf=bytes.fromhex(bpf),
                              instructions=int(instructions), denied=tuple(denied.split()),
                              skipped=tuple(skipped.split("\x1f")) if skipped else (),
                              reported_bpf=bytes.fromhex(reported_bpf), notify_errnos=bytes.fromhex(notify_errnos))
    except ValueError:  # not UTF-8, not hex, a size that does not match
        return None
