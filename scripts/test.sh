#!/usr/bin/env bash
# Runs every check deskgrid has, on a fresh Debian 12 machine as root:
# host setup (Debian packages, libvirtd), formatting, lints, shell scripts,
# then the whole test suite (unit, property, crash, CLI and binary tests).
# This is the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
bash scripts/setup-host.sh

echo "==> cargo fmt --check"
cargo fmt --check

echo "==> shellcheck"
find scripts image-build tests/guest .ci -type f \( -name '*.sh' -o -name run \) -print0 | xargs -0 shellcheck

echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

echo "==> cargo test"
# Not --all-targets: the benches are harness-less programs that provision real
# VMs for minutes; clippy above checks that they build.
cargo test --locked

echo "==> all checks passed in $(($(date +%s) - started)) s"
