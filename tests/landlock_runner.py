"""`ndf-sandbox run ...` with one bind target left out of the Landlock rules (test
only): the mount namespace deliberately wider than the ruleset, to show that
Landlock alone holds. Usage: `python tests/landlock_runner.py TARGET run [options] -- command`."""

from __future__ import annotations

import sys

from neural_doc_flow_security.sandbox import cli
from neural_doc_flow_security.sandbox.linux import landlock

if __name__ == "__main__":
    landlock._UNRULED_FOR_TESTS = frozenset({sys.argv[1]})
    sys.exit(cli.main(sys.argv[2:]))
