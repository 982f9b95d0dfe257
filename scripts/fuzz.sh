#!/usr/bin/env bash
# The property tests of untrusted input, run long: object names and listings
# turned into directory entries (src/fs), BidiReadObject responses from an
# adversarial server, mutated on the wire (src/gcs/mrd.rs), and the emulator's
# paged listings (src/emulator/store.rs). `cargo test` runs the same tests with
# a few hundred cases each; this runs PROPTEST_CASES (default 20000) each, in
# release mode, bounded by FUZZ_TIMEOUT seconds (default 1800, counted after the
# build). A failure prints the minimal input and saves its seed under
# proptest-regressions/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-20000}"
cargo test --release --lib --no-run
echo "== $PROPTEST_CASES cases per property, at most ${FUZZ_TIMEOUT:-1800} s"
exec timeout "${FUZZ_TIMEOUT:-1800}" cargo test --release --lib -- \
  proptest_ adversarial_responses_never_yield_wrong_bytes \
  honest_interleaved_responses_complete_exactly paged_listing_matches_reference
