#!/usr/bin/env bash
# Soak: the load test (tests/load.rs: 32 readers through a real mount, every
# byte checked, daemon memory, descriptors and streams bounded) for SECS
# seconds (default 1800) on a release build. Usage: scripts/soak.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-1800}
case "$SECS" in
  ''|*[!0-9]*) echo "usage: $0 [SECS]  (whole seconds, default 1800)" >&2; exit 2 ;;
esac
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: the soak test needs FUSE" >&2; exit 1; }
ZONALFS_LOAD_SECS=$SECS exec cargo test --release --test load -- --nocapture
