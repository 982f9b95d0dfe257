//! Directory listings: `opendir` lists a prefix (every page) into a snapshot
//! the handle reads from, names that cannot be POSIX path components are
//! skipped (once warned about), and each entry is interned in the inode
//! table. Listings may be reused for `list_ttl`, and feed prefetch across
//! files ([`super::order`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::inode::{Kind, Table};
use super::{order, Fs, FsError, ROOT_INO};
use crate::gcs::ObjectId;
use crate::sync::lock;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub is_dir: bool,
}

/// A directory's entries, as one open handle (or the listing cache) holds them.
pub(super) type Listing = Arc<Vec<DirEntry>>;

/// True for a valid POSIX path component.
pub(super) fn valid_component(name: &str) -> bool {
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
    /// Logs a skipped name, once per name for the life of the mount.
    pub(super) fn warn_once(&self, name: &str, why: &str) {
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
            t.complete.clear();
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

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dir_handles).remove(&fh);
    }
}
