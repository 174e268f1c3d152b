#!/bin/bash
# Run one command as root in a throw-away QEMU guest with a cgroup-v2-only
# kernel (Debian 6.1), seeing the host's / read-only under a tmpfs overlay.
#
#   tests/vm/run-in-vm.sh [options] -- CMD ARGS...
#
# Options:
#   --disk            attach a fresh 256 MB ext4 virtio disk: /dev/vda, mounted
#                     at /mnt/vdisk (a host temp file, deleted afterwards)
#   --disk-size SIZE  size for --disk (truncate syntax, default 256M)
#   --mem SIZE        guest memory (default 2G)
#   --smp N           guest CPUs (default 2)
#   --timeout DUR     kill the VM after DUR (timeout(1) syntax, default 20m)
#   -e NAME[=VALUE]   set NAME in the command's environment (NAME alone: copy
#                     the host's value); repeatable
#   --9p-cache MODE   cache mode of the host-root 9p mount (default loose;
#                     mmap or none see host edits made while the guest runs)
#   --verbose         show kernel and init messages
#
# The command runs in the host's current directory (which must exist in the
# guest: the host's /tmp, /run, /dev, /proc, /sys are replaced by fresh ones)
# with a clean environment: PATH, HOME=/root, TERM, LANG plus the -e ones.
# Its output streams through the serial console. The exit code is the
# command's; 124 if the timeout fired, 125 if the VM failed to boot or report.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="$HERE/.cache"

DISK=0 DISK_SIZE=256M MEM=2G SMP=2 TIMEOUT=20m VERBOSE=0 P9CACHE=loose
ENV_ARGS=()

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { printf 'run-in-vm: %s\n' "$*" >&2; exit 125; }

while (($#)); do
    case $1 in
        --disk) DISK=1 ;;
        --disk-size) DISK=1; DISK_SIZE=${2:?}; shift ;;
        --mem) MEM=${2:?}; shift ;;
        --smp) SMP=${2:?}; shift ;;
        --timeout) TIMEOUT=${2:?}; shift ;;
        -e|--env)
            if [[ ${2:?} == *=* ]]; then ENV_ARGS+=("$2")
            else ENV_ARGS+=("$2=${!2-}"); fi
            shift ;;
        --9p-cache)
            case ${2:?} in loose|fscache|mmap|none) P9CACHE=$2 ;; *) die "bad --9p-cache: $2" ;; esac
            shift ;;
        --verbose) VERBOSE=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
