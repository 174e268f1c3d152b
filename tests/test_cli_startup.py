"""`ndf-sandbox run` starts lean: its plain command lines are parsed without building
argparse's parsers, into exactly what argparse gives, and the run path imports
nothing it does not need (issue #20 item 3)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from neural_doc_flow_security.sandbox import cli
from neural_doc_flow_security.sandbox.cli import build_parser

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the Linux sandbox")

PLAIN = [
    ["--", "/bin/true"],
    ["/bin/echo", "--memory", "1G"],  # everything from the command on is its own
    ["--memory", "1G", "--timeout=none", "--pids", "64", "--", "/bin/echo", "-n", "x"],
    ["--net", "--net", "--net-allow", "10.0.3.2:80", "--net-allow=host", "--net-dns", "--", "x"],
    ["--no-net", "--ro-bind", "/srv/in:/in", "--bind", "/srv/out", "--bind-owner", "caller", "--", "x"],
    ["--ro-bind", "/a", "--ro-bind=/b:/c", "--bind", "/d", "x"],
    ["--env", "A=B", "--env", "C=", "--env", "", "--cap", "CAP_NET_RAW", "--ambient-cap", "CAP_CHOWN", "x"],
    ["--nofile", "12", "--uid", "1000", "--gid=1000", "--landlock", "off", "--seccomp", "allow-list", "x"],
    ["--rootless-limits", "rlimit", "--python", "--overlay", "--overlay-changes", "report", "--cwd", "/tmp", "x"],
    ["--json-result", "/tmp/r.json", "--audit-log", "/tmp/a.log", "--hostname", "h", "--tmpfs-size", "8M", "--"],
    ["--memory", "1G"],  # no command: run says so
    [],
]

# Forms only argparse reads right (or reports): the fast parser must leave them to it.
LEFT_TO_ARGPARSE = [
    ["-h"],
    ["--help"],
    ["--mem", "1G", "--", "x"],  # an abbreviation
    ["--memory", "-1", "--", "x"],  # a value like an option
    ["--memory", "--", "x"],
    ["--memory"],
    ["--memory=", "--", "x"],
    ["--python=yes", "--", "x"],
    ["--net", "--no-net", "--", "x"],  # mutually exclusive
    ["--bind-to", "/a", "/b", "--", "x"],  # nargs=2
    ["--nofile", "many", "--", "x"],
    ["--landlock", "sometimes", "--", "x"],
    ["--no-such-option", "--", "x"],
    ["-", "x"],
]


@pytest.mark.parametrize("argv", PLAIN, ids=lambda a: " ".join(a) or "(none)")
def test_plain_command_lines_parse_exactly_as_argparse_does(argv: list[str]) -> None:
    fast = cli._parse_run_fast(argv)
    assert fast is not None, "a plain command line fell back to argparse"
    slow = vars(build_parser().parse_args(["run", *argv]))
    assert slow.pop("subcommand") == "run"
    assert vars(fast) == slow


@pytest.mark.parametrize("argv", LEFT_TO_ARGPARSE, ids=" ".join)
def test_other_forms_are_left_to_argparse(argv: list[str]) -> None:
    assert cli._parse_run_fast(argv) is None


@pytest.mark.parametrize("argv", [["--nofile", "many"], ["--bogus"], ["--net", "--no-net"], ["--memory"], ["-h"]],
                         ids=" ".join)
def test_errors_and_help_are_the_full_parsers_own(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """What main() prints and exits with is exactly what the full parser does."""
    with pytest.raises(SystemExit) as expected:
        build_parser().parse_args(["run", *argv, "--", "/bin/true"])
    wanted = capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", *argv, "--", "/bin/true"])
    assert exit_info.value.code == expected.value.code
    assert capsys.readouterr() == wanted


_IMPORTED = """
import sys
from neural_doc_flow_security.sandbox.cli import main
status = main(["run", "--", "/bin/true"])
print(status, " ".join(sorted(sys.modules)))
"""
# Not needed to run a program: the asyncio API, the IPC of callables, logging
# (without --audit-log), TOML (without --profile), pickle (a zygote's), the full
# argparse parser (HelpFormatter imports shutil), the live-limits API.
NOT_ON_THE_RUN_PATH = (
    "asyncio", "logging", "tomllib", "pickle", "shutil", "subprocess",
    "neural_doc_flow_security.sandbox.api", "neural_doc_flow_security.sandbox.ipc.messages",
    "neural_doc_flow_security.sandbox.ipc.memfd", "neural_doc_flow_security.sandbox.live_limits",
    "neural_doc_flow_security.sandbox.launch.zygote", "neural_doc_flow_security.sandbox.executor",
)


def test_the_run_path_imports_nothing_it_does_not_need() -> None:
    from neural_doc_flow_security.sandbox.linux import seccomp_cache

    modules: set[str] = set()
    for _ in range(2):  # the first run may compile (and cache) the seccomp programs
        done = subprocess.run([sys.executable, "-c", _IMPORTED], capture_output=True, text=True, timeout=120,
                              check=False, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        status, _, names = done.stdout.strip().partition(" ")
        assert status == "0", done.stderr
        modules = set(names.split())
    assert "neural_doc_flow_security.sandbox.launch.supervise" in modules  # it did run the program
    assert sorted(set(NOT_ON_THE_RUN_PATH) & modules) == []
    if os.geteuid() == os.stat(seccomp_cache.__file__).st_uid:  # the cache is ours to write: warm now
        assert "pyseccomp" not in modules


def _run_options() -> list[cli._RecordedOption]:
    options: list[cli._RecordedOption] = []
    cli._add_run_arguments(cli._Recorder(options))  # type: ignore[arg-type]
    return options


@pytest.mark.parametrize("option", [o for o in _run_options() if o.plain], ids=lambda o: o.flags[0])
def test_every_plain_option_parses_as_argparse_does(option: cli._RecordedOption) -> None:
    """Each option of `run` (those added later too), given alone and twice, in both spellings."""
    value = [str(option.choices[0]) if option.choices else "7" if option.type is int else "/srv/x"]
    given = [option.flags[0], *(value if option.takes_value else [])]
    twice = [*given, f"{option.flags[-1]}={value[0]}" if option.takes_value else option.flags[-1]]
    for argv in (given, twice):
        fast = cli._parse_run_fast([*argv, "--", "/bin/true"])
        assert fast is not None, argv
        slow = vars(build_parser().parse_args(["run", *argv, "--", "/bin/true"]))
        slow.pop("subcommand")
        assert vars(fast) == slow, argv
