#!/usr/bin/env bash
# The main job on the embedded default: build zonalfs, generate sample data,
# start the emulator on it, list and read it back through the gRPC protocol
# (checking every byte), print throughput, and clean up - even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building (release)"
cargo build --release --quiet --bin zonalfs --example emuclient
BIN=target/release/zonalfs
CLIENT=target/release/examples/emuclient

WORK=$(mktemp -d "${TMPDIR:-/tmp}/zonalfs-quickstart.XXXXXX")
EMU_PID=
cleanup() {
  if [ -n "$EMU_PID" ] && kill -0 "$EMU_PID" 2>/dev/null; then
    kill -TERM "$EMU_PID" 2>/dev/null || true
    wait "$EMU_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "== generating sample data in $WORK/root"
B="$WORK/root/sample-bucket"
mkdir -p "$B/datasets/images" "$B/logs"
head -c $((256 << 20)) /dev/urandom > "$B/datasets/train.bin"
for i in $(seq -w 1 20); do head -c $((RANDOM * 4)) /dev/urandom > "$B/datasets/images/img$i.jpg"; done
echo "hello from zonalfs" > "$B/README.txt"
printf 'line 1\n' > "$B/logs/app.log"
mkdir -p "$WORK/root/.appendable/sample-bucket/logs" && : > "$WORK/root/.appendable/sample-bucket/logs/app.log"

echo "== starting the emulator"
"$BIN" emulator --root "$WORK/root" --listen 127.0.0.1:0 --log-level warn \
  > "$WORK/emu.out" 2> "$WORK/emu.err" &
EMU_PID=$!
for _ in $(seq 1 100); do
  grep -q '^listening on ' "$WORK/emu.out" 2>/dev/null && break
  kill -0 "$EMU_PID" 2>/dev/null || { cat "$WORK/emu.err" >&2; exit 1; }
  sleep 0.1
done
ADDR=$(sed -n 's/^listening on //p' "$WORK/emu.out")
[ -n "$ADDR" ] || { echo "emulator did not start" >&2; exit 1; }
EP="http://$ADDR"
echo "   serving on $EP"

echo "== ls gs://sample-bucket/"
"$CLIENT" ls "$EP" sample-bucket
echo "== ls gs://sample-bucket/datasets/"
"$CLIENT" ls "$EP" sample-bucket datasets/ | head -5
echo "== cat gs://sample-bucket/README.txt"
"$CLIENT" cat "$EP" sample-bucket README.txt 2>/dev/null
echo "== read gs://sample-bucket/datasets/train.bin (256 MiB) and compare sha256"
WANT=$(sha256sum < "$B/datasets/train.bin" | cut -d' ' -f1)
GOT=$("$CLIENT" cat "$EP" sample-bucket datasets/train.bin 2> "$WORK/cat.err" | sha256sum | cut -d' ' -f1)
cat "$WORK/cat.err"
[ "$WANT" = "$GOT" ] || { echo "MISMATCH: $GOT != $WANT" >&2; exit 1; }
echo "   sha256 ok: $GOT"
echo "== single-stream throughput, data discarded (3 runs)"
"$CLIENT" bench "$EP" sample-bucket datasets/train.bin 3

kill -TERM "$EMU_PID"
wait "$EMU_PID" || true
EMU_PID=
echo "== emulator counters: $(tail -n 1 "$WORK/emu.err")"
echo "== done"
