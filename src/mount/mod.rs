//! The mount's life cycle as a library: check the mountpoint, connect to the
//! bucket, wire the layers, mount, make sure the mount serves, serve until
//! told to stop (or unmounted from outside), unmount.
//!
//! [`MountConfig`] holds every setting as plain values (the command line,
//! `examples/mem_mount.rs`, the tests and a Kubernetes node service build
//! one); [`Objects`] says where the objects come from: a bucket (through the
//! shared MRD pool) or any [`ObjectClient`] (an in-memory one for the FUSE
//! ceiling). [`Mount::start`] does everything up to a mount verified live in
//! mountinfo and answering; [`Mount::serve_fd`] does the same on a
//! `/dev/fuse` descriptor someone else already mounted (as a CSI node plugin
//! hands one over); [`Mount::run_until`] serves and unmounts at the end.
//!
//! The wiring, from the bottom up: the client (or pool) → the memory layer
//! (budget `memory_limit`, warm reserve, its maintainer thread) → the read
//! engine → the filesystem (`Fs`) → the FUSE adapter → the kernel. Process-wide
//! effects stay with the binary: logging, allocator tuning, the environment,
//! daemonizing and telling systemd (`NOTIFY_SOCKET`) that the mount is ready.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fs::fuse::{self, FuseFs};
use crate::fs::mountinfo::MountEntry;
use crate::fs::{Fs, FsConfig};
use crate::gcs::client::ClientConfig;
use crate::gcs::{GcsClient, GcsError, MrdPool, ObjectClient, PoolConfig};
use crate::memory::{Budget, Pool};
use crate::read::{PrefetchConfig, ReadEngine};

/// Why a mount could not be made or served. The message is what the user
/// reads (one line).
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint cannot take the mount (missing, not a directory, a
    /// stale or live mount there, not empty).
    #[error("{0}")]
    Mountpoint(String),
    /// The bucket cannot be mounted: missing, or these credentials may not
    /// read it.
    #[error("{message}")]
    Bucket {
        message: String,
        #[source]
        source: GcsError,
    },
    /// The service or the connection to it.
    #[error(transparent)]
    Service(#[from] GcsError),
    /// A setting that cannot work (e.g. metrics without a bucket).
    #[error("{0}")]
    Config(String),
    /// Mounting, serving or unmounting failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl MountError {
    fn io(what: impl Into<String>, source: std::io::Error) -> MountError {
        MountError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Every setting of a mount, as plain values.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The bucket's name (the mount's source in mountinfo, and messages).
    pub bucket: String,
    pub mountpoint: PathBuf,
    /// Detach a stale mount (left by a daemon that died) first.
    pub force: bool,
    /// Mount over a directory that is not empty.
    pub nonempty: bool,
    /// Namespace and attributes.
    pub fs: FsConfig,
    /// The memory budget for reading (blocks, memory files and the
    /// transport's windows).
    pub memory_limit: u64,
    /// Free memory kept mapped and warm (None: a quarter of the limit).
    pub memory_warm_reserve: Option<u64>,
    pub block_size: u64,
    pub readahead_max: u64,
    /// FOPEN_DIRECT_IO on every open (no page cache).
    pub direct_io: bool,
    /// FUSE passthrough for small finalized files, where the kernel offers it.
    pub passthrough: bool,
    pub allow_other: bool,
    /// FUSE loop threads.
    pub fuse_threads: usize,
    /// Asynchronous FUSE requests the kernel may keep in flight.
    pub max_background: u16,
    /// The mount's kernel readahead, in KiB.
    pub kernel_readahead_kb: u32,
    /// Serve Prometheus metrics here (bucket mounts only).
    pub metrics_addr: Option<String>,
}

impl MountConfig {
    /// The daemon's defaults for `bucket` at `mountpoint`.
    pub fn new(bucket: &str, mountpoint: &Path) -> MountConfig {
        MountConfig {
            bucket: bucket.to_string(),
            mountpoint: mountpoint.to_path_buf(),
            force: false,
            nonempty: false,
            fs: FsConfig {
                prefetch_files: 16,
                ..FsConfig::default()
            },
            memory_limit: crate::memory::default_memory_limit(),
            memory_warm_reserve: None,
            block_size: 8 << 20,
            readahead_max: 256 << 20,
            direct_io: false,
            passthrough: false,
            allow_other: false,
            fuse_threads: 4,
            max_background: 64,
            kernel_readahead_kb: 1024,
            metrics_addr: None,
        }
    }
}

/// Where a mount's objects come from. (Built once per mount: the size of the
/// bucket's settings costs nothing.)
#[allow(clippy::large_enum_variant)]
pub enum Objects {
    /// A bucket of the service (or the emulator), read through the shared
    /// MRD pool; its existence and the credentials are checked first.
    Bucket {
        client: ClientConfig,
        pool: PoolConfig,
    },
    /// Any object client (e.g. in memory).
    Client(Arc<dyn ObjectClient>),
}

/// How [`Mount::run_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The stop future resolved; the mount was unmounted.
    Stopped,
    /// Someone unmounted it (`umount`, `zonalfs unmount`).
    UnmountedOutside,
}

