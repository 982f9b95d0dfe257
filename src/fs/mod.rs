//! The filesystem: a read-only view of a bucket as plain async methods, testable
//! without FUSE; [`fuse`] is the thin adapter that calls them and replies.
//!
//! Namespace (hierarchical): a directory is a `/`-delimited prefix (explicit
//! folders and implicit directories alike), a file an object. Inode numbers are
//! handed out on first sight and stay fixed for the life of the mount while the
//! kernel holds a lookup on them (`forget` drops them). File metadata is cached
//! for `metadata_ttl`, failed lookups for `negative_ttl`. Names that cannot be
//! POSIX path components (empty, `.`, `..`, containing `/` or NUL, over 255
//! bytes) are skipped with a warning ([`entry_name`] decides, for every name a
//! listing returns, even one that does not belong to the directory listed), so
//! no entry can lead outside the mount; when a file and a directory share a
//! name, the directory wins.
//!
//! Data flow for a read: `open` pins the object's generation and size in a
//! handle; `read` asks the [`ReadEngine`], the only read path, with that
//! pinned version. Writes (files created or truncated stream as appendable
//! objects; appends take an unfinalized object over) and namespace changes
//! are in [`write`]; a `--read-only` mount refuses them with EROFS. Errors are [`FsError`], turned into
//! an errno in one place ([`FsError::errno`]).
//!
//! Changing objects: a file inode stands for one object *generation*, because
//! the kernel's page cache (kept across opens) is per inode. When a lookup,
//! listing or open finds a new generation under a path, the path gets a new
//! inode; the old one keeps its generation for the handles still open on it
//! (they read old bytes, or get ESTALE once the service no longer serves that
//! generation) and is dropped when the kernel forgets it. An open of the old
//! inode (a path whose dentry the kernel still caches) fails with ESTALE,
//! which makes the kernel look the name up again and open the new inode: a
//! reader sees one generation's bytes, or an error, never a mix. Appendable
//! objects: a read reaching past a handle's known size first
//! refreshes the size (stat), updating the handle and the file's attributes,
//! so a tailing reader gets the appended bytes and `stat` agrees with it.
//!
//! Where each part lives: `inode` (the table of inodes, lookups,
//! attributes, forgetting), `dir` (listings and directory handles), `handle`
//! (opens, reads, releases), `write` (writes, creates, truncation, unlink,
//! mkdir, rmdir, rename), `error` ([`FsError`] and its errno), and
//! [`fuse`], the adapter to the kernel. [`Fs`] and its settings are here.

mod dir;
mod error;
pub mod fuse;
mod handle;
mod inode;
pub mod mountinfo;
pub mod order;
#[cfg(test)]
mod tests;
pub mod write;

pub use dir::{entry_name, DirEntry};
pub use error::FsError;
pub use handle::{Handle, Io, Opened, ReadHandle};
pub use inode::Attr;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::gcs::ObjectClient;
use crate::read::ReadEngine;
use dir::Listing;
use inode::{Kind, Node, Table};

pub const ROOT_INO: u64 = 1;

/// Filesystem settings.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub metadata_ttl: Duration,
    pub negative_ttl: Duration,
    /// How long a directory listing is reused by later opens (0: never).
    pub list_ttl: Duration,
    /// Serve only objects under this prefix (`--only-dir`), with its `/`.
    pub prefix: String,
    /// Past this many inodes, listing a directory first drops the ones the
    /// kernel holds no lookup on (memory stays bounded however large the
    /// bucket; a later lookup re-creates them).
    pub max_nodes: usize,
    /// Prefetch across files (`--prefetch-files`): when a directory's files
    /// are opened in listing order, fetch this many of the next ones whole
    /// ahead of the reader (0: off).
    pub prefetch_files: usize,
    /// `--read-only` (`-o ro`): every change is EROFS.
    pub read_only: bool,
    /// `--finalize-on-close`: a file written through the mount is finalized
    /// when it is closed (else it stays appendable).
    pub finalize_on_close: bool,
    /// `--temp-dir`: where writes that cannot stream keep their staged copy.
    pub temp_dir: std::path::PathBuf,
    /// `--temp-dir-limit`: bytes all staged copies may take together.
    pub temp_limit: u64,
}

impl Default for FsConfig {
    fn default() -> Self {
        // SAFETY: getuid takes no arguments, touches no memory of ours and
        // cannot fail.
        let uid = unsafe { libc::getuid() };
        // SAFETY: as getuid.
        let gid = unsafe { libc::getgid() };
        FsConfig {
            uid,
            gid,
            file_mode: 0o644,
            dir_mode: 0o755,
            metadata_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            list_ttl: Duration::ZERO,
            max_nodes: 200_000,
            prefix: String::new(),
            prefetch_files: 0,
            read_only: false,
            finalize_on_close: false,
            temp_dir: std::env::temp_dir(),
            temp_limit: 10 << 30,
        }
    }
}

/// The filesystem.
pub struct Fs {
    client: Arc<dyn ObjectClient>,
    engine: Arc<ReadEngine>,
    cfg: FsConfig,
    table: Mutex<Table>,
    next_ino: AtomicU64,
    handles: Mutex<HashMap<u64, Handle>>,
    dir_handles: Mutex<HashMap<u64, Listing>>,
    /// Recent listings by directory inode, reused within `list_ttl`.
    listings: Mutex<HashMap<u64, (Instant, Listing)>>,
    /// Files of listed directories in listing order, and how they are being
    /// opened (prefetch across files).
    orders: Mutex<HashMap<u64, Arc<order::DirOrder>>>,
    /// Inodes opened the normal way (never passthrough after that).
    normal_opens: Mutex<std::collections::HashSet<u64>>,
    /// Invalid names already warned about (one warning each).
    warned: Mutex<std::collections::HashSet<String>>,
    next_fh: AtomicU64,
    started: SystemTime,
    /// What writes did (metrics).
    writes: Arc<write::WriteStats>,
    /// Room for staged copies (`--temp-dir`, `--temp-dir-limit`).
    temp: Arc<write::TempSpace>,
}

impl Fs {
    pub fn new(client: Arc<dyn ObjectClient>, engine: Arc<ReadEngine>, cfg: FsConfig) -> Arc<Fs> {
        let mut table = Table::default();
        table.nodes.insert(
            ROOT_INO,
            Node {
                parent: ROOT_INO,
                kind: Kind::Dir(cfg.prefix.clone()),
                lookups: 1,
            },
        );
        let temp = Arc::new(write::TempSpace::new(cfg.temp_dir.clone(), cfg.temp_limit));
        Arc::new(Fs {
            temp,
            client,
            engine,
            cfg,
            table: Mutex::new(table),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            handles: Mutex::new(HashMap::new()),
            dir_handles: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            orders: Mutex::new(HashMap::new()),
            normal_opens: Mutex::new(std::collections::HashSet::new()),
            warned: Mutex::new(std::collections::HashSet::new()),
            next_fh: AtomicU64::new(1),
            started: SystemTime::now(),
            writes: Arc::default(),
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// FUSE passthrough for small finalized objects, on or off (the kernel
    /// offered it at init, or refused a backing file).
    pub fn set_passthrough(&self, on: bool) {
        self.engine.set_whole_files(on);
    }
}
