#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (the
# Python conformance test installs its pinned client into a venv under target/).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required" >&2; exit 1; }
NEED=()
python3 -c 'import venv, ensurepip' 2>/dev/null || NEED+=(python3-venv)
command -v systemd-analyze >/dev/null || NEED+=(systemd)
# The mount write tests run rsync into the mount.
command -v rsync >/dev/null || NEED+=(rsync)
if [ ${#NEED[@]} -gt 0 ]; then
  echo "== installing ${NEED[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${NEED[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: the mount tests need FUSE" >&2; exit 1; }
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
set +e
cargo test --lib --tests 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite: the sum over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$LOG"
exit "$RC"
