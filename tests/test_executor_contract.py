"""The concurrent.futures.Executor contract, checked against the reference.

Every test runs once against `ProcessPoolExecutor` and once against
`SandboxExecutor`, with the same checks. Where the two may legitimately differ,
the check accepts either documented behaviour and the executor's description
(`Impl`) says which one it promises:

- cancel() of a running call: the standard executor returns False and lets it
  run; SandboxExecutor kills the sandbox and returns True (so map(timeout=...)
  leaves nothing running). Host-side evidence: the `sleep` the call started
  (found by its unique duration) is gone, or still there when cancel() said False.
- Exceptions: both re-raise the original class with the remote traceback as
  __cause__ (the sandbox rebuilds it from text: see remote_errors.py).

The calls start a `sleep` with a unique duration so that the host can see
whether a call is still running; the reference's sleeps are short (a running
call cannot be stopped there), the sandbox's are long (it must be stopped).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import api_helpers
from api_helpers import linux_only, needs_root, wait_until
from conftest import kill_processes_with_argument, processes_with_argument

no_leaks = api_helpers.no_leaks  # the fixture, used by the SandboxExecutor runs

pytestmark = [linux_only, needs_root, pytest.mark.timeout(300)]

RESULT_TIMEOUT = 120.0  # generous: the machine is noisy


@dataclass(frozen=True)
class Impl:
    """One executor under test and the behaviour it promises where the contract allows a choice."""

    name: str
    make: Callable[..., concurrent.futures.Executor]
    stops_running_calls: bool  # cancel() of a running call kills it and returns True
    sleep_seconds: int         # how long a "long" call sleeps (the reference cannot stop it)


def _sandbox_executor(max_workers: int | None = None, max_tasks_per_child: int | None = 1
                      ) -> concurrent.futures.Executor:
    from neural_doc_flow_security.sandbox.executor import SandboxExecutor

    return SandboxExecutor(max_workers=max_workers, max_tasks_per_child=max_tasks_per_child)


IMPLS = [
    Impl("ProcessPoolExecutor", lambda max_workers=None: concurrent.futures.ProcessPoolExecutor(max_workers),
         stops_running_calls=False, sleep_seconds=3),
    Impl("SandboxExecutor", _sandbox_executor, stops_running_calls=True, sleep_seconds=1000),
    # Reused sandboxed workers (tests/test_worker_reuse.py): the same contract.
    Impl("SandboxExecutor-max_tasks_per_child=3",
         lambda max_workers=None: _sandbox_executor(max_workers, max_tasks_per_child=3),
         stops_running_calls=True, sleep_seconds=1000),
]


@pytest.fixture(params=IMPLS, ids=lambda impl: impl.name)
def impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    chosen: Impl = request.param
    if chosen.name.startswith("SandboxExecutor"):
        request.getfixturevalue("no_leaks")  # no process, fd, cgroup of ours is left after the test
    yield chosen


@pytest.fixture
def markers() -> Iterator[list[str]]:
    """Unique sleep durations for the test's calls; their processes are killed at teardown."""
    made: list[str] = []
    yield made
    for marker in made:
        kill_processes_with_argument(marker)


def new_marker(markers: list[str], seconds: int) -> str:
    marker = f"{seconds}.{secrets.randbelow(10**9):09d}"
    markers.append(marker)
    return marker


# --- the calls (module level: the process pool pickles them by reference) ----------------

def square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def sleep_then(marker: str, value: int = 0) -> int:
    """Run `sleep <marker>` (visible on the host) and return value."""
    subprocess.run(["sleep", marker], check=False)
    return value


class ParseFailed(Exception):
    """A plugin's own exception class."""


def fail_parsing(name: str) -> None:
    raise ParseFailed(f"cannot parse {name}")


def running(marker: str) -> bool:
    return bool(processes_with_argument(marker))


# --- the contract ---------------------------------------------------------------------------

def test_with_block_waits_for_every_call(impl: Impl) -> None:
    with impl.make() as executor:
        futures = [executor.submit(square, i) for i in range(10)]
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [i * i for i in range(10)]


def test_shutdown_without_wait_lets_calls_finish(impl: Impl) -> None:
    executor = impl.make()
    futures = [executor.submit(square, i) for i in range(6)]
    executor.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)
    assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [i * i for i in range(6)]
    executor.shutdown(wait=True)  # a second call waits for the executor's own resources


