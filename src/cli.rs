//! The command line: clap definitions for every `zonalfs` subcommand and their
//! conversion into the settings each layer takes. `main.rs` parses, then hands
//! the converted settings to the layer that runs the command.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};

use crate::emulator::{self, Shaping};
use crate::fs::FsConfig;
use crate::gcs::auth::CredentialsSource;
use crate::gcs::client::{ClientConfig, DEFAULT_CONNECTIONS};
use crate::gcs::retry::RetryPolicy;
use crate::gcs::PoolConfig;
use crate::mount::{MountConfig, Objects};

/// Parses a duration: `30s`, `500ms`, `2m`, `1h`, or plain seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("'{s}' is not a valid duration"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("'{s}': {e}"))
}

/// Parses a size: `16MiB`, `1M`, `4k`, `1GiB`, or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let i = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(i);
    let v: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 8MiB, 4k, 1048576)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use k, M or G)")),
    };
    v.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a thread count: a whole number from 1 to 256.
pub fn parse_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=256) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a thread count (a whole number from 1 to 256)"
        )),
    }
}

/// Threads for the runtime that drives the network, unless the user set
/// them: half the CPUs this process may use, at least 1. The FUSE loop
/// threads do the kernel's copies to and from programs; more runtime
/// workers than the other half of the CPUs mostly wake one another (a task
/// woken on one worker wakes a parked one to steal it): CPU spent on
/// futexes and context switches, not on data (see docs/architecture.md).
pub fn network_threads(set: Option<usize>) -> usize {
    set.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1)
    })
}

/// Checks a bucket name the way GCS does (3–63 characters, or up to 222 with
/// dots, of `a-z 0-9 - _ .`, starting and ending with a letter or digit), so a
/// typo such as `gs://bucket` or `My_Bucket` is refused before any network call.
pub fn parse_bucket(s: &str) -> Result<String, String> {
    if crate::names::valid_bucket_name(s) {
        Ok(s.to_string())
    } else if let Some(b) = s.strip_prefix("gs://") {
        Err(format!(
            "'{s}' is not a bucket name; give the name alone ('{}')",
            b.trim_end_matches('/')
        ))
    } else {
        Err(format!(
            "'{s}' is not a valid bucket name (3-63 characters of a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit)"
        ))
    }
}

/// A clap error (unknown flag, bad value, missing argument) as one line:
/// clap's own first line without its `error: ` prefix, the lines that belong
/// to it (missing argument names, a "did you mean" tip) folded in, the usage
/// block dropped, and a pointer to `--help` for the subcommand in `argv`.
pub fn usage_error_line(e: &clap::Error, argv: &[String]) -> String {
    let text = e.render().to_string();
    let body = text
        .split("\n\nUsage:")
        .next()
        .unwrap_or_default()
        .split("\n\nFor more information")
        .next()
        .unwrap_or_default();
    let mut out = String::new();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let line = line.strip_prefix("error: ").unwrap_or(line);
        if line.starts_with("tip: to pass") {
            continue; // "use '-- --flag'": not what a mistyped flag needs
        }
        if out.is_empty() {
            out.push_str(line);
        } else if line.starts_with("tip:") {
            out.push_str("; ");
            out.push_str(line);
        } else if out.ends_with(':') {
            out.push(' ');
            out.push_str(line);
        } else {
            out.push_str(", ");
            out.push_str(line);
        }
    }
    if out.is_empty() {
        out = e.kind().to_string();
    }
    use clap::CommandFactory;
    let sub = argv
        .get(1)
        .filter(|a| Cli::command().find_subcommand(a.as_str()).is_some());
    match sub {
        Some(sub) => format!("{out} (see 'zonalfs {sub} --help')"),
        None => format!("{out} (see 'zonalfs --help')"),
    }
}

/// Checks a log filter: a level (`error`, `warn`, `info`, `debug`, `trace`,
/// `off`) or tracing directives (`zonalfs=debug,h2=warn`). A bare word that is
/// not a level would be taken as a target name and silently log nothing else,
/// so it is refused.
pub fn parse_log_filter(s: &str) -> Result<String, String> {
    const LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace", "off"];
    let plain_word = !s.contains(['=', ',', ':', '[']);
    if (plain_word && !LEVELS.contains(&s.to_ascii_lowercase().as_str()))
        || tracing_subscriber::EnvFilter::try_new(s).is_err()
    {
        return Err(format!(
            "'{s}' is not a log level (error, warn, info, debug, trace, off) or a tracing directive (e.g. zonalfs=debug)"
        ));
    }
    Ok(s.to_string())
}

