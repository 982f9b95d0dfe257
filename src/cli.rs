//! The command line: clap definitions for every `zonalfs` subcommand and their
//! conversion into the settings each layer takes. `main.rs` parses, then hands
//! the converted settings to the layer that runs the command.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::emulator::{self, Shaping};

/// zonalfs: mount a Google Cloud Storage zonal bucket as a read-only filesystem.
#[derive(Debug, Parser)]
#[command(name = "zonalfs", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a directory tree as GCS zonal buckets over gRPC (google.storage.v2),
    /// a stand-in for GCS in tests, benchmarks and the quickstart.
    Emulator(EmulatorArgs),
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

fn parse_chunk(s: &str) -> Result<usize, String> {
    let v: usize = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (1..=emulator::faults::MAX_CHUNK).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is not between 1 and {}",
            emulator::faults::MAX_CHUNK
        ))
    }
}

fn parse_positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} must be a positive number"))
    }
}

/// `zonalfs emulator`: every subdirectory of --root is a bucket, every regular file
/// below it an object. An object is appendable (unfinalized) while the marker file
/// ROOT/.appendable/BUCKET/OBJECT exists.
#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Directory whose subdirectories are the buckets.
    #[arg(long, env = "ZONALFS_EMULATOR_ROOT")]
    pub root: PathBuf,
    /// Address to listen on (port 0: any free port). The bound address is printed
    /// on stdout as "listening on ADDR".
    #[arg(
        long,
        default_value = "127.0.0.1:9000",
        env = "ZONALFS_EMULATOR_LISTEN"
    )]
    pub listen: String,
    /// Seed for the random fault decisions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Delay before the first byte of every range, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Bandwidth cap per stream, in megabytes (10^6 bytes) per second.
    #[arg(long, value_parser = parse_positive)]
    pub stream_mbps: Option<f64>,
    /// Fraction (0..1) of stream opens that fail with UNAVAILABLE.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_open_rate: f64,
    /// Abort every stream with UNAVAILABLE after it sent N bytes.
    #[arg(long, value_name = "N")]
    pub break_after_bytes: Option<u64>,
    /// End every Nth fresh stream ABORTED with a BidiReadObjectRedirectedError
    /// (routing token + read handle); the reopen must present both.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub redirect_every: Option<u64>,
    /// Flip a byte in every Nth data chunk, keeping the original CRC32C.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub corrupt_every: Option<u64>,
    /// Stop sending (without closing the stream) after a stream sent N bytes.
    #[arg(long, value_name = "N")]
    pub stall_after_bytes: Option<u64>,
    /// Largest data chunk to send, in bytes (the real service sends up to 2 MiB).
    #[arg(long, default_value_t = emulator::faults::MAX_CHUNK, value_parser = parse_chunk)]
    pub chunk_size: usize,
    /// Location the buckets report (their storage layout's location_type is "zone").
    #[arg(long, default_value = "us-central1-a")]
    pub location: String,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info", env = "ZONALFS_LOG")]
    pub log_level: String,
}

impl EmulatorArgs {
    /// The emulator settings these flags describe.
    pub fn config(&self) -> emulator::Config {
        emulator::Config {
            shaping: Shaping {
                latency: Duration::from_millis(self.latency_ms),
                stream_bytes_per_sec: self.stream_mbps.map(|m| m * 1e6),
                fail_open_rate: self.fail_open_rate,
                break_after_bytes: self.break_after_bytes,
                redirect_every: self.redirect_every,
                corrupt_every: self.corrupt_every,
                stall_after_bytes: self.stall_after_bytes,
                seed: self.seed,
                chunk_size: self.chunk_size,
            },
            location: self.location.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn emulator_flags() {
        let cli = Cli::try_parse_from([
            "zonalfs",
            "emulator",
            "--root",
            "/tmp",
            "--stream-mbps",
            "200",
            "--latency-ms",
            "2",
            "--redirect-every",
            "3",
        ])
        .unwrap();
        let Command::Emulator(a) = cli.command;
        let c = a.config();
        assert_eq!(c.shaping.stream_bytes_per_sec, Some(200e6));
        assert_eq!(c.shaping.latency, Duration::from_millis(2));
        assert_eq!(c.shaping.redirect_every, Some(3));
        for bad in [
            vec!["--fail-open-rate", "1.5"],
            vec!["--redirect-every", "0"],
            vec!["--chunk-size", "3000000"],
            vec!["--stream-mbps", "-1"],
        ] {
            let mut args = vec!["zonalfs", "emulator", "--root", "/tmp"];
            args.extend(bad.iter());
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?}");
        }
    }
}
