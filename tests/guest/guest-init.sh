#!/bin/sh
# /init of the deskgrid test guest (busybox sh): tests/guest/build-guest.sh
# puts this file into the guest's initramfs. It loads the modules listed in
# /etc/deskgrid/modules, finds the virtio-serial port org.deskgrid.agent.0,
# then runs /deskgrid/agent PORT (restarting it when it exits) or, without an
# agent, writes a hello line to the port every second. Progress lines go to
# the serial console (the domain's serial log).
#
# Test logins (optional): each line of /deskgrid/test-logins is
#   UUID_PREFIX USER LOGIN_AFTER_S SESSION_S
# and a guest whose SMBIOS UUID starts with UUID_PREFIX (- for any) logs USER in
# LOGIN_AFTER_S seconds after its agent port appeared and out SESSION_S
# seconds later, by writing utmp records as login(1) and logout(3) do: a
# USER_PROCESS record (line tty1, the pid of a process that lives for the
# session) into /run/utmp, then the same line as DEAD_PROCESS with the user
# cleared. Nobody types a password (the test guest has no getty), but the
# agent reads exactly what a real login leaves behind.
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

# --- test logins (see the top of this file) ---------------------------------
# Four little-endian bytes of $1.
le32() {
  for shift in 0 8 16 24; do
    # shellcheck disable=SC2059 # the format is the octal escape itself
    printf "$(printf '\\%03o' $((($1 >> shift) & 255)))"
  done
}
# $1 as a NUL-padded field of $2 bytes.
fixed() {
  printf '%s' "$1"
  head -c $(($2 - ${#1})) /dev/zero
}
# One 384-byte utmp record (glibc x86-64): type pid line user.
utmp_record() {
  le32 "$1"
  le32 "$2"
  fixed "$3" 32
  fixed "${3#tty}" 4
  fixed "$4" 32
  fixed "" 256
  fixed "" 8
  le32 "$(date +%s)"
  fixed "" 20
  fixed "" 20
}
write_utmp() {
  utmp_record "$@" >/run/utmp.new && mv /run/utmp.new /run/utmp
}
test_login() {
  user=$1 after=$2 session=$3
  sleep "$after"
  sleep "$session" &
  session_pid=$!
  write_utmp 7 "$session_pid" tty1 "$user"
  log "test login: $user on tty1 (pid $session_pid) for $session s"
  wait "$session_pid"
  write_utmp 8 "$session_pid" tty1 ""
  log "test logout: $user from tty1"
}
[ -e /var/run ] || ln -s /run /var/run
if [ -r /deskgrid/test-logins ]; then
  uuid=$(tr 'A-F' 'a-f' </sys/class/dmi/id/product_uuid 2>/dev/null)
  while read -r prefix user after session; do
    # A prefix of "-" stands for every guest.
    [ "$prefix" = - ] && prefix=
    case $uuid in
      "$prefix"*) test_login "$user" "$after" "$session" & ;;
    esac
  done </deskgrid/test-logins
fi

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