def test_cancel_of_a_running_call(impl: Impl, markers: list[str], caplog: pytest.LogCaptureFixture,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    marker = new_marker(markers, impl.sleep_seconds)
    callbacks: list[concurrent.futures.Future[Any]] = []
    with impl.make() as executor:
        future = executor.submit(sleep_then, marker, 7)
        future.add_done_callback(callbacks.append)
        assert wait_until(lambda: running(marker), timeout=RESULT_TIMEOUT), "the call never started"
        assert future.running()
        cancelled = future.cancel()
        assert cancelled is impl.stops_running_calls
        if cancelled:
            assert future.cancelled() and future.done()
            assert not running(marker), "cancel() returned True but the call's process still runs"
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(timeout=0)
        else:
            assert future.result(timeout=RESULT_TIMEOUT) == 7
    assert callbacks == [future]
    logged = capfd.readouterr().err + caplog.text
    assert "InvalidStateError" not in logged and "Traceback" not in logged, logged


def test_cancel_of_a_pending_call(impl: Impl, markers: list[str]) -> None:
    with impl.make(max_workers=1) as executor:
        blocker = executor.submit(sleep_then, new_marker(markers, 3), 1)
        queued = [executor.submit(square, i) for i in range(8)]
        last = queued[-1]
        assert last.cancel(), "a call that has not started can always be cancelled"
        assert last.cancelled()
        done, _ = concurrent.futures.wait(queued, timeout=RESULT_TIMEOUT)
        assert last in done
    assert blocker.result(timeout=0) == 1


def test_shutdown_cancel_futures_cancels_calls_not_started(impl: Impl, markers: list[str]) -> None:
    marker = new_marker(markers, 3)
    executor = impl.make(max_workers=1)
    first = executor.submit(sleep_then, marker, 1)
    assert wait_until(lambda: running(marker), timeout=RESULT_TIMEOUT), "the first call never started"
    rest = [executor.submit(square, i) for i in range(8)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=0) == 1, "a running call is not cancelled by cancel_futures"
    assert all(f.done() for f in rest)
    cancelled = [f for f in rest if f.cancelled()]
    # The process pool has already handed one or two calls to its worker's queue.
    assert len(cancelled) >= len(rest) - 2, [f for f in rest if not f.cancelled()]
    for i, f in enumerate(rest):
        if not f.cancelled():
            assert f.result(timeout=0) == i * i


def test_map_with_timeout_raises_and_leaves_nothing_running(impl: Impl, markers: list[str]) -> None:
    calls = [new_marker(markers, impl.sleep_seconds) for _ in range(4)]
    with impl.make(max_workers=2) as executor:
        results = executor.map(sleep_then, calls, timeout=0.5)
        with pytest.raises(TimeoutError):
            list(results)
        still_running = [m for m in calls if running(m)]
        if impl.stops_running_calls:
            assert not still_running, f"map's TimeoutError left calls running: {still_running}"
    # The reference cannot stop what had started: those end on their own, by the end of the block.
    assert not [m for m in calls if running(m)]


def test_exceptions_are_re_raised_by_result(impl: Impl) -> None:
    with impl.make() as executor:
        builtin = executor.submit(int, "not a number")
        own = executor.submit(fail_parsing, "report.pdf")
        with pytest.raises(ValueError, match="invalid literal") as builtin_error:
            builtin.result(timeout=RESULT_TIMEOUT)
        with pytest.raises(ParseFailed, match="cannot parse report.pdf") as own_error:
            own.result(timeout=RESULT_TIMEOUT)
        assert isinstance(builtin.exception(timeout=0), ValueError)
    assert "Traceback" in str(builtin_error.value.__cause__)
    assert "fail_parsing" in str(own_error.value.__cause__), "the remote traceback names the function"


def test_as_completed_yields_every_future_cancelled_ones_too(impl: Impl, markers: list[str]) -> None:
    with impl.make(max_workers=1) as executor:
        blocker = executor.submit(sleep_then, new_marker(markers, 2), 1)
        futures = [executor.submit(square, i) for i in range(6)]
        assert futures[-1].cancel()
        finished = list(concurrent.futures.as_completed([blocker, *futures], timeout=RESULT_TIMEOUT))
    assert set(finished) == {blocker, *futures}
    assert sorted(f.result() for f in finished if not f.cancelled()) == [0, 1, 1, 4, 9, 16]


def test_submit_after_shutdown_raises_and_earlier_calls_complete(impl: Impl) -> None:
    executor = impl.make()
    earlier = executor.submit(square, 3)
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)
    assert earlier.result(timeout=0) == 9


def test_use_from_several_threads(impl: Impl) -> None:
    futures: dict[int, list[concurrent.futures.Future[int]]] = {}
    errors: list[BaseException] = []

    with impl.make() as executor:
        def worker(n: int) -> None:
            try:
                futures[n] = [executor.submit(square, n * 10 + i) for i in range(4)]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RESULT_TIMEOUT)
    # Collected after the block: the executor waited for every thread's calls.
    assert not errors, errors
    assert {n: [f.result(timeout=0) for f in fs] for n, fs in futures.items()} == {
        n: [(n * 10 + i) ** 2 for i in range(4)] for n in range(4)}


def test_run_in_executor_results_and_cancellation(impl: Impl, markers: list[str]) -> None:
    marker = new_marker(markers, impl.sleep_seconds)

    async def main(executor: concurrent.futures.Executor) -> list[int]:
        loop = asyncio.get_running_loop()
        results = list(await asyncio.gather(*(loop.run_in_executor(executor, square, i) for i in range(4))))
        task = asyncio.ensure_future(loop.run_in_executor(executor, sleep_then, marker))
        while not running(marker):
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return results

    with impl.make() as executor:
        assert asyncio.run(asyncio.wait_for(main(executor), RESULT_TIMEOUT)) == [0, 1, 4, 9]
        if impl.stops_running_calls:
            assert not running(marker), "the sandbox still runs after its awaiting task was cancelled"


logging.getLogger("asyncio").setLevel(logging.DEBUG)  # so that caplog sees the loop's error reports