/// A mount that serves.
pub struct Mount {
    mounted: fuse::Mounted,
    entry: MountEntry,
    _metrics: Option<AbortOnDrop>,
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The layers wired up, not mounted yet.
struct Wired {
    fuse_fs: FuseFs,
    metrics: Option<AbortOnDrop>,
}

impl Mount {
    /// Checks the mountpoint, connects, wires the layers and mounts; returns
    /// once the mount is listed in mountinfo at the mountpoint and answers.
    /// On an error nothing is left mounted.
    pub async fn start(cfg: &MountConfig, objects: Objects) -> Result<Mount, MountError> {
        let mp = check_mountpoint(cfg)?;
        check_temp_dir(cfg)?;
        let wired = wire(cfg, objects).await?;
        let mounted = fuse::mount(
            wired.fuse_fs,
            &mp,
            &fuse::config(
                &cfg.bucket,
                cfg.allow_other,
                cfg.fuse_threads,
                cfg.fs.read_only,
            ),
        )
        .map_err(|e| MountError::io(format!("cannot mount at {}", mp.display()), e))?;
        Self::verified(cfg, mounted, &mp, wired.metrics).await
    }

    /// Serves on `fd`, a `/dev/fuse` descriptor already mounted at the
    /// config's mountpoint by someone else (a Kubernetes CSI node plugin
    /// mounts, then hands the descriptor over). Unmounting detaches that
    /// mount.
    pub async fn serve_fd(
        cfg: &MountConfig,
        objects: Objects,
        fd: OwnedFd,
    ) -> Result<Mount, MountError> {
        let mp = cfg.mountpoint.canonicalize().map_err(|e| {
            MountError::Mountpoint(format!("mountpoint {}: {e}", cfg.mountpoint.display()))
        })?;
        let wired = wire(cfg, objects).await?;
        let config = fuse::config(
            &cfg.bucket,
            cfg.allow_other,
            cfg.fuse_threads,
            cfg.fs.read_only,
        );
        let mp2 = mp.clone();
        let mounted =
            tokio::task::spawn_blocking(move || fuse::serve_fd(wired.fuse_fs, fd, &mp2, config))
                .await
                .map_err(|e| MountError::io("serve the FUSE descriptor", std::io::Error::other(e)))?
                .map_err(|e| MountError::io("serve the FUSE descriptor", e))?;
        Self::verified(cfg, mounted, &mp, wired.metrics).await
    }