(($#)) || { usage >&2; die "no command given"; }

case $PWD/ in
    /tmp/*|/run/*|/dev/*|/proc/*|/sys/*)
        printf 'run-in-vm: warning: %s is hidden in the guest by a fresh mount\n' "$PWD" >&2 ;;
esac

"$HERE/build.sh" || die "building the guest image failed"

T0=$(date +%s.%N)
RUNDIR=$(mktemp -d "${TMPDIR:-/tmp}/ndf-vm.XXXXXX")
QEMU_PID=
cleanup() {
    # timeout(1) passes the TERM on to qemu.
    [[ -n $QEMU_PID ]] && kill -TERM "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    rm -rf "$RUNDIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir "$RUNDIR/ctl"

# The job: cwd, clean environment, argv, each word quoted for bash.
# The guest console is a tty; when ours is not, say so (no colours). Either
# way the guest sends bare \n: qemu leaves OPOST on for a terminal.
GUEST_TERM=${TERM:-dumb} SIZE=
if [[ -t 1 ]]; then
    SIZE=$(stty size 2>/dev/null </dev/tty || true)
else
    GUEST_TERM=dumb
fi
{
    printf 'cd -- %q || { echo "run-in-vm: directory %q does not exist in the guest" >&2; exit 125; }\n' \
        "$PWD" "$PWD"
    printf 'exec env -i --'
    printf ' %q' "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "HOME=/root" "TERM=$GUEST_TERM" "NDF_IN_VM=1" "LANG=${LANG:-C.UTF-8}" ${ENV_ARGS[@]+"${ENV_ARGS[@]}"}
    printf ' %q' "$@"
    printf '\n'
} >"$RUNDIR/ctl/job.sh"
printf 'VERBOSE=%s\nDISK=%s\nTTY_SIZE="%s"\nP9CACHE=%s\n' "$VERBOSE" "$DISK" "$SIZE" "$P9CACHE" \
    >"$RUNDIR/ctl/vm.conf"

ACCEL=(-accel tcg,thread=multi -cpu max)
if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -w /dev/kvm ]]; then
    ACCEL=(-accel kvm -cpu host)
fi

BIOS=()
for rom in /usr/share/qemu/qboot.rom /usr/share/qboot/bios.bin; do
    if [[ -f $rom ]]; then BIOS=(-bios "$rom"); break; fi
done

if ((VERBOSE)); then
    APPEND="console=ttyS0 loglevel=7"
else
    APPEND="console=ttyS0 quiet loglevel=1"
fi
# No hardware to probe, no clock to trust-check; mitigations cost a lot under TCG.
APPEND+=" panic=-1 mitigations=off tsc=reliable no_timer_check i8042.noaux i8042.nokbd"
APPEND+=" 8250.nr_uarts=1 random.trust_cpu=on rootfstype=ramfs"

# The unpacked ELF (PVH entry) boots ~7 s faster under TCG than the bzImage.
KERNEL=$CACHE/vmlinuz
[[ -f $CACHE/vmlinux ]] && KERNEL=$CACHE/vmlinux

DRIVE=()
if ((DISK)); then
    truncate -s "$DISK_SIZE" "$RUNDIR/disk.img"
    mkfs.ext4 -q -F -L vdisk "$RUNDIR/disk.img" || die "mkfs.ext4 failed"
    DRIVE=(-drive "file=$RUNDIR/disk.img,format=raw,if=virtio,cache=unsafe,aio=threads")
fi

QEMU=(qemu-system-x86_64
    -machine q35 "${ACCEL[@]}" -smp "$SMP" -m "$MEM"
    "${BIOS[@]}"
    -nodefaults -no-user-config -display none -no-reboot
    -chardev stdio,id=con,signal=on -serial chardev:con -monitor none
    -nic none
    -kernel "$KERNEL" -initrd "$CACHE/initramfs.cpio" -append "$APPEND"
    -fsdev local,id=root,path=/,readonly=on,security_model=none,multidevs=remap
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot
    -fsdev "local,id=ctl,path=$RUNDIR/ctl,security_model=none"
    -device virtio-9p-pci,fsdev=ctl,mount_tag=vmctl
    "${DRIVE[@]}"
)
# Extra qemu arguments for experiments (later ones win), e.g. "-cpu qemu64".
# shellcheck disable=SC2206
QEMU+=(${NDF_VM_QEMU_ARGS:-})

# qemu puts a terminal stdin into raw mode; restore it however qemu ends.
STTY=
[[ -t 0 ]] && STTY=$(stty -g)
set +e
if [[ -n $STTY ]]; then
    # Interactive: qemu must be in the terminal's foreground process group.
    timeout --foreground -k 5 "$TIMEOUT" "${QEMU[@]}"
    QRC=$?
else
    # Batch: in the background, so a TERM/INT to this script stops the VM at once.
    timeout -k 5 "$TIMEOUT" "${QEMU[@]}" &
    QEMU_PID=$!
    wait "$QEMU_PID"
    QRC=$?
    QEMU_PID=
fi
set -e
[[ -n $STTY ]] && stty "$STTY"
T1=$(date +%s.%N)

if [[ -f $RUNDIR/ctl/boot-uptime ]]; then
    BOOT=$(cut -d' ' -f1 "$RUNDIR/ctl/boot-uptime")
else
    BOOT=?
fi
if [[ -n ${NDF_VM_TIMING:-} ]]; then
    printf 'run-in-vm: guest uptime at command start %ss, total %.2fs\n' \
        "$BOOT" "$(awk "BEGIN {print $T1 - $T0}")" >&2
fi

if ((QRC == 124 || QRC == 137)); then
    printf 'run-in-vm: timed out after %s; VM killed\n' "$TIMEOUT" >&2
    exit 124
fi
if [[ -f $RUNDIR/ctl/boot-error ]]; then
    die "guest failed to boot: $(cat "$RUNDIR/ctl/boot-error")"
fi
if [[ ! -f $RUNDIR/ctl/exitcode ]]; then
    die "VM exited (qemu status $QRC) without reporting an exit code; rerun with --verbose"
fi
exit "$(cat "$RUNDIR/ctl/exitcode")"
