#!/usr/bin/env bash
# The main job: deskgrid in one command, a grid of three servers on this
# machine on the embedded default settings. Sets up the host, builds
# deskgrid, creates the grid on server 1, joins servers 2 and 3 with a join
# token, imports the tiny test desktop (with the real deskgrid-agent inside)
# as a template's base image, waits while the grid replicates it and boots
# desktops, logs a demo user in and prints the connection details and the
# .vv file for remote-viewer, then serves until Ctrl-C. Run again: it reuses
# what it made.
#   DESKGRID_DEMO_DIR      where the servers' data directories go (/tmp/deskgrid-demo)
#   DESKGRID_DEMO_SECONDS  stop by itself after that many seconds
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh

echo "==> building deskgrid (release)"
cargo build --locked --release --bins
deskgrid=$PWD/target/release/deskgrid
demo_dir=${DESKGRID_DEMO_DIR:-/tmp/deskgrid-demo}
mkdir -p "$demo_dir"
chmod 700 "$demo_dir"

dir() { echo "$demo_dir/server-$1"; }
address() { echo "127.0.0.1:$((7442 + $1))"; }
settings() {
  echo --name "demo-$1" --site demo --listen "$(address "$1")" \
    --libvirt qemu:///system --pool "deskgrid-demo-$1" \
    --pool-path "/var/lib/libvirt/images/deskgrid-demo-$1" --domain-type qemu \
    --network user-mode
}

servers=()
cleanup() {
  for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

start() {
  "$deskgrid" --data-dir "$(dir "$1")" serve 2>>"$demo_dir/server-$1.log" &
  servers+=("$!")
  for _ in $(seq 1 100); do
    [ -S "$(dir "$1")/control.sock" ] && return 0
    kill -0 "${servers[-1]}" 2>/dev/null || { echo "demo: server $1 stopped at start-up; see $demo_dir/server-$1.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "demo: server $1 did not start; see $demo_dir/server-$1.log" >&2
  exit 1
}

if [ ! -f "$(dir 1)/config.toml" ]; then
  echo "==> creating the grid on server 1"
  password_file=$demo_dir/admin-password
  (umask 077 && head -c 18 /dev/urandom | base64 >"$password_file")
  # shellcheck disable=SC2046 # settings are words on purpose
  "$deskgrid" --data-dir "$(dir 1)" init --new-grid --admin-password-file "$password_file" $(settings 1)
  echo "    the admin's password is in $password_file"
fi
start 1

for n in 2 3; do
  if [ ! -f "$(dir "$n")/config.toml" ]; then
    echo "==> joining server $n"
    token=$("$deskgrid" --data-dir "$(dir 1)" token create --ttl 10m --uses 1 2>/dev/null)
    # shellcheck disable=SC2046 # settings are words on purpose
    "$deskgrid" --data-dir "$(dir "$n")" join "$(address 1)" --token "$token" $(settings "$n")
  fi
  start "$n"
done

echo "==> waiting for the three servers to agree"
for _ in $(seq 1 60); do
  digests=$(for n in 1 2 3; do "$deskgrid" --data-dir "$(dir "$n")" --output json status | grep '"state_digest"'; done | sort -u | wc -l)
  [ "$digests" = 1 ] && break
  sleep 0.5
done
dg() { "$deskgrid" --data-dir "$(dir 1)" "$@"; }

image=demo-desktop-1
if ! dg image list 2>/dev/null | grep -q "$image"; then
  echo "==> building the test desktop image (a tiny Linux with deskgrid-agent)"
  guest=$(bash tests/guest/build-guest.sh --add "$PWD/target/release/deskgrid-agent:/deskgrid/agent" | tail -n 1)
  echo "==> importing it as base image $image"
  dg image import "$guest" --name "$image"
fi
if ! dg template list 2>/dev/null | grep -q '^office\b'; then
  dg template create office --image "$image" --vcpus 1 --memory 256 --desired 3 --replicas 2
fi
user_password=$demo_dir/demo-user-password
if [ ! -f "$user_password" ]; then
  (umask 077 && head -c 12 /dev/urandom | base64 >"$user_password")
  dg user add demo --password-file "$user_password"
  dg entitle --user demo --template office
fi

echo "==> waiting for desktops: the grid copies the image and boots them (a few minutes under emulation)"
ready=0
for _ in $(seq 1 300); do
  ready=$(dg --output json status | grep -o '"ready_vms": *[0-9]*' | awk -F: '{ n += $2 } END { print n + 0 }')
  [ "${ready:-0}" -ge 1 ] && break
  sleep 2
done
dg status
echo
if [ "${ready:-0}" -ge 1 ]; then
  echo "==> logging the demo user in"
  dg connect --user demo --password-file "$user_password" --vv-file "$demo_dir/demo.vv" ||
    echo "demo: the login did not get a desktop (see above)" >&2
  echo "    remote-viewer $demo_dir/demo.vv   # opens the desktop (the file works once)"
else
  echo "demo: no desktop became ready in time; see $demo_dir/server-N.log and 'deskgrid status'" >&2
fi
echo
echo "Three servers run under $demo_dir (logs: server-N.log). In another terminal:"
echo "  $deskgrid --data-dir $(dir 2) status"
echo "  $deskgrid --data-dir $(dir 3) token create     # a change on one server reaches all"
echo "  $deskgrid --data-dir $(dir 1) host check"
cert=$(dir 1)/api/tls-cert.pem
cat <<EOF
The same login over the HTTPS API (a session token, then a desktop as JSON):
  TOKEN=\$(printf '{"user": "demo", "password": "%s"}' "\$(cat $user_password)" |
    curl -sS --cacert $cert -H 'Content-Type: application/json' --data-binary @- https://127.0.0.1:8443/api/v1/login |
    sed -n 's/.*"token":"\\([0-9a-f]*\\)".*/\\1/p')
  curl -sS --cacert $cert -H "Authorization: Bearer \$TOKEN" -X POST https://127.0.0.1:8443/api/v1/connect
EOF
echo "Stop with Ctrl-C."

if [ -n "${DESKGRID_DEMO_SECONDS:-}" ]; then
  sleep "$DESKGRID_DEMO_SECONDS"
  cleanup
  servers=()
else
  wait
fi
echo "==> servers stopped; server 1's state:"
"$deskgrid" --data-dir "$(dir 1)" state check
