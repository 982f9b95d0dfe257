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
//! handle (writes are refused with EROFS); `read` asks the [`ReadEngine`], the
//! only read path, with that pinned version. Errors are [`FsError`], turned into
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

pub mod fuse;
pub mod mountinfo;
pub mod order;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::gcs::{GcsError, ObjectClient, ObjectId, ObjectInfo};
use crate::read::cache::Slot;
use crate::read::{ReadData, ReadEngine, ReadError};
use crate::sync::lock;

pub const ROOT_INO: u64 = 1;

/// Errors of the filesystem layer: its own (a name or handle that is not
/// there) and those of the layers below, kept whole (kind and source chain)
/// until [`FsError::errno`] turns them into what a program sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("read-only file system")]
    ReadOnly,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
    #[error("stale file handle: {0}")]
    Stale(String),
    #[error("bad file handle")]
    BadHandle,
    #[error("invalid name")]
    InvalidName,
    /// What the service said of an object cannot be right (e.g. an appendable
    /// object that shrank).
    #[error("I/O error: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Read(ReadError),
    #[error(transparent)]
    Gcs(GcsError),
}

impl FsError {
    /// The errno a program sees: the one place errors become errnos.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::IsDir => libc::EISDIR,
            FsError::NotDir => libc::ENOTDIR,
            FsError::Stale(_) | FsError::Read(ReadError::Stale { .. }) => libc::ESTALE,
            // The version an open handle pinned is gone.
            FsError::Read(ReadError::Gcs(GcsError::NotFound(_))) => libc::ESTALE,
            FsError::BadHandle => libc::EBADF,
            FsError::InvalidName => libc::EINVAL,
            FsError::Inconsistent(_) | FsError::Read(ReadError::Short { .. }) => libc::EIO,
            FsError::Read(ReadError::Gcs(g)) | FsError::Gcs(g) => gcs_errno(g),
        }
    }
}

/// A client error's errno, by its kind: a missing object is ENOENT, a refusal
/// (by the service, or credentials that can no longer get a token) EACCES;
/// everything else (the service unavailable past the retry deadline, a
/// protocol violation, a cancelled call) is EIO.
fn gcs_errno(e: &GcsError) -> i32 {
    match e {
        GcsError::NotFound(_) => libc::ENOENT,
        e if e.is_denied() => libc::EACCES,
        _ => libc::EIO,
    }
}

impl From<GcsError> for FsError {
    fn from(e: GcsError) -> Self {
        match e {
            GcsError::NotFound(_) => FsError::NotFound,
            other => FsError::Gcs(other),
        }
    }
}

impl From<ReadError> for FsError {
    fn from(e: ReadError) -> Self {
        FsError::Read(e)
    }
}

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
            file_mode: 0o444,
            dir_mode: 0o555,
            metadata_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            list_ttl: Duration::ZERO,
            max_nodes: 200_000,
            prefix: String::new(),
            prefetch_files: 0,
        }
    }
}

/// What a file or directory looks like to `stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub is_dir: bool,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub is_dir: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    /// The prefix of the directory ("" for the root, else "a/b/").
    Dir(String),
    /// The object and when its metadata was fetched.
    File(ObjectInfo, Instant),
}

#[derive(Debug)]
struct Node {
    parent: u64,
    kind: Kind,
    lookups: u64,
}

#[derive(Debug, Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    negative: HashMap<String, Instant>,
}

/// An open file: the object version it reads.
#[derive(Clone)]
pub struct Handle {
    pub ino: u64,
    pub object: ObjectId,
    pub size: u64,
    pub finalized: bool,
    /// A passthrough open: the memory file the kernel reads, kept cached
    /// while the handle is open.
    pub backing: Option<Arc<Slot>>,
}

/// What an open gives the FUSE layer: the handle, and for a passthrough open
/// the block whose memory file the kernel is to read.
pub struct Opened {
    pub fh: u64,
    pub passthrough: Option<Arc<Slot>>,
}

/// A directory's entries, as one open handle (or the listing cache) holds them.
type Listing = Arc<Vec<DirEntry>>;

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
}

/// True for a valid POSIX path component.
fn valid_component(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && name.len() <= 255
}

