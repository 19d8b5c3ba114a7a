#!/usr/bin/env bash
# The main job: a local deskgrid server with the embedded default settings.
# Sets up the host, builds deskgrid, initialises a data directory (once) and
# serves it until Ctrl-C. DESKGRID_DEMO_DIR picks the data directory
# (default /tmp/deskgrid-demo); DESKGRID_DEMO_SECONDS stops the demo by itself
# after that many seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-host.sh

echo "==> building deskgrid (release)"
cargo build --locked --release --bins
deskgrid=$PWD/target/release/deskgrid
data_dir=${DESKGRID_DEMO_DIR:-/tmp/deskgrid-demo}

if [ ! -f "$data_dir/config.toml" ]; then
  echo "==> initialising $data_dir"
  "$deskgrid" --data-dir "$data_dir" init --name demo-1 --site demo \
    --listen 127.0.0.1:7443 --libvirt qemu:///system --domain-type qemu
else
  echo "==> reusing $data_dir"
fi

echo "==> starting the server"
"$deskgrid" --data-dir "$data_dir" serve &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" || true' EXIT

for _ in $(seq 1 100); do
  [ -S "$data_dir/control.sock" ] && break
  kill -0 "$server" 2>/dev/null || { echo "demo: the server stopped at start-up (see above)" >&2; exit 1; }
  sleep 0.1
done

echo "==> deskgrid status"
"$deskgrid" --data-dir "$data_dir" status
echo
echo "The server runs on $data_dir. In another terminal, try:"
echo "  $deskgrid --data-dir $data_dir status"
echo "  $deskgrid --data-dir $data_dir state compact"
echo "Stop it with Ctrl-C."

if [ -n "${DESKGRID_DEMO_SECONDS:-}" ]; then
  sleep "$DESKGRID_DEMO_SECONDS"
  kill -TERM "$server"
fi
wait "$server"
trap - EXIT
echo "==> server stopped cleanly; its state:"
"$deskgrid" --data-dir "$data_dir" state check
