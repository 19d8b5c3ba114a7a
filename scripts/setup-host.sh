#!/usr/bin/env bash
# Prepares a Debian 12 machine (as root) to build, run and test deskgrid:
# the Debian packages for libvirt and QEMU, a root-run QEMU, and virtlogd and
# libvirtd started when they are not running. Safe to run again.
set -euo pipefail

packages=(
  build-essential pkg-config
  libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils
  binutils procps tmux shellcheck
  busybox-static syslinux syslinux-common mtools dosfstools cpio python3
  # benches/transfer*.rs and benches/swarm.rs: rsync baselines, namespaces and tc
  rsync iproute2
  # tests/api_http.rs and tests/desktop_grid.rs: the HTTPS API through the
  # real curl (and openssl for the certificate's fingerprint)
  curl openssl ca-certificates
)

log() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host.sh: run as root (it installs Debian packages and starts libvirtd)" >&2
  exit 1
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
    missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "Debian packages already installed"
fi

# QEMU runs as root on test machines: no per-image ownership changes needed.
if ! getent passwd libvirt-qemu >/dev/null; then
  log "creating the libvirt-qemu user"
  useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu
fi
qemu_conf=/etc/libvirt/qemu.conf
if ! grep -q '^user = "root"' "$qemu_conf"; then
  log "letting QEMU run as root ($qemu_conf)"
  printf '\nuser = "root"\ngroup = "root"\n' >>"$qemu_conf"
fi

# Machines without systemd (containers, CI) need the daemons started by hand,
# and the directories systemd would have made for them.
mkdir -p /var/log/libvirt /var/log/libvirt/qemu /run/libvirt /var/lib/libvirt/images
if ! pgrep -x virtlogd >/dev/null; then
  log "starting virtlogd"
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
  log "starting libvirtd"
  libvirtd -d
fi
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null || {
  echo "setup-host.sh: libvirtd did not answer on qemu:///system" >&2
  exit 1
}
log "libvirt ready: $(virsh -c qemu:///system version | grep -i 'running hypervisor' || true)"
