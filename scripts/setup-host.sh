#!/usr/bin/env bash
# Prepare this machine for vmbackup: Debian packages, libvirtd running, a virtualenv.
# Idempotent: safe to run before every `make run` / `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# restic: offsite copies (workers run it)
PACKAGES=(qemu-utils qemu-system-x86 qemu-block-extra libvirt-daemon-system libvirt-clients
          libvirt-dev pkg-config ovmf dnsmasq-base python3-venv rsync restic)
# the test suite also needs a browser (Debian's; browsers cannot be downloaded), e2fsprogs
# (mkfs.ext4, debugfs) and cpio for the guest-agent test guests (syslinux and mtools are run
# from their extracted packages), swtpm for a guest with an emulated TPM; the benches
# (whose smoke runs in the suite) compare with virtnbdbackup and take CPU/RSS from GNU time;
# openssh-server for the SFTP offsite tests (installed only: the tests start their own sshd)
[ "${1:-}" = "--test" ] && PACKAGES+=(chromium e2fsprogs cpio swtpm swtpm-tools virtnbdbackup time
                                     openssh-server)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}"
    # install only, start nothing (openssh-server would start sshd): a policy-rc.d that
    # says no, unless the machine has its own
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

if [ "$(id -u)" = 0 ]; then
  mkdir -p /run/libvirt /var/lib/libvirt/images /var/log/libvirt/qemu /var/cache/libvirt/qemu
  # Without udev the kvm node stays root-only: libvirtd then probes QEMU as KVM-capable and
  # finds KVM unusable for the qemu user on every call, re-probing for seconds each time.
  if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chown root:kvm /dev/kvm && chmod 660 /dev/kvm
  fi
  # swtpm's local CA must belong to the user libvirt runs swtpm as (tss); a first run as
  # root leaves root-owned files that make every later TPM start fail
  if [ -d /var/lib/swtpm-localca ] && getent passwd tss >/dev/null; then
    chown -R tss:root /var/lib/swtpm-localca
  fi
  pgrep -x virtlogd >/dev/null || virtlogd -d
  if ! pgrep -x libvirtd >/dev/null; then
    echo "setup: starting libvirtd"
    libvirtd -d
  fi
fi
for _ in $(seq 1 60); do
  [ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.5
done
virsh -c qemu:///system version >/dev/null 2>&1 || { echo "setup: libvirtd does not answer" >&2; exit 1; }

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: installing Python requirements"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
  rm -f .venv/.requirements-* && touch "$stamp"
fi
echo "setup: ok"
