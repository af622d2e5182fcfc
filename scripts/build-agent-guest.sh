#!/usr/bin/env bash
# Build tiny guests that run the QEMU guest agent, offline from Debian packages:
#   OUTDIR/vmlinuz     the Debian -cloud-amd64 kernel (direct kernel boot)
#   OUTDIR/initrd.img  the initramfs-only guest: a gzip newc initramfs holding busybox-static,
#                      qemu-ga and its libraries, the virtio modules; /init loads them in
#                      dependency order, links /dev/virtio-ports/org.qemu.guest_agent.0 itself
#                      (no udev), mounts any ext4 virtio disk on /mnt/<vdX> (so fsfreeze has
#                      something to freeze) and runs qemu-ga in the foreground, respawning it.
#   OUTDIR/disk-root.img
#                      the disk-rooted guest: a raw 64 MiB disk that holds the whole system, so
#                      that a backup of it proves something when it boots. MBR (syslinux's
#                      mbr.bin), partition 1 FAT (syslinux, the same kernel, a small initramfs
#                      with busybox and the virtio_pci/virtio_blk modules), partition 2 ext4
#                      labelled vmbackup-root (busybox, qemu-ga and its libraries,
#                      virtio_console, /sbin/init). SeaBIOS boots it (no direct kernel boot,
#                      which a restored definition drops anyway); the initramfs mounts
#                      root=/dev/vda2 and switch_roots into it, where /sbin/init starts qemu-ga
#                      like the initramfs-only guest does. A root that is not there, not ext4 or
#                      has no /sbin/init prints "agent-guest: no root on /dev/vda2: <why>" on
#                      the serial console and stays up without an agent; a disk without a boot
#                      sector leaves SeaBIOS printing "No bootable device." (with
#                      <bios useserial='yes'/>). Everything is written into image files without
#                      mounting (mformat/mcopy/syslinux --offset, mkfs.ext4 -d).
#   OUTDIR/stamp       what was built from; a second run with the same stamp does nothing.
# Boot the initramfs-only guest with `<domain type='qemu'>`, <kernel>/<initrd>, cmdline
# "console=ttyS0" and a virtio channel named org.qemu.guest_agent.0; the disk-rooted one from a
# copy of disk-root.img as virtio disk vda with <boot dev='hd'/> and the same channel (see
# tests/agent_guest.py, which also writes a per-test marker file into the root filesystem).
#
# Usage: scripts/build-agent-guest.sh [OUTDIR]    (default /var/tmp/vmbackup-guest)
# Needs apt (Debian 12). The qemu-ga libraries come from the host when present, otherwise from
# their packages (apt-get download + dpkg-deb -x); syslinux and mtools run from their extracted
# packages too, so nothing is installed on the host.
set -euo pipefail

OUT=${1:-/var/tmp/vmbackup-guest}
ARCH_LIBDIR=x86_64-linux-gnu
# Wanted modules; their dependencies are added and ordered from each module's .modinfo.
MODULES=(virtio_pci virtio_console virtio_blk)
# The disk-rooted guest: its initramfs loads what finds the root disk, the root the rest.
BOOT_MODULES=(virtio_pci virtio_blk)
DISK_MIB=64
BOOT_START_MIB=1
BOOT_MIB=24 # the kernel (~14 MiB), the small initramfs, syslinux
ROOT_START_MIB=$((BOOT_START_MIB + BOOT_MIB))
ROOT_DEV=/dev/vda2
SCRIPT_SUM=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

log() { echo "build-agent-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

apt_updated=0
apt_update() {
  [ "$apt_updated" = 1 ] && return 0
  log "apt-get update"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt_updated=1
}

# One apt-cache call (this machine keeps no apt binary cache, so each call parses the lists):
# the kernel package linux-image-cloud-amd64 points at, and the other package versions.
query_versions() {
  apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static qemu-guest-agent \
    syslinux mtools 2>/dev/null | awk '
      /^Package: / { pkg = $2 }
      /^Version: / { ver[pkg] = $2 }
      /^Depends: / && pkg == "linux-image-cloud-amd64" {
        for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-.*-cloud-amd64$/) { kpkg = $i; kver = $(i + 2); break }
        sub(/\)$/, "", kver); sub(/,$/, "", kver)
      }
      END {
        if (kpkg == "" || ver["busybox-static"] == "" || ver["qemu-guest-agent"] == "") exit 1
        if (ver["syslinux"] == "" || ver["mtools"] == "") exit 1
        print kpkg, kpkg ":" kver, ver["busybox-static"], ver["qemu-guest-agent"], ver["syslinux"], ver["mtools"]
      }'
}