/// How to reach the bucket: endpoint, credentials, connections, retries, pool.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// gRPC endpoint (https://, or http:// for a plaintext endpoint such as the
    /// emulator). Default: $STORAGE_EMULATOR_HOST (plaintext, anonymous) if set,
    /// else https://storage.googleapis.com.
    #[arg(long, env = "ZONALFS_ENDPOINT")]
    pub endpoint: Option<String>,
    /// HTTP/2 connections to the endpoint; streams are spread across them.
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS, env = "ZONALFS_CONNECTIONS",
          value_parser = clap::value_parser!(u64).range(1..=64).map(|v| v as usize))]
    pub connections: usize,
    /// Service account (or other ADC-format) JSON key file. Default: Application
    /// Default Credentials.
    #[arg(long, env = "ZONALFS_KEY_FILE", conflicts_with = "anonymous")]
    pub key_file: Option<PathBuf>,
    /// Send no credentials (public buckets, emulators).
    #[arg(long, env = "ZONALFS_ANONYMOUS")]
    pub anonymous: bool,
    /// Give up on a failing read or call after this long without progress.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "ZONALFS_RETRY_DEADLINE")]
    pub retry_deadline: Duration,
    /// Reopen a stream that delivered nothing for this long while ranges wait.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "ZONALFS_READ_STALL_TIMEOUT")]
    pub read_stall_timeout: Duration,
    /// BidiReadObject streams per object. Default: by object size (1 below
    /// 100 MiB, 2 below 500 MiB, else 4).
    #[arg(long, env = "ZONALFS_POOL_SIZE",
          value_parser = clap::value_parser!(u64).range(1..=64).map(|v| v as usize))]
    pub pool_size: Option<usize>,
    /// Most streams open at once, all objects together.
    #[arg(long, default_value_t = 256, env = "ZONALFS_MAX_STREAMS",
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_streams: usize,
    /// Idle streams kept open for reuse.
    #[arg(long, default_value_t = 64, env = "ZONALFS_MAX_IDLE_STREAMS",
          value_parser = clap::value_parser!(u64).map(|v| v as usize))]
    pub max_idle_streams: usize,
    /// Close a stream idle for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "ZONALFS_STREAM_IDLE_TIMEOUT")]
    pub stream_idle_timeout: Duration,
}

impl ClientArgs {
    pub fn client_config(&self, bucket: &str) -> ClientConfig {
        let mut c = ClientConfig::new(bucket);
        c.endpoint = self.endpoint.clone();
        c.connections = self.connections;
        c.credentials = if self.anonymous {
            CredentialsSource::Anonymous
        } else if let Some(k) = &self.key_file {
            CredentialsSource::KeyFile(k.clone())
        } else {
            CredentialsSource::Adc
        };
        c.retry = RetryPolicy {
            deadline: self.retry_deadline,
            stall_timeout: self.read_stall_timeout,
            ..RetryPolicy::default()
        };
        c
    }

    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            pool_size: self.pool_size,
            max_streams: self.max_streams,
            max_idle_streams: self.max_idle_streams,
            idle_timeout: self.stream_idle_timeout,
            ..PoolConfig::default()
        }
    }
}

