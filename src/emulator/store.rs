//! The emulator's object store: a directory tree on the local filesystem.
//!
//! Every subdirectory of the root is a bucket; every regular file below a bucket
//! is an object named by its path relative to the bucket, joined with `/`.
//! Symlinks, sockets and other special files are ignored and never followed, and
//! no request name can reach outside its bucket (names with empty, `.` or `..`
//! segments are refused before any path is built).
//!
//! Generations: an object written through the emulator (BidiWriteObject) has a
//! generation record at `ROOT/.generations/BUCKET/OBJECT` ("GEN INO MTIME_NS
//! SIZE"): its generation number, given at creation and kept when the object is
//! finalized or moved, as the real service keeps it. The record holds while the
//! file is the same inode (and, once finalized, the same mtime and size: a file
//! rewritten in place by hand is a new version). Any other file's generation is a
//! hash of its identity and content version (device, inode, mtime, size), so it
//! is stable across emulator restarts and changes when the file is replaced or
//! rewritten. An object is *appendable* (unfinalized) while a marker file exists
//! at `ROOT/.appendable/BUCKET/OBJECT`; without a record its generation then
//! comes from the file's inode and the marker (not the file's mtime), so it stays
//! put while writers append, and its size follows the file as it grows.
//! Whole-object CRC32C checksums of finalized objects are computed once per
//! generation and cached.
//!
//! Data flow: the gRPC services resolve `(bucket, object)` here to an
//! [`ObjectMeta`] and an open [`std::fs::File`], then read chunks with `pread`.
//! Writes, deletes, moves and folders change the tree through [`mutate`], under
//! one lock so that a precondition and the change it guards are one step.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::EmuError;
use crate::names::{valid_bucket_name, valid_object_name};

mod mutate;
pub use mutate::{folder_path, FolderMeta, Preconditions, Written};

/// Name of the root-level directory that holds appendable-object markers.
pub const APPENDABLE_DIR: &str = ".appendable";

/// Name of the root-level directory that holds generation records.
pub const GENERATIONS_DIR: &str = ".generations";

/// Name of the root-level directory where new objects are staged.
pub const STAGING_DIR: &str = ".staging";

/// What the store knows of one object version.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub bucket: String,
    pub name: String,
    pub generation: i64,
    pub size: u64,
    pub finalized: bool,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Whole-object CRC32C, when known (finalized objects, after [`Store::checksum`]).
    pub crc32c: Option<u32>,
}

/// One entry of a sorted directory listing (cached per directory mtime).
#[derive(Debug, Clone)]
struct DirEntry {
    /// The entry's name, with a trailing `/` for directories, so that a plain
    /// byte-wise sort of keys is the lexicographic order of the object names below.
    key: String,
    is_dir: bool,
}

type DirCache = HashMap<PathBuf, (i64, i64, Arc<Vec<DirEntry>>)>;

/// The filesystem-backed store.
pub struct Store {
    root: PathBuf,
    crc_cache: Mutex<HashMap<(String, String, i64), u32>>,
    dir_cache: Mutex<DirCache>,
    /// Held by every change to the tree (see [`mutate`]).
    changing: Mutex<()>,
    /// The last generation number given out (see [`Store::next_generation`]).
    last_generation: std::sync::atomic::AtomicI64,
}

/// A page of a listing, in lexicographic order of names and prefixes.
#[derive(Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    pub prefixes: Vec<String>,
    /// The last name or prefix returned, when more may follow.
    pub next: Option<ListCursor>,
}

/// Where a listing resumes: strictly after an object name, or after every name
/// that starts with a collapsed prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListCursor {
    AfterName(String),
    AfterPrefix(String),
}

/// A listing request, already validated.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    pub prefix: String,
    pub delimiter: String,
    pub include_folders_as_prefixes: bool,
    pub start: String,
    pub end: String,
    pub cursor: Option<ListCursor>,
    pub page_size: usize,
}

/// Parses `projects/_/buckets/NAME` into NAME.
pub fn parse_bucket_resource(resource: &str) -> Result<&str, EmuError> {
    let name = resource
        .strip_prefix("projects/_/buckets/")
        .ok_or_else(|| {
            EmuError::InvalidArgument(format!(
                "Invalid bucket resource name '{resource}': expected projects/_/buckets/BUCKET"
            ))
        })?;
    if !valid_bucket_name(name) {
        return Err(EmuError::InvalidArgument(format!(
            "Invalid bucket name: '{name}'"
        )));
    }
    Ok(name)
}

