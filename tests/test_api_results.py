"""Results and exceptions (issue 21): the plugin's exception class, its traceback
and the whole result reach the caller; nothing the sandbox names is imported or
run on the host; output cut at the limit says so."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

import api_helpers
from api_helpers import (
    LeakTracker,
    describe,
    linux_only,
    make_host_dir,
    manager,
    needs_root,
    run,
)
from neural_doc_flow_security.sandbox import errors
from neural_doc_flow_security.sandbox.errors import OutcomeError, SandboxError
from neural_doc_flow_security.sandbox.executor import SandboxExecutor
from neural_doc_flow_security.sandbox.result import Outcome, SandboxResult

no_leaks = api_helpers.no_leaks  # the fixture, used by every test below

pytestmark = [linux_only, needs_root, pytest.mark.usefixtures("no_leaks"), pytest.mark.timeout(300)]

RESULT_TIMEOUT = 120.0


async def call(function: Any, *args: Any, **options: Any) -> SandboxResult:
    async with manager("zygote", **options) as m:
        return await m.execute_sandboxed("results", function, *args)


class PdfStreamError(Exception):
    """Stands for a library's exception class (importable on the host)."""


class NeedsCode(Exception):
    """An exception whose constructor is Python code: never run on the sandbox's text."""

    built = 0

    def __init__(self, message: str) -> None:
        NeedsCode.built += 1
        super().__init__(message)


def test_result_carries_the_exception_type_message_and_traceback() -> None:
    def parse() -> None:
        print("parsing page 1")
        raise PdfStreamError("stream ended early")

    result = run(call(parse))
    assert result.outcome is Outcome.ERROR, describe(result)
    assert result.error_type == f"{__name__}.PdfStreamError"
    assert result.error_message == "stream ended early"
    assert result.traceback is not None and "in parse" in result.traceback
    with pytest.raises(OutcomeError) as raised:
        result.raise_for_outcome()
    assert raised.value.error_type == f"{__name__}.PdfStreamError"
    assert raised.value.result is result
    assert isinstance(raised.value.__cause__, errors.RemoteTraceback)
    assert "stream ended early" in str(raised.value.__cause__)


def test_executor_re_raises_the_plugin_class_with_its_output() -> None:
    def parse(name: str) -> None:
        print(f"opened {name}")
        raise PdfStreamError(f"{name}: stream ended early")

    with SandboxExecutor() as executor:
        future = executor.submit(parse, "a.pdf")
        with pytest.raises(PdfStreamError, match="a.pdf: stream ended early") as raised:
            future.result(timeout=RESULT_TIMEOUT)
    assert type(raised.value) is PdfStreamError
    assert isinstance(raised.value.__cause__, errors.RemoteTraceback)
    assert "in parse" in str(raised.value.__cause__)
    assert raised.value.sandbox_result.stdout == b"opened a.pdf\n"  # type: ignore[attr-defined]


def test_a_class_the_host_cannot_rebuild_is_an_outcome_error_with_the_result() -> None:
    def parse() -> None:
        class LocalError(Exception):
            pass

        print("some output")
        raise LocalError("only the sandbox knows this class")

    with SandboxExecutor() as executor, pytest.raises(OutcomeError, match="only the sandbox knows") as raised:
        executor.submit(parse).result(timeout=RESULT_TIMEOUT)
    error = raised.value
    assert error.outcome == "error"
    assert error.error_type is not None and error.error_type.endswith("parse.<locals>.LocalError")
    assert error.result is not None and error.result.stdout == b"some output\n"
    assert isinstance(error.__cause__, errors.RemoteTraceback)


def test_no_host_code_runs_for_an_exception_class_with_a_python_constructor() -> None:
    before = NeedsCode.built

    def parse() -> None:
        raise NeedsCode("built from the sandbox's text?")

    with SandboxExecutor() as executor, pytest.raises(OutcomeError) as raised:
        executor.submit(parse).result(timeout=RESULT_TIMEOUT)
    assert raised.value.error_type == f"{__name__}.NeedsCode"
    assert NeedsCode.built == before, "the host ran the class's __init__ on the sandbox's message"


