#!/bin/sh
# /init of the cgroup-v2 test guest (busybox sh). Two stages in one file:
#
#   stage 1 (initramfs, PID 1): load modules, mount the host's / read-only over
#     virtio-9p with a tmpfs-backed overlay on top (the guest never writes the
#     host), mount the API filesystems and cgroup2 inside it, then switch_root
#     (not chroot: a chrooted process cannot create user namespaces).
#   stage 2 (overlay root, still PID 1): run the job written by run-in-vm.sh on
#     the control share, write its exit code there, power off.
#
# The control share (9p tag "vmctl", a temp dir on the host) holds vm.conf
# (VERBOSE, DISK, TTY_SIZE, P9CACHE), job.sh, and receives exitcode / boot-error.

BB=/bin/busybox
NEWROOT=/newroot
VMDIR=/run/vm                     # inside the new root
P9OPTS=trans=virtio,version=9p2000.L,msize=512000

CTL=/ctl                          # where the control share is mounted now

fail() {
    echo "vm-init: error: $*" >/dev/console
    echo "$*" >$CTL/boot-error 2>/dev/null
    $BB sync
    echo "0 4 1 7" >/proc/sys/kernel/printk 2>/dev/null
    $BB poweroff -f
    $BB sleep 2
    $BB reboot -f
}

stage1() {
    export PATH=/bin
    mount -t proc proc /proc || fail "mount /proc"
    mount -t sysfs sysfs /sys || fail "mount /sys"
    mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
    exec </dev/console >/dev/console 2>&1

    while read -r mod; do
        insmod "$mod" || fail "insmod $mod"
    done </modules.load

    mount -t 9p -o "$P9OPTS" vmctl /ctl || fail "mount the control share"
    VERBOSE=0 DISK=0 P9CACHE=loose
    [ -f /ctl/vm.conf ] && . /ctl/vm.conf
    [ "$VERBOSE" = 1 ] && set -x

    mount -t 9p -o "ro,$P9OPTS,cache=$P9CACHE" hostroot /lower || fail "mount host / over 9p"
    mount -t tmpfs -o mode=0755 overlay-rw /rw || fail "mount the overlay tmpfs"
    mkdir -p /rw/upper /rw/work
    mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work \
        overlay $NEWROOT || fail "mount the overlay root"

    mount -t proc proc $NEWROOT/proc || fail "mount proc in the new root"
    mount -t sysfs sysfs $NEWROOT/sys || fail "mount sys in the new root"
    mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $NEWROOT/sys/fs/cgroup \
        || fail "mount cgroup2"
    mount --move /dev $NEWROOT/dev || fail "move /dev"
    mkdir -p $NEWROOT/dev/pts $NEWROOT/dev/shm
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts $NEWROOT/dev/pts \
        || fail "mount devpts"
    mount -t tmpfs -o mode=1777,nosuid,nodev shm $NEWROOT/dev/shm || fail "mount /dev/shm"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $NEWROOT/tmp || fail "mount /tmp"
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $NEWROOT/run || fail "mount /run"

    mkdir -p $NEWROOT$VMDIR/ctl
    cp /bin/busybox /init $NEWROOT$VMDIR/
    mount --move /ctl $NEWROOT$VMDIR/ctl || fail "move the control share"
    CTL=$NEWROOT$VMDIR/ctl

    # The guest kernel's modules, so modprobe (host kmod) can load more on demand.
    kver=$(cat /kernel-release)
    mkdir -p $NEWROOT/lib/modules
    cp -a /lib/modules/"$kver" $NEWROOT/lib/modules/ 2>/dev/null

    umount /proc /sys
    exec switch_root $NEWROOT $VMDIR/busybox sh $VMDIR/init stage2
    fail "switch_root"
}

stage2() {
    BB=$VMDIR/busybox
    CTL=$VMDIR/ctl
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    VERBOSE=0 DISK=0 TTY_SIZE=
    . $VMDIR/ctl/vm.conf
    [ "$VERBOSE" = 1 ] && set -x
    # Keep the kernel off the console (OOM kills, hung tasks) unless verbose.
    [ "$VERBOSE" = 1 ] || echo "1 4 1 7" >/proc/sys/kernel/printk
    # Bare \n on the console: a host terminal adds the \r itself, a pipe wants none.
    $BB stty -onlcr </dev/console
    if [ -n "$TTY_SIZE" ]; then
        set -- $TTY_SIZE
        [ "${1:-0}" -gt 0 ] && [ "${2:-0}" -gt 0 ] && $BB stty rows "$1" cols "$2" </dev/console
    fi
    $BB hostname ndf-vm
    $BB ip link set lo up 2>/dev/null
    # Like a systemd host: every controller enabled below the root cgroup.
    ctrls=
    for c in $(cat /sys/fs/cgroup/cgroup.controllers); do ctrls="$ctrls +$c"; done
    echo "$ctrls" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null \
        || echo "vm-init: warning: cannot enable$ctrls in the root cgroup" >/dev/console
    if [ "$DISK" = 1 ]; then
        # devtmpfs creates nodes asynchronously.
        n=0
        while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do $BB sleep 0.1; n=$((n + 1)); done
        $BB mkdir -p /mnt/vdisk
        $BB mount -t ext4 /dev/vda /mnt/vdisk || fail "mount /dev/vda (ext4) at /mnt/vdisk"
    fi
    cat /proc/uptime >$VMDIR/ctl/boot-uptime

    /bin/bash $VMDIR/ctl/job.sh </dev/console >/dev/console 2>&1 &
    wait $!
    rc=$?
    echo "$rc" >$VMDIR/ctl/exitcode
    $BB sync
    # Not even "reboot: Power down" (KERN_EMERG) on the console.
    [ "$VERBOSE" = 1 ] || echo "0 4 1 7" >/proc/sys/kernel/printk
    $BB poweroff -f
    $BB sleep 2
    $BB reboot -f
}

if [ "$1" = stage2 ]; then
    stage2
else
    stage1
fi
