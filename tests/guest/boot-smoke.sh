#!/usr/bin/env bash
# Boots the deskgrid test guest under libvirt (TCG) and waits for its hello
# line on the virtio-serial channel org.deskgrid.agent.0.
#
#   tests/guest/boot-smoke.sh [--image PATH] [--runs N] [--timeout SECONDS]
#                             [--machine pc|q35] [--bus virtio|sata]
#                             [--shutdown] [--verbose]
#
# Without --image it runs tests/guest/build-guest.sh (cached) for the image.
# Each run defines a transient domain (`virsh create`) on a qcow2 overlay of
# the image, in a temporary directory, so the cached image is never written;
# libvirt chooses the channel's socket path, read back from `virsh dumpxml`.
# It prints the time from `virsh create` to the first line, checks that the
# line carries the domain's UUID, and with --shutdown also presses the ACPI
# power button (`virsh shutdown`) and waits for the guest to power off. The
# domain and the temporary files go away on exit, also on failure, when the
# guest's serial log is printed to stderr. Run as root; the libvirt URI is
# $LIBVIRT_DEFAULT_URI or qemu:///system.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
uri=${LIBVIRT_DEFAULT_URI:-qemu:///system}
image=
runs=1
timeout=60
machine=pc
bus=virtio
shutdown=0
verbose=0

die() {
  printf 'boot-smoke: error: %s\n' "$*" >&2
  exit 1
}
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
  case $1 in
    --image) image=${2:?--image needs a path}; shift 2 ;;
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
    --machine) machine=${2:?--machine needs pc or q35}; shift 2 ;;
    --bus) bus=${2:?--bus needs virtio or sata}; shift 2 ;;
    --shutdown) shutdown=1; shift ;;
    --verbose) verbose=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds"
case $machine in pc | q35) ;; *) die "--machine must be pc or q35" ;; esac
case $bus in
  virtio) disk_dev=vda ;;
  sata) disk_dev=sda ;;
  *) die "--bus must be virtio or sata" ;;
esac

if [ -z "$image" ]; then
  image=$("$here/build-guest.sh" | tail -n 1)
fi
image=$(readlink -f "$image")
[ -f "$image" ] || die "no image at $image"

virsh() { command virsh -q -c "$uri" "$@"; }

tmp=
domain=
waiter=
cleanup() {
  local status=${1:-$?}
  if [ -n "$waiter" ]; then
    kill "$waiter" 2>/dev/null || true
    waiter=
  fi
  if [ -n "$domain" ]; then
    virsh destroy "$domain" >/dev/null 2>&1 || true
  fi
  if [ "$status" -ne 0 ] && [ -n "$tmp" ] && [ -s "$tmp/serial.log" ]; then
    printf 'boot-smoke: serial log of %s:\n' "$domain" >&2
    tail -n 60 "$tmp/serial.log" | sed 's/^/  | /' >&2
  fi
  [ -z "$tmp" ] || rm -rf "$tmp"
  tmp=
  domain=
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
elapsed() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.2f", e - s }'; }

# Prints the UNIX socket path of the org.deskgrid.agent.0 channel of $1.
channel_socket() {
  virsh dumpxml "$1" | python3 -c '
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
for ch in root.iter("channel"):
    target = ch.find("target")
    source = ch.find("source")
    if target is not None and target.get("name") == "org.deskgrid.agent.0" and source is not None:
        print(source.get("path"))
        break
'
}

# Connects to socket $1, prints the first line within $2 seconds, or fails.
first_line() {
  python3 - "$1" "$2" <<'PY'
import socket, sys, time
path, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
sock = None
while sock is None:
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    except OSError:
        sock.close()
        sock = None
        if time.monotonic() > deadline:
            sys.exit("cannot connect to " + path)
        time.sleep(0.05)
data = b""
while b"\n" not in data:
    left = deadline - time.monotonic()
    if left <= 0:
        sys.exit("no line from the guest in time (got %r)" % data)
    sock.settimeout(left)
    try:
        chunk = sock.recv(4096)
    except socket.timeout:
        continue
    if not chunk:
        sys.exit("channel closed (got %r)" % data)
    data += chunk
print(data.split(b"\n", 1)[0].decode("utf-8", "replace"))
PY
}

boot_once() {
  local run=$1 xml start created line end uuid socket_path boot_ms stop_start
  tmp=$(mktemp -d /var/tmp/deskgrid-boot-smoke.XXXXXX)
  domain=deskgrid-smoke-$$-$run
  qemu-img create -q -f qcow2 -F raw -b "$image" "$tmp/overlay.qcow2"
  : >"$tmp/serial.log"
  xml=$tmp/domain.xml
  cat >"$xml" <<XML
<domain type='qemu'>
  <name>$domain</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='$machine'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$tmp/overlay.qcow2'/>
      <target dev='$disk_dev' bus='$bus'/>
    </disk>
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.deskgrid.agent.0'/>
    </channel>
    <serial type='file'>
      <source path='$tmp/serial.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
  start=$(now)
  virsh create "$xml" >/dev/null
  created=$(now)
  socket_path=$(channel_socket "$domain")
  [ -n "$socket_path" ] || die "no channel socket in the live XML of $domain"
  # In the background, so that a signal interrupts the wait at once.
  first_line "$socket_path" "$timeout" >"$tmp/first-line" &
  waiter=$!
  wait "$waiter" || die "run $run: no hello line from $domain"
  waiter=
  line=$(cat "$tmp/first-line")
  end=$(now)
  uuid=$(virsh domuuid "$domain")
  [[ $line =~ ^deskgrid-test-guest\ hello\ uuid=([0-9a-fA-F-]+)\ boot_ms=([0-9]+)$ ]] ||
    die "run $run: unexpected first line: $line"
  [ "${BASH_REMATCH[1],,}" = "${uuid,,}" ] ||
    die "run $run: guest reports uuid ${BASH_REMATCH[1]}, domain has $uuid"
  boot_ms=${BASH_REMATCH[2]}
  printf 'boot-smoke: run %d: hello after %s s (virsh create %s s, guest uptime %d ms)\n' \
    "$run" "$(elapsed "$start" "$end")" "$(elapsed "$start" "$created")" "$boot_ms" >&2
  [ "$verbose" = 0 ] || { printf '  | %s\n' "$line"; sed 's/^/  | /' "$tmp/serial.log"; } >&2
  times+=("$(elapsed "$start" "$end")")

  if [ "$shutdown" = 1 ]; then
    stop_start=$(now)
    virsh shutdown "$domain" >/dev/null
    until ! virsh domstate "$domain" >/dev/null 2>&1; do
      if [ "$(elapsed "$stop_start" "$(now)" | cut -d. -f1)" -ge "$timeout" ]; then
        die "run $run: the guest did not power off on the ACPI power button"
      fi
      sleep 0.1
    done
    domain=
    printf 'boot-smoke: run %d: powered off %s s after virsh shutdown\n' \
      "$run" "$(elapsed "$stop_start" "$(now)")" >&2
  fi
  cleanup 0
}

times=()
for run in $(seq 1 "$runs"); do
  boot_once "$run"
done
printf '%s\n' "${times[@]}" | sort -n | awk -v m="$machine" -v b="$bus" '
  { t[NR] = $1 }
  END { printf "boot-smoke: %d run(s), %s/%s: boot-to-hello min %.2f s, median %.2f s, max %.2f s\n",
        NR, m, b, t[1], t[int((NR + 1) / 2)], t[NR] }'
