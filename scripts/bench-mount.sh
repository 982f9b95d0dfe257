#!/usr/bin/env bash
# Mount tuning benchmark (issue 5, item 3): `dd bs=1M` of a 1 GiB object
# through a real mount over the unshaped emulator, for each FUSE choice (kernel
# readahead, loop threads, max_background, page cache vs --direct-io), against
# `zonalfs cat` of the same object. Median of RUNS runs; each run is a fresh
# mount (cold page cache for the file). Writes the "mount" section of
# docs/benchmarks.md. Run as root.
#   usage: scripts/bench-mount.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
cargo build --release --quiet --bin zonalfs
. scripts/lib/bench-common.sh
MNT="$WORK/mnt"
mkdir -p "$WORK/root/bench" "$MNT"
head -c $((1 << 30)) /dev/urandom > "$WORK/root/bench/1GiB"
unmount_quietly() { grep -qs " $MNT " /proc/mounts && "$BIN" unmount "$MNT" || true; }
trap 'unmount_quietly; cleanup' EXIT INT TERM

start_emu
"$BIN" cat gs://bench/1GiB --endpoint "$EP" --anonymous > /dev/null   # warm the emulator's page cache
dd_mbps() {
  "$BIN" mount bench "$MNT" --endpoint "$EP" --anonymous --log-level warn "$@"
  local out
  out=$(dd if="$MNT/1GiB" of=/dev/null bs=1M 2>&1 | tail -n 1)
  "$BIN" unmount "$MNT"
  for _ in $(seq 1 50); do grep -qs " $MNT " /proc/mounts || break; sleep 0.1; done
  echo "$out" | awk '{ for (i = 1; i <= NF; i++) if ($i == "s,") { printf "%.0f", 1073741824 / $(i-1) / 1e6 } }'
}
cat_mbps() {
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN" cat gs://bench/1GiB --endpoint "$EP" --anonymous > /dev/null
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", 1073741824 / (b - a) / 1e6 }'
}
row() {
  local label=$1; shift
  local r=()
  for _ in $(seq 1 "$RUNS"); do r+=("$(dd_mbps "$@")"); done
  echo "| $label | $(median "${r[@]}") | ${r[*]} |"
}
dd_mbps > /dev/null   # one untimed mount first: warms the page caches and the emulator
C=(); for _ in $(seq 1 "$RUNS"); do C+=("$(cat_mbps)"); done
CAT=$(median "${C[@]}")
ROWS=$(
  row "defaults (readahead 1 MiB, 4 threads, max_background 64, page cache)"
  row "kernel readahead 4 MiB" --kernel-readahead-kb 4096
  row "kernel readahead 16 MiB" --kernel-readahead-kb 16384
  row "kernel readahead 64 MiB" --kernel-readahead-kb 65536
  row "2 loop threads" --fuse-threads 2
  row "8 loop threads" --fuse-threads 8
  row "max_background 16" --max-background 16
  row "max_background 128" --max-background 128
  row "--direct-io" --direct-io
)
stop_emu
write_section mount "## Mount: \`dd bs=1M\` of 1 GiB through FUSE, per tuning choice

$(machine_line)
Unshaped emulator; each run a fresh mount. Median of $RUNS runs (MB/s).
\`zonalfs cat\` of the same object (the raw client): **$CAT MB/s** (runs: ${C[*]}).

| setup | median MB/s | runs |
|---|---:|---|
$ROWS"
