# Shared pieces of the benchmark scripts (sourced, not run).
# Provides: WORK (temp dir, removed on exit), start_emu ARGS..., stop_emu,
# write_section NAME TEXT (replaces <!-- NAME:begin --> ... <!-- NAME:end -->
# in docs/benchmarks.md, or appends it), machine_line.

WORK=$(mktemp -d "${TMPDIR:-/tmp}/zonalfs-bench.XXXXXX")
EMU_PID=
BIN=${BIN:-target/release/zonalfs}
cleanup() {
  if [ -n "$EMU_PID" ] && kill -0 "$EMU_PID" 2>/dev/null; then
    kill -TERM "$EMU_PID" 2>/dev/null || true; wait "$EMU_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# start_emu ARGS...: starts the emulator over $WORK/root; sets EP and ADDR.
start_emu() {
  : > "$WORK/emu.out"
  "$BIN" emulator --root "$WORK/root" --listen 127.0.0.1:0 --log-level warn "$@" \
    > "$WORK/emu.out" 2> "$WORK/emu.err" &
  EMU_PID=$!
  for _ in $(seq 1 100); do
    grep -q '^listening on ' "$WORK/emu.out" 2>/dev/null && break; sleep 0.1
  done
  ADDR=$(sed -n 's/^listening on //p' "$WORK/emu.out")
  [ -n "$ADDR" ] || { cat "$WORK/emu.err" >&2; return 1; }
  EP="http://$ADDR"
}
stop_emu() { kill -TERM "$EMU_PID"; wait "$EMU_PID" || true; EMU_PID=; }

machine_line() {
  local cpu
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
  echo "Machine: $(nproc) vCPUs ($cpu), $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r). Run on $(date -u +%Y-%m-%d)."
}

# median of numbers given as arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

write_section() {
  local name=$1 text=$2 out=docs/benchmarks.md
  local block
  block=$(printf '<!-- %s:begin (written by a script in scripts/) -->\n%s\n<!-- %s:end -->' "$name" "$text" "$name")
  if [ -f "$out" ] && grep -q "<!-- $name:begin" "$out"; then
    python3 - "$out" "$name" "$block" <<'PY'
import re, sys
path, name, block = sys.argv[1:4]
text = open(path).read()
pat = re.compile(r"<!-- %s:begin.*?<!-- %s:end -->" % (re.escape(name), re.escape(name)), re.S)
open(path, "w").write(pat.sub(lambda m: block, text))
PY
  else
    { [ -f "$out" ] || printf '# zonalfs benchmarks\n\nEvery figure here is produced by a script in scripts/; no test asserts a timing.\n\n'; printf '%s\n\n' "$block"; } >> "$out"
  fi
  printf '%s\n' "$text"
}