impl MountArgs {
    /// The mount's settings as plain values (the library's [`MountConfig`]).
    pub fn mount_config(&self) -> MountConfig {
        let mut fs = FsConfig {
            list_ttl: self.list_ttl,
            file_mode: self.file_mode,
            dir_mode: self.dir_mode,
            metadata_ttl: self.metadata_ttl,
            negative_ttl: self.negative_ttl,
            prefetch_files: self.prefetch_files,
            read_only: self.read_only,
            finalize_on_close: self.finalize_on_close,
            temp_limit: self.temp_dir_limit,
            ..FsConfig::default()
        };
        if let Some(d) = &self.temp_dir {
            fs.temp_dir = d.clone();
        }
        if let Some(u) = self.uid {
            fs.uid = u;
        }
        if let Some(g) = self.gid {
            fs.gid = g;
        }
        if let Some(p) = &self.only_dir {
            let p = p.trim_matches('/');
            if !p.is_empty() {
                fs.prefix = format!("{p}/");
            }
        }
        MountConfig {
            bucket: self.bucket.clone(),
            mountpoint: self.mountpoint.clone(),
            force: self.force,
            nonempty: self.nonempty,
            fs,
            memory_limit: self
                .memory_limit
                .unwrap_or_else(crate::memory::default_memory_limit),
            memory_warm_reserve: self.memory_warm_reserve,
            block_size: self.block_size,
            readahead_max: self.readahead_max,
            direct_io: self.direct_io,
            passthrough: self.passthrough,
            allow_other: self.allow_other,
            fuse_threads: self.fuse_threads,
            max_background: self.max_background,
            kernel_readahead_kb: self.kernel_readahead_kb,
            metrics_addr: self.metrics_addr.clone(),
        }
    }

    /// Where the mount's objects come from: the bucket, through the pool.
    pub fn objects(&self) -> Objects {
        Objects::Bucket {
            client: self.client.client_config(&self.bucket),
            pool: self.client.pool_config(),
        }
    }
}

fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("'{s}' is not an octal mode (e.g. 0444)"))
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `zonalfs mount BUCKET MOUNTPOINT`
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The bucket to mount (its name, without gs://).
    #[arg(value_parser = parse_bucket)]
    pub bucket: String,
    /// An existing, empty directory.
    pub mountpoint: PathBuf,
    /// Settings from a TOML file (keys: these flags' long names). Precedence:
    /// flags > environment > file > defaults.
    #[arg(long, env = "ZONALFS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stay in the foreground (default: run as a daemon; the command returns
    /// once the mount is serving, or fails with the daemon's error).
    #[arg(short, long, env = "ZONALFS_FOREGROUND")]
    pub foreground: bool,
    /// Mount only this prefix of the bucket (a directory in it).
    #[arg(long, env = "ZONALFS_ONLY_DIR")]
    pub only_dir: Option<String>,
    /// Owner of every file and directory (default: the mounting user).
    #[arg(long, env = "ZONALFS_UID")]
    pub uid: Option<u32>,
    /// Group of every file and directory (default: the mounting user's group).
    #[arg(long, env = "ZONALFS_GID")]
    pub gid: Option<u32>,
    /// Permission bits of files (octal).
    #[arg(long, default_value = "0644", value_parser = parse_mode, env = "ZONALFS_FILE_MODE")]
    pub file_mode: u16,
    /// Permission bits of directories (octal).
    #[arg(long, default_value = "0755", value_parser = parse_mode, env = "ZONALFS_DIR_MODE")]
    pub dir_mode: u16,
    /// Mount read-only: every change is refused (EROFS). `-o ro` in fstab.
    #[arg(long, env = "ZONALFS_READ_ONLY")]
    pub read_only: bool,
    /// Finalize a file written through the mount when it is closed (by
    /// default it stays appendable, as gcsfuse leaves zonal objects).
    #[arg(long, env = "ZONALFS_FINALIZE_ON_CLOSE")]
    pub finalize_on_close: bool,
    /// Where writes that cannot stream (seeking back, holes, rewriting a
    /// finalized object, resizing) keep a local copy of the file until it is
    /// uploaded as a new generation at fsync or close (default: $TMPDIR or
    /// /tmp). The copies are unnamed files: nothing is left behind.
    #[arg(long, env = "ZONALFS_TEMP_DIR")]
    pub temp_dir: Option<std::path::PathBuf>,
    /// Bytes those local copies may take, all files together; past it such a
    /// write fails with ENOSPC.
    #[arg(long, default_value = "10GiB", value_parser = parse_size, env = "ZONALFS_TEMP_DIR_LIMIT")]
    pub temp_dir_limit: u64,
    /// Let other users access the mount.
    #[arg(long, env = "ZONALFS_ALLOW_OTHER")]
    pub allow_other: bool,
    /// How long file metadata is cached.
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "ZONALFS_METADATA_TTL")]
    pub metadata_ttl: Duration,
    /// How long a failed lookup is remembered.
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "ZONALFS_NEGATIVE_TTL")]
    pub negative_ttl: Duration,
    /// Bypass the kernel page cache (FOPEN_DIRECT_IO), for streaming workloads.
    #[arg(long, env = "ZONALFS_DIRECT_IO")]
    pub direct_io: bool,
    /// Memory for reading, all files together: prefetch and cache blocks plus
    /// the transport's buffers (HTTP/2 windows, 5 MiB per open stream), which
    /// blocks leave room for (default: a quarter of the RAM or cgroup limit,
    /// 64 MiB to 4 GiB).
    #[arg(long, value_parser = parse_size, env = "ZONALFS_MEMORY_LIMIT")]
    pub memory_limit: Option<u64>,
    /// Free memory kept mapped and warm for reuse, within --memory-limit
    /// (default: a quarter of it). Memory unused for 30 s, or all of it when
    /// the system is under memory pressure, goes back to the OS.
    #[arg(long, value_parser = parse_size, env = "ZONALFS_MEMORY_WARM_RESERVE")]
    pub memory_warm_reserve: Option<u64>,
    /// Largest prefetch window: one sequential reader's, shared fairly when
    /// several read at once (so prefetch memory stays bounded and reused warm).
    #[arg(long, default_value = "256MiB", value_parser = parse_size, env = "ZONALFS_READAHEAD_MAX")]
    pub readahead_max: u64,
    /// Prefetch and cache block size.
    #[arg(long, default_value = "8MiB", value_parser = parse_size, env = "ZONALFS_BLOCK_SIZE")]
    pub block_size: u64,
    /// FUSE passthrough: small finalized files are held whole in memory files
    /// and the kernel serves their reads itself, where the kernel offers it
    /// (6.9+, CAP_SYS_ADMIN). Off by default: on a cold read-once pass it
    /// costs more per file than it saves (see docs/benchmarks.md).
    #[arg(long, env = "ZONALFS_PASSTHROUGH")]
    pub passthrough: bool,
    /// Prefetch across files: when a process opens a directory's files in
    /// listing order (as dataset loaders do), fetch this many of the next
    /// small files whole ahead of it, within the memory budget (0: off).
    #[arg(long, default_value_t = 16, env = "ZONALFS_PREFETCH_FILES")]
    pub prefetch_files: usize,
    /// Kernel readahead for the mount, in KiB (written to /sys/class/bdi).
    /// zonalfs prefetches on its own, so the kernel's readahead only needs to
    /// keep requests big: `dd bs=1M` of 1 GiB measured (median of 5, warm
    /// emulator) 924 MB/s at 1024, 779 at 4096, 807 at 16384, 535 at 65536
    /// (scripts/bench-mount.sh).
    #[arg(long, default_value_t = 1024, env = "ZONALFS_KERNEL_READAHEAD_KB")]
    pub kernel_readahead_kb: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9101).
    #[arg(long, env = "ZONALFS_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Asynchronous FUSE requests (readahead) the kernel may keep in flight.
    #[arg(long, default_value_t = 64, env = "ZONALFS_MAX_BACKGROUND")]
    pub max_background: u16,
    /// FUSE loop threads.
    #[arg(long, default_value_t = 4, env = "ZONALFS_FUSE_THREADS")]
    pub fuse_threads: usize,
    /// Threads that drive the network (read and write streams, checksums,
    /// copies into the cache). Default: half the CPUs this process may use,
    /// at least 1 (the FUSE loop threads do the other half of the work: the
    /// kernel's copies to and from programs).
    #[arg(long, value_parser = parse_threads, env = "ZONALFS_NETWORK_THREADS")]
    pub network_threads: Option<usize>,
    /// Mount over a directory that is not empty (hiding what is in it).
    #[arg(long, env = "ZONALFS_NONEMPTY")]
    pub nonempty: bool,
    /// Detach a stale mount (left by a daemon that died) before mounting.
    #[arg(long)]
    pub force: bool,
    /// How long a directory listing is reused by later opens of the directory
    /// (0: list every time).
    #[arg(long, default_value = "0s", value_parser = parse_duration, env = "ZONALFS_LIST_TTL")]
    pub list_ttl: Duration,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text", env = "ZONALFS_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Write logs to this file instead of stderr (a daemon's stderr is closed).
    #[arg(long, env = "ZONALFS_LOG_FILE")]
    pub log_file: Option<PathBuf>,
}