/// Rejects object names GCS itself rejects (INVALID_ARGUMENT).
pub fn check_object_name(name: &str) -> Result<(), EmuError> {
    if !valid_object_name(name) {
        return Err(EmuError::InvalidArgument(format!(
            "Invalid object name: {name:?}"
        )));
    }
    Ok(())
}

/// True when a (valid) object name maps onto a file path in the bucket: no empty,
/// `.` or `..` segments, no NUL, segments of at most 255 bytes. Other names are legal
/// in GCS but cannot exist here, so lookups of them are NOT_FOUND.
fn representable(name: &str) -> bool {
    !name.contains('\0')
        && name
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && s.len() <= 255)
}

/// A stable 64-bit FNV-1a hash (std's hasher is not stable across releases).
fn fnv1a(words: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Maps a hash to a positive generation number (1 ..= 2^62).
fn to_generation(h: u64) -> i64 {
    ((h >> 2) as i64).max(1)
}

fn mtime_ns(md: &Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// A file's mtime as a `SystemTime`.
pub fn mtime_of(md: &Metadata) -> SystemTime {
    system_time(md.mtime(), md.mtime_nsec())
}

fn system_time(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH
    }
}

/// A generation record: the generation given to a file when the emulator
/// created it, with the file's identity (and, once finalized, its version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    generation: i64,
    ino: u64,
    mtime_ns: i64,
    size: u64,
}

impl Record {
    fn parse(text: &str) -> Option<Record> {
        let mut w = text.split_ascii_whitespace();
        let r = Record {
            generation: w.next()?.parse().ok()?,
            ino: w.next()?.parse().ok()?,
            mtime_ns: w.next()?.parse().ok()?,
            size: w.next()?.parse().ok()?,
        };
        w.next().is_none().then_some(r)
    }

    fn render(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.generation, self.ino, self.mtime_ns, self.size
        )
    }
}

