"""The `ndf-sandbox demo` pipeline, written directly against the Python API.

    sudo /opt/ndf-venv/bin/python examples/sandbox_demo.py

Good plugins turn documents into text; hostile ones try to escape. Each call
gets a fresh sandbox with its own limits, and all of them run at once. Run as
root: the memory and process limits are cgroups (without root, the sandbox
refuses a config it cannot enforce, and those rows say so).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from importlib.resources import files
from pathlib import Path

from neural_doc_flow_security.sandbox import SandboxConfig, SandboxManager, SandboxResult
from neural_doc_flow_security.sandbox.demo_plugins import (
    count_words,
    eat_memory,
    extract_pdf_text,
    fork_bomb,
    html_to_text,
    never_return,
    phone_home,
    read_host_secrets,
)

SAMPLES = files("neural_doc_flow_security.sandbox").joinpath("samples")
LIMITS = SandboxConfig(memory_limit_mb=256, max_processes=32, timeout_seconds=20)


def show(name: str, result: SandboxResult) -> None:
    usage = result.resource_usage
    said = result.output or result.stdout.decode() or result.error or ""
    print(f"{name:<14} {result.outcome.value:<8} {usage.wall_seconds:5.2f}s "
          f"{usage.memory_peak_bytes >> 20:4d} MiB  {usage.processes_peak:2d} procs  "
          f"{said.splitlines()[0][:60] if said else ''}")


async def main() -> None:
    pdf = SAMPLES.joinpath("report.pdf").read_bytes()
    secret = Path(tempfile.mkdtemp()) / "token.secret"
    secret.write_text("decoy secret\n")
    listener = socket.create_server(("127.0.0.1", 0))  # nobody inside can reach it
    port = listener.getsockname()[1]

    async with SandboxManager(LIMITS) as sandbox:
        runs = {
            # good plugins: a Python callable, or a native program fed on stdin
            "pypdf": sandbox.execute_sandboxed("pypdf", extract_pdf_text, pdf),
            "pdftotext": sandbox.execute_command("pdftotext", ["pdftotext", "-", "-"], stdin=pdf),
            "html": sandbox.execute_sandboxed(
                "html", html_to_text, SAMPLES.joinpath("newsletter.html").read_bytes()),
            "words": sandbox.execute_sandboxed(
                "words", count_words, SAMPLES.joinpath("meeting-notes.txt").read_bytes()),
            # hostile plugins: each stopped by a different protection
            "secrets": sandbox.execute_sandboxed("secrets", read_host_secrets, str(secret)),
            "phone-home": sandbox.execute_sandboxed("phone-home", phone_home, port),
            "fork-bomb": sandbox.with_options(sandbox_config=LIMITS.replace(max_processes=16)).execute_sandboxed(
                "fork-bomb", fork_bomb),
            "memory-eater": sandbox.with_options(sandbox_config=LIMITS.replace(memory_limit_mb=128)).execute_sandboxed(
                "memory-eater", eat_memory),
            "never-returns": sandbox.with_options(sandbox_config=LIMITS.replace(timeout_seconds=2)).execute_sandboxed(
                "never-returns", never_return),
        }
        results = await asyncio.gather(*runs.values(), return_exceptions=True)

    for name, result in zip(runs, results, strict=True):
        if isinstance(result, BaseException):
            print(f"{name:<14} refused: {result}")
        else:
            show(name, result)
    listener.settimeout(0.1)
    try:
        listener.accept()
        print("the listener got a connection!")
    except TimeoutError:
        print("the listener got no connection")
    secret.unlink()
    secret.parent.rmdir()


if __name__ == "__main__":
    # The table below shows each sandbox's end; without a handler, the audit log's
    # WARNING events would also print as JSON lines (README, "Audit log").
    logging.getLogger("neural_doc_flow_security.audit").addHandler(logging.NullHandler())
    asyncio.run(main())
