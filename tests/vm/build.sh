#!/bin/bash
# Build the cgroup-v2 test guest: a Debian 6.1 kernel plus a tiny initramfs
# (static busybox, the few modules needed for virtio-9p/overlay/virtio-blk/ext4,
# and tests/vm/guest-init.sh as /init). Output lands in tests/vm/.cache/.
#
# Idempotent: when the cache matches this script and guest-init.sh, it returns
# at once without touching apt or the network. `--force` rebuilds.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE="$HERE/.cache"
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

log() { printf 'vm-build: %s\n' "$*" >&2; }
die() { printf 'vm-build: error: %s\n' "$*" >&2; exit 1; }

# Modules wanted in the guest; their dependencies are added from modules.dep.
# virtio/9p/overlay boot the root; virtio_blk/ext4 back --disk; crc32c for
# ext4/jbd2 checksums (request_module cannot reach /sbin/modprobe in stage 1);
# veth/loop for sandbox tests that might need them (loaded on demand via the
# guest's modprobe if the host has kmod installed).
WANTED_MODULES="virtio virtio_ring virtio_pci virtio_blk netfs fscache 9pnet 9pnet_virtio 9p overlay crc32c_generic ext4"
ONDEMAND_MODULES="veth loop"
HOST_PACKAGES="qemu-system-x86 busybox-static cpio e2fsprogs kmod"

# The stamp covers the inputs that shape the image; the kernel version is
# resolved once and then pinned by the cache (no apt query on a warm run).
inputs_hash() {
    cat "$HERE/build.sh" "$HERE/guest-init.sh" | sha256sum | cut -c1-16
}

cache_is_fresh() {
    [[ -f $CACHE/stamp && -f $CACHE/vmlinuz && -f $CACHE/initramfs.cpio ]] || return 1
    [[ $(cat "$CACHE/stamp") == "$(inputs_hash)" ]] || return 1
    local pkg
    for pkg in $HOST_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || return 1
    done
}

ensure_host_packages() {
    local missing=() pkg
    for pkg in $HOST_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

kernel_package() {
    # The generic flavour that linux-image-amd64 points to (not -cloud: no 9p).
    local dep
    dep=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9].*-amd64$/ {print $2; exit}')
    if [[ -z $dep ]]; then
        apt-get update -q >/dev/null
        dep=$(apt-cache depends linux-image-amd64 \
            | awk '/Depends: linux-image-[0-9].*-amd64$/ {print $2; exit}')
    fi
    [[ -n $dep ]] || die "cannot resolve the kernel package behind linux-image-amd64"
    printf '%s\n' "$dep"
}

if ((FORCE == 0)) && cache_is_fresh; then
    exit 0
fi

# One builder at a time; whoever waited finds the cache fresh.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if ((FORCE == 0)) && cache_is_fresh; then
    exit 0
fi

