"""The plugins of `ndf-sandbox demo`: four good ones and six hostile ones.

Plain module-level functions, so the sandbox imports them by name (cloudpickle
sends a reference, not the code). Each hostile plugin is written to stay
harmless even if the sandbox around it were broken: it touches only a decoy file
and a marker path the demo creates and removes, only loopback, and it stops by
itself after a bounded amount of forks, memory or time.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections import Counter
from html.parser import HTMLParser

# -- good plugins -------------------------------------------------------------


def extract_pdf_text(pdf: bytes) -> str:
    """The text of every page of a PDF, with pypdf (pure Python)."""
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(pdf))
    return "\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()


class _TextCollector(HTMLParser):
    """Collects the visible text of an HTML document (no script, style or head)."""

    _HIDDEN = frozenset({"script", "style", "head", "title", "template", "noscript"})
    _BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                         "section", "article", "header", "footer", "table", "ul", "ol"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)


def html_to_text(html: bytes) -> str:
    """The visible text of an HTML document, with the standard library's html.parser."""
    collector = _TextCollector()
    collector.feed(html.decode("utf-8", errors="replace"))
    collector.close()
    lines = (" ".join(line.split()) for line in "".join(collector.parts).splitlines())
    return "\n".join(line for line in lines if line)


def count_words(text: bytes) -> str:
    """A one-line summary of a plain-text document: words, lines, most common words."""
    decoded = text.decode("utf-8", errors="replace")
    words = [w.strip(".,;:!?\"'()[]").lower() for w in decoded.split()]
    words = [w for w in words if w]
    common = ", ".join(f"{w}×{n}" for w, n in Counter(w for w in words if len(w) > 3).most_common(3))
    return f"{len(words)} words, {len(decoded.splitlines())} lines; most common: {common}"


# -- hostile plugins ----------------------------------------------------------


def read_host_secrets(decoy_path: str) -> str:
    """Try to read a secret on the host (the demo's decoy file) and /etc/shadow.

    Returns whatever it could read (the demo checks that nothing came back);
    raises the first error when nothing was readable.
    """
    stolen: list[str] = []
    errors: list[OSError] = []
    for path in (decoy_path, "/etc/shadow"):
        try:
            with open(path) as f:  # read-only: never modifies anything
                stolen.append(f.read())
        except OSError as e:
            errors.append(e)
    if stolen:
        return "\n".join(stolen)
    first = errors[0]
    detail = "; ".join(f"{e.filename}: {e.strerror}" for e in errors)
    raise type(first)(first.errno, detail)


def phone_home(port: int) -> str:
    """Try to connect to a listener on the host's loopback and send it data."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.connect(("127.0.0.1", port))
        s.sendall(b"stolen data from the sandbox\n")
    return f"connected to 127.0.0.1:{port} and sent data"


def write_outside(marker_path: str) -> str:
    """Try to create a marker file in a host directory (the demo's decoy dir)."""
    with open(marker_path, "x") as f:
        f.write("a sandboxed plugin wrote this file on the host\n")
    return f"wrote {marker_path}"


def fork_bomb(max_forks: int = 10_000, child_seconds: float = 5.0) -> str:
    """Fork until the kernel refuses (bounded: at most `max_forks`; every child
    sleeps `child_seconds` and exits by itself)."""
    forked = 0
    for _ in range(max_forks):
        try:
            pid = os.fork()
        except OSError as e:
            raise BlockingIOError(e.errno, f"fork refused after {forked} children: {e.strerror}") from None
        if pid == 0:  # the child: hold a process slot for a while, then leave
            try:
                time.sleep(child_seconds)
            finally:
                os._exit(0)
        forked += 1
    return f"forked {forked} children, never refused"


def eat_memory(max_mb: int = 2048, step_mb: int = 16) -> str:
    """Allocate (and touch) memory in steps up to `max_mb`."""
    hoard: list[bytes] = []
    for _ in range(max_mb // step_mb):
        hoard.append(b"\x01" * (step_mb * 1024 * 1024))  # written, so really resident
    return f"allocated {len(hoard) * step_mb} MB, never stopped"


def never_return(max_seconds: float = 60.0) -> str:
    """Sleep far longer than any job should take (bounded by `max_seconds`)."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
    return f"returned after {max_seconds:.0f} s"


# -- for the cluster demo -----------------------------------------------------


def run_program(argv: list[str], stdin: bytes) -> bytes:
    """Run a program (a native parser such as pdftotext) on a document given on its
    standard input, inside the calling sandbox; returns its standard output."""
    import subprocess

    return subprocess.run(argv, input=stdin, capture_output=True, check=True, timeout=60).stdout