    /// Waits until the mount is ours in mountinfo and answers; then raises
    /// its kernel readahead. On an error, dropping `mounted` unmounts it.
    async fn verified(
        cfg: &MountConfig,
        mounted: fuse::Mounted,
        mp: &Path,
        metrics: Option<AbortOnDrop>,
    ) -> Result<Mount, MountError> {
        let mp2 = mp.to_path_buf();
        let entry = tokio::task::spawn_blocking(move || fuse::verify_serving(&mp2))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|e| {
                MountError::Mountpoint(format!("mountpoint {}: mounted, but {e}", mp.display()))
            })?;
        if let Err(e) = fuse::set_read_ahead_kb(&entry, cfg.kernel_readahead_kb) {
            tracing::warn!(error = %e, "could not raise the kernel readahead");
        }
        tracing::info!(bucket = %cfg.bucket, mountpoint = %mp.display(), "mounted");
        Ok(Mount {
            mounted,
            entry,
            _metrics: metrics,
        })
    }

    /// The mount as mountinfo lists it.
    pub fn entry(&self) -> &MountEntry {
        &self.entry
    }

    /// Where it is mounted (absolute).
    pub fn mountpoint(&self) -> &Path {
        &self.mounted.mountpoint
    }

    /// Serves until `stop` resolves or the mount is unmounted from outside;
    /// then unmounts (a busy mount is detached lazily).
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Ended, MountError> {
        let ended = tokio::select! {
            _ = stop => Ended::Stopped,
            _ = fuse::unmounted(&self.entry) => Ended::UnmountedOutside,
        };
        self.unmount().await?;
        Ok(ended)
    }

    /// Unmounts now and waits for the FUSE session to end.
    pub async fn unmount(self) -> Result<(), MountError> {
        let Mount { mounted, .. } = self;
        tokio::task::spawn_blocking(move || mounted.unmount())
            .await
            .map_err(|e| MountError::io("unmount", std::io::Error::other(e)))?
            .map_err(|e| MountError::io("unmount", e))
    }
}

/// The mountpoint's checks; returns it absolute (as mountinfo lists it).
/// A read-write mount needs a `--temp-dir` it can stage copies in: a
/// directory where it may create files (checked with a file made and removed
/// at once).
fn check_temp_dir(cfg: &MountConfig) -> Result<(), MountError> {
    if cfg.fs.read_only {
        return Ok(());
    }
    let dir = &cfg.fs.temp_dir;
    let bad = |e: String| MountError::Config(format!("--temp-dir {}: {e}", dir.display()));
    let meta = std::fs::metadata(dir).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".to_string()));
    }
    // The file staged writes would make, made and dropped: no name, so
    // two mounts checking at once (or a probe a crashed daemon left) never
    // collide.
    crate::fileio::scratch_file(dir).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

fn check_mountpoint(cfg: &MountConfig) -> Result<PathBuf, MountError> {
    let mp = &cfg.mountpoint;
    let bad = MountError::Mountpoint;
    match std::fs::metadata(mp) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(bad(format!("mountpoint {}: not a directory", mp.display()))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) && cfg.force => {
            tracing::warn!(mountpoint = %mp.display(), "detaching a stale mount (--force)");
            fuse::lazy_unmount(mp);
            if !std::fs::metadata(mp).is_ok_and(|m| m.is_dir()) {
                return Err(bad(format!(
                    "mountpoint {}: the stale mount could not be detached",
                    mp.display()
                )));
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(bad(format!(
                "mountpoint {}: a stale mount is still there (the daemon died); run 'zonalfs unmount {}' (or 'umount -l'), or mount again with --force",
                mp.display(),
                mp.display()
            )))
        }
        Err(e) => return Err(bad(format!("mountpoint {}: {e}", mp.display()))),
    }
    let mp = mp.canonicalize().unwrap_or_else(|_| mp.clone());
    if fuse::is_mounted(&mp) {
        return Err(bad(format!(
            "mountpoint {} is already a mount point; unmount it first ('zonalfs unmount {}')",
            mp.display(),
            mp.display()
        )));
    }
    if !cfg.nonempty
        && std::fs::read_dir(&mp)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        return Err(bad(format!("mountpoint {}: not empty", mp.display())));
    }
    Ok(mp)
}