/// The entry name under which a listing of the directory `dir_prefix` ("" or
/// "a/b/") shows `listed`: a collapsed prefix (`is_prefix`, "a/b/c/") or an
/// object name ("a/b/f"). None when the name cannot be shown: it is not inside
/// the directory (a misbehaving server), or its next segment is not a valid
/// POSIX name (empty as in `a//b`, `.`, `..`, NUL, over 255 bytes), or it is
/// nested deeper than one level. When Some, `dir_prefix + name` (plus `/` for
/// a prefix) is exactly `listed`.
pub fn entry_name<'a>(dir_prefix: &str, listed: &'a str, is_prefix: bool) -> Option<&'a str> {
    let rest = listed.strip_prefix(dir_prefix)?;
    let name = if is_prefix {
        rest.strip_suffix('/')?
    } else {
        rest
    };
    valid_component(name).then_some(name)
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
        Arc::new(Fs {
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

    fn attr_of(&self, ino: u64, kind: &Kind) -> Attr {
        match kind {
            Kind::Dir(_) => Attr {
                ino,
                is_dir: true,
                size: 0,
                mtime: self.started,
                ctime: self.started,
                mode: self.cfg.dir_mode,
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                nlink: 2,
            },
            Kind::File(info, _) => Attr {
                ino,
                is_dir: false,
                size: info.size,
                mtime: info.update_time,
                ctime: info.update_time,
                mode: self.cfg.file_mode,
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                nlink: 1,
            },
        }
    }

    /// Records a node under its path (reusing the inode it already has, unless
    /// the type or the object's generation changed).
    fn intern(&self, table: &mut Table, parent: u64, path: &str, kind: Kind, lookup: bool) -> u64 {
        if let Some(&ino) = table.by_path.get(path) {
            if let Some(n) = table.nodes.get_mut(&ino) {
                let same = match (&n.kind, &kind) {
                    (Kind::Dir(_), Kind::Dir(_)) => true,
                    (Kind::File(a, _), Kind::File(b, _)) => a.generation == b.generation,
                    _ => false,
                };
                if same {
                    n.kind = kind;
                    n.lookups += u64::from(lookup);
                    return ino;
                }
                if n.lookups == 0 {
                    // The kernel holds no lookup on it (it came from a plain
                    // listing), so nothing was read through it: drop it now.
                    table.nodes.remove(&ino);
                }
            }
        }
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        table.nodes.insert(
            ino,
            Node {
                parent,
                kind,
                lookups: u64::from(lookup),
            },
        );
        table.by_path.insert(path.to_string(), ino);
        ino
    }

    fn dir_prefix(&self, ino: u64) -> Result<String, FsError> {
        match lock(&self.table).nodes.get(&ino).map(|n| n.kind.clone()) {
            Some(Kind::Dir(p)) => Ok(p),
            Some(Kind::File(..)) => Err(FsError::NotDir),
            None => Err(FsError::Stale(format!("inode {ino}"))),
        }
    }

    /// Finds `name` in directory `parent`; the kernel holds one more lookup on
    /// the result.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        if !valid_component(name) {
            return Err(FsError::NotFound);
        }
        let prefix = self.dir_prefix(parent)?;
        let path = format!("{prefix}{name}");
        if path.len() > 1024 {
            return Err(FsError::NotFound);
        }
        {
            let mut t = lock(&self.table);
            if let Some(when) = t.negative.get(&path) {
                if when.elapsed() < self.cfg.negative_ttl {
                    return Err(FsError::NotFound);
                }
                t.negative.remove(&path);
            }
        }
        let dir_path = format!("{path}/");
        // Known from a recent listing or lookup: no round trip.
        {
            let mut t = lock(&self.table);
            let known = [&dir_path, &path].into_iter().find_map(|k| {
                let ino = *t.by_path.get(k.as_str())?;
                let n = t.nodes.get(&ino)?;
                let fresh = match &n.kind {
                    Kind::Dir(_) => true,
                    Kind::File(_, fetched) => fetched.elapsed() < self.cfg.metadata_ttl,
                };
                fresh.then_some(ino)
            });
            if let Some(ino) = known {
                if let Some(n) = t.nodes.get_mut(&ino) {
                    n.lookups += 1;
                    let kind = n.kind.clone();
                    return Ok(self.attr_of(ino, &kind));
                }
            }
        }
        // A directory wins over a file of the same name.
        let (as_dir, as_file) =
            tokio::join!(self.client.list(&dir_path, None), self.client.stat(&path));
        let is_dir = match as_dir {
            // Only names inside count (a misbehaving server's others do not);
            // the folder's own placeholder object `dir/` does.
            Ok(page) => {
                page.objects.iter().any(|o| o.name.starts_with(&dir_path))
                    || page
                        .prefixes
                        .iter()
                        .any(|p| p.len() > dir_path.len() && p.starts_with(&dir_path))
            }
            Err(GcsError::NotFound(_)) => false,
            Err(e) => return Err(e.into()),
        };
        let mut t = lock(&self.table);
        let (kind, key) = if is_dir {
            (Kind::Dir(dir_path.clone()), dir_path)
        } else {
            match as_file {
                Ok(info) => (Kind::File(info, Instant::now()), path),
                Err(GcsError::NotFound(_)) => {
                    if t.negative.len() > 100_000 {
                        t.negative.clear();
                    }
                    t.negative.insert(path, Instant::now());
                    return Err(FsError::NotFound);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let ino = self.intern(&mut t, parent, &key, kind.clone(), true);
        Ok(self.attr_of(ino, &kind))
    }

    /// The attributes of an inode, refreshing file metadata past its TTL.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let kind = lock(&self.table)
            .nodes
            .get(&ino)
            .map(|n| n.kind.clone())
            .ok_or_else(|| FsError::Stale(format!("inode {ino}")))?;
        if let Kind::File(info, fetched) = &kind {
            if fetched.elapsed() >= self.cfg.metadata_ttl {
                let fresh = self.client.stat(&info.name).await?;
                let kind = self.refreshed(ino, info, fresh);
                return Ok(self.attr_of(ino, &kind));
            }
        }
        Ok(self.attr_of(ino, &kind))
    }

    /// Records fresh metadata of file inode `ino` (whose metadata was `old`).
    /// Another generation does not change the inode: the path gets a new inode
    /// for it, and `ino` keeps describing its own generation (re-checked no
    /// sooner than the TTL). Returns the inode's kind now.
    fn refreshed(&self, ino: u64, old: &ObjectInfo, fresh: ObjectInfo) -> Kind {
        let mut t = lock(&self.table);
        if fresh.generation == old.generation {
            let kind = Kind::File(fresh, Instant::now());
            if let Some(n) = t.nodes.get_mut(&ino) {
                n.kind = kind.clone();
            }
            return kind;
        }
        let kind = Kind::File(old.clone(), Instant::now());
        let parent = match t.nodes.get_mut(&ino) {
            Some(n) => {
                n.kind = kind.clone();
                n.parent
            }
            None => return kind,
        };
        if t.by_path.get(&old.name) == Some(&ino) {
            let name = fresh.name.clone();
            self.intern(
                &mut t,
                parent,
                &name,
                Kind::File(fresh, Instant::now()),
                false,
            );
        }
        kind
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = lock(&self.table);
        let gone = match t.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = t.nodes.remove(&ino) {
                let key = match node.kind {
                    Kind::Dir(p) => p,
                    Kind::File(info, _) => info.name,
                };
                if t.by_path.get(&key) == Some(&ino) {
                    t.by_path.remove(&key);
                }
            }
            drop(t);
            self.engine.forget(ino);
        }
    }

    /// Logs a skipped name, once per name for the life of the mount.
    fn warn_once(&self, name: &str, why: &str) {
        let mut w = lock(&self.warned);
        if w.len() < 10_000 && w.insert(name.to_string()) {
            tracing::warn!(name = %name.escape_debug(), "{why}");
        }
    }

    /// Lists a directory (every page) into a snapshot for its handle.
    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let prefix = self.dir_prefix(ino)?;
        if !self.cfg.list_ttl.is_zero() {
            let cached = lock(&self.listings)
                .get(&ino)
                .and_then(|(t, e)| (t.elapsed() < self.cfg.list_ttl).then(|| e.clone()));
            if let Some(entries) = cached {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dir_handles).insert(fh, entries);
                return Ok(fh);
            }
        }
        let mut dirs = Vec::new();
        let mut files = Vec::new();
        let mut token = None;
        loop {
            let page = self.client.list(&prefix, token).await?;
            for p in page.prefixes {
                match entry_name(&prefix, &p, true) {
                    Some(name) => dirs.push((name.to_string(), p)),
                    None => {
                        self.warn_once(&p, "skipping a prefix that is not a valid directory name")
                    }
                }
            }
            for o in page.objects {
                if o.name == prefix {
                    continue; // the folder's own placeholder object
                }
                if let Some(name) = entry_name(&prefix, &o.name, false) {
                    files.push((name.to_string(), o));
                } else {
                    self.warn_once(
                        &o.name,
                        "skipping an object whose name is not a valid file name",
                    );
                }
            }
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut t = lock(&self.table);
        if t.nodes.len() > self.cfg.max_nodes {
            // Bound the table: drop nodes the kernel holds no lookup on (they
            // came from plain readdir listings; a later lookup re-creates them).
            t.nodes.retain(|&i, n| i == ROOT_INO || n.lookups > 0);
            let Table { nodes, by_path, .. } = &mut *t;
            by_path.retain(|_, i| nodes.contains_key(i));
        }
        let parent = t.nodes.get(&ino).map_or(ROOT_INO, |n| n.parent);
        let mut entries = vec![
            DirEntry {
                ino,
                name: ".".into(),
                is_dir: true,
            },
            DirEntry {
                ino: parent,
                name: "..".into(),
                is_dir: true,
            },
        ];
        // Each name once (a server may repeat one, e.g. across pages), and a
        // directory wins over a file of the same name.
        let mut seen = std::collections::HashSet::new();
        for (name, p) in dirs {
            if !seen.insert(name.clone()) {
                continue;
            }
            let child = self.intern(&mut t, ino, &p, Kind::Dir(p.clone()), false);
            entries.push(DirEntry {
                ino: child,
                name,
                is_dir: true,
            });
        }
        let mut listed = Vec::new();
        for (name, o) in files {
            if !seen.insert(name.clone()) {
                continue;
            }
            let path = o.name.clone();
            let (object, size, finalized) = (
                ObjectId {
                    name: o.name.clone(),
                    generation: o.generation,
                },
                o.size,
                o.finalized,
            );
            let child = self.intern(&mut t, ino, &path, Kind::File(o, Instant::now()), false);
            if self.cfg.prefetch_files > 0 {
                listed.push(order::ListedFile {
                    ino: child,
                    object,
                    size,
                    finalized,
                });
            }
            entries.push(DirEntry {
                ino: child,
                name,
                is_dir: false,
            });
        }
        drop(t);
        if self.cfg.prefetch_files > 0 {
            let mut orders = lock(&self.orders);
            if orders.len() >= 1_000 {
                orders.clear();
            }
            orders.insert(ino, Arc::new(order::DirOrder::new(listed)));
        }
        let entries = Arc::new(entries);
        if !self.cfg.list_ttl.is_zero() {
            let mut l = lock(&self.listings);
            if l.len() > 10_000 {
                l.clear();
            }
            l.insert(ino, (Instant::now(), entries.clone()));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dir_handles).insert(fh, entries);
        Ok(fh)
    }

    /// Entries of an open directory from `offset` (offsets are stable indexes).
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>, FsError> {
        let entries = lock(&self.dir_handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        Ok(entries
            .iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    /// The attributes of an inode as last known (no round trip), for
    /// readdirplus.
    pub fn cached_attr(&self, ino: u64) -> Option<Attr> {
        let t = lock(&self.table);
        t.nodes.get(&ino).map(|n| self.attr_of(ino, &n.kind))
    }

    /// The kernel took a lookup on `ino` without calling lookup (readdirplus).
    pub fn add_lookup(&self, ino: u64) {
        if let Some(n) = lock(&self.table).nodes.get_mut(&ino) {
            n.lookups += 1;
        }
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dir_handles).remove(&fh);
    }

    /// Opens a file for reading, pinning its current generation. ESTALE when
    /// the object has a new generation: the inode stands for the old one, and
    /// the kernel then looks the name up again (and finds the new inode).
    pub async fn open(&self, ino: u64, write: bool) -> Result<u64, FsError> {
        self.open_file(ino, write).await.map(|o| o.fh)
    }

    /// [`Fs::open`], and for a small finalized object when FUSE passthrough
    /// is on, its whole bytes in a memory file for the kernel to serve (an
    /// inode once opened the normal way stays on the normal path: the kernel
    /// refuses cached and passthrough opens of one inode at once).
    pub async fn open_file(&self, ino: u64, write: bool) -> Result<Opened, FsError> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let kind = lock(&self.table)
            .nodes
            .get(&ino)
            .map(|n| n.kind.clone())
            .ok_or_else(|| FsError::Stale(format!("inode {ino}")))?;
        let info = match kind {
            Kind::Dir(_) => return Err(FsError::IsDir),
            Kind::File(info, fetched) if fetched.elapsed() < self.cfg.metadata_ttl => info,
            Kind::File(info, _) => {
                let fresh = self.client.stat(&info.name).await?;
                if fresh.generation != info.generation {
                    let generation = fresh.generation;
                    self.refreshed(ino, &info, fresh);
                    return Err(FsError::Stale(format!(
                        "{}: generation {} was replaced by {generation}",
                        info.name, info.generation
                    )));
                }
                self.refreshed(ino, &info, fresh.clone());
                fresh
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let object = ObjectId {
            name: info.name.clone(),
            generation: info.generation,
        };
        // A small object is read whole: start fetching it now, so the first
        // read finds its bytes on the way (the open's reply and the fetch
        // overlap).
        self.engine
            .start_small(ino, &object, info.size, info.finalized);
        self.prefetch_after(ino);
        // Without passthrough nothing needs tracking: every open is normal.
        let tracking = self.engine.whole_files();
        let passthrough = if !tracking || lock(&self.normal_opens).contains(&ino) {
            None
        } else {
            self.engine
                .whole_file(ino, &object, info.size, info.finalized)
                .await
        };
        if tracking && passthrough.is_none() {
            let mut normal = lock(&self.normal_opens);
            if normal.len() > 1_000_000 {
                normal.clear();
            }
            normal.insert(ino);
        }
        lock(&self.handles).insert(
            fh,
            Handle {
                ino,
                object,
                size: info.size,
                finalized: info.finalized,
                backing: passthrough.clone(),
            },
        );
        Ok(Opened { fh, passthrough })
    }

    /// Prefetch across files: file `ino` was opened; if its directory's files
    /// are being opened in listing order, the next ones start loading whole
    /// (within the memory budget, never evicting anything for them).
    fn prefetch_after(&self, ino: u64) {
        if self.cfg.prefetch_files == 0 {
            return;
        }
        let Some(parent) = lock(&self.table).nodes.get(&ino).map(|n| n.parent) else {
            return;
        };
        let Some(dir) = lock(&self.orders).get(&parent).cloned() else {
            return;
        };
        for f in dir.opened(ino, self.cfg.prefetch_files) {
            if !self
                .engine
                .prefetch_file(f.ino, &f.object, f.size, f.finalized)
            {
                break;
            }
        }
    }

    /// Reads through the read engine, the only read path.
    pub async fn read(&self, fh: u64, offset: u64, len: u32) -> Result<ReadData, FsError> {
        let mut h = lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let mut fresh = false;
        if !h.finalized && offset.saturating_add(u64::from(len)) > h.size {
            h = self.refresh_appendable(fh, h).await?;
            fresh = true;
        }
        // A size just refreshed needs no second look from the engine.
        Ok(self
            .engine
            .read(
                h.ino,
                &h.object,
                h.size,
                h.finalized || fresh,
                offset,
                u64::from(len),
            )
            .await?)
    }

    /// An appendable object's handle is read past its known size: looks up the
    /// current size (and whether it was finalized meanwhile), and records it in
    /// the handle and the file's attributes. A new generation: ESTALE.
    async fn refresh_appendable(&self, fh: u64, mut h: Handle) -> Result<Handle, FsError> {
        let info = self.client.stat(&h.object.name).await?;
        if info.generation != h.object.generation {
            return Err(FsError::Stale(format!(
                "{}: generation {} was replaced",
                h.object.name, h.object.generation
            )));
        }
        if info.size < h.size {
            return Err(FsError::Inconsistent(format!(
                "{}: the appendable object shrank from {} to {} bytes",
                h.object.name, h.size, info.size
            )));
        }
        h.size = info.size;
        h.finalized = info.finalized;
        if let Some(stored) = lock(&self.handles).get_mut(&fh) {
            stored.size = h.size;
            stored.finalized = h.finalized;
        }
        if let Some(n) = lock(&self.table).nodes.get_mut(&h.ino) {
            if let Kind::File(old, _) = &n.kind {
                if old.generation == info.generation && old.size <= info.size {
                    n.kind = Kind::File(info, Instant::now());
                }
            }
        }
        Ok(h)
    }

    /// Closes a file handle. When it was the inode's last one, the read
    /// engine lets go of the blocks that were read through (see
    /// [`ReadEngine::closed`]).
    pub fn release(&self, fh: u64) {
        let last_of = {
            let mut handles = lock(&self.handles);
            handles
                .remove(&fh)
                .filter(|h| !handles.values().any(|o| o.ino == h.ino))
                .map(|h| h.ino)
        };
        if let Some(ino) = last_of {
            self.engine.closed(ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcs::mem::MemClient;
    use crate::memory::{Budget, Pool, PoolConfig};
    use crate::read::PrefetchConfig;
    use proptest::prelude::*;

    fn fs(client: Arc<MemClient>) -> Arc<Fs> {
        let engine = ReadEngine::new(
            client.clone(),
            Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20)),
            PrefetchConfig::default(),
        );
        Fs::new(client, engine, FsConfig::default())
    }

    /// Object names a bucket may hold, and names a misbehaving server may
    /// send: valid segments mixed with empty, `.`, `..`, NUL, over-long and
    /// arbitrary Unicode ones (which may contain `/` themselves).
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => "[a-c]{1,2}",
            1 => Just(String::new()),
            1 => Just(".".to_string()),
            1 => Just("..".to_string()),
            1 => Just("x\0y".to_string()),
            1 => Just("n".repeat(256)),
            1 => "[ %\\\n\u{301}\u{1F600}\u{5D0}e]{1,4}",
            1 => any::<String>(),
        ]
    }

    fn object_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 1..5).prop_map(|v| v.join("/"))
    }

    fn assert_valid(name: &str) -> Result<(), TestCaseError> {
        prop_assert!(!name.is_empty());
        prop_assert!(name != "." && name != "..", "{:?}", name);
        prop_assert!(!name.contains('/') && !name.contains('\0'), "{:?}", name);
        prop_assert!(name.len() <= 255);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(1024)))]

        /// Whatever a listing returns, an entry name is a valid POSIX name that
        /// leads back to exactly the listed name inside the directory.
        #[test]
        fn proptest_name_filter_entry_names(
            dir in prop_oneof![Just(String::new()), object_name().prop_map(|n| n + "/"), any::<String>()],
            listed in prop_oneof![object_name(), any::<String>()],
            inside in any::<bool>(),
            is_prefix in any::<bool>(),
        ) {
            let listed = if inside { format!("{dir}{listed}") } else { listed };
            if let Some(name) = entry_name(&dir, &listed, is_prefix) {
                assert_valid(name)?;
                let back = format!("{dir}{name}{}", if is_prefix { "/" } else { "" });
                prop_assert_eq!(back, listed);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(96)))]

        /// A bucket of arbitrary names, walked as a program would (readdir, then
        /// lookup of every entry): every entry is a valid name, `.` and `..`
        /// stay inside (the root's `..` is the root), every file reached is the
        /// object its path names, and every object whose segments are all valid
        /// (and that no directory of the same name hides) is reached.
        #[test]
        fn proptest_name_filter_listing(names in proptest::collection::vec(object_name(), 1..20)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let c = MemClient::new(Duration::ZERO);
                for n in &names {
                    c.put(n, vec![1u8], true);
                }
                let fs = fs(c);
                for bad in [".", "..", "", "a/b"] {
                    prop_assert!(fs.lookup(ROOT_INO, bad).await.is_err(), "{:?}", bad);
                }
                let depth = names.iter().map(|n| n.matches('/').count()).max().unwrap_or(0);
                let mut found = std::collections::HashSet::new();
                let mut todo = vec![(ROOT_INO, Vec::<String>::new())];
                while let Some((ino, path)) = todo.pop() {
                    prop_assert!(path.len() <= depth, "deeper than any name: {:?}", path);
                    let h = fs.opendir(ino).await.unwrap();
                    let entries = fs.readdir(h, 0).unwrap();
                    fs.releasedir(h);
                    prop_assert_eq!(&entries[0].1.name, ".");
                    prop_assert_eq!(entries[0].1.ino, ino);
                    prop_assert_eq!(&entries[1].1.name, "..");
                    if ino == ROOT_INO {
                        prop_assert_eq!(entries[1].1.ino, ROOT_INO);
                    }
                    for (_, e) in &entries[2..] {
                        assert_valid(&e.name)?;
                        let attr = fs.lookup(ino, &e.name).await.unwrap();
                        prop_assert_eq!((attr.ino, attr.is_dir), (e.ino, e.is_dir));
                        let mut p = path.clone();
                        p.push(e.name.clone());
                        if e.is_dir {
                            todo.push((e.ino, p));
                        } else {
                            found.insert(p.join("/"));
                        }
                    }
                }
                for f in &found {
                    prop_assert!(names.contains(f), "{:?} is no object", f);
                }
                for n in &names {
                    let shown = n.split('/').all(valid_component)
                        && !names.iter().any(|m| m.starts_with(&format!("{n}/")));
                    prop_assert_eq!(shown, found.contains(n), "{:?}", n);
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn invalid_names_are_skipped_once() {
        let c = MemClient::new(Duration::ZERO);
        c.put("ok", vec![1u8], true);
        c.put("bad//x", vec![1u8], true);
        c.put(&"n".repeat(300), vec![1u8], true);
        c.put("dots/./y", vec![1u8], true);
        let fs = fs(c);
        let names = |fs: &Fs, ino| {
            let h = futures::executor::block_on(fs.opendir(ino)).unwrap();
            let v: Vec<String> = fs
                .readdir(h, 2)
                .unwrap()
                .into_iter()
                .map(|(_, e)| e.name)
                .collect();
            fs.releasedir(h);
            v
        };
        assert_eq!(
            names(&fs, ROOT_INO),
            ["bad", "dots", "ok"],
            "the 300-byte name is skipped"
        );
        let bad = fs.lookup(ROOT_INO, "bad").await.unwrap();
        assert!(
            names(&fs, bad.ino).is_empty(),
            "an empty segment is skipped"
        );
        let dots = fs.lookup(ROOT_INO, "dots").await.unwrap();
        assert!(names(&fs, dots.ino).is_empty(), "a '.' segment is skipped");
        names(&fs, ROOT_INO);
        assert_eq!(lock(&fs.warned).len(), 3, "one warning per name");
    }

    #[tokio::test]
    async fn inode_table_stays_bounded() {
        let c = MemClient::new(Duration::ZERO);
        for i in 0..50 {
            c.put(&format!("d/f{i}"), vec![1u8], true);
        }
        let engine = ReadEngine::new(
            c.clone(),
            Pool::new(Budget::new(4 << 20), PoolConfig::new(1 << 20)),
            PrefetchConfig::default(),
        );
        let fs = Fs::new(
            c,
            engine,
            FsConfig {
                max_nodes: 10,
                ..Default::default()
            },
        );
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        let kept = fs.lookup(d.ino, "f7").await.unwrap();
        for _ in 0..3 {
            let h = fs.opendir(d.ino).await.unwrap();
            assert_eq!(fs.readdir(h, 0).unwrap().len(), 52);
            fs.releasedir(h);
        }
        let n = lock(&fs.table).nodes.len();
        assert!(n <= 10 + 52, "{n} nodes");
        // Looked-up inodes survive the pruning, with their numbers.
        assert_eq!(fs.lookup(d.ino, "f7").await.unwrap().ino, kept.ino);
    }

    /// Through the page cache, closing the last handle of a file that was
    /// read to its end hands its blocks back to the memory pool, and the next
    /// file's block is that same warm buffer (no fresh memory per file); a
    /// second handle still open keeps them, and with direct I/O (no page
    /// cache) they stay cached.
    #[tokio::test]
    async fn closing_a_file_read_through_gives_its_blocks_back_warm() {
        for release_consumed in [true, false] {
            let c = MemClient::new(Duration::ZERO);
            c.put("a", vec![1u8; 20 << 10], true);
            c.put("b", vec![2u8; 20 << 10], true);
            let pool = Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20));
            let engine = ReadEngine::new(
                c.clone(),
                pool.clone(),
                PrefetchConfig {
                    release_consumed,
                    ..Default::default()
                },
            );
            let fs = Fs::new(c.clone(), engine.clone(), FsConfig::default());
            let a = fs.lookup(ROOT_INO, "a").await.unwrap();
            let (h1, h2) = (
                fs.open(a.ino, false).await.unwrap(),
                fs.open(a.ino, false).await.unwrap(),
            );
            assert_eq!(fs.read(h1, 0, 1 << 20).await.unwrap().len(), 20 << 10);
            fs.release(h1);
            assert_eq!(engine.blocks_of(a.ino).len(), 1, "another handle is open");
            fs.release(h2);
            let kept = engine.blocks_of(a.ino).len();
            assert_eq!(kept, usize::from(!release_consumed), "{release_consumed}");
            let fresh = pool.stats().fresh.load(Ordering::Relaxed);
            let b = fs.lookup(ROOT_INO, "b").await.unwrap();
            let hb = fs.open(b.ino, false).await.unwrap();
            assert_eq!(
                fs.read(hb, 0, 1 << 20).await.unwrap().as_slice(),
                &vec![2u8; 20 << 10][..]
            );
            let fresh_for_b = pool.stats().fresh.load(Ordering::Relaxed) - fresh;
            assert_eq!(
                fresh_for_b,
                u64::from(!release_consumed),
                "{release_consumed}"
            );
        }
    }

    /// Opening a small file (one block) starts fetching it whole before any
    /// read; a larger file waits for its reads; a file already read through
    /// and closed (whose bytes the kernel's page cache holds) fetches nothing
    /// at its next open.
    #[tokio::test]
    async fn open_starts_fetching_a_small_file_whole() {
        let c = MemClient::new(Duration::ZERO);
        c.put("small", vec![3u8; 50_000], true);
        c.put("big", vec![4u8; 3 << 20], true);
        let engine = ReadEngine::new(
            c.clone(),
            Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20)),
            PrefetchConfig {
                release_consumed: true,
                ..Default::default()
            },
        );
        let fs = Fs::new(c.clone(), engine.clone(), FsConfig::default());
        let small = fs.lookup(ROOT_INO, "small").await.unwrap();
        let big = fs.lookup(ROOT_INO, "big").await.unwrap();
        let fh = fs.open(small.ino, false).await.unwrap();
        assert_eq!(
            engine.blocks_of(small.ino).len(),
            1,
            "loading since the open"
        );
        let hb = fs.open(big.ino, false).await.unwrap();
        assert!(
            engine.blocks_of(big.ino).is_empty(),
            "a big file waits for reads"
        );
        let data = fs.read(fh, 0, 1 << 20).await.unwrap();
        assert_eq!(data.as_slice(), &vec![3u8; 50_000][..]);
        drop(data);
        assert_eq!(c.requests.load(Ordering::Relaxed), 1, "one fetch, at open");
        fs.release(fh);
        fs.release(hb);
        let again = fs.open(small.ino, false).await.unwrap();
        assert!(
            engine.blocks_of(small.ino).is_empty(),
            "read through once: the page cache has it"
        );
        assert_eq!(c.requests.load(Ordering::Relaxed), 1);
        fs.release(again);
    }

    /// Prefetch across files: opening a directory's files in listing order
    /// starts the next ones loading whole (at most `prefetch_files` ahead);
    /// they are counted as used when read; random order fetches nothing
    /// extra; a full budget stops it without evicting the open file's block.
    #[tokio::test]
    async fn files_opened_in_listing_order_are_fetched_ahead() {
        let setup = |budget: u64| {
            let c = MemClient::new(Duration::ZERO);
            for i in 0..30 {
                c.put(&format!("d/f{i:02}"), vec![i as u8; 20 << 10], true);
            }
            let engine = ReadEngine::new(
                c.clone(),
                Pool::new(Budget::new(budget), PoolConfig::new(1 << 20)),
                PrefetchConfig {
                    release_consumed: true,
                    ..Default::default()
                },
            );
            let cfg = FsConfig {
                prefetch_files: 4,
                ..Default::default()
            };
            (c.clone(), engine.clone(), Fs::new(c, engine, cfg))
        };
        async fn files(fs: &Fs) -> Vec<u64> {
            let d = fs.lookup(ROOT_INO, "d").await.unwrap();
            let dh = fs.opendir(d.ino).await.unwrap();
            let inos = fs
                .readdir(dh, 0)
                .unwrap()
                .into_iter()
                .filter(|(_, e)| !e.is_dir)
                .map(|(_, e)| e.ino)
                .collect();
            fs.releasedir(dh);
            inos
        }
        let loading = |e: &ReadEngine, inos: &[u64]| -> Vec<bool> {
            inos.iter().map(|i| !e.blocks_of(*i).is_empty()).collect()
        };

        // In listing order: from the fourth open, the next four files.
        let (_c, engine, fs) = setup(16 << 20);
        let inos = files(&fs).await;
        assert_eq!(inos.len(), 30);
        for (i, ino) in inos.iter().take(4).enumerate() {
            let fh = fs.open(*ino, false).await.unwrap();
            let got = fs.read(fh, 0, 1 << 20).await.unwrap();
            assert_eq!(got.as_slice(), &vec![i as u8; 20 << 10][..]);
            drop(got);
            fs.release(fh);
        }
        assert_eq!(
            loading(&engine, &inos[4..10]),
            [true, true, true, true, false, false]
        );
        assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 4);
        let fh = fs.open(inos[4], false).await.unwrap();
        assert_eq!(
            fs.read(fh, 0, 1 << 20).await.unwrap().as_slice(),
            &vec![4u8; 20 << 10][..]
        );
        assert_eq!(engine.stats.prefetch_used.load(Ordering::Relaxed), 1);
        assert_eq!(
            loading(&engine, &inos[8..10]),
            [true, false],
            "topped up by one"
        );
        assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 5);
        assert_eq!(
            engine.stats.block_misses.load(Ordering::Relaxed),
            9,
            "4 opened + 5 ahead, none fetched twice"
        );

        // Random order: nothing is fetched but what is opened.
        let (_c, engine, fs) = setup(16 << 20);
        let inos = files(&fs).await;
        for i in [17, 3, 25, 9, 21, 0, 14, 28] {
            let fh = fs.open(inos[i], false).await.unwrap();
            fs.release(fh);
        }
        assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 0);
        assert_eq!(engine.stats.block_misses.load(Ordering::Relaxed), 8);

        // A budget with room for three files: the open files keep theirs and
        // the files ahead take only what is free.
        let (_c, engine, fs) = setup(3 * (20 << 10));
        let inos = files(&fs).await;
        let mut open = Vec::new();
        for ino in inos.iter().take(4) {
            open.push(fs.open(*ino, false).await.unwrap());
        }
        assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 0);
        for fh in open {
            fs.release(fh);
        }
    }

    /// Objects replaced or deleted between the listing and the read, while
    /// the files around them are fetched ahead: a reader gets a file's old
    /// bytes whole, or ESTALE/ENOENT, and a new lookup the new bytes, never a
    /// mix of generations.
    #[tokio::test]
    async fn files_changed_after_the_listing_never_mix_generations() {
        for metadata_ttl in [Duration::from_secs(60), Duration::ZERO] {
            let c = MemClient::new(Duration::ZERO);
            for i in 0..12 {
                c.put(&format!("d/f{i:02}"), vec![i as u8; 30 << 10], true);
            }
            let engine = ReadEngine::new(
                c.clone(),
                Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20)),
                PrefetchConfig {
                    release_consumed: true,
                    ..Default::default()
                },
            );
            let cfg = FsConfig {
                prefetch_files: 8,
                metadata_ttl,
                ..Default::default()
            };
            let fs = Fs::new(c.clone(), engine.clone(), cfg);
            let d = fs.lookup(ROOT_INO, "d").await.unwrap();
            let dh = fs.opendir(d.ino).await.unwrap();
            let listed: Vec<DirEntry> = fs
                .readdir(dh, 0)
                .unwrap()
                .into_iter()
                .map(|(_, e)| e)
                .filter(|e| !e.is_dir)
                .collect();
            fs.releasedir(dh);
            // Opened in order: the files after the fourth are fetched ahead
            // with the listing's generations; then two of them change.
            for e in &listed[..4] {
                let fh = fs.open(e.ino, false).await.unwrap();
                fs.release(fh);
            }
            assert!(engine.stats.prefetch_started.load(Ordering::Relaxed) > 0);
            c.put("d/f06", vec![0xee; 20 << 10], true);
            c.delete("d/f08");
            for (i, e) in listed.iter().enumerate().skip(4) {
                let read = async {
                    let fh = fs.open(e.ino, false).await?;
                    let r = fs.read(fh, 0, 1 << 20).await.map(|d| d.as_slice().to_vec());
                    fs.release(fh);
                    r
                };
                match read.await {
                    Ok(bytes) => assert!(
                        bytes == vec![i as u8; 30 << 10],
                        "{metadata_ttl:?}: file {i} is not its listed generation's bytes"
                    ),
                    Err(err) => {
                        assert!(i == 6 || i == 8, "file {i}: {err}");
                        assert!(
                            [libc::ESTALE, libc::ENOENT].contains(&err.errno()),
                            "file {i}: {err}"
                        );
                    }
                }
            }
            // A new lookup finds the new generation, whole.
            let fresh = fs.lookup(d.ino, "f06").await.unwrap();
            let fh = fs.open(fresh.ino, false).await.unwrap();
            if fresh.ino != listed[6].ino {
                let got = fs.read(fh, 0, 1 << 20).await.unwrap();
                assert!(got.as_slice() == vec![0xee; 20 << 10].as_slice());
            }
            fs.release(fh);
        }
    }

    #[tokio::test]
    async fn a_new_generation_gets_a_new_inode_and_old_handles_keep_theirs() {
        let c = MemClient::new(Duration::ZERO);
        c.put("o", b"first".to_vec(), true);
        let engine = ReadEngine::new(
            c.clone(),
            Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20)),
            PrefetchConfig::default(),
        );
        let fs = Fs::new(
            c.clone(),
            engine,
            FsConfig {
                metadata_ttl: Duration::ZERO,
                ..Default::default()
            },
        );
        let old = fs.lookup(ROOT_INO, "o").await.unwrap();
        let fh = fs.open(old.ino, false).await.unwrap();
        assert_eq!(fs.read(fh, 0, 5).await.unwrap().as_slice(), b"first");
        c.put("o", b"other!".to_vec(), true);
        // The old inode still describes (and opens) nothing but its generation.
        assert_eq!(fs.getattr(old.ino).await.unwrap().size, 5);
        assert!(matches!(
            fs.open(old.ino, false).await,
            Err(FsError::Stale(_))
        ));
        // The name now leads to a new inode with the new generation.
        let new = fs.lookup(ROOT_INO, "o").await.unwrap();
        assert_ne!(new.ino, old.ino, "a new generation is a new inode");
        assert_eq!(new.size, 6);
        let fh2 = fs.open(new.ino, false).await.unwrap();
        assert_eq!(fs.read(fh2, 0, 6).await.unwrap().as_slice(), b"other!");
        // The old handle reads its own generation, or fails; never the new one.
        match fs.read(fh, 0, 5).await {
            Ok(d) => assert_eq!(d.as_slice(), b"first"),
            Err(e) => assert_eq!(e.errno(), libc::ESTALE, "{e}"),
        }
        // Listing shows the new inode too.
        let dh = fs.opendir(ROOT_INO).await.unwrap();
        let listed = fs.readdir(dh, 2).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.ino, new.ino);
    }

    #[tokio::test]
    async fn reads_past_the_known_end_of_an_appendable_object_refresh_its_size() {
        let c = MemClient::new(Duration::ZERO);
        c.put("log", b"12345".to_vec(), false);
        let fs = fs(c.clone()); // default metadata TTL: 60 s
        let ino = fs.lookup(ROOT_INO, "log").await.unwrap().ino;
        let fh = fs.open(ino, false).await.unwrap();
        assert_eq!(fs.read(fh, 0, 100).await.unwrap().as_slice(), b"12345");
        assert!(fs.read(fh, 5, 100).await.unwrap().is_empty(), "EOF for now");
        c.append("log", b"678");
        assert_eq!(fs.read(fh, 5, 100).await.unwrap().as_slice(), b"678");
        assert_eq!(
            fs.getattr(ino).await.unwrap().size,
            8,
            "the attributes agree with what was read, within the TTL"
        );
        // Replaced by a new generation: ESTALE, not the new object's bytes.
        c.put("log", b"something else".to_vec(), false);
        assert!(matches!(fs.read(fh, 8, 100).await, Err(FsError::Stale(_))));
    }

    #[tokio::test]
    async fn namespace_and_reads() {
        let c = MemClient::new(Duration::ZERO);
        c.put("a/b.txt", b"hello".to_vec(), true);
        c.put("a/c/d", b"x".to_vec(), true);
        c.put("top", b"top!".to_vec(), true);
        c.put("dup", b"file".to_vec(), true);
        c.put("dup/inner", b"i".to_vec(), true);
        let fs = fs(c);
        let a = fs.lookup(ROOT_INO, "a").await.unwrap();
        assert!(a.is_dir);
        let b = fs.lookup(a.ino, "b.txt").await.unwrap();
        assert_eq!((b.is_dir, b.size), (false, 5));
        assert_eq!(
            fs.lookup(ROOT_INO, "a").await.unwrap().ino,
            a.ino,
            "stable inode"
        );
        assert!(
            fs.lookup(ROOT_INO, "dup").await.unwrap().is_dir,
            "directory wins"
        );
        assert!(matches!(
            fs.lookup(ROOT_INO, "nope").await,
            Err(FsError::NotFound)
        ));
        assert!(matches!(
            fs.lookup(ROOT_INO, "..").await,
            Err(FsError::NotFound)
        ));
        let dh = fs.opendir(ROOT_INO).await.unwrap();
        let names: Vec<String> = fs
            .readdir(dh, 0)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.name)
            .collect();
        assert_eq!(names, [".", "..", "a", "dup", "top"]);
        let rest: Vec<String> = fs
            .readdir(dh, 3)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.name)
            .collect();
        assert_eq!(rest, ["dup", "top"], "offsets are stable indexes");
        assert!(matches!(fs.open(b.ino, true).await, Err(FsError::ReadOnly)));
        assert!(matches!(fs.open(a.ino, false).await, Err(FsError::IsDir)));
        let fh = fs.open(b.ino, false).await.unwrap();
        assert_eq!(fs.read(fh, 1, 100).await.unwrap().as_slice(), b"ello");
        fs.release(fh);
        assert!(matches!(fs.read(fh, 0, 1).await, Err(FsError::BadHandle)));
        fs.forget(b.ino, 1);
        assert!(matches!(fs.getattr(b.ino).await, Err(FsError::Stale(_))));
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
    }

    /// Errors reach the errno mapping whole: the kind decides the errno and
    /// whether it is retried, and the source chain still names the cause.
    #[test]
    fn errors_keep_kind_and_source_down_to_the_errno() {
        use crate::gcs::AuthError;
        let auth = |transient| {
            GcsError::from(AuthError::Token {
                origin: "key file k.json".into(),
                detail: "invalid_grant".into(),
                transient,
            })
        };
        let chain = |e: &dyn std::error::Error| {
            let mut out = vec![e.to_string()];
            let mut cur = e.source();
            while let Some(s) = cur {
                out.push(s.to_string());
                cur = s.source();
            }
            out
        };
        // A permanent credentials failure: not retried, EACCES, whichever
        // layer hands it up.
        let permanent = auth(false);
        assert!(!permanent.is_retryable() && permanent.is_denied());
        for e in [
            FsError::from(permanent.clone()),
            FsError::from(ReadError::Gcs(permanent.clone())),
        ] {
            assert_eq!(e.errno(), libc::EACCES, "{e}");
            assert!(
                chain(&e).iter().any(|m| m.contains("invalid_grant")),
                "{:?}",
                chain(&e)
            );
        }
        // A transient one is retried; if retrying runs out of time, the last
        // failure is the source of the deadline error, and the errno is EIO.
        let transient = auth(true);
        assert!(transient.is_retryable() && !transient.is_denied());
        let deadline = GcsError::RetryDeadline {
            attempts: 3,
            secs: 1.0,
            last: Arc::new(transient),
        };
        assert!(!deadline.is_retryable());
        let e = FsError::from(ReadError::Gcs(deadline));
        assert_eq!(e.errno(), libc::EIO);
        let c = chain(&e);
        assert!(c.len() >= 3, "deadline -> credentials -> token: {c:?}");
        assert!(
            c.last().is_some_and(|m| m.contains("invalid_grant")),
            "{c:?}"
        );
        // Kinds of the layers below keep their errnos.
        let cases = [
            (FsError::from(GcsError::NotFound("x".into())), libc::ENOENT),
            (
                FsError::from(GcsError::PermissionDenied("x".into())),
                libc::EACCES,
            ),
            (
                FsError::from(ReadError::Gcs(GcsError::Unauthenticated("x".into()))),
                libc::EACCES,
            ),
            (
                FsError::from(ReadError::Gcs(GcsError::NotFound("gone".into()))),
                libc::ESTALE,
            ),
            (
                FsError::from(ReadError::Stale {
                    object: "o".into(),
                    generation: 1,
                }),
                libc::ESTALE,
            ),
            (FsError::from(GcsError::Unavailable("x".into())), libc::EIO),
            (FsError::Inconsistent("shrank".into()), libc::EIO),
        ];
        for (e, errno) in cases {
            assert_eq!(e.errno(), errno, "{e:?}");
        }
    }
}
