"""How a sandbox child reports a failed set-up stage to its parent, on every
backend: one write of "stage NUL errno NUL message" on a close-on-exec pipe,
then exit. Nothing here is Linux-specific."""

from __future__ import annotations

import os
from typing import NoReturn

from ..errors import SetupError
from ..result import EXIT_SANDBOX_ERROR


def report_failure(error_fd: int, stage: str, exc: BaseException) -> NoReturn:
    """Child side: write the report and exit with the sandbox-error status."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
    message = str(exc) or type(exc).__name__
    try:
        os.write(error_fd, f"{stage}\0{code}\0{message}".encode(errors="replace")[:4000])
    finally:
        os._exit(EXIT_SANDBOX_ERROR)


def parse_setup_error(report: bytes) -> SetupError:
    """Parent side: decode the report."""
    stage, _, rest = report.decode(errors="replace").partition("\0")
    code, _, message = rest.partition("\0")
    errno_value = int(code) if code.isdigit() and len(code) <= 4 else 0
    if 0 < errno_value < 4096 and os.strerror(errno_value) not in message:
        message = f"{message} (errno {errno_value}: {os.strerror(errno_value)})"
    return SetupError(stage, message, errno_value)
