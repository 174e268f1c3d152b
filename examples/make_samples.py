"""Write the sample documents of `ndf-sandbox demo` (2 PDFs, 2 HTML, 2 text files).

    python examples/make_samples.py [OUTPUT_DIR]

The PDFs come from a minimal hand-written PDF 1.4 generator (one Helvetica text
stream per page, a correct cross-reference table), so no PDF library is needed
to build them and each file stays around 1 KB. The outputs are committed under
src/neural_doc_flow_security/sandbox/samples/; rerun this after editing them.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "src/neural_doc_flow_security/sandbox/samples"


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[list[str]], title: str) -> bytes:
    """A valid PDF with one page per entry of `pages`, each a list of text lines."""
    objects: list[bytes] = []
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{p} 0 R" for p in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for page_id, lines in zip(page_ids, pages, strict=True):
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_id + 1} 0 R >>".encode())
        body = ["BT", "/F1 12 Tf", "16 TL", "72 720 Td"]
        for line in lines:
            body += [f"{_pdf_string(line)} Tj", "T*"]
        body.append("ET")
        stream = "\n".join(body).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info_id = len(objects) + 1
    objects.append(f"<< /Title {_pdf_string(title)} /Producer (ndf make_samples.py) >>".encode())

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body_bytes in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body_bytes + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += (b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
            % (len(objects) + 1, info_id, xref))
    return bytes(out)


INVOICE_PDF = [
    ["INVOICE 2024-0117", "Acme Paper Supplies", "",
     "Item: recycled printer paper, 40 boxes", "Item: toner cartridges, 6 units",
     "Total due: 1,284.00 EUR", "Payment within 30 days."],
]
REPORT_PDF = [
    ["Quarterly Research Report", "",
     "Summary: the document pipeline processed 18,422 files this quarter.",
     "Parsing failures dropped from 2.1 percent to 0.4 percent."],
    ["Page two: next steps", "",
     "Run every third-party parser in its own sandbox.",
     "Measure peak memory and CPU time per document."],
]

ARTICLE_HTML = """<!doctype html>
<html><head><title>Release notes</title><style>body { font-family: sans-serif; }</style></head>
<body>
<h1>Release notes 3.2</h1>
<p>The OCR plugin now runs <b>40% faster</b> on scanned invoices.</p>
<script>document.write("tracking pixel");</script>
<ul><li>New: table extraction</li><li>Fixed: crash on empty pages</li></ul>
</body></html>
"""
NEWSLETTER_HTML = """<!doctype html>
<html><head><title>Newsletter</title></head>
<body>
<h2>Team newsletter &mdash; March</h2>
<p>Welcome to our three new colleagues in the document &amp; data team.</p>
<p>Reminder: the archive migration starts on Monday.</p>
</body></html>
"""
MEETING_TXT = """Meeting notes, pipeline team

Attendees: Ana, Bo, Chen, Dara.
Decision: every document parser runs in a sandbox from now on.
Decision: parsers get 256 MB of memory and 20 seconds per document.
Action: Chen writes the sandbox profile for the OCR parser.
"""
README_TXT = """Sample corpus

This corpus holds small documents used to demonstrate the sandbox.
Each document is processed by a plugin that runs in its own sandbox.
Plugins cannot read the host, reach the network or exhaust the machine.
"""


def main(argv: list[str]) -> int:
    """Write the samples into argv[0] (default: the package's samples directory)."""
    output = Path(argv[0]) if argv else DEFAULT_OUTPUT
    output.mkdir(parents=True, exist_ok=True)
    files = {
        "invoice.pdf": make_pdf(INVOICE_PDF, "Invoice 2024-0117"),
        "report.pdf": make_pdf(REPORT_PDF, "Quarterly Research Report"),
        "release-notes.html": ARTICLE_HTML.encode(),
        "newsletter.html": NEWSLETTER_HTML.encode(),
        "meeting-notes.txt": MEETING_TXT.encode(),
        "corpus-readme.txt": README_TXT.encode(),
    }
    for name, data in files.items():
        (output / name).write_bytes(data)
        print(f"wrote {output / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
