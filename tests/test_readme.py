"""README.md stays true to the code: every CLI flag it shows exists and every flag
of `ndf-sandbox` is documented there; every public name of the API is exported,
documented and named in the README; the table of contents lists every section."""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import neural_doc_flow_security.sandbox as sandbox
from neural_doc_flow_security.sandbox.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _cli_flags() -> set[str]:
    return {flag for parser in _parsers(build_parser()) for action in parser._actions
            for flag in action.option_strings if flag.startswith("--")}


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])")


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _readme_cli_flags() -> set[str]:
    """The `--flags` the README shows on an `ndf-sandbox` command or in the CLI section."""
    text = _readme()
    cli = text[text.index("\n## CLI\n"):]
    cli = cli[:cli.index("\n## ", 1)]
    # another program's flags (systemd-run --user) count only after `ndf-sandbox`
    lines = [line.rpartition("ndf-sandbox")[2] if "ndf-sandbox" in line else line
             for line in text.splitlines() + cli.splitlines()
             if "ndf-sandbox" in line or (line in cli and "systemd-run" not in line)]
    return set(FLAG.findall("\n".join(lines)))


def test_every_cli_flag_the_readme_shows_exists() -> None:
    assert sorted(_readme_cli_flags() - _cli_flags()) == []


def test_every_cli_flag_is_documented_in_the_readme() -> None:
    documented = set(FLAG.findall(_readme()))
    assert sorted(_cli_flags() - documented) == []


def test_every_audit_event_kind_is_in_the_readme_table() -> None:
    from neural_doc_flow_security.sandbox import audit

    kinds = set(re.findall(r'"const": *"([a-z_]+)"', Path(audit.schema_path()).read_text()))
    table = _readme().split("\n### Audit log\n")[1].split("\n#")[0]
    rows = {kind for line in table.splitlines() if line.startswith("| `")
            for kind in re.findall(r"`([a-z_]+)`", line.split(" | ")[0])}
    assert sorted(kinds - rows) == []


def test_table_of_contents_lists_every_section() -> None:
    text = _readme()
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    contents = text[text.index("\n## Contents\n"):]
    contents = contents[:contents.index("\n## ", 1)]
    toc = re.findall(r"^- \[(.+?)\]\(#[^)]+\)$", contents, re.MULTILINE)
    assert [h for h in headings if h != "Contents"] == toc, "add the section to README.md's Contents, in order"


@pytest.mark.parametrize("name", sandbox.__all__)
def test_public_name_is_exported_documented_and_in_the_readme(name: str) -> None:
    obj = getattr(sandbox, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"
    if inspect.isclass(obj):
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if inspect.isfunction(function):
                assert function.__doc__, f"{name}.{member} has no docstring"
    assert re.search(rf"\b{name}\b", _readme()), f"{name} is not named in README.md"


@pytest.mark.skipif(os.geteuid() != 0, reason="the example sets a memory limit: as root, or with a delegated cgroup")
def test_the_python_api_example_runs_as_shown(tmp_path: Path) -> None:
    example = re.findall(r"```python\n(.*?)```", _readme(), re.DOTALL)[0]
    assert "asyncio.run(main())" in example
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["ok", "3"]


def test_the_profile_examples_load(tmp_path: Path) -> None:
    from neural_doc_flow_security.sandbox import NetworkPolicy, SandboxConfig

    profile, network = re.findall(r"```toml\n(.*?)```", _readme(), re.DOTALL)
    (tmp_path / "plain.toml").write_text(profile)
    assert SandboxConfig.from_toml(tmp_path / "plain.toml").memory_limit_mb == 256
    (tmp_path / "policy.toml").write_text(profile.replace('network = "none"', "") + network)
    assert isinstance(SandboxConfig.from_toml(tmp_path / "policy.toml").network, NetworkPolicy)
