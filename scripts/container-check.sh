#!/usr/bin/env bash
# The sandbox inside a container (rootful Podman; no registry is reachable, so the
# container's root is made from this machine's files: a small directory with a
# copy of /etc, and /usr, the venv and the checkout bound in).
#   1. the engine's defaults (its seccomp profile and capabilities): `ndf-sandbox
#      check` says what is missing, `run` and the API refuse with an error naming
#      the stage and what to add, and the API runs with the posix floor when the
#      caller allows it (start_method="posix", allow_unenforced=["all"]);
#   2. with what the README asks of a container (--cap-add SYS_ADMIN,NET_ADMIN
#      --security-opt unmask=ALL; the engine's seccomp profile kept): `check` is
#      clean and tests/test_escape.py passes, as root and as the unprivileged user.
# Installs podman and runc (Debian) if missing. NDF_VENV: the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
NDF_VENV=${NDF_VENV:-/opt/ndf-venv}
checkout=$(pwd)
fail() { echo "container-check: $*" >&2; exit 1; }

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
if ((${#missing[@]})); then
  echo "container-check: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/ndf-container.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{usr,etc,opt,tmp,proc,sys,dev,root,run,var/tmp,"${NDF_VENV#/}","${checkout#/}"}
cp -a /etc/. "$root/etc/"
for link in bin lib lib64 sbin; do ln -s "usr/$link" "$root/$link"; done
chmod 1777 "$root/tmp" "$root/var/tmp"
# This CI machine is itself a container: without CAP_SYS_RESOURCE Podman cannot
# raise its default rlimits, and crun refuses its hybrid cgroup layout; runc
# does not. Neither is needed on an ordinary host.
printf '[containers]\ndefault_ulimits = []\n' > "$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
podman_run() {
  # /usr as an overlay: the escape tests check that the sandbox cannot write there,
  # and remove what a broken sandbox would have written; nothing reaches the host.
  podman run --runtime runc --rm --network none -e PYTHONDONTWRITEBYTECODE=1 \
    -v /usr:/usr:O -v "$NDF_VENV:$NDF_VENV:ro" -v "$checkout:$checkout:ro" --workdir "$checkout" \
    "$@"
}

echo "== container, the engine's defaults"
status=0
podman_run --rootfs "$root" "$NDF_VENV/bin/ndf-sandbox" check >"$work/check.out" 2>&1 || status=$?
[ "$status" = 1 ] || { cat "$work/check.out"; fail "check exited $status, expected 1 (default config not enforceable)"; }
grep -q "namespaces.net:" "$work/check.out" || { cat "$work/check.out"; fail "check did not name namespaces.net"; }
status=0
podman_run --rootfs "$root" "$NDF_VENV/bin/ndf-sandbox" run -- /bin/true >"$work/run.out" 2>&1 || status=$?
[ "$status" = 126 ] || { cat "$work/run.out"; fail "run exited $status, expected 126"; }
grep -q "SYS_ADMIN" "$work/run.out" || { cat "$work/run.out"; fail "run's error did not say what to add"; }
podman_run --rootfs "$root" "$NDF_VENV/bin/python" - <<'EOF' || fail "the API in a default container"
import asyncio
from neural_doc_flow_security.sandbox import SandboxError, SandboxManager

async def main() -> None:
    try:
        async with SandboxManager() as manager:
            await manager.execute_command("t", ["/bin/true"])
    except SandboxError as e:
        assert "SYS_ADMIN" in str(e), e
    else:
        raise AssertionError("the linux backend ran without its namespaces")
    async with SandboxManager(start_method="posix", allow_unenforced=["all"]) as manager:
        result = await manager.execute_command("t", ["/bin/true"])
    assert result.outcome.value == "ok" and result.isolation.backend == "posix", result
    assert result.isolation.not_enforced, result.isolation

asyncio.run(main())
EOF

echo "== container, --cap-add SYS_ADMIN,NET_ADMIN --security-opt unmask=ALL (the engine's seccomp profile kept)"
full=(--cap-add SYS_ADMIN,NET_ADMIN --security-opt unmask=ALL)
podman_run "${full[@]}" --rootfs "$root" "$NDF_VENV/bin/ndf-sandbox" check >"$work/check.out" 2>&1 \
  || { cat "$work/check.out"; fail "check found the default config not enforceable"; }
podman_run "${full[@]}" --rootfs "$root" "$NDF_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_escape.py