/// Turns `-o opt[,opt=val]...` (fstab style) into `--flag[=val]` arguments.
/// `ro` is `--read-only`, `rw` (the default) nothing. Options the mount(8)
/// machinery passes for itself (`defaults`, `_netdev`, `auto`, `noauto`,
/// `nofail`, `user`, `users`, `nouser`, `exec`, `noexec`, `suid`, `nosuid`,
/// `dev`, `nodev`, `async`, `atime`, `noatime`, `relatime`) are accepted and
/// ignored.
pub fn expand_mount_options(opts: &str) -> Result<Vec<String>, String> {
    const IGNORED: &[&str] = &[
        "rw", "defaults", "_netdev", "auto", "noauto", "nofail", "user", "users", "nouser", "exec",
        "noexec", "suid", "nosuid", "dev", "nodev", "async", "atime", "noatime", "relatime",
    ];
    let mut out = Vec::new();
    for o in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if IGNORED.contains(&o) {
            continue;
        }
        if o == "ro" {
            out.push("--read-only".to_string());
            continue;
        }
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        };
        let flag = format!("--{}", k.replace('_', "-"));
        out.push(flag);
        if let Some(v) = v {
            out.push(v.to_string());
        }
    }
    Ok(out)
}

/// The arguments of `zonalfs mount` for a `mount.zonalfs` helper invocation
/// (`mount.zonalfs BUCKET MOUNTPOINT [-o OPTIONS] [-f] [-n] [-s] [-v]`, as
/// mount(8) calls it).
pub fn helper_args(args: &[String]) -> Result<Vec<String>, String> {
    let mut out = vec!["zonalfs".to_string(), "mount".to_string()];
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-o" => {
                let o = args.get(i + 1).ok_or("-o needs a value")?;
                out.extend(expand_mount_options(o)?);
                i += 1;
            }
            s if s.starts_with("-o") => out.extend(expand_mount_options(&s[2..])?),
            // mount(8)'s own flags: fake, no mtab, sloppy, verbose.
            "-f" | "-n" | "-s" | "-v" => {}
            s => positional.push(s.to_string()),
        }
        i += 1;
    }
    if positional.len() != 2 {
        return Err("usage: mount.zonalfs BUCKET MOUNTPOINT [-o OPTIONS]".to_string());
    }
    out.extend(positional);
    Ok(out)
}

/// `zonalfs install-helper [--dir /sbin]`
#[derive(Debug, Args)]
pub struct InstallHelperArgs {
    /// Where mount(8) looks for helpers.
    #[arg(long, default_value = "/sbin")]
    pub dir: PathBuf,
}

/// `zonalfs unmount MOUNTPOINT`
#[derive(Debug, Args)]
pub struct UnmountArgs {
    pub mountpoint: PathBuf,
}

/// `zonalfs cat gs://BUCKET/OBJECT`
#[derive(Debug, Args)]
pub struct CatArgs {
    /// gs://BUCKET/OBJECT
    pub url: String,
    /// First byte to read.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Bytes to read (default: to the end).
    #[arg(long, value_parser = parse_size)]
    pub length: Option<u64>,
    /// Bytes per window read through the pool.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub window: u64,
    /// Windows in flight (default: twice the object's streams).
    #[arg(long)]
    pub inflight: Option<usize>,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "warn", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
}

/// `zonalfs ls gs://BUCKET[/PREFIX]`
#[derive(Debug, Args)]
pub struct LsArgs {
    /// gs://BUCKET[/PREFIX]
    pub url: String,
    /// Long listing: size and update time.
    #[arg(short, long)]
    pub long: bool,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "warn", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
}

/// `zonalfs stat gs://BUCKET/OBJECT`
#[derive(Debug, Args)]
pub struct StatArgs {
    /// gs://BUCKET/OBJECT
    pub url: String,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "warn", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
}

/// `zonalfs cp SRC DST`
#[derive(Debug, Args)]
pub struct CpArgs {
    /// A local file, `-` (standard input), or gs://BUCKET/OBJECT.
    pub src: String,
    /// gs://BUCKET/OBJECT (or gs://BUCKET/PREFIX/ to keep the file's name),
    /// or a local file or directory.
    pub dst: String,
    /// Leave the uploaded object appendable (unfinalized).
    #[arg(long)]
    pub no_finalize: bool,
    /// Do not replace an existing object.
    #[arg(short = 'n', long)]
    pub no_clobber: bool,
    /// Ask the service to persist every this many bytes.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub flush_every: u64,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "warn", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
}

