#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the state-machine scripts, and the end-to-end
# tests that drive the real `sluice` binary against real servers (echo backends, redis-server)
# on loopback. Installs the Debian packages those tests need first.
#
#   scripts/test.sh            # everything in the default tier
#   scripts/test.sh -p sluice  # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Several tests hold thousands of sockets: ask for the hard limit (tests cope with less).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo test --workspace --locked "$@"
