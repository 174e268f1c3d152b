"""The default seccomp program kept on disk between runs (linux/seccomp_cache.py).

What is read back must be exactly what libseccomp compiles now for the same
inputs; anything else (changed inputs, a file others could have written, a
damaged file, a profile file instead of "default") is compiled fresh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import CLI_TIMEOUT, SandboxCaller, ndf_host_env

pytest.importorskip("pyseccomp")

from neural_doc_flow_security.sandbox.linux import seccomp, seccomp_cache  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="seccomp is Linux only")


def fields(program: seccomp.SeccompProgram) -> tuple[object, ...]:
    return (program.name, program.description, program.bpf, program.instructions, program.denied, program.skipped)


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of our own (in place of the installation's), and no program
    compiled yet in this process."""
    monkeypatch.setattr(seccomp_cache, "cache_dir", lambda: str(tmp_path / "__pycache__"))
    monkeypatch.setattr(seccomp_cache, "_code_owner", os.geteuid)
    monkeypatch.setattr(seccomp, "_cache", {})
    return tmp_path


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every compile with libseccomp (the names of the profiles compiled)."""
    calls: list[str] = []

    def counting(profile: seccomp.SeccompProfile) -> seccomp.SeccompProgram:
        calls.append(profile.name)
        return _BUILD(profile)

    monkeypatch.setattr(seccomp, "build_program", counting)
    return calls


_BUILD = seccomp.build_program


def fresh_default() -> seccomp.SeccompProgram:
    """The default program as libseccomp compiles it now (never counted, never cached)."""
    return _BUILD(seccomp.default_profile())


def test_cached_default_program_is_exactly_a_fresh_compile(cache_home: Path, compiles: list[str]) -> None:
    expected = fresh_default()
    first = seccomp.compile_profile("default")
    assert compiles == ["deny-list"]
    path = seccomp_cache.cache_file()
    assert path is not None and path.startswith(str(cache_home))
    assert os.stat(path).st_mode & 0o022 == 0
    seccomp._cache.clear()  # as a new process would start
    loaded = seccomp.compile_profile("default")
    assert compiles == ["deny-list"], "the second process compiled again"
    assert loaded is not first
    assert fields(loaded) == fields(first) == fields(expected)


def test_the_allow_list_and_its_reported_variant_are_cached_too(cache_home: Path, compiles: list[str]) -> None:
    first = seccomp.compile_profile("allow-list")
    seccomp._cache.clear()
    loaded = seccomp.compile_profile("allow-list")
    assert compiles == ["allow-list"]
    assert fields(loaded) == fields(first)
    assert loaded.reports and (loaded.reported_bpf, loaded.notify_errnos) == (first.reported_bpf, first.notify_errnos)


def test_changed_inputs_compile_again(cache_home: Path, compiles: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seccomp.compile_profile("default")
    seccomp._cache.clear()
    key = seccomp_cache.cache_key()
    monkeypatch.setattr(seccomp_cache, "cache_key", lambda: key.replace(os.uname().release, "another-kernel"))
    assert fields(seccomp.compile_profile("default")) == fields(fresh_default())
    assert compiles == ["deny-list", "deny-list"]


@pytest.mark.parametrize("damage", ["group-writable", "not-ours", "garbage", "short", "symlink"])
def test_a_cache_file_that_is_not_ours_alone_or_damaged_is_not_used(
        cache_home: Path, compiles: list[str], damage: str) -> None:
    seccomp.compile_profile("default")
    seccomp._cache.clear()
    path = Path(str(seccomp_cache.cache_file()))
    if damage == "group-writable":
        path.chmod(0o620)
    elif damage == "not-ours":
        os.chown(path, 4242, 4242) if os.geteuid() == 0 else pytest.skip("chown needs root")
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 100)
    elif damage == "short":  # a BPF program cut off: its size no longer matches
        lines = path.read_text().split("\n")
        lines[7] = lines[7][:-16]
        path.write_text("\n".join(lines))
    else:
        elsewhere = cache_home / "elsewhere"
        path.rename(elsewhere)
        path.symlink_to(elsewhere)
    assert fields(seccomp.compile_profile("default")) == fields(fresh_default())
    assert compiles == ["deny-list", "deny-list"]


def test_profile_files_are_compiled_fresh_and_not_cached(cache_home: Path, compiles: list[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cache(*_args: object) -> None:
        raise AssertionError("a profile file must not go through the default program's cache")

    monkeypatch.setattr(seccomp_cache, "load_or_compile", no_cache)
    path = cache_home / "same-as-default.toml"
    path.write_text('extends = "default"\n')
    program = seccomp.compile_profile(str(path))
    assert compiles == [str(path)]
    assert program.name == str(path) and program.bpf == fresh_default().bpf
    assert not (cache_home / "__pycache__").exists()


def test_a_caller_who_does_not_own_the_installation_neither_writes_nor_trusts_a_cache(
        cache_home: Path, compiles: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seccomp.compile_profile("default")
    seccomp._cache.clear()
    monkeypatch.setattr(seccomp_cache, "_code_owner", lambda: os.geteuid() + 1)
    assert fields(seccomp.compile_profile("default")) == fields(fresh_default())
    assert compiles == ["deny-list", "deny-list"]
    path = Path(str(seccomp_cache.cache_file()))
    path.unlink()
    seccomp._cache.clear()
    seccomp.compile_profile("default")
    assert not path.exists(), "a caller who does not own the code wrote beside it"


# A filter that allows everything (BPF_RET|BPF_K SECCOMP_RET_ALLOW), written over every
# cached program the sandbox can reach, keeping the key line so that it would be read back.
FORGE = ("for f in $(find /h -name 'seccomp-*' -type f); do "
         "sed -i -e '7s/.*/1/' -e '8s/.*/060000000000ff7f/' \"$f\" && echo forged \"$f\"; done; true")
LOADED_IS_FRESH = """
from neural_doc_flow_security.sandbox.linux import seccomp
print(seccomp.compile_profile("default").bpf == seccomp.build_program(seccomp.default_profile()).bpf)
"""


def test_a_sandbox_writing_the_callers_home_cannot_choose_the_filter_of_later_runs(
        sandbox_caller: SandboxCaller) -> None:
    """A writable bind of the caller's home whose files belong to the caller (what an
    output directory in the home looks like): whatever the sandbox writes there, the
    program the caller's next process installs is what libseccomp compiles."""
    base = Path(tempfile.mkdtemp(prefix="ndf-seccomp-home-"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir(mode=0o700)
        os.chown(home, sandbox_caller.uid, sandbox_caller.uid)
        env = ndf_host_env(HOME=str(home))
        first = sandbox_caller.run([], ["true"], env=env)
        assert first.returncode == 0, first.stderr.decode()
        forge = sandbox_caller.run(["--bind", f"{home}:/h", "--bind-owner", "caller"], ["/bin/sh", "-c", FORGE],
                                   env=env)
        assert forge.returncode == 0, forge.stderr.decode()
        check = subprocess.run([*sandbox_caller.prefix, sys.executable, "-c", LOADED_IS_FRESH], env=env,
                               cwd="/tmp", capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False)
        assert check.stdout.split() == ["True"], (forge.stdout.decode(), check.stdout, check.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)


RUN_AND_LIST_IMPORTS = """
import sys
from neural_doc_flow_security.sandbox.cli import main
status = main(["run", "--", "/bin/sh", "-c", "grep -q '^Seccomp:[[:space:]]*2' /proc/self/status"])
print(status, *sorted(m for m in ("pyseccomp", "ctypes.util", "subprocess", "importlib.metadata", "asyncio",
                                  "tomllib", "json", "logging") if m in sys.modules))
"""


def test_cli_run_with_the_cached_filter_imports_no_libseccomp_binding() -> None:
    """`ndf-sandbox run` reads the cached program (no pyseccomp, ctypes.util, subprocess),
    and its payload runs under a seccomp filter all the same."""
    if os.geteuid() != os.stat(seccomp_cache.__file__).st_uid:
        pytest.skip("the cache is written by the installation's owner only")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    runs = [subprocess.run([sys.executable, "-c", RUN_AND_LIST_IMPORTS], capture_output=True, text=True,
                           cwd="/", env=env, timeout=60, check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == "0", runs[0]  # compiled (and cached) unless an earlier run cached it
    assert runs[1] == ["0"], f"the second run imported {runs[1][1:]}"
