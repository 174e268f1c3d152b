#!/usr/bin/env bash
# The test command: set up, lint, type-check, run the test suite on this host
# (as root; the isolation tests also run as an unprivileged user), the API and
# escape tests on the other supported Pythons, the release build (wheel) checked
# and tested, the sandbox inside a Podman container, then the cgroup v2 tests inside a small QEMU guest (this host's
# cgroups are v1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NDF_VENV=${NDF_VENV:-/opt/ndf-venv}
echo "== ruff"; "$NDF_VENV/bin/ruff" check src tests benchmarks examples
echo "== mypy"; "$NDF_VENV/bin/mypy"
echo "== pytest (host, cgroup v1)"
"$NDF_VENV/bin/python" -m pytest -q -m "not cgroup_v2" "$@"
echo "== Python versions"; bash scripts/python-matrix.sh
echo "== wheel"; bash scripts/wheel-check.sh
echo "== in a container (Podman)"; bash scripts/container-check.sh
echo "== pytest (cgroup v2, QEMU guest)"
bash tests/vm/run-cgroup-v2-tests.sh
