#!/usr/bin/env bash
# The main job on the embedded default: build zonalfs, generate sample data,
# start the emulator on it, list, stat and read it back with `zonalfs ls/stat/cat`,
# then mount it and read it with ordinary tools (checking every byte against the
# source), write through it (a new file and an append) and upload with
# `zonalfs cp`, print throughput, unmount and clean up - even on failure. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building (release)"
cargo build --release --quiet --bin zonalfs
BIN=target/release/zonalfs

WORK=$(mktemp -d "${TMPDIR:-/tmp}/zonalfs-quickstart.XXXXXX")
EMU_PID=
MOUNT_PID=
MNT="$WORK/mnt"
cleanup() {
  if [ -n "$MOUNT_PID" ] && kill -0 "$MOUNT_PID" 2>/dev/null; then
    kill -TERM "$MOUNT_PID" 2>/dev/null || true
    wait "$MOUNT_PID" 2>/dev/null || true
  fi
  if grep -qs " $MNT " /proc/mounts; then umount -l "$MNT" 2>/dev/null || true; fi
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
# An appendable (unfinalized) object: see docs/emulator.md.
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
echo "   serving on $ADDR"
export STORAGE_EMULATOR_HOST="$ADDR"   # plaintext + anonymous, as Google's tools do

echo "== zonalfs ls gs://sample-bucket"
"$BIN" ls gs://sample-bucket
echo "== zonalfs ls -l gs://sample-bucket/datasets/"
"$BIN" ls -l gs://sample-bucket/datasets/ | head -5
echo "== zonalfs stat gs://sample-bucket/logs/app.log (appendable)"
"$BIN" stat gs://sample-bucket/logs/app.log
echo "== zonalfs cat gs://sample-bucket/README.txt"
"$BIN" cat gs://sample-bucket/README.txt
echo "== zonalfs cat gs://sample-bucket/datasets/train.bin (256 MiB) | sha256sum, vs the source"
WANT=$(sha256sum < "$B/datasets/train.bin" | cut -d' ' -f1)
GOT=$("$BIN" cat gs://sample-bucket/datasets/train.bin | sha256sum | cut -d' ' -f1)
[ "$WANT" = "$GOT" ] || { echo "MISMATCH: $GOT != $WANT" >&2; exit 1; }
echo "   sha256 ok: $GOT"
echo "== throughput: zonalfs cat of 256 MiB to /dev/null (3 runs)"
for _ in 1 2 3; do
  T0=$(date +%s.%N)
  "$BIN" cat gs://sample-bucket/datasets/train.bin > /dev/null
  T1=$(date +%s.%N)
  awk -v a="$T0" -v b="$T1" 'BEGIN { printf "   %.0f MB/s\n", 268435456 / (b - a) / 1e6 }'
done

echo "== zonalfs mount sample-bucket $MNT"
mkdir -p "$MNT"
"$BIN" mount -f sample-bucket "$MNT" --log-level warn 2> "$WORK/mount.err" &
MOUNT_PID=$!
for _ in $(seq 1 300); do
  grep -qs " $MNT " /proc/mounts && break
  kill -0 "$MOUNT_PID" 2>/dev/null || { cat "$WORK/mount.err" >&2; exit 1; }
  sleep 0.1
done
grep -qs " $MNT " /proc/mounts || { echo "the mount did not come up" >&2; exit 1; }
echo "== ls -lR through the mount"
ls -lR "$MNT" | head -20
echo "== cat README.txt through the mount"
cat "$MNT/README.txt"
echo "== dd bs=1M of datasets/train.bin through the mount: cold (over gRPC), then again (page cache)"
dd if="$MNT/datasets/train.bin" of=/dev/null bs=1M 2>&1 | tail -n 1
dd if="$MNT/datasets/train.bin" of=/dev/null bs=1M 2>&1 | tail -n 1
echo "== sha256sum of every file through the mount vs the source tree"
(cd "$MNT" && find . -type f | sort | xargs sha256sum) > "$WORK/mnt.sha"
(cd "$B" && find . -type f | sort | xargs sha256sum) > "$WORK/src.sha"
diff "$WORK/mnt.sha" "$WORK/src.sha" && echo "   all $(wc -l < "$WORK/src.sha") files identical"
echo "== writing through the mount: a new file, then an append (an appendable object, taken over)"
echo "written through zonalfs" > "$MNT/notes.txt"
echo "and appended" >> "$MNT/notes.txt"
[ "$("$BIN" cat gs://sample-bucket/notes.txt)" = "$(printf 'written through zonalfs\nand appended')" ] \
  || { echo "the written object is not what was written" >&2; exit 1; }
"$BIN" stat gs://sample-bucket/notes.txt | grep -E 'size|finalized'
echo "== zonalfs cp of train.bin to a new object and back, compared"
"$BIN" cp "$B/datasets/train.bin" gs://sample-bucket/copies/
GOT=$("$BIN" cat gs://sample-bucket/copies/train.bin | sha256sum | cut -d' ' -f1)
[ "$WANT" = "$GOT" ] || { echo "MISMATCH after cp: $GOT != $WANT" >&2; exit 1; }
echo "   sha256 ok"
kill -TERM "$MOUNT_PID"
wait "$MOUNT_PID" || true
MOUNT_PID=
grep -qs " $MNT " /proc/mounts && { echo "still mounted!" >&2; exit 1; }
echo "   unmounted"

kill -TERM "$EMU_PID"
wait "$EMU_PID" || true
EMU_PID=
echo "== emulator counters: $(tail -n 1 "$WORK/emu.err")"
echo "== done"
