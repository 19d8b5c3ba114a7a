#!/bin/sh
# /init of the deskgrid test guest (busybox sh): tests/guest/build-guest.sh
# puts this file into the guest's initramfs. It loads the modules listed in
# /etc/deskgrid/modules, finds the virtio-serial port org.deskgrid.agent.0,
# then runs /deskgrid/agent PORT (restarting it when it exits) or, without an
# agent, writes a hello line to the port every second. Progress lines go to
# the serial console (the domain's serial log).
export PATH=/bin HOME=/ TERM=linux
agent_port_name=org.deskgrid.agent.0
agent=/deskgrid/agent

mkdir -p /dev /proc /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

# Output goes to the first serial port (the domain's serial log) and, for
# progress lines, to the display as well.
if (: >/dev/ttyS0) 2>/dev/null; then
  exec </dev/null >/dev/ttyS0 2>&1
else
  exec </dev/null >/dev/console 2>&1
fi
uptime_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
log() {
  echo "deskgrid-guest: [$(uptime_ms) ms] $*"
  echo "deskgrid-guest: $*" >/dev/tty0 2>/dev/null
}
log "init started (kernel $(uname -r))"

while read -r module; do
  insmod "/lib/modules/deskgrid/$module.ko" || log "insmod $module failed"
done </etc/deskgrid/modules
log "modules loaded: $(awk '{ printf "%s ", $1 }' /proc/modules)"
# The ACPI power button (virsh shutdown) runs /etc/acpi/PWRF/00000080.
mkdir -p /var/log
acpid -c /etc/acpi -l /var/log/acpid.log || log "acpid did not start"

find_port() {
  for dir in /sys/class/virtio-ports/*; do
    [ -r "$dir/name" ] || continue
    if [ "$(cat "$dir/name")" = "$agent_port_name" ]; then
      echo "/dev/${dir##*/}"
      return 0
    fi
  done
  return 1
}
waited=0
until port=$(find_port) && [ -c "$port" ]; do
  if [ $((waited % 50)) -eq 0 ]; then
    log "waiting for virtio-serial port $agent_port_name (ports: $(cat /sys/class/virtio-ports/*/name 2>/dev/null | tr '\n' ' '))"
  fi
  waited=$((waited + 1))
  usleep 100000
done
log "port $agent_port_name is $port"

if [ -x "$agent" ]; then
  while :; do
    log "starting $agent $port"
    "$agent" "$port"
    log "$agent exited with status $?; restarting in 1 s"
    sleep 1
  done
fi

uuid=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null) || uuid=unknown
log "no $agent: writing hello lines to $port (uuid=$uuid)"
while :; do
  echo "deskgrid-test-guest hello uuid=$uuid boot_ms=$(uptime_ms)" >"$port" ||
    log "write to $port failed"
  sleep 1
done
