#!/bin/bash
# Run the cgroup_v2-marked tests in the cgroup-v2-only guest, with a scratch
# ext4 disk at /mnt/vdisk (NDF_TEST_IO_DIR) for the io.max tests.
#
#   tests/vm/run-cgroup-v2-tests.sh [PYTEST ARGS...]     (default: tests/)
#
# Extra run-in-vm.sh options go in NDF_VM_ARGS, e.g. NDF_VM_ARGS="--mem 4G".
# Exits with pytest's status (124: timed out, 125: the VM failed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."

(($#)) || set -- tests/

# The guest sees the host's / except /tmp, /run and /dev (fresh mounts there):
# a checkout below them is copied to /var/tmp for the run and imported from there.
extra_env=()
case "$PWD" in
    /tmp/*|/run/*|/dev/*)
        copy=$(mktemp -d /var/tmp/ndf-vm-src.XXXXXX)
        trap 'rm -rf "$copy"' EXIT
        tar --exclude=./tests/vm/.cache --exclude=./.git -cf - . | tar -C "$copy" -xf -
        cd "$copy"
        # A checkout installed with `pip install .` has no built C extension in src/:
        # take the venv's (same interpreter, same source).
        linux_dir=src/neural_doc_flow_security/sandbox/linux
        if ! compgen -G "$linux_dir/_child*.so" >/dev/null; then
            cp "$("${NDF_VENV:-/opt/ndf-venv}/bin/python" -c \
                'import neural_doc_flow_security.sandbox.linux._child as c; print(c.__file__)')" "$linux_dir/"
        fi
        extra_env=(-e "PYTHONPATH=$copy/src")
        ;;
esac

# Plugin autoload is off (no stray site plugins); pytest_timeout is loaded by
# hand because pyproject sets `timeout`.
# shellcheck disable=SC2086
"$HERE/run-in-vm.sh" --disk ${NDF_VM_ARGS:-} "${extra_env[@]}" \
    -e PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 -e NDF_TEST_IO_DIR=/mnt/vdisk \
    -- "${NDF_VENV:-/opt/ndf-venv}/bin/python" -m pytest -m cgroup_v2 -p no:cacheprovider -p pytest_timeout \
    -q "$@"
