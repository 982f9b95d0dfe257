//! zonalfs: a FUSE mount for Google Cloud Storage zonal (Rapid) buckets.
//!
//! Data flows up through the layers, one module each (`docs/architecture.md`
//! is the map): [`gcs`] talks to the bucket (transport and credentials,
//! metadata calls, BidiReadObject streams that verify every chunk's CRC32C,
//! and the shared stream pool) behind the `ObjectClient` trait; [`read`] is
//! the read engine (per-inode readahead cache, prefetcher, page-aligned blocks
//! under one memory budget); [`fs`] is the filesystem as async methods plus the
//! thin fuser adapter and the mount's life cycle. Beside them: [`emulator`],
//! the loopback gRPC server that stands in for GCS; [`tools`], the `cat`, `ls`,
//! `stat`, `cp`, `append`, `rm` and `mv` commands; [`fileio`], offset reads of
//! local files; [`metrics`], the Prometheus endpoint; [`cli`] and
//! [`config`], the command line and config files of the `zonalfs` binary;
//! [`proto`], the generated wire types.

pub mod cli;
pub mod config;
pub mod emulator;
pub mod fileio;
pub mod fs;
pub mod gcs;
pub mod logsink;
pub mod memory;
pub mod metrics;
pub mod mount;
pub mod names;
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