/// Connects (for a bucket) and wires the layers, bottom up; starts the
/// metrics endpoint if asked.
async fn wire(cfg: &MountConfig, objects: Objects) -> Result<Wired, MountError> {
    let (client, pool): (Arc<dyn ObjectClient>, Option<Arc<MrdPool>>) = match objects {
        Objects::Bucket { client, pool } => {
            let client = GcsClient::connect(client).await?;
            client
                .check_bucket()
                .await
                .map_err(|e| bucket_failure(&cfg.bucket, e))?;
            let pool = Arc::new(MrdPool::new(client, pool));
            (pool.clone(), Some(pool))
        }
        Objects::Client(c) => (c, None),
    };
    let memory = Pool::new(
        Budget::new(cfg.memory_limit),
        crate::memory::PoolConfig {
            warm_reserve: cfg.memory_warm_reserve.unwrap_or(cfg.memory_limit / 4),
            ..crate::memory::PoolConfig::new(cfg.block_size as usize)
        },
    );
    if let Some(pool) = &pool {
        // The transport's windows and buffers count in the budget.
        let pool = pool.clone();
        memory.budget().reserve_for(move || pool.transport_memory());
    }
    memory
        .spawn_maintainer(std::time::Duration::from_secs(1))
        .map_err(|e| MountError::io("cannot start the memory maintainer", e))?;
    let engine = ReadEngine::new(
        client.clone(),
        memory,
        PrefetchConfig {
            block_size: cfg.block_size,
            readahead_max: cfg.readahead_max,
            // Through the page cache the kernel keeps what was read; our
            // blocks only need to hold what is ahead of the readers.
            release_consumed: !cfg.direct_io,
            ..Default::default()
        },
    );
    let fuse_stats = Arc::new(crate::metrics::FuseStats::default());
    let fs = Fs::new(client, engine.clone(), cfg.fs.clone());
    let metrics = match (&cfg.metrics_addr, &pool) {
        (Some(addr), Some(pool)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| MountError::Config(format!("--metrics-addr {addr}: {e}")))?;
            let sources = crate::metrics::Sources {
                fuse: fuse_stats.clone(),
                engine: engine.clone(),
                pool: pool.clone(),
                writes: fs.write_stats(),
            };
            Some(AbortOnDrop(tokio::spawn(crate::metrics::serve(
                listener, sources,
            ))))
        }
        (Some(_), None) => {
            return Err(MountError::Config(
                "metrics are served for bucket mounts only".into(),
            ))
        }
        (None, _) => None,
    };
    let mut fuse_fs = FuseFs::new(
        fs,
        tokio::runtime::Handle::current(),
        cfg.direct_io,
        fuse_stats,
    );
    fuse_fs.max_background = cfg.max_background;
    fuse_fs.passthrough = cfg.passthrough;
    Ok(Wired { fuse_fs, metrics })
}

/// The mount-time bucket check's failures in the words of a mount tool: the
/// bucket is missing, or these credentials may not read it.
fn bucket_failure(bucket: &str, e: GcsError) -> MountError {
    let server = |m: &str| {
        m.strip_prefix(&format!("gs://{bucket}: "))
            .unwrap_or(m)
            .to_string()
    };
    let message = match &e {
        GcsError::NotFound(_) => format!("bucket \"{bucket}\" not found"),
        GcsError::PermissionDenied(m) => {
            format!("permission denied for bucket \"{bucket}\": {}", server(m))
        }
        GcsError::Unauthenticated(m) => format!(
            "not authenticated for bucket \"{bucket}\": {}; pass --key-file, or set up Application Default Credentials",
            server(m)
        ),
        _ => return MountError::Service(e),
    };
    MountError::Bucket { message, source: e }
}