impl Store {
    /// Opens a store over `root`, which must be a readable directory.
    pub fn new(root: &Path) -> Result<Store, EmuError> {
        let md = std::fs::metadata(root)
            .map_err(|e| EmuError::InvalidArgument(format!("--root {}: {e}", root.display())))?;
        if !md.is_dir() {
            return Err(EmuError::InvalidArgument(format!(
                "--root {}: not a directory",
                root.display()
            )));
        }
        std::fs::read_dir(root)
            .map_err(|e| EmuError::InvalidArgument(format!("--root {}: {e}", root.display())))?;
        Ok(Store {
            root: root.to_path_buf(),
            crc_cache: Mutex::new(HashMap::new()),
            dir_cache: Mutex::new(HashMap::new()),
            changing: Mutex::new(()),
            last_generation: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a bucket to its directory, or NOT_FOUND.
    pub fn bucket_dir(&self, bucket: &str) -> Result<PathBuf, EmuError> {
        if !valid_bucket_name(bucket) {
            return Err(EmuError::InvalidArgument(format!(
                "Invalid bucket name: '{bucket}'"
            )));
        }
        let dir = self.root.join(bucket);
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => Ok(dir),
            _ => Err(EmuError::NotFound(format!(
                "The specified bucket does not exist: {bucket}"
            ))),
        }
    }

    /// Creation time of a bucket (its directory's mtime stands in).
    pub fn bucket_time(&self, bucket: &str) -> Result<SystemTime, EmuError> {
        let md = std::fs::metadata(self.bucket_dir(bucket)?)?;
        Ok(system_time(md.mtime(), md.mtime_nsec()))
    }

    fn not_found(bucket: &str, name: &str) -> EmuError {
        EmuError::NotFound(format!("No such object: {bucket}/{name}"))
    }

    fn object_path(&self, bucket: &str, name: &str) -> Result<PathBuf, EmuError> {
        check_object_name(name)?;
        let dir = self.bucket_dir(bucket)?;
        if !representable(name) {
            return Err(Self::not_found(bucket, name));
        }
        Ok(dir.join(name))
    }

    fn marker_path(&self, bucket: &str, name: &str) -> PathBuf {
        self.root.join(APPENDABLE_DIR).join(bucket).join(name)
    }

    fn record_path(&self, bucket: &str, name: &str) -> PathBuf {
        self.root.join(GENERATIONS_DIR).join(bucket).join(name)
    }

    /// The generation record of an object written here, if it still holds for
    /// the file `md` describes (see the module doc).
    fn recorded_generation(
        &self,
        bucket: &str,
        name: &str,
        md: &Metadata,
        appendable: bool,
    ) -> Option<i64> {
        let text = std::fs::read_to_string(self.record_path(bucket, name)).ok()?;
        let r = Record::parse(&text)?;
        let same_file = r.ino == md.ino();
        let same_version = appendable || (r.mtime_ns == mtime_ns(md) && r.size == md.size());
        (same_file && same_version).then_some(r.generation)
    }

    /// Builds the metadata of an object from its file's metadata.
    fn meta_from(&self, bucket: &str, name: &str, md: &Metadata) -> ObjectMeta {
        let marker = std::fs::symlink_metadata(self.marker_path(bucket, name)).ok();
        let recorded = self.recorded_generation(bucket, name, md, marker.is_some());
        let (generation, finalized) = match &marker {
            Some(m) => (
                recorded.unwrap_or_else(|| {
                    to_generation(fnv1a(&[md.dev(), md.ino(), m.ino(), mtime_ns(m) as u64]))
                }),
                false,
            ),
            None => (
                recorded.unwrap_or_else(|| {
                    to_generation(fnv1a(&[md.dev(), md.ino(), mtime_ns(md) as u64, md.size()]))
                }),
                true,
            ),
        };
        let crc32c = if finalized {
            self.cached_crc(bucket, name, generation)
        } else {
            None
        };
        ObjectMeta {
            bucket: bucket.to_string(),
            name: name.to_string(),
            generation,
            size: md.size(),
            finalized,
            mtime: system_time(md.mtime(), md.mtime_nsec()),
            ctime: match marker {
                Some(m) => system_time(m.mtime(), m.mtime_nsec()),
                None => system_time(md.mtime(), md.mtime_nsec()),
            },
            crc32c,
        }
    }

    fn cached_crc(&self, bucket: &str, name: &str, generation: i64) -> Option<u32> {
        let key = (bucket.to_string(), name.to_string(), generation);
        self.crc_cache.lock().ok()?.get(&key).copied()
    }

    /// Looks an object up. `generation` 0 means the live one; another generation
    /// that is not the live one is NOT_FOUND (the emulator keeps no old versions).
    pub fn stat(&self, bucket: &str, name: &str, generation: i64) -> Result<ObjectMeta, EmuError> {
        let path = self.object_path(bucket, name)?;
        let md = match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() => md,
            _ => return Err(Self::not_found(bucket, name)),
        };
        let meta = self.meta_from(bucket, name, &md);
        if generation != 0 && generation != meta.generation {
            return Err(EmuError::NotFound(format!(
                "No such object: {bucket}/{name}#{generation}"
            )));
        }
        Ok(meta)
    }

    /// Opens an object for reading, pinned to `generation` (0: the live one).
    /// The returned file keeps serving this version even if the path is replaced.
    pub fn open(
        &self,
        bucket: &str,
        name: &str,
        generation: i64,
    ) -> Result<(ObjectMeta, File), EmuError> {
        self.open_as(bucket, name, generation, File::options().read(true))
    }

    /// [`Store::open`] with these open options (writers open for writing too).
    fn open_as(
        &self,
        bucket: &str,
        name: &str,
        generation: i64,
        how: &std::fs::OpenOptions,
    ) -> Result<(ObjectMeta, File), EmuError> {
        let path = self.object_path(bucket, name)?;
        let file = how.open(&path).map_err(|_| Self::not_found(bucket, name))?;
        let md = file.metadata()?;
        if !md.is_file() {
            return Err(Self::not_found(bucket, name));
        }
        let meta = self.meta_from(bucket, name, &md);
        if generation != 0 && generation != meta.generation {
            return Err(EmuError::NotFound(format!(
                "No such object: {bucket}/{name}#{generation}"
            )));
        }
        Ok((meta, file))
    }

    /// Fills in the whole-object CRC32C of a finalized object, computing it once
    /// per generation (a blocking read of the whole file: call off the reactor).
    pub fn checksum(&self, meta: &mut ObjectMeta, file: &File) -> Result<(), EmuError> {
        if !meta.finalized || meta.crc32c.is_some() {
            return Ok(());
        }
        let mut crc = 0u32;
        // A buffer kept per thread (the blocking pool's threads are reused),
        // grown to the largest object seen up to 4 MiB: a fresh zeroed buffer
        // per object cost a small file's first open 40% of the emulator's
        // cycles, and a 4 MiB object's first open ~3 ms of page faults.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let want_len = usize::try_from(meta.size)
            .unwrap_or(usize::MAX)
            .clamp(1, 4 << 20);
        BUF.with(|b| -> Result<(), EmuError> {
            let mut buf = b.borrow_mut();
            if buf.len() < want_len {
                buf.resize(want_len, 0);
            }
            let mut off = 0u64;
            while off < meta.size {
                let want = buf.len().min((meta.size - off) as usize);
                let n = file.read_at(&mut buf[..want], off)?;
                if n == 0 {
                    // The file shrank: this generation is gone.
                    return Err(Self::not_found(&meta.bucket, &meta.name));
                }
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                off += n as u64;
            }
            Ok(())
        })?;
        // Cache only if the file is still the same version.
        let md = file.metadata()?;
        if self.meta_from(&meta.bucket, &meta.name, &md).generation == meta.generation {
            if let Ok(mut cache) = self.crc_cache.lock() {
                if cache.len() > 1_000_000 {
                    cache.clear();
                }
                cache.insert(
                    (meta.bucket.clone(), meta.name.clone(), meta.generation),
                    crc,
                );
            }
        }
        meta.crc32c = Some(crc);
        Ok(())
    }

    /// The sorted entries of a directory, cached while its mtime is unchanged.
    fn dir_entries(&self, dir: &Path) -> Result<Arc<Vec<DirEntry>>, EmuError> {
        let md = std::fs::symlink_metadata(dir)?;
        let stamp = (md.mtime(), md.mtime_nsec());
        if let Ok(cache) = self.dir_cache.lock() {
            if let Some((s, ns, entries)) = cache.get(dir) {
                if (*s, *ns) == stamp {
                    return Ok(entries.clone());
                }
            }
        }
        let mut entries = Vec::new();
        for ent in std::fs::read_dir(dir)? {
            let ent = ent?;
            let ft = ent.file_type()?;
            let Ok(name) = ent.file_name().into_string() else {
                tracing::warn!(dir = %dir.display(), "skipping a file name that is not UTF-8");
                continue;
            };
            if ft.is_dir() {
                entries.push(DirEntry {
                    key: format!("{name}/"),
                    is_dir: true,
                });
            } else if ft.is_file() {
                entries.push(DirEntry {
                    key: name,
                    is_dir: false,
                });
            }
        }
        entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let entries = Arc::new(entries);
        if let Ok(mut cache) = self.dir_cache.lock() {
            if cache.len() > 100_000 {
                cache.clear();
            }
            cache.insert(dir.to_path_buf(), (stamp.0, stamp.1, entries.clone()));
        }
        Ok(entries)
    }

    /// Lists a bucket: objects and collapsed prefixes in lexicographic order,
    /// at most `q.page_size` of them together, resuming after `q.cursor`.
    pub fn list(&self, bucket: &str, q: &ListQuery) -> Result<ListPage, EmuError> {
        let dir = self.bucket_dir(bucket)?;
        let mut walk = Walk {
            store: self,
            bucket,
            q,
            skip_prefix: match &q.cursor {
                Some(ListCursor::AfterPrefix(p)) => Some(p.clone()),
                _ => None,
            },
            after: match &q.cursor {
                Some(ListCursor::AfterName(n) | ListCursor::AfterPrefix(n)) => Some(n.clone()),
                None => None,
            },
            page: ListPage::default(),
            full: false,
        };
        walk.dir(&dir, "")?;
        let mut page = walk.page;
        if !walk.full {
            page.next = None;
        }
        Ok(page)
    }
}

/// A depth-first walk over a bucket in name order, pruning subtrees the query
/// excludes, collapsing names at the delimiter.
struct Walk<'a> {
    store: &'a Store,
    bucket: &'a str,
    q: &'a ListQuery,
    /// Names starting with this were already returned as a collapsed prefix.
    skip_prefix: Option<String>,
    /// Only names strictly after this one.
    after: Option<String>,
    page: ListPage,
    /// The page is full: stop at the next candidate.
    full: bool,
}