resolve_versions() {
  local line
  line=$(query_versions) || { apt_update; line=$(query_versions); } \
    || die "cannot resolve linux-image-cloud-amd64, busybox-static, qemu-guest-agent, syslinux, mtools with apt-cache"
  read -r KPKG kernel busybox qga syslinux mtools <<<"$line"
  KVER=${KPKG#linux-image-}
  STAMP="kernel=$kernel busybox-static=$busybox qemu-guest-agent=$qga syslinux=$syslinux"
  STAMP+=" mtools=$mtools script=$SCRIPT_SUM"
}

# apt-get download into the current directory; one apt-get update and a retry on failure.
download() {
  if ! apt-get download -qq "$@" >/dev/null 2>dl.err; then
    apt_update
    apt-get download -qq "$@" >/dev/null 2>dl.err || { cat dl.err >&2; die "apt-get download $*"; }
  fi
}

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

resolve_versions
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/disk-root.img" ] \
  && [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$STAMP" ]; then
  log "up to date in $OUT ($STAMP)"
  exit 0
fi

started=$(date +%s)
WORK=$(mktemp -d /var/tmp/vmbackup-guest-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/pkg" "$WORK/libs"
# apt drops privileges to _apt for downloads; let it write there (no "unsandboxed" warning).
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
  chown _apt "$WORK/debs"
fi

log "downloading $KPKG busybox-static qemu-guest-agent syslinux syslinux-common mtools"
cd "$WORK/debs"
download "$KPKG" busybox-static qemu-guest-agent syslinux syslinux-common mtools
for deb in ./*.deb; do dpkg-deb -x "$deb" "$WORK/pkg"; done

PKG=$WORK/pkg
[ -f "$PKG/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-$KVER in $KPKG"
[ -x "$PKG/usr/sbin/qemu-ga" ] || die "no qemu-ga in qemu-guest-agent"
[ -x "$PKG/bin/busybox" ] || die "no busybox in busybox-static"
[ -x "$PKG/usr/bin/syslinux" ] || die "no syslinux in syslinux"
[ -f "$PKG/usr/lib/syslinux/mbr/mbr.bin" ] || die "no mbr.bin in syslinux-common"
[ -x "$PKG/usr/bin/mcopy" ] || die "no mcopy in mtools"

# --- qemu-ga's shared libraries: the host's, else extracted from their packages -------------
ldd_qga() {
  LD_LIBRARY_PATH="$WORK/libs/lib/$ARCH_LIBDIR:$WORK/libs/usr/lib/$ARCH_LIBDIR" \
    ldd "$PKG/usr/sbin/qemu-ga"
}
if ldd_qga | grep -q 'not found'; then
  missing=$(ldd_qga | awk '/not found/ {print $1}' | tr '\n' ' ')
  missing=${missing% }
  log "not on this host: $missing; extracting them from packages"
  # The library packages in qemu-guest-agent's dependency closure that are not installed.
  mapfile -t libpkgs < <(
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances qemu-guest-agent 2>/dev/null \
      | grep -E '^(lib|zlib)[^ <>]*$' | sed 's/:amd64$//' | sort -u
  )
  fetch=()
  for p in "${libpkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || fetch+=("$p")
  done
  [ ${#fetch[@]} -gt 0 ] || die "qemu-ga needs $missing but no library package is missing"
  mkdir -p "$WORK/libdebs"
  [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1 && chown _apt "$WORK/libdebs"
  cd "$WORK/libdebs"
  download "${fetch[@]}"
  for deb in ./*.deb; do dpkg-deb -x "$deb" "$WORK/libs"; done
  cd "$WORK"
  if ldd_qga | grep -q 'not found'; then
    ldd_qga >&2
    die "qemu-ga libraries still missing"
  fi
fi

# A root tree with busybox (applets linked at boot, or here with "links") and no agent.
add_busybox() {
  local root=$1
  mkdir -p "$root"/{bin,sbin,usr/sbin,lib/modules,etc,proc,sys,dev,run,tmp,mnt,root}
  cp "$PKG/bin/busybox" "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"
  if [ "${2:-}" = links ]; then
    local applet
    for applet in $("$PKG/bin/busybox" --list); do
      [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
  fi
}

# qemu-ga, its libraries and the loader; /sbin/shutdown for guest-shutdown.
add_agent() {
  local root=$1 lib
  mkdir -p "$root/lib/$ARCH_LIBDIR" "$root/lib64" "$root/var/lib"
  ln -s ../run "$root/var/run"
  cp "$PKG/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
  # "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
  ldd_qga | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
    if [[ $lib == */ld-linux-x86-64.so.2 ]]; then
      cp -L "$lib" "$root/lib64/ld-linux-x86-64.so.2"
    else
      cp -L "$lib" "$root/lib/$ARCH_LIBDIR/$(basename "$lib")"
    fi
  done
  [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader not found by ldd"
  # qemu-ga's guest-shutdown runs "/sbin/shutdown -h -P +0 ...": power off at once (no real init)
  cat >"$root/sbin/shutdown" <<'SHUTDOWN'
#!/bin/sh
sync
exec /bin/busybox poweroff -f
SHUTDOWN
  chmod 755 "$root/sbin/shutdown"
}

