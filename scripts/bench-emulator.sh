#!/usr/bin/env bash
# Emulator throughput benchmark (issue 2, item 7): serve a 1 GiB object over ONE
# BidiReadObject stream on loopback to a Rust client that checks CRC32C and
# discards the data; median of RUNS runs. Writes the emulator section of
# docs/benchmarks.md. Never asserted by a test: numbers live here.
#   usage: scripts/bench-emulator.sh [RUNS]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
cargo build --release --quiet --bin zonalfs --example emuclient
BIN=target/release/zonalfs
CLIENT=target/release/examples/emuclient
WORK=$(mktemp -d "${TMPDIR:-/tmp}/zonalfs-bench.XXXXXX")
EMU_PID=
cleanup() {
  if [ -n "$EMU_PID" ] && kill -0 "$EMU_PID" 2>/dev/null; then
    kill -TERM "$EMU_PID" 2>/dev/null || true; wait "$EMU_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
mkdir -p "$WORK/root/bench"
head -c $((1 << 30)) /dev/urandom > "$WORK/root/bench/1GiB"

start_emu() {
  "$BIN" emulator --root "$WORK/root" --listen 127.0.0.1:0 --log-level warn "$@" \
    > "$WORK/emu.out" 2> "$WORK/emu.err" &
  EMU_PID=$!
  for _ in $(seq 1 100); do
    grep -q '^listening on ' "$WORK/emu.out" 2>/dev/null && break; sleep 0.1
  done
  EP="http://$(sed -n 's/^listening on //p' "$WORK/emu.out")"
}
stop_emu() { kill -TERM "$EMU_PID"; wait "$EMU_PID" || true; EMU_PID=; }
median() { sed -n 's/.*median_mbps=\([0-9]*\).*/\1/p'; }
runs() { sed -n 's/.*runs_mbps=\([0-9,]*\).*/\1/p'; }

start_emu
"$CLIENT" bench "$EP" bench 1GiB 1 >/dev/null   # warm the page cache
R1=$("$CLIENT" bench "$EP" bench 1GiB "$RUNS")
R2=$(EMUCLIENT_MAX_FRAME=16384 "$CLIENT" bench "$EP" bench 1GiB "$RUNS")
stop_emu
start_emu --stream-mbps 200
R3=$("$CLIENT" bench "$EP" bench 1GiB 1)
stop_emu

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
OUT=docs/benchmarks.md
SECTION=$(cat <<EOT
<!-- emulator:begin (written by scripts/bench-emulator.sh) -->
## Emulator: one stream, 1 GiB, loopback

Machine: $(nproc) vCPUs ($CPU), $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r).
Run on $(date -u +%Y-%m-%d). Object in the page cache; the client (examples/emuclient)
checks every chunk's CRC32C and the whole-object CRC32C, then discards the bytes.
Median of $RUNS runs each (MB/s = 10^6 bytes/s).

| setup | median MB/s | runs |
|---|---:|---|
| unshaped, client max HTTP/2 frame 1 MiB | $(echo "$R1" | median) | $(echo "$R1" | runs) |
| unshaped, client max HTTP/2 frame 16 KiB (protocol default) | $(echo "$R2" | median) | $(echo "$R2" | runs) |
| \`--stream-mbps 200\` (cap check, 1 run) | $(echo "$R3" | median) | $(echo "$R3" | runs) |

Target (issue 2): >= 1000 MB/s over one stream. What got it there: chunks are
read with \`pread\` into uninitialized buffers (no memset), glibc's mmap threshold
is raised so 2 MiB chunk buffers are reused instead of faulted in fresh each time,
and the client advertises a 1 MiB HTTP/2 max frame size (the row above shows what
the 16 KiB default costs: every 2 MiB message becomes 128 DATA frames).
<!-- emulator:end -->
EOT
)
if [ -f "$OUT" ] && grep -q '<!-- emulator:begin' "$OUT"; then
  python3 - "$OUT" "$SECTION" <<'PY'
import re, sys
path, section = sys.argv[1], sys.argv[2]
text = open(path).read()
text = re.sub(r"<!-- emulator:begin.*?<!-- emulator:end -->", lambda m: section, text, flags=re.S)
open(path, "w").write(text)
PY
else
  { [ -f "$OUT" ] || printf '# zonalfs benchmarks\n\nProduced by scripts; never asserted by tests.\n\n'; echo "$SECTION"; } >> "$OUT"
fi
echo "$SECTION"