def test_a_module_named_by_the_sandbox_is_never_imported(no_leaks: LeakTracker) -> None:
    directory = make_host_dir(no_leaks)
    module = f"ndf_import_bait_{os.getpid()}"
    marker = directory / "imported"
    (directory / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Boom(Exception):\n    pass\n")
    sys.path.insert(0, str(directory))
    try:
        def hostile() -> None:
            raise type("Boom", (Exception,), {"__module__": module})("look me up")

        with SandboxExecutor() as executor, pytest.raises(OutcomeError) as raised:
            executor.submit(hostile).result(timeout=RESULT_TIMEOUT)
    finally:
        sys.path.remove(str(directory))
    assert raised.value.error_type == f"{module}.Boom"
    assert module not in sys.modules
    assert not marker.exists(), "the host imported a module the sandbox named"


@pytest.mark.parametrize(("module", "name"), [
    ("builtins", "KeyboardInterrupt"), ("builtins", "SystemExit"), ("builtins", "GeneratorExit"),
    ("neural_doc_flow_security.sandbox.errors", "UnsupportedError"),
    ("neural_doc_flow_security.sandbox.errors", "SandboxError"),
])
def test_a_plugin_cannot_raise_control_flow_or_sandbox_errors_in_the_host(module: str, name: str) -> None:
    def plugin() -> None:
        raise type(name, (Exception,), {"__module__": module})("stop the host, or pass for the sandbox")

    with SandboxExecutor() as executor, pytest.raises(SandboxError) as raised:
        executor.submit(plugin).result(timeout=RESULT_TIMEOUT)
    assert type(raised.value) is OutcomeError and raised.value.outcome == "error"
    assert raised.value.error_type == (name if module == "builtins" else f"{module}.{name}")


def test_outcomes_without_an_exception_are_outcome_errors() -> None:
    import time

    from neural_doc_flow_security.sandbox.config import SandboxConfig

    with SandboxExecutor(SandboxConfig(timeout_seconds=1)) as executor, pytest.raises(OutcomeError) as raised:
        executor.submit(time.sleep, 300).result(timeout=RESULT_TIMEOUT)
    assert raised.value.outcome == "timeout"
    assert raised.value.error_type is None and raised.value.result is not None


def test_output_over_the_limit_is_flagged_as_truncated() -> None:
    def chatty(count: int) -> int:
        os.write(1, b"o" * count)
        os.write(2, b"e" * 10)
        return count

    limit = 4096
    cut = run(call(chatty, limit + 1, output_limit=limit))
    assert cut.ok, describe(cut)
    assert cut.stdout == b"o" * limit and cut.stdout_truncated
    assert cut.stderr == b"e" * 10 and not cut.stderr_truncated
    exact = run(call(chatty, limit, output_limit=limit))
    assert exact.stdout == b"o" * limit and not exact.stdout_truncated


def test_default_output_limit_is_one_mebibyte_per_stream(no_leaks: LeakTracker) -> None:
    async def scenario() -> SandboxResult:
        async with manager("zygote") as m:
            return await m.execute_command("head", ["head", "-c", str(2 * 1024 * 1024), "/dev/zero"])

    result = run(scenario())
    assert result.ok, describe(result)
    assert len(result.stdout) == 1024 * 1024 and result.stdout_truncated
    assert not result.stderr_truncated



def test_only_plain_builtin_exception_classes_are_rebuilt_from_sandbox_text() -> None:
    # A sandbox names the class; rebuilding it must run no code of the host's on its text,
    # and must not raise what steers the caller's control flow.
    import concurrent.futures
    import functools

    from neural_doc_flow_security.sandbox.remote_errors import _rebuildable

    class Meta(type):
        def __call__(cls, *args: object) -> object:
            raise AssertionError("ran on the sandbox's text")

    class WithMeta(Exception, metaclass=Meta):
        pass

    class CachedInit(ValueError):
        __init__ = functools.lru_cache(maxsize=None)(ValueError.__init__)  # type: ignore[assignment]

    class Plain(ValueError):
        pass

    assert _rebuildable(ValueError) and _rebuildable(OSError) and _rebuildable(Plain)
    for cls in (StopIteration, StopAsyncIteration, TimeoutError, concurrent.futures.CancelledError,
                WithMeta, CachedInit, SandboxError):
        assert not _rebuildable(cls), cls
