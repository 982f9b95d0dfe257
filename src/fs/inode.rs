//! The inode table: which inode stands for which directory prefix or object
//! generation, lookups (the kernel's references), attributes, and forgetting.
//!
//! A lookup first asks the table (a name seen in a recent listing or lookup
//! needs no round trip), else the service: a listing of `name/` and a stat of
//! `name` at once, a directory winning over a file. Missing names are
//! remembered for `negative_ttl`. An inode stands for one object generation;
//! a new generation under a path gets a new inode (see the module doc of
//! [`super`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use super::dir::valid_component;
use super::{Fs, FsError, ROOT_INO};
use crate::gcs::{GcsError, ObjectId, ObjectInfo};
use crate::sync::lock;

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
    /// For a finalized object (whose generation never changes): until when
    /// this mount trusts its metadata (fetched + `--metadata-ttl`), so the
    /// kernel may cache the entry and attributes that long. None for
    /// directories and appendable objects (they change under one name).
    pub fresh_until: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(super) enum Kind {
    /// The prefix of the directory ("" for the root, else "a/b/").
    Dir(String),
    /// The object and when its metadata was fetched.
    File(ObjectInfo, Instant),
}

#[derive(Debug)]
pub(super) struct Node {
    pub(super) parent: u64,
    pub(super) kind: Kind,
    pub(super) lookups: u64,
}

#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) nodes: HashMap<u64, Node>,
    pub(super) by_path: HashMap<String, u64>,
    pub(super) negative: HashMap<String, Instant>,
    /// Directories (prefixes, with their `/`) whose every entry this mount
    /// knows, and since when: those it made itself (mkdir), with what it
    /// created in them since. Within `negative_ttl` a name in one that is not
    /// in `by_path` is missing without asking (a program creating many files
    /// in a new directory pays no lookup round trips). Dropped when an entry
    /// may have left `by_path` without leaving the bucket (forget, trimming)
    /// or arrived without entering it (rename).
    pub(super) complete: HashMap<String, Instant>,
}

/// A file this mount created whose object the service has not made yet
/// (its create was answered at once, `fs::write`): this mount knows it
/// better than the service does, whatever the metadata TTL.
pub(super) fn pending_create(info: &ObjectInfo) -> bool {
    info.generation == 0
}

impl Fs {
    pub(super) fn attr_of(&self, ino: u64, kind: &Kind) -> Attr {
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
                fresh_until: None,
            },
            Kind::File(info, fetched) => Attr {
                ino,
                is_dir: false,
                size: info.size,
                mtime: info.update_time,
                ctime: info.update_time,
                mode: self.cfg.file_mode,
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                nlink: 1,
                fresh_until: (info.finalized && !pending_create(info))
                    .then(|| *fetched + self.cfg.metadata_ttl),
            },
        }
    }

    /// Records a node under its path (reusing the inode it already has, unless
    /// the type or the object's generation changed).
    pub(super) fn intern(
        &self,
        table: &mut Table,
        parent: u64,
        path: &str,
        kind: Kind,
        lookup: bool,
    ) -> u64 {
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

    pub(super) fn dir_prefix(&self, ino: u64) -> Result<String, FsError> {
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
                    Kind::File(info, fetched) => {
                        pending_create(info) || fetched.elapsed() < self.cfg.metadata_ttl
                    }
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
            let whole = t
                .complete
                .get(&prefix)
                .is_some_and(|since| since.elapsed() < self.cfg.negative_ttl);
            if whole && !t.by_path.contains_key(&path) && !t.by_path.contains_key(&dir_path) {
                return Err(FsError::NotFound);
            }
        }
        // A directory wins over a file of the same name. A file's first
        // bytes come with its metadata (one round trip), for the read that
        // usually follows the lookup of a name not listed.
        let (as_dir, as_file) = tokio::join!(
            self.client.list(&dir_path, None),
            self.engine.stat_with_head(&path)
        );
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
        // Neither a file nor a directory with contents: perhaps an empty folder.
        let is_dir = is_dir
            || (matches!(as_file, Err(GcsError::NotFound(_))) && self.empty_folder(&path).await?);
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

    /// Is `path/` an empty folder (one with nothing below it, which a listing
    /// of `path/` does not show)? Asked of the service (GetFolder) only for
    /// names found neither as a file nor as a directory with contents.
    async fn empty_folder(&self, path: &str) -> Result<bool, FsError> {
        match self.client.folder_exists(&format!("{path}/")).await {
            Ok(found) => Ok(found),
            Err(GcsError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The attributes of an inode, refreshing file metadata past its TTL.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let kind = lock(&self.table)
            .nodes
            .get(&ino)
            .map(|n| n.kind.clone())
            .ok_or_else(|| FsError::Stale(format!("inode {ino}")))?;
        if let Kind::File(info, fetched) = &kind {
            if fetched.elapsed() >= self.cfg.metadata_ttl && !pending_create(info) {
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
    pub(super) fn refreshed(&self, ino: u64, old: &ObjectInfo, fresh: ObjectInfo) -> Kind {
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
            let mut object = None;
            if let Some(node) = t.nodes.remove(&ino) {
                if let Some(Kind::Dir(parent)) = t.nodes.get(&node.parent).map(|p| p.kind.clone()) {
                    t.complete.remove(&parent);
                }
                let key = match node.kind {
                    Kind::Dir(p) => p,
                    Kind::File(info, _) => {
                        object = Some(ObjectId {
                            name: info.name.clone(),
                            generation: info.generation,
                        });
                        info.name
                    }
                };
                if t.by_path.get(&key) == Some(&ino) {
                    t.by_path.remove(&key);
                }
                // The engine caches by object: keep it while another inode
                // (the path's current one) stands for the same version.
                let shared = t.by_path.get(&key).and_then(|i| t.nodes.get(i)).is_some_and(
                    |n| matches!((&n.kind, &object), (Kind::File(i, _), Some(o)) if i.generation == o.generation),
                );
                if shared {
                    object = None;
                }
            }
            drop(t);
            if let Some(object) = object {
                self.engine.forget(&object);
            }
        }
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
}