ensure_host_packages
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ndf-vm-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. Kernel package (kept in the cache so a rebuild of the initramfs is offline).
PKG=$(cat "$CACHE/kernel-package" 2>/dev/null || true)
if ((FORCE)) || [[ -z $PKG ]] || ! ls "$CACHE/$PKG"_*.deb >/dev/null 2>&1; then
    PKG=$(kernel_package)
    log "downloading $PKG"
    rm -f "$CACHE"/linux-image-*.deb
    (cd "$CACHE" && apt-get download -q "$PKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    ls "$CACHE/$PKG"_*.deb >/dev/null 2>&1 || die "apt-get download $PKG failed"
    printf '%s\n' "$PKG" >"$CACHE/kernel-package"
fi
DEB=$(ls "$CACHE/$PKG"_*.deb | head -n1)
KVER=${PKG#linux-image-}

# 2. Unpack vmlinuz and the module tree, let depmod compute dependencies.
log "unpacking $KVER"
mkdir -p "$WORK/pkg"
dpkg-deb --fsys-tarfile "$DEB" \
    | tar -x -C "$WORK/pkg" --wildcards "./boot/vmlinuz-$KVER" "./boot/config-$KVER" \
        "./lib/modules/$KVER/*" 2>/dev/null \
    || die "cannot unpack $DEB"
MODROOT="$WORK/pkg/lib/modules/$KVER"
[[ -f $WORK/pkg/boot/vmlinuz-$KVER && -d $MODROOT ]] || die "$DEB lacks vmlinuz or modules"
depmod -b "$WORK/pkg" "$KVER"

# Resolve each wanted module to its path and dependency closure, in load order
# (modules.dep lists a module's dependencies so that the last must load first).
resolve_modules() {
    awk -v want="$*" '
        BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) wanted[w[i]] = 1 }
        {
            sub(":", "", $1); path = $1
            name = path; sub(".*/", "", name); sub("\\.ko(\\.[a-z]+)?$", "", name)
            gsub("-", "_", name)
            deps[path] = ""
            for (i = NF; i >= 2; i--) deps[path] = deps[path] " " $i
            byname[name] = path
        }
        function visit(p,   d, k, i) {
            if (p in done) return
            done[p] = 1
            k = split(deps[p], d, " ")
            for (i = 1; i <= k; i++) visit(d[i])
            print p
        }
        END {
            for (i = 1; i <= n; i++) {
                nm = w[i]; gsub("-", "_", nm)
                if (!(nm in byname)) { print "MISSING " w[i] > "/dev/stderr"; continue }
                visit(byname[nm])
            }
        }' "$MODROOT/modules.dep"
}
mapfile -t LOAD_ORDER < <(resolve_modules $WANTED_MODULES)
mapfile -t ALL_MODULES < <(resolve_modules $WANTED_MODULES $ONDEMAND_MODULES)
((${#LOAD_ORDER[@]})) || die "no modules resolved"

# 3. Assemble the initramfs.
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys,lower,rw,newroot,ctl,lib/modules/"$KVER"}
cp /bin/busybox "$ROOT/bin/busybox"
for applet in sh mount umount mkdir insmod switch_root cat echo sleep poweroff; do
    ln -s busybox "$ROOT/bin/$applet"
done
install -m 0755 "$HERE/guest-init.sh" "$ROOT/init"
: >"$ROOT/modules.load"
for mod in "${ALL_MODULES[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$mod")"
    case $mod in
        *.ko.xz) xz -dc "$MODROOT/$mod" >"$ROOT/lib/modules/$KVER/${mod%.xz}" ;;
        *.ko.zst) zstd -qdc "$MODROOT/$mod" >"$ROOT/lib/modules/$KVER/${mod%.zst}" ;;
        *) cp "$MODROOT/$mod" "$ROOT/lib/modules/$KVER/$mod" ;;
    esac
done
for mod in "${LOAD_ORDER[@]}"; do
    mod=${mod%.xz}; mod=${mod%.zst}
    printf '%s\n' "/lib/modules/$KVER/$mod" >>"$ROOT/modules.load"
done
cp "$MODROOT"/modules.{order,builtin,builtin.modinfo} "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
# A modules.dep for just this subset, so modprobe in the guest finds them.
depmod -b "$ROOT" "$KVER" 2>/dev/null || true
printf '%s\n' "$KVER" >"$ROOT/kernel-release"

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) \
    >"$CACHE/initramfs.cpio.tmp"
cp "$WORK/pkg/boot/vmlinuz-$KVER" "$CACHE/vmlinuz.tmp"
# Under TCG, decompressing the xz bzImage takes ~7 s. QEMU can boot the bare
# ELF through the PVH entry point instead (CONFIG_PVH), so keep it unpacked.
rm -f "$CACHE/vmlinux"
if grep -q '^CONFIG_PVH=y' "$WORK/pkg/boot/config-$KVER"; then
    off=$(LC_ALL=C grep -abo -m1 $'\xfd7zXZ' "$WORK/pkg/boot/vmlinuz-$KVER" | head -n1 | cut -d: -f1 || true)
    # (process substitution: tail dies of SIGPIPE when xz stops after the stream)
    if [[ -n $off ]] && xz -dc --single-stream >"$CACHE/vmlinux.tmp" 2>/dev/null \
            < <(tail -c +$((off + 1)) "$WORK/pkg/boot/vmlinuz-$KVER") \
            && [[ $(head -c4 "$CACHE/vmlinux.tmp" | tail -c3) == ELF ]]; then
        mv "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"
    else
        rm -f "$CACHE/vmlinux.tmp"
        log "warning: cannot unpack an ELF vmlinux with a PVH entry; booting the bzImage (slower)"
    fi
fi
cp "$WORK/pkg/boot/config-$KVER" "$CACHE/config"
mv "$CACHE/initramfs.cpio.tmp" "$CACHE/initramfs.cpio"
mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
printf '%s\n' "$KVER" >"$CACHE/kernel-release"
inputs_hash >"$CACHE/stamp"
log "built $CACHE (kernel $KVER, ${#LOAD_ORDER[@]} modules loaded at boot," \
    "initramfs $(du -h "$CACHE/initramfs.cpio" | cut -f1))"
