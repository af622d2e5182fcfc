#!/usr/bin/env bash
# Build a tiny guest that runs the QEMU guest agent, offline from Debian packages:
#   OUTDIR/vmlinuz     the Debian -cloud-amd64 kernel (direct kernel boot)
#   OUTDIR/initrd.img  gzip newc initramfs: busybox-static, qemu-ga and its libraries, the virtio
#                      modules; /init loads them in dependency order, links
#                      /dev/virtio-ports/org.qemu.guest_agent.0 itself (no udev), mounts any ext4
#                      virtio disk on /mnt/<vdX> (so fsfreeze has something to freeze) and runs
#                      qemu-ga in the foreground, respawning it if it exits.
#   OUTDIR/stamp       what was built from; a second run with the same stamp does nothing.
# Boot it with `<domain type='qemu'>`, <kernel>/<initrd>, cmdline "console=ttyS0" and a virtio
# channel named org.qemu.guest_agent.0 (see tests/agent_guest.py).
#
# Usage: scripts/build-agent-guest.sh [OUTDIR]    (default /var/tmp/vmbackup-guest)
# Needs apt (Debian 12). The qemu-ga libraries come from the host when present, otherwise from
# their packages (apt-get download + dpkg-deb -x), so nothing is installed on the host.
set -euo pipefail

OUT=${1:-/var/tmp/vmbackup-guest}
ARCH_LIBDIR=x86_64-linux-gnu
# Wanted modules; their dependencies are added and ordered from each module's .modinfo.
MODULES=(virtio_pci virtio_console virtio_blk)
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
# the kernel package linux-image-cloud-amd64 points at, and the three package versions.
query_versions() {
  apt-cache show --no-all-versions linux-image-cloud-amd64 busybox-static qemu-guest-agent \
    2>/dev/null | awk '
      /^Package: / { pkg = $2 }
      /^Version: / { ver[pkg] = $2 }
      /^Depends: / && pkg == "linux-image-cloud-amd64" {
        for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-.*-cloud-amd64$/) { kpkg = $i; kver = $(i + 2); break }
        sub(/\)$/, "", kver); sub(/,$/, "", kver)
      }
      END {
        if (kpkg == "" || ver["busybox-static"] == "" || ver["qemu-guest-agent"] == "") exit 1
        print kpkg, kpkg ":" kver, ver["busybox-static"], ver["qemu-guest-agent"]
      }'
}

resolve_versions() {
  local line
  line=$(query_versions) || { apt_update; line=$(query_versions); } \
    || die "cannot resolve linux-image-cloud-amd64, busybox-static, qemu-guest-agent with apt-cache"
  read -r KPKG kernel busybox qga <<<"$line"
  KVER=${KPKG#linux-image-}
  STAMP="kernel=$kernel busybox-static=$busybox qemu-guest-agent=$qga script=$SCRIPT_SUM"
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
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -f "$OUT/stamp" ] \
  && [ "$(cat "$OUT/stamp")" = "$STAMP" ]; then
  log "up to date in $OUT ($STAMP)"
  exit 0
fi

started=$(date +%s)
WORK=$(mktemp -d /var/tmp/vmbackup-guest-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/pkg" "$WORK/libs" "$WORK/root"
# apt drops privileges to _apt for downloads; let it write there (no "unsandboxed" warning).
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
  chown _apt "$WORK/debs"
fi

log "downloading $KPKG busybox-static qemu-guest-agent"
cd "$WORK/debs"
download "$KPKG" busybox-static qemu-guest-agent
for deb in ./*.deb; do dpkg-deb -x "$deb" "$WORK/pkg"; done

PKG=$WORK/pkg
ROOT=$WORK/root
[ -f "$PKG/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-$KVER in $KPKG"
[ -x "$PKG/usr/sbin/qemu-ga" ] || die "no qemu-ga in qemu-guest-agent"
[ -x "$PKG/bin/busybox" ] || die "no busybox in busybox-static"

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

mkdir -p "$ROOT"/{bin,sbin,usr/sbin,lib/"$ARCH_LIBDIR",lib64,lib/modules,etc,proc,sys,dev,run,tmp,mnt,root}
mkdir -p "$ROOT/var/lib" && ln -s ../run "$ROOT/var/run"
cp "$PKG/usr/sbin/qemu-ga" "$ROOT/usr/sbin/qemu-ga"
# "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
ldd_qga | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  if [[ $lib == */ld-linux-x86-64.so.2 ]]; then
    cp -L "$lib" "$ROOT/lib64/ld-linux-x86-64.so.2"
  else
    cp -L "$lib" "$ROOT/lib/$ARCH_LIBDIR/$(basename "$lib")"
  fi
done
[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader not found by ldd"
nlibs=$(find "$ROOT/lib/$ARCH_LIBDIR" -type f | wc -l)

cp "$PKG/bin/busybox" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"

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
for m in "${MODULES[@]}"; do visit "$m"; done
for mod in "${order[@]}"; do
  cp "${ko_path[$mod]}" "$ROOT/lib/modules/$mod.ko"
done
printf '%s\n' "${order[@]}" >"$ROOT/etc/modules"
log "modules: ${order[*]}"

cat >"$ROOT/init" <<'INIT'
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

while read -r mod; do
  insmod "/lib/modules/$mod.ko" || echo "agent-guest: insmod $mod failed"
done </etc/modules

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
# any other disk is left untouched (a failed mount attempt writes nothing).
for dev in /sys/block/vd*; do
  [ -e "$dev" ] || continue
  name=${dev##*/}
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
INIT
chmod 755 "$ROOT/init"
# qemu-ga's guest-shutdown runs "/sbin/shutdown -h -P +0 ...": power off at once (no real init)
cat >"$ROOT/sbin/shutdown" <<'SHUTDOWN'
#!/bin/sh
sync
exec /bin/busybox poweroff -f
SHUTDOWN
chmod 755 "$ROOT/sbin/shutdown"

# --- pack ------------------------------------------------------------------------------------
cd "$ROOT"
if command -v cpio >/dev/null; then
  find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet >"$WORK/initrd.cpio"
else
  find . -mindepth 1 | LC_ALL=C sort | "$ROOT/bin/busybox" cpio -o -H newc >"$WORK/initrd.cpio" 2>/dev/null
fi
gzip -n <"$WORK/initrd.cpio" >"$WORK/initrd.img"
cd "$WORK"

cp "$PKG/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
chmod 644 "$WORK/vmlinuz" "$WORK/initrd.img"
chmod 755 "$OUT"
rm -f "$OUT/stamp"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
echo "$STAMP" >"$OUT/stamp"
log "built $OUT (kernel $KVER, qemu-ga + $nlibs libraries, initrd $(($(stat -c %s "$OUT/initrd.img") / 1024)) KiB) in $(($(date +%s) - started)) s"
