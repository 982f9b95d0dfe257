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
