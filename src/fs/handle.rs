//! Open files: `open` pins an object generation and size in a handle and
//! starts fetching a small object (or hands the kernel a memory file to read
//! through passthrough); `read` goes to the [`ReadEngine`], the only read
//! path, first refreshing an appendable object's size when a read reaches
//! past it; `release` of an inode's last handle lets the engine give its
//! blocks back.
//!
//! [`ReadEngine`]: crate::read::ReadEngine

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::inode::Kind;
use super::{Fs, FsError};
use crate::gcs::ObjectId;
use crate::read::cache::Slot;
use crate::read::ReadData;
use crate::sync::lock;

/// An open file: its inode, and what the handle does with it.
#[derive(Clone)]
pub struct Handle {
    pub ino: u64,
    pub io: Io,
}

/// What an open handle does with its file: it reads (a pinned object
/// version), or it writes (an upload, see [`super::write`]).
#[derive(Clone)]
pub enum Io {
    Read(ReadHandle),
    Write(super::write::WriteHandle),
}

/// A read handle: the object version it reads.
#[derive(Clone)]
pub struct ReadHandle {
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

impl Fs {
    /// Opens a file for reading, pinning its current generation. ESTALE when
    /// the object has a new generation: the inode stands for the old one, and
    /// the kernel then looks the name up again (and finds the new inode).
    pub async fn open(&self, ino: u64, write: bool) -> Result<u64, FsError> {
        self.open_file(ino, write, false).await.map(|o| o.fh)
    }

    /// [`Fs::open`], and for a small finalized object when FUSE passthrough
    /// is on, its whole bytes in a memory file for the kernel to serve (an
    /// inode once opened the normal way stays on the normal path: the kernel
    /// refuses cached and passthrough opens of one inode at once).
    /// `write`: for writing (see [`super::write`]); `truncate`: to a new empty
    /// generation.
    pub async fn open_file(
        &self,
        ino: u64,
        write: bool,
        truncate: bool,
    ) -> Result<Opened, FsError> {
        if write {
            let fh = self.open_write(ino, truncate).await?;
            return Ok(Opened {
                fh,
                passthrough: None,
            });
        }
        let kind_now = || {
            lock(&self.table)
                .nodes
                .get(&ino)
                .map(|n| n.kind.clone())
                .ok_or_else(|| FsError::Stale(format!("inode {ino}")))
        };
        let mut kind = kind_now()?;
        if let Kind::File(info, _) = &kind {
            if super::inode::pending_create(info) {
                // Created here, not made by the service yet: wait for it,
                // then read the version it made.
                self.settle_create(&info.name).await;
                kind = kind_now()?;
            }
        }
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
        self.engine.start_small(&object, info.size, info.finalized);
        self.prefetch_after(ino);
        // Without passthrough nothing needs tracking: every open is normal.
        let tracking = self.engine.whole_files();
        let passthrough = if !tracking || lock(&self.normal_opens).contains(&ino) {
            None
        } else {
            self.engine
                .whole_file(&object, info.size, info.finalized)
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
                io: Io::Read(ReadHandle {
                    object,
                    size: info.size,
                    finalized: info.finalized,
                    backing: passthrough.clone(),
                }),
            },
        );
        Ok(Opened { fh, passthrough })
    }

    /// Prefetch across files: file `ino` was opened; if its directory's files
    /// are being opened in listing order, the next ones start loading whole
    /// (within the memory budget, never evicting anything for them).
    pub(super) fn prefetch_after(&self, ino: u64) {
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
            if !self.engine.prefetch_file(&f.object, f.size, f.finalized) {
                break;
            }
        }
    }

    /// Reads through the read engine, the only read path.
    pub async fn read(&self, fh: u64, offset: u64, len: u32) -> Result<ReadData, FsError> {
        let (ino, io) = lock(&self.handles)
            .get(&fh)
            .map(|h| (h.ino, h.io.clone()))
            .ok_or(FsError::BadHandle)?;
        let mut h = match io {
            Io::Read(h) => h,
            Io::Write(w) => return self.read_written(&w, offset, len).await,
        };
        let mut fresh = false;
        if !h.finalized && offset.saturating_add(u64::from(len)) > h.size {
            h = self.refresh_appendable(fh, ino, h).await?;
            fresh = true;
        }
        // A size just refreshed needs no second look from the engine.
        Ok(self
            .engine
            .read(
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
    pub(super) async fn refresh_appendable(
        &self,
        fh: u64,
        ino: u64,
        mut h: ReadHandle,
    ) -> Result<ReadHandle, FsError> {
        let info = self.engine.grown(&h.object, h.size).await?;
        h.size = info.size;
        h.finalized = info.finalized;
        if let Some(Io::Read(stored)) = lock(&self.handles).get_mut(&fh).map(|s| &mut s.io) {
            stored.size = h.size;
            stored.finalized = h.finalized;
        }
        if let Some(n) = lock(&self.table).nodes.get_mut(&ino) {
            if let Kind::File(old, _) = &n.kind {
                if old.generation == info.generation && old.size <= info.size {
                    n.kind = Kind::File(info, Instant::now());
                }
            }
        }
        Ok(h)
    }

    /// Closes a file handle. When it was the object's last one, the read
    /// engine lets go of the blocks that were read through (see
    /// [`ReadEngine::closed`]).
    /// A write handle's upload is returned, for the caller to end
    /// ([`Fs::finish_write`], async).
    pub fn release(&self, fh: u64) -> Option<super::write::WriteHandle> {
        let last_of = {
            let mut handles = lock(&self.handles);
            match handles.remove(&fh).map(|h| h.io) {
                Some(Io::Read(r)) => {
                    let open = handles
                        .values()
                        .any(|o| matches!(&o.io, Io::Read(other) if other.object == r.object));
                    (!open).then_some(r.object)
                }
                Some(Io::Write(w)) => return Some(w),
                None => None,
            }
        };
        if let Some(object) = last_of {
            self.engine.closed(&object);
        }
        None
    }
}
