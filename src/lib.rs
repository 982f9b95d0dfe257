//! zonalfs: a FUSE mount for Google Cloud Storage zonal (Rapid) buckets.
//!
//! Layers (see `../shared/DESIGN.md`): `proto` holds the generated wire types,
//! `emulator` the loopback gRPC server that stands in for GCS, `cli` the command
//! line of the `zonalfs` binary.

pub mod cli;
pub mod config;
pub mod emulator;
pub mod fs;
pub mod gcs;
pub mod metrics;
pub mod proto;
pub mod read;
pub mod sync;
pub mod tools;

/// Cases per property test: `$PROPTEST_CASES` when set (scripts/fuzz.sh runs
/// thousands), else `default`, sized to keep `cargo test` brief.
#[cfg(test)]
pub(crate) fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
