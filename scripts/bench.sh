#!/usr/bin/env bash
# The whole benchmark suite (issue 6) in one command, on this machine:
# zonalfs's mount against its ceilings (FUSE over an in-memory client, tmpfs,
# the raw client) and its peer (the official Python client), on the same
# emulator and the same objects, unshaped and shaped like a remote zonal
# bucket. Writes the suite's section of docs/benchmarks.md and the plots
# docs/img/bench-*.png (scripts/bench/suite.py does the measuring).
#
# It installs what it needs: fio (Debian package) and a venv under target/ with
# the pinned Python client (tests/python/requirements.txt) and matplotlib.
# Run as root (it mounts). Finishes in about 17 minutes on 2 cores, bounded at
# 25 (the small-file runs added about 6 of them, random order, the FUSE ceiling
# and the run without prefetch across files about 1.5 more; the writes
# section's small files written and its 16 writers about 2.5 more); leaves no
# mount or process behind.
#
#   usage: scripts/bench.sh [--quick] [--runs N] [--only SECTION[,SECTION...]]
#     --quick   smaller objects and shorter random-read runs (a smoke run;
#               its figures are marked as not for comparison)
#     --runs N  runs per figure, median reported (default 5)
#     --only S  run only these sections (ceilings, sequential, random, skip,
#               firstbyte, ls, rss, smallfiles, writes); the report is printed and
#               docs/ is left alone
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: scripts/bench.sh [--quick] [--runs N] [--only SECTION[,SECTION...]]"
EXTRA=()
RUNS=5
while [ $# -gt 0 ]; do
  case $1 in
    --quick) EXTRA+=(--quick) ;;
    --runs) RUNS=${2:?$USAGE}; shift ;;
    --only) EXTRA+=(--only "${2:?$USAGE}"); shift ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "bench.sh: run as root (it mounts)" >&2; exit 2; }
[ -c /dev/fuse ] || { echo "bench.sh: /dev/fuse is missing" >&2; exit 2; }

need_apt=()
command -v fio > /dev/null || need_apt+=(fio)
python3 -c 'import ensurepip, venv' 2> /dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bench.sh: installing ${need_apt[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" > /dev/null
fi

VENV=target/bench-venv
STAMP=$VENV/.installed
WANT="$(cat tests/python/requirements.txt) matplotlib==3.10.8"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "bench.sh: creating $VENV" >&2
  python3 -m venv --clear "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    -r tests/python/requirements.txt matplotlib==3.10.8
  printf '%s' "$WANT" > "$STAMP"
fi

cargo build --release --quiet --bin zonalfs --example mem_mount --example engine_bench
. scripts/lib/bench-common.sh   # WORK (removed on exit), machine_line
detach_all() {
  # Anything still mounted under WORK (a step that died) is detached, and any
  # process still running on WORK (its path is unique to this run) stopped.
  awk -v w="$WORK" '$2 ~ "^"w {print $2}' /proc/mounts | while read -r m; do umount -l "$m" || true; done
  pkill -TERM -f -- "$WORK" 2> /dev/null || true
}
trap 'detach_all; cleanup' EXIT INT TERM

timeout --kill-after=30 1500 "$VENV/bin/python" scripts/bench/suite.py \
  --bin target/release/zonalfs \
  --mem-mount target/release/examples/mem_mount \
  --engine-bench target/release/examples/engine_bench \
  --python "$VENV/bin/python" \
  --work "$WORK" --runs "$RUNS" --machine "$(machine_line)" "${EXTRA[@]}"
left=$(awk -v w="$WORK" '$2 ~ "^"w' /proc/mounts; pgrep -af -- "$WORK" || true)
[ -z "$left" ] || { echo "bench.sh: left behind: $left" >&2; exit 1; }
echo "bench.sh: done; nothing left mounted or running" >&2