# --- virtio modules in dependency order (depends= from .modinfo; no modules.dep in the .deb) ---
MODDIR=$PKG/lib/modules/$KVER
declare -A ko_path=() visited=()
while IFS= read -r -d '' ko; do
  base=${ko##*/}
  base=${base%.ko}
  ko_path[${base//-/_}]=$ko
done < <(find "$MODDIR" -name '*.ko' -print0)
order=()
visit() {
  local mod=${1//-/_}
  [ -n "${visited[$mod]:-}" ] && return 0
  visited[$mod]=1
  if [ -z "${ko_path[$mod]:-}" ]; then
    # Built into the kernel: nothing to load.
    grep -q "/$mod.ko$" "$MODDIR/modules.builtin" || die "module $mod not found in $KPKG"
    return 0
  fi
  local deps
  deps=$(tr '\0' '\n' <"${ko_path[$mod]}" | sed -n 's/^depends=//p' | head -n1)
  local dep
  for dep in ${deps//,/ }; do visit "$dep"; done
  order+=("$mod")
}
# The modules "$@" with their dependencies not yet visited, in load order, into ROOT/lib/modules
# and ROOT/etc/modules (one name a line, for init). Call with visited reset for a fresh set.
add_modules() {
  local root=$1 mod
  shift
  order=()
  for mod in "$@"; do visit "$mod"; done
  for mod in "${order[@]}"; do
    cp "${ko_path[$mod]}" "$root/lib/modules/$mod.ko"
  done
  printf '%s\n' "${order[@]}" >"$root/etc/modules"
  log "modules in ${root##*/}: ${order[*]}"
}

# --- init scripts: a head per guest, then the shared module loading and agent part ----------
load_modules_sh() {
  cat <<'EOF'

while read -r mod; do
  insmod "/lib/modules/$mod.ko" || echo "agent-guest: insmod $mod failed"
done </etc/modules
EOF
}

agent_sh() {
  cat <<'EOF'

# No udev: find the agent's port by name and link it where qemu-ga (and everyone) expects it.
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    if [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ] && [ -e "/dev/${p##*/}" ]; then
      port=${p##*/}
    fi
  done
  [ -n "$port" ] || { i=$((i + 1)); sleep 0.1; }
done
if [ -z "$port" ]; then
  echo "agent-guest: no virtio port named org.qemu.guest_agent.0"
else
  mkdir -p /dev/virtio-ports
  ln -sf "../$port" /dev/virtio-ports/org.qemu.guest_agent.0
  echo "agent-guest: /dev/virtio-ports/org.qemu.guest_agent.0 -> $port"
fi

# Every virtio disk that holds an ext2/3/4 filesystem is mounted (fsfreeze then freezes it);
# any other disk is left untouched (a failed mount attempt writes nothing), a partitioned one
# (the disk-rooted guest's vda) is not even tried.
for dev in /sys/block/vd*; do
  [ -e "$dev" ] || continue
  name=${dev##*/}
  [ -e "$dev/${name}1" ] && continue
  mkdir -p "/mnt/$name"
  if mount -t ext4 "/dev/$name" "/mnt/$name" 2>/dev/null; then
    echo "agent-guest: mounted /dev/$name on /mnt/$name"
  else
    rmdir "/mnt/$name"
  fi
done

while true; do
  echo "agent-guest: starting qemu-ga"
  /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
    -f /run/qemu-ga.pid -t /run
  echo "agent-guest: qemu-ga exited ($?), restarting"
  rm -f /run/qemu-ga.pid
  sleep 1
done
EOF
}

# The initramfs-only guest's /init: everything in RAM.
ram_init_sh() {
  cat <<'EOF'
#!/bin/sh
# PID 1 of the vmbackup agent guest (see scripts/build-agent-guest.sh).
PATH=/bin:/sbin:/usr/sbin
export PATH
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console, so the kernel gave PID 1 no stdio: take the console now.
exec </dev/console >/dev/console 2>&1
echo "agent-guest: init on $(uname -r)"
EOF
  load_modules_sh
  agent_sh
}

# The disk-rooted guest's initramfs /init: find the root, check it holds a system, switch.
boot_init_sh() {
  cat <<'EOF'
#!/bin/sh
# PID 1 of the disk-rooted agent guest's initramfs (see scripts/build-agent-guest.sh): mount
# root= and switch into it; a missing or broken root leaves the guest up without an agent.
PATH=/bin
export PATH
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
echo "agent-guest: initramfs on $(uname -r)"
EOF
  load_modules_sh
  cat <<'EOF'

root=""
for arg in $(cat /proc/cmdline); do
  case $arg in root=*) root=${arg#root=} ;; esac
done
no_root() {
  echo "agent-guest: no root on ${root:-(no root= given)}: $*"
  while true; do sleep 3600; done
}
i=0
while [ -n "$root" ] && [ ! -b "$root" ] && [ $i -lt 50 ]; do
  i=$((i + 1))
  sleep 0.1
done
[ -b "$root" ] || no_root "no such block device"
mkdir -p /newroot
mount -t ext4 "$root" /newroot 2>/dev/null || no_root "no ext4 filesystem"
if [ ! -x /newroot/sbin/init ]; then
  umount /newroot
  no_root "no /sbin/init"
fi
echo "agent-guest: root $root mounted, switching to it"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF
}

# The disk-rooted guest's /sbin/init on its root filesystem.
disk_init_sh() {
  cat <<'EOF'
#!/bin/sh
# PID 1 of the disk-rooted agent guest, on its root filesystem (see
# scripts/build-agent-guest.sh): everything from here on is read from the disk.
PATH=/bin:/sbin:/usr/sbin
export PATH
mount -t proc proc /proc
# The initramfs moved its /dev here; mount one only if this init was started otherwise.
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
echo "agent-guest: init on the root disk ($(uname -r))"
EOF
  load_modules_sh
  cat <<'EOF'
if [ ! -x /usr/sbin/qemu-ga ]; then
  echo "agent-guest: no qemu-ga on the root disk"
  while true; do sleep 3600; done
fi
EOF
  agent_sh
}

pack_initramfs() {
  local root=$1 out=$2
  (
    cd "$root"
    if command -v cpio >/dev/null; then
      find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet
    else
      find . -mindepth 1 | LC_ALL=C sort | "$PKG/bin/busybox" cpio -o -H newc 2>/dev/null
    fi
  ) | gzip -n >"$out"
}

# --- the initramfs-only guest ----------------------------------------------------------------
ROOT=$WORK/root
add_busybox "$ROOT"
add_agent "$ROOT"
visited=()
add_modules "$ROOT" "${MODULES[@]}"
ram_init_sh >"$ROOT/init"
chmod 755 "$ROOT/init"
nlibs=$(find "$ROOT/lib/$ARCH_LIBDIR" -type f | wc -l)
pack_initramfs "$ROOT" "$WORK/initrd.img"

# --- the disk-rooted guest: a small initramfs, a root filesystem, one bootable disk ---------
BOOTRD=$WORK/bootrd
add_busybox "$BOOTRD"
visited=()
add_modules "$BOOTRD" "${BOOT_MODULES[@]}"
boot_init_sh >"$BOOTRD/init"
chmod 755 "$BOOTRD/init"
pack_initramfs "$BOOTRD" "$WORK/bootrd.img"

DISKROOT=$WORK/diskroot
add_busybox "$DISKROOT" links
add_agent "$DISKROOT"
add_modules "$DISKROOT" "${MODULES[@]}" # what the initramfs loaded is visited: only the rest
disk_init_sh >"$DISKROOT/sbin/init"
chmod 755 "$DISKROOT/sbin/init"
chmod 1777 "$DISKROOT/tmp"

# Little-endian 32-bit as printf %b escapes; one MBR partition entry (CHS unused: LBA only).
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
mbr_entry() { printf '%b' "\\x$1\\xfe\\xff\\xff\\x$2\\xfe\\xff\\xff$(le32 "$3")$(le32 "$4")"; }

make_disk() {
  local disk=$1 s=2048 # sectors per MiB
  local boot_at=$((BOOT_START_MIB * s)) boot_len=$((BOOT_MIB * s))
  local root_at=$((ROOT_START_MIB * s)) root_len=$(((DISK_MIB - ROOT_START_MIB) * s))
  truncate -s "${DISK_MIB}M" "$disk"
  # syslinux's MBR code, a disk signature, partition 1 active FAT16 (LBA), 2 Linux, 0x55AA.
  {
    head -c 440 "$PKG/usr/lib/syslinux/mbr/mbr.bin"
    printf '%b' '\x76\x6d\x62\x6b\0\0'
    mbr_entry 80 0e "$boot_at" "$boot_len"
    mbr_entry 00 83 "$root_at" "$root_len"
    head -c 32 /dev/zero
    printf '%b' '\x55\xaa'
  } >"$WORK/mbr"
  [ "$(stat -c %s "$WORK/mbr")" = 512 ] || die "MBR is not 512 bytes"
  dd if="$WORK/mbr" of="$disk" conv=notrunc status=none

  cat >"$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT agent
PROMPT 0
TIMEOUT 0
LABEL agent
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0 quiet root=$ROOT_DEV
EOF
  local fat="$disk@@$((BOOT_START_MIB))M"
  PATH="$PKG/usr/bin:$PATH" MTOOLS_SKIP_CHECK=1 mformat -i "$fat" -T "$boot_len" -h 64 -s 32 \
    -H "$boot_at" -v VMBBOOT :: || die "mformat failed"
  PATH="$PKG/usr/bin:$PATH" MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" "$PKG/boot/vmlinuz-$KVER" ::/vmlinuz
  PATH="$PKG/usr/bin:$PATH" MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" "$WORK/bootrd.img" ::/initrd.img
  PATH="$PKG/usr/bin:$PATH" MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" "$WORK/syslinux.cfg" ::/syslinux.cfg
  PATH="$PKG/usr/bin:$PATH" MTOOLS_SKIP_CHECK=1 "$PKG/usr/bin/syslinux" \
    --offset $((BOOT_START_MIB * 1024 * 1024)) --install "$disk" || die "syslinux --install failed"

  truncate -s "$((DISK_MIB - ROOT_START_MIB))M" "$WORK/root.ext4"
  mkfs.ext4 -q -F -L vmbackup-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$DISKROOT" \
    "$WORK/root.ext4" || die "mkfs.ext4 -d failed"
  dd if="$WORK/root.ext4" of="$disk" bs=1M seek="$ROOT_START_MIB" conv=notrunc,sparse status=none
}
make_disk "$WORK/disk-root.img"

# --- publish ---------------------------------------------------------------------------------
cp "$PKG/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
chmod 644 "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/disk-root.img"
chmod 755 "$OUT"
rm -f "$OUT/stamp"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
mv -f "$WORK/disk-root.img" "$OUT/disk-root.img"
echo "$STAMP" >"$OUT/stamp"
log "built $OUT (kernel $KVER, qemu-ga + $nlibs libraries, initrd $(($(stat -c %s "$OUT/initrd.img") / 1024)) KiB, disk-root.img ${DISK_MIB} MiB with $(($(du -k "$OUT/disk-root.img" | cut -f1) / 1024)) MiB used) in $(($(date +%s) - started)) s"
