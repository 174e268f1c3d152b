#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for neural-doc-flow-security: system packages,
# a virtualenv at $NDF_VENV (default /opt/ndf-venv) on Debian's Python, and the
# project installed into it with its test and demo extras. The install is a copy
# (not editable) so that unprivileged users and the test VM can import it even
# when the checkout sits in a directory only root may enter; for development,
# `pip install -e .` into the same venv afterwards.
# Idempotent: a second run only checks. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
NDF_VENV=${NDF_VENV:-/opt/ndf-venv}
packages=(python3 python3-venv python3-dev libc6-dev libseccomp2 gcc poppler-utils util-linux busybox-static runc nftables)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x "$NDF_VENV/bin/python" ]; then
  echo "setup: creating $NDF_VENV"
  /usr/bin/python3 -m venv "$NDF_VENV"
  "$NDF_VENV/bin/pip" install -q --upgrade pip
fi
"$NDF_VENV/bin/pip" install -q --force-reinstall --no-deps .
"$NDF_VENV/bin/pip" install -q '.[test,demo,dask,ray]'
# The unprivileged-user tests run as this uid.
id -u ndftest >/dev/null 2>&1 || useradd -M -s /bin/sh -u 4242 ndftest