/// `zonalfs append SRC gs://BUCKET/OBJECT`
#[derive(Debug, Args)]
pub struct AppendArgs {
    /// A local file, or `-` for standard input.
    pub src: String,
    /// gs://BUCKET/OBJECT
    pub dst: String,
    /// Finalize the object at the end (no more appends).
    #[arg(long)]
    pub finalize: bool,
    /// Ask the service to persist every this many bytes.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub flush_every: u64,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "warn", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
}

/// `zonalfs rm gs://BUCKET/OBJECT...`
#[derive(Debug, Args)]
pub struct RmArgs {
    /// gs://BUCKET/OBJECT, one or more.
    #[arg(required = true)]
    pub urls: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "warn", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
}

/// `zonalfs mv gs://BUCKET/SRC gs://BUCKET/DST`
#[derive(Debug, Args)]
pub struct MvArgs {
    /// gs://BUCKET/OBJECT, or gs://BUCKET/FOLDER/
    pub src: String,
    /// gs://BUCKET/OBJECT (same bucket)
    pub dst: String,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, default_value = "warn", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
    pub log_level: String,
}

/// zonalfs: mount a Google Cloud Storage zonal bucket as a filesystem.
#[derive(Debug, Parser)]
#[command(name = "zonalfs", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the mount's variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount a bucket at a directory (read-write; --read-only for a read-only mount).
    Mount(MountArgs),
    /// Unmount a zonalfs mount (detaching it lazily if it is busy).
    Unmount(UnmountArgs),
    /// Install the mount(8) helper (DIR/mount.zonalfs, a link to this binary)
    /// so that `mount -t zonalfs` and fstab lines work.
    InstallHelper(InstallHelperArgs),
    /// Stream an object to stdout through the shared MRD pool.
    Cat(CatArgs),
    /// List objects and prefixes: gs://BUCKET[/PREFIX].
    Ls(LsArgs),
    /// Show an object's metadata.
    Stat(StatArgs),
    /// Copy a local file (or `-`, standard input) to gs://BUCKET/OBJECT as an
    /// appendable object, finalized unless --no-finalize; or an object to a
    /// local file.
    Cp(CpArgs),
    /// Append a local file (or `-`, standard input, persisted as it comes) to
    /// an unfinalized object, creating it if missing.
    Append(AppendArgs),
    /// Delete objects.
    Rm(RmArgs),
    /// Rename an object (atomically) or a folder, within a bucket.
    Mv(MvArgs),
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
    /// Flip a byte in every Nth data chunk of each stream, keeping the original CRC32C.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub corrupt_every: Option<u64>,
    /// Stop sending (without closing the stream) after a stream sent N bytes.
    #[arg(long, value_name = "N")]
    pub stall_after_bytes: Option<u64>,
    /// Largest data chunk to send, in bytes (the real service sends up to 2 MiB).
    #[arg(long, default_value_t = emulator::faults::MAX_CHUNK, value_parser = parse_chunk)]
    pub chunk_size: usize,
    /// Location the buckets report.
    #[arg(long, default_value = "us-central1-a")]
    pub location: String,
    /// Location type the buckets report: "zone" (zonal, Rapid), or e.g. "region"
    /// to stand in for a non-zonal bucket.
    #[arg(long, default_value = "zone")]
    pub location_type: String,
    /// Require `authorization: Bearer TOKEN` on every call: without a token
    /// calls fail UNAUTHENTICATED, with another one PERMISSION_DENIED.
    #[arg(long, value_name = "TOKEN", env = "ZONALFS_EMULATOR_REQUIRE_TOKEN")]
    pub require_token: Option<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info", env = "ZONALFS_LOG", value_parser = parse_log_filter)]
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
            location_type: self.location_type.clone(),
            require_token: self.require_token.clone(),
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
    fn network_threads_are_a_positive_count_and_default_to_half_the_cpus() {
        assert_eq!(parse_threads("3"), Ok(3));
        for bad in ["0", "-1", "two", "257", ""] {
            assert!(parse_threads(bad).is_err(), "{bad:?} was taken");
        }
        assert_eq!(network_threads(Some(5)), 5);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(network_threads(None), (cpus / 2).max(1));
        let cli =
            Cli::try_parse_from(["zonalfs", "mount", "b-1", "/mnt", "--network-threads", "2"])
                .unwrap();
        let Command::Mount(a) = cli.command else {
            panic!("not the mount command");
        };
        assert_eq!(a.network_threads, Some(2));
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
        let Command::Emulator(a) = cli.command else {
            panic!("not the emulator command");
        };
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

    #[test]
    fn fstab_options() {
        let a = helper_args(&[
            "my-bucket".into(),
            "/mnt/x".into(),
            "-o".into(),
            "ro,allow_other,uid=1000,_netdev,file_mode=0440".into(),
        ])
        .unwrap();
        assert_eq!(
            a,
            [
                "zonalfs",
                "mount",
                "--read-only",
                "--allow-other",
                "--uid",
                "1000",
                "--file-mode",
                "0440",
                "my-bucket",
                "/mnt/x"
            ]
        );
        let cli = Cli::try_parse_from(&a).unwrap();
        let Command::Mount(m) = cli.command else {
            panic!("not mount");
        };
        assert!(m.allow_other && m.uid == Some(1000) && m.file_mode == 0o440 && m.read_only);
        let rw = helper_args(&["b".into(), "/m".into(), "-o".into(), "rw".into()]).unwrap();
        assert!(!rw.contains(&"--read-only".to_string()), "{rw:?}");
        let ro = helper_args(&["b".into(), "/m".into(), "-o".into(), "ro,nodev".into()]).unwrap();
        assert!(ro.contains(&"--read-only".to_string()), "{ro:?}");
        assert!(helper_args(&["b".into()]).is_err());
        let bad = helper_args(&["b".into(), "/m".into(), "-o".into(), "bogus".into()]).unwrap();
        assert!(
            Cli::try_parse_from(&bad).is_err(),
            "unknown options are rejected"
        );
    }

    #[test]
    fn buckets_log_filters_and_usage_lines() {
        assert_eq!(parse_bucket("my-bucket.x_1"), Ok("my-bucket.x_1".into()));
        for bad in [
            "", "ab", "gs://b1b", "Upper", "-lead", "trail-", "a/b", "x y",
        ] {
            assert!(parse_bucket(bad).is_err(), "{bad:?}");
        }
        assert!(parse_bucket("gs://b1b/").unwrap_err().contains("'b1b'"));
        for ok in [
            "info",
            "TRACE",
            "off",
            "zonalfs=debug",
            "zonalfs=debug,h2=warn",
        ] {
            assert_eq!(parse_log_filter(ok).as_deref(), Ok(ok));
        }
        for bad in ["verbose", "a=b=c", ""] {
            assert!(parse_log_filter(bad).is_err(), "{bad:?}");
        }
        let argv: Vec<String> = ["zonalfs", "mount", "--forc"].map(String::from).to_vec();
        let e = Cli::try_parse_from(&argv).unwrap_err();
        let line = usage_error_line(&e, &argv);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("'--forc'") && line.contains("'--force'"),
            "{line}"
        );
        assert!(line.ends_with("(see 'zonalfs mount --help')"), "{line}");
        let argv: Vec<String> = ["zonalfs", "mount"].map(String::from).to_vec();
        let e = Cli::try_parse_from(&argv).unwrap_err();
        assert!(usage_error_line(&e, &argv).contains("<BUCKET>, <MOUNTPOINT>"));
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn client_flags() {
        let cli = Cli::try_parse_from([
            "zonalfs",
            "cat",
            "gs://b1b/o",
            "--endpoint",
            "http://127.0.0.1:1",
            "--anonymous",
            "--retry-deadline",
            "5s",
            "--pool-size",
            "3",
        ])
        .unwrap();
        let Command::Cat(a) = cli.command else {
            panic!("not cat");
        };
        let c = a.client.client_config("b1b");
        assert!(matches!(c.credentials, CredentialsSource::Anonymous));
        assert_eq!(c.retry.deadline, Duration::from_secs(5));
        assert_eq!(a.client.pool_config().pool_size, Some(3));
        assert!(Cli::try_parse_from([
            "zonalfs",
            "cat",
            "gs://b/o",
            "--anonymous",
            "--key-file",
            "k"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["zonalfs", "cat", "gs://b/o", "--connections", "0"]).is_err());
    }
}
