"""`ndf-sandbox run` behaves like the tools users know (issue 21, CLI consistency):
--version, 0 is not "unlimited", bad options exit 2 before anything runs (a
--json-result that cannot be written, a missing --seccomp file, a relative --cwd),
the JSON result names the argv, and --help documents every option."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from conftest import SandboxCaller
from neural_doc_flow_security.sandbox.cli import build_parser
from test_cli import describe, ndf


def test_version_prints_the_installed_version() -> None:
    from importlib import metadata

    result = ndf("--version")
    assert result.returncode == 0, describe(result)
    assert result.stdout.decode().strip() == f"ndf-sandbox {metadata.version('neural-doc-flow-security')}"


@pytest.mark.parametrize(("options", "field"), [
    (["--timeout", "0"], "timeout_seconds"),
    (["--timeout", "0.0"], "timeout_seconds"),
    (["--memory", "0"], "memory_limit_mb"),
    (["--memory", "0M"], "memory_limit_mb"),
    (["--pids", "0"], "max_processes"),
    (["--cpu", "0"], "cpu_quota_percent"),
    (["--max-file-size", "0"], "max_file_size_mb"),
    (["--io-read-bps", "0"], "io_read_bps"),
])
def test_zero_is_refused_like_the_api_and_none_means_no_limit(options: list[str], field: str,
                                                              shared_host_dir: Path) -> None:
    """0 meant "unlimited" on the command line while SandboxConfig refuses 0: the
    command ran with no limit at all. Now it exits 2 before running, saying to write none."""
    marker = shared_host_dir / "ran"
    result = ndf("run", *options, "--", "touch", str(marker))
    assert result.returncode == 2, describe(result)
    assert f"{field}: must be > 0" in result.stderr.decode() and "none" in result.stderr.decode()
    assert not marker.exists()


def test_none_and_unlimited_mean_no_limit(root_caller: SandboxCaller, shared_host_dir: Path) -> None:
    report = shared_host_dir / "r.json"
    result = root_caller.run(["--timeout", "none", "--memory", "unlimited", "--json-result", str(report)],
                             ["true"])
    assert result.returncode == 0, describe(result)
    limits = " ".join(json.loads(report.read_text())["isolation"]["limits"])
    assert "memory_limit_mb" not in limits and "timeout" not in limits


def test_unwritable_json_result_exits_2_before_running(shared_host_dir: Path) -> None:
    marker = shared_host_dir / "ran"
    target = shared_host_dir / "no-such-dir" / "result.json"
    result = ndf("run", "--json-result", str(target), "--", "touch", str(marker))
    assert result.returncode == 2, describe(result)
    assert b"Traceback" not in result.stderr
    assert b"--json-result" in result.stderr
    assert not marker.exists()  # the command never ran


@pytest.mark.parametrize(("options", "expected"), [
    (["--seccomp", "/no/such/profile.toml"], "seccomp: /no/such/profile.toml: cannot read profile file"),
    (["--cwd", "relative/dir"], "--cwd: must be an absolute path"),
])
def test_bad_seccomp_file_and_relative_cwd_exit_2(options: list[str], expected: str,
                                                   shared_host_dir: Path) -> None:
    marker = shared_host_dir / "ran"
    result = ndf("run", *options, "--", "touch", str(marker))
    assert result.returncode == 2, describe(result)  # a bad command line, not 126 (a protection failed)
    assert expected in result.stderr.decode(), describe(result)
    assert b"Traceback" not in result.stderr
    assert not marker.exists()


def test_json_result_names_the_argv_and_exit_status(sandbox_caller: SandboxCaller,
                                                    shared_host_dir: Path) -> None:
    report = shared_host_dir / "result.json"
    argv = ["sh", "-c", "echo hi; exit 3", "arg with space"]
    result = sandbox_caller.run(["--json-result", str(report)], argv)
    assert result.returncode == 3, describe(result)
    assert result.stdout == b"hi\n"  # passed through, so not captured into the report
    data = json.loads(report.read_text())
    assert data["argv"] == argv
    assert data["exit_status"] == 3
    assert "stdout" not in data and "stderr" not in data


def test_json_result_of_a_missing_program_says_127(root_caller: SandboxCaller, shared_host_dir: Path) -> None:
    report = shared_host_dir / "result.json"
    result = root_caller.run(["--json-result", str(report)], ["/no/such/program"])
    assert result.returncode == 127, describe(result)
    data = json.loads(report.read_text())
    assert (data["outcome"], data["exit_status"], data["argv"]) == ("sandbox_error", 127, ["/no/such/program"])


def test_help_describes_every_option_and_gives_examples() -> None:
    result = ndf("run", "--help")
    assert result.returncode == 0, describe(result)
    text = result.stdout.decode()
    assert "examples:" in text and "ndf-sandbox run -- " in text
    assert "127" in text and "0 is refused" in text
    subparsers = next(a for a in build_parser()._actions if a.dest == "subcommand")
    run = subparsers.choices["run"]  # type: ignore[index]
    undocumented = [a.option_strings for a in run._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_profile_network_key_uses_the_cli_word(tmp_path: Path, shared_host_dir: Path) -> None:
    """`namespaces.net = true` meant *no* network while `--net` means the host's:
    profiles now say `network = "none" | "host"`; the old key warns."""
    profile = tmp_path / "p.toml"
    profile.write_text('network = "hots"\n')
    result = ndf("run", "--profile", str(profile), "--", "true")
    assert result.returncode == 2, describe(result)
    assert 'network: must be "none", "host" or a policy table' in result.stderr.decode()
    profile.write_text("[namespaces]\nnet = true\n")
    result = ndf("run", "--profile", str(profile), "--", "true")
    assert result.returncode == 0, describe(result)
    assert re.search(rb"FutureWarning: profile key namespaces.net is deprecated", result.stderr), describe(result)


def test_profile_network_host_and_none(tmp_path: Path) -> None:
    from neural_doc_flow_security.sandbox.config import SandboxConfig

    profile = tmp_path / "p.toml"
    for word, net_namespace in (("host", False), ("none", True)):
        profile.write_text(f'network = "{word}"\n')
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert SandboxConfig.from_toml(profile).namespaces.net is net_namespace
    profile.write_text('network = "host"\n[namespaces]\nnet = true\n')
    with pytest.warns(FutureWarning), pytest.raises(Exception, match="not both"):
        SandboxConfig.from_toml(profile)


def test_errors_name_the_option_or_the_profile_the_user_wrote(tmp_path: Path) -> None:
    result = ndf("run", "--timeout", "-1", "--", "true")
    assert result.returncode == 2, describe(result)
    assert "invalid configuration in --timeout: timeout_seconds: must be > 0" in result.stderr.decode()
    profile = tmp_path / "p.toml"
    profile.write_text("[capabilities]\nallowed = \"CAP_CHOWN\"\n")
    result = ndf("run", "--profile", str(profile), "--cap", "CAP_KILL", "--", "true")
    assert result.returncode == 2, describe(result)
    assert (f"invalid profile {profile}: capabilities.allowed: must be a list of capability names, "
            "got the string 'CAP_CHOWN'") in result.stderr.decode(), describe(result)