impl Walk<'_> {
    /// Can a directory whose names all start with `d` hold a name we return?
    fn dir_wanted(&self, d: &str) -> bool {
        let q = self.q;
        (d.starts_with(&q.prefix) || q.prefix.starts_with(d))
            && (q.start.is_empty() || d >= q.start.as_str() || q.start.starts_with(d))
            && (q.end.is_empty() || d < q.end.as_str())
            && self
                .after
                .as_deref()
                .is_none_or(|a| d >= a || a.starts_with(d))
            && self
                .skip_prefix
                .as_deref()
                .is_none_or(|p| !d.starts_with(p))
    }

    fn name_wanted(&self, n: &str) -> bool {
        let q = self.q;
        n.starts_with(&q.prefix)
            && n >= q.start.as_str()
            && (q.end.is_empty() || n < q.end.as_str())
            && self.after.as_deref().is_none_or(|a| n > a)
            && self
                .skip_prefix
                .as_deref()
                .is_none_or(|p| !n.starts_with(p))
    }

    /// The collapsed prefix of a name or directory path, if the delimiter occurs
    /// after the query prefix.
    fn collapse(&self, n: &str) -> Option<String> {
        let q = self.q;
        if q.delimiter.is_empty() || n.len() <= q.prefix.len() {
            return None;
        }
        let rest = &n[q.prefix.len()..];
        rest.find(q.delimiter.as_str())
            .map(|i| n[..q.prefix.len() + i + q.delimiter.len()].to_string())
    }

    /// Adds an item; returns false once the page is full (the walk stops).
    fn push(&mut self, item: ListCursor, meta: Option<ObjectMeta>) -> bool {
        if self.page.objects.len() + self.page.prefixes.len() >= self.q.page_size {
            self.full = true;
            return false;
        }
        match &item {
            ListCursor::AfterName(_) => {
                if let Some(m) = meta {
                    self.page.objects.push(m);
                }
            }
            ListCursor::AfterPrefix(p) => {
                self.page.prefixes.push(p.clone());
                self.skip_prefix = Some(p.clone());
            }
        }
        self.page.next = Some(item);
        true
    }

    /// Walks directory `path` whose object names start with `base` ("" or "a/b/").
    /// Returns false when the walk must stop.
    fn dir(&mut self, path: &Path, base: &str) -> Result<bool, EmuError> {
        let entries = self.store.dir_entries(path)?;
        // Seek: skip entries wholly before the lower bound.
        let lower = [
            Some(self.q.prefix.as_str()),
            Some(self.q.start.as_str()),
            self.after.as_deref(),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or("")
        .to_string();
        let first = entries.partition_point(|e| {
            let full = format!("{base}{}", e.key);
            full.as_str() < lower.as_str() && !(e.is_dir && lower.starts_with(&full))
        });
        for e in &entries[first..] {
            let full = format!("{base}{}", e.key);
            if !self.q.end.is_empty() && full.as_str() >= self.q.end.as_str() {
                return Ok(false);
            }
            if e.is_dir {
                if !self.dir_wanted(&full) {
                    continue;
                }
                if self.q.include_folders_as_prefixes {
                    if let Some(p) = self.collapse(&full) {
                        if p == full && self.name_wanted(&p) {
                            if !self.push(ListCursor::AfterPrefix(p), None) {
                                return Ok(false);
                            }
                            continue;
                        }
                    }
                }
                if !self.dir(&path.join(&e.key[..e.key.len() - 1]), &full)? {
                    return Ok(false);
                }
            } else {
                if !self.name_wanted(&full) {
                    continue;
                }
                if let Some(p) = self.collapse(&full) {
                    let covers_dir = base.starts_with(&p);
                    if !self.push(ListCursor::AfterPrefix(p), None) {
                        return Ok(false);
                    }
                    if covers_dir {
                        // The rest of this directory is inside the prefix just returned.
                        return Ok(true);
                    }
                    continue;
                }
                let md = match std::fs::symlink_metadata(path.join(&e.key)) {
                    Ok(md) if md.is_file() => md,
                    _ => continue, // removed since the directory was read
                };
                let meta = self.store.meta_from(self.bucket, &full, &md);
                if !self.push(ListCursor::AfterName(full), Some(meta)) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

pub use crate::fileio::{pread_bytes, read_exact_at};

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        for f in files {
            let p = tmp.path().join("bkt").join(f);
            if let Some(stripped) = f.strip_suffix('/') {
                std::fs::create_dir_all(tmp.path().join("bkt").join(stripped)).unwrap();
                continue;
            }
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f.as_bytes()).unwrap();
        }
        std::fs::create_dir_all(tmp.path().join("bkt")).unwrap();
        let store = Store::new(tmp.path()).unwrap();
        (tmp, store)
    }

    fn all(store: &Store, mut q: ListQuery, page: usize) -> (Vec<String>, Vec<String>) {
        q.page_size = page;
        let (mut objs, mut prefixes) = (vec![], vec![]);
        for _ in 0..10_000 {
            let p = store.list("bkt", &q).unwrap();
            objs.extend(p.objects.into_iter().map(|o| o.name));
            prefixes.extend(p.prefixes);
            match p.next {
                Some(c) => q.cursor = Some(c),
                None => return (objs, prefixes),
            }
        }
        panic!("listing did not end after 10,000 pages");
    }

    #[test]
    fn bucket_names() {
        assert!(valid_bucket_name("my-bucket_1"));
        assert!(!valid_bucket_name("ab"));
        assert!(!valid_bucket_name("-abc"));
        assert!(!valid_bucket_name("ABC"));
        assert!(!valid_bucket_name(".appendable"));
        assert!(parse_bucket_resource("projects/_/buckets/abc").is_ok());
        assert!(parse_bucket_resource("buckets/abc").is_err());
    }

    #[test]
    fn names_that_cannot_escape() {
        let (_t, s) = tree(&["a/b"]);
        for bad in [
            "../x",
            "a/../../etc/passwd",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "a/",
        ] {
            assert!(
                matches!(s.stat("bkt", bad, 0), Err(EmuError::NotFound(_))),
                "{bad}"
            );
        }
        for bad in ["", ".", "..", "a\nb"] {
            assert!(
                matches!(s.stat("bkt", bad, 0), Err(EmuError::InvalidArgument(_))),
                "{bad}"
            );
        }
        assert_eq!(s.stat("bkt", "a/b", 0).unwrap().size, 3);
    }

    #[test]
    fn listing_order_and_collapse() {
        let (_t, s) = tree(&["a.txt", "a/b", "a/c/d", "a0", "b", "empty/", "x/y/z"]);
        let (o, p) = all(&s, ListQuery::default(), 1000);
        assert_eq!(o, ["a.txt", "a/b", "a/c/d", "a0", "b", "x/y/z"]);
        assert!(p.is_empty());
        let q = ListQuery {
            delimiter: "/".into(),
            ..Default::default()
        };
        let (o, p) = all(&s, q.clone(), 1000);
        assert_eq!(o, ["a.txt", "a0", "b"]);
        assert_eq!(p, ["a/", "x/"]);
        let (o2, p2) = all(&s, q.clone(), 1);
        assert_eq!((o2, p2), (o, p));
        let q = ListQuery {
            delimiter: "/".into(),
            include_folders_as_prefixes: true,
            ..Default::default()
        };
        let (_, p) = all(&s, q, 2);
        assert_eq!(p, ["a/", "empty/", "x/"]);
        let q = ListQuery {
            delimiter: "/".into(),
            prefix: "a/".into(),
            ..Default::default()
        };
        let (o, p) = all(&s, q, 1);
        assert_eq!((o, p), (vec!["a/b".to_string()], vec!["a/c/".to_string()]));
        let q = ListQuery {
            start: "a/c".into(),
            end: "b".into(),
            ..Default::default()
        };
        let (o, _) = all(&s, q, 1);
        assert_eq!(o, ["a/c/d", "a0"]);
    }

    #[test]
    fn generation_changes_on_rewrite_not_on_append() {
        let (t, s) = tree(&["f"]);
        let g1 = s.stat("bkt", "f", 0).unwrap().generation;
        let p = t.path().join("bkt/f");
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"new content").unwrap();
        let m = s.stat("bkt", "f", 0).unwrap();
        assert_ne!(m.generation, g1);
        assert!(m.finalized);
        assert!(matches!(s.stat("bkt", "f", g1), Err(EmuError::NotFound(_))));
        // Mark appendable; appends keep the generation and grow the size.
        let marker = t.path().join(APPENDABLE_DIR).join("bkt/f");
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(&marker, b"").unwrap();
        let a = s.stat("bkt", "f", 0).unwrap();
        assert!(!a.finalized);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b"more").unwrap();
        let b = s.stat("bkt", "f", 0).unwrap();
        assert_eq!(b.generation, a.generation);
        assert_eq!(b.size, a.size + 4);
    }

    #[test]
    fn checksum_is_cached() {
        let (_t, s) = tree(&["f"]);
        let (mut m, f) = s.open("bkt", "f", 0).unwrap();
        s.checksum(&mut m, &f).unwrap();
        assert_eq!(m.crc32c, Some(crc32c::crc32c(b"f")));
        assert_eq!(
            s.stat("bkt", "f", 0).unwrap().crc32c,
            Some(crc32c::crc32c(b"f"))
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// Paths of 1-3 segments over a small alphabet that provokes ordering
        /// corner cases ('.' < '/' < '0' < 'a').
        fn paths() -> impl Strategy<Value = Vec<String>> {
            let seg = proptest::string::string_regex("[a.0-]{1,3}").unwrap();
            proptest::collection::vec(proptest::collection::vec(seg, 1..4), 1..40).prop_map(|v| {
                let mut names: Vec<String> = v
                    .into_iter()
                    .filter(|segs| segs.iter().all(|s| s != "." && s != ".."))
                    .map(|segs| segs.join("/"))
                    .collect();
                names.sort();
                names.dedup();
                // A name cannot be both a file and a directory.
                let all = names.clone();
                names.retain(|n| !all.iter().any(|m| m.starts_with(&format!("{n}/"))));
                names
            })
        }

        fn reference(names: &[String], q: &ListQuery) -> (Vec<String>, Vec<String>) {
            let (mut objs, mut prefixes) = (vec![], Vec::<String>::new());
            for n in names {
                if !n.starts_with(&q.prefix)
                    || n.as_str() < q.start.as_str()
                    || (!q.end.is_empty() && n.as_str() >= q.end.as_str())
                {
                    continue;
                }
                let rest = &n[q.prefix.len()..];
                match (!q.delimiter.is_empty())
                    .then(|| rest.find(q.delimiter.as_str()))
                    .flatten()
                {
                    Some(i) => {
                        let p = n[..q.prefix.len() + i + q.delimiter.len()].to_string();
                        if prefixes.last() != Some(&p) {
                            prefixes.push(p);
                        }
                    }
                    None => objs.push(n.clone()),
                }
            }
            (objs, prefixes)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(64)))]
            #[test]
            fn paged_listing_matches_reference(
                names in paths(),
                prefix in "[a.0/-]{0,3}",
                slash in any::<bool>(),
                start in "[a.0/-]{0,2}",
                end in "[a.0/-]{0,2}",
                page in 1usize..6,
            ) {
                let tmp = tempfile::tempdir().unwrap();
                for n in &names {
                    let p = tmp.path().join("bkt").join(n);
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(&p, b"x").unwrap();
                }
                std::fs::create_dir_all(tmp.path().join("bkt")).unwrap();
                let store = Store::new(tmp.path()).unwrap();
                let q = ListQuery {
                    prefix,
                    delimiter: if slash { "/".into() } else { String::new() },
                    start,
                    end,
                    ..Default::default()
                };
                let got = all(&store, q.clone(), page);
                prop_assert_eq!(got, reference(&names, &q));
            }
        }
    }
}
