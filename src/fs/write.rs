//! Writes through the mount: files created (or truncated) are streamed to the
//! bucket as new appendable objects, appends at the end of an unfinalized
//! object take it over, and unlink, mkdir, rmdir and rename change the
//! namespace.
//!
//! Data flow of a write: `write(2)`s land in the handle's [`WriteState`],
//! gathered into pieces of [`PIECE`] bytes, each handed to the object's
//! writer (`gcs::ObjectWrite`), which streams it in checksummed chunks and
//! holds it until the service says it is persisted. `fsync` and `close` (the
//! kernel's flush) push what is gathered and persist everything: another
//! mount then sees the new size and bytes. `close` leaves the object
//! unfinalized (appendable), as gcsfuse does on zonal buckets;
//! `--finalize-on-close` finalizes it. The file's inode follows the writes:
//! its size is what was written, and a truncating open or a create makes it
//! stand for the new generation.
//!
//! Not done yet (EOPNOTSUPP, with the reason): writing anywhere but at the
//! end (seeking back, holes), rewriting a finalized object in place, and
//! resizing to other than 0 or the current size; the staged fallback will
//! take those.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;

use super::inode::Kind;
use super::{Attr, Fs, FsError, Handle, Io};
use crate::gcs::{GcsError, ObjectId, ObjectInfo, ObjectWrite};
use crate::memory::Budget;
use crate::read::ReadData;
use crate::sync::lock;

/// Bytes of `write(2)`s gathered before they go to the writer (which sends
/// them as 2 MiB chunks, slices of the piece). Writes that fit in the piece
/// being gathered are copied straight into it on the FUSE loop thread
/// ([`Fs::write_now`]); only the write that fills a piece waits for it to go.
pub const PIECE: usize = 8 << 20;

/// What writes through the mount did, for the metrics.
#[derive(Debug, Default)]
pub struct WriteStats {
    /// Bytes programs wrote.
    pub bytes: AtomicU64,
    /// Flushes (fsync, close) that persisted a handle's bytes.
    pub flushes: AtomicU64,
    /// Unfinalized objects taken over to append to them.
    pub takeovers: AtomicU64,
    /// New object generations made (creates, truncations).
    pub objects_created: AtomicU64,
    /// Writes refused as not streamable (what the staged fallback will take).
    pub unsupported: AtomicU64,
}

fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A handle open for writing.
#[derive(Clone)]
pub struct WriteHandle {
    pub state: Arc<tokio::sync::Mutex<WriteState>>,
}

/// What a write handle knows and holds.
pub struct WriteState {
    name: String,
    /// The object's writer: None until the first write of a handle opened on
    /// an existing object (which then takes the object over), and once the
    /// object is finalized.
    writer: Option<Box<dyn ObjectWrite>>,
    /// The object as the handle opened it.
    base: ObjectInfo,
    /// Where the next byte goes: the file's size as written here.
    size: u64,
    /// Bytes written and not handed to the writer yet (no buffer until the
    /// first byte of a piece comes).
    pending: BytesMut,
    /// The upload failed: later writes and flushes say so.
    failed: Option<String>,
    /// The mount's memory budget, shared with the read cache: the piece
    /// being gathered and the pieces the writer holds until they are
    /// persisted count in it.
    budget: Arc<Budget>,
    /// Bytes of `budget` this handle holds for its piece being gathered.
    gathering: u64,
    /// Pieces handed to the writer and not yet known persisted: where each
    /// ends in the object, and the bytes of `budget` it holds.
    held: VecDeque<(u64, u64)>,
}

impl Drop for WriteState {
    fn drop(&mut self) {
        let held: u64 = self.held.iter().map(|(_, n)| n).sum();
        self.budget.release(self.gathering + held);
    }
}

impl WriteState {
    fn new(
        base: ObjectInfo,
        writer: Option<Box<dyn ObjectWrite>>,
        budget: Arc<Budget>,
    ) -> WriteState {
        WriteState {
            name: base.name.clone(),
            size: base.size,
            writer,
            base,
            pending: BytesMut::new(),
            failed: None,
            budget,
            gathering: 0,
            held: VecDeque::new(),
        }
    }

    /// A buffer for the next piece, if the budget has room for it now.
    fn start_piece(&mut self) -> bool {
        if self.gathering > 0 {
            return true;
        }
        if !self.budget.try_reserve(PIECE as u64) {
            return false;
        }
        self.gathering = PIECE as u64;
        self.pending = BytesMut::with_capacity(PIECE);
        true
    }

    /// A buffer for the next piece. When the budget is full (readers and
    /// writers hold it all), this writer first persists what it holds and
    /// lets go of it, then takes the piece even if that goes one piece over:
    /// a slow service slows the writer down, and its memory stays bounded.
    async fn ensure_piece(&mut self) -> Result<(), FsError> {
        if self.start_piece() {
            return Ok(());
        }
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.flush().await {
                return Err(self.fail(&e));
            }
        }
        self.release_persisted();
        if !self.start_piece() {
            self.budget.take(PIECE as u64);
            self.gathering = PIECE as u64;
            self.pending = BytesMut::with_capacity(PIECE);
        }
        Ok(())
    }

    /// Gives back the budget of pieces the service has persisted.
    fn release_persisted(&mut self) {
        let persisted = self.writer.as_ref().map_or(u64::MAX, |w| w.persisted());
        while let Some(&(end, n)) = self.held.front() {
            if end > persisted {
                break;
            }
            self.held.pop_front();
            self.budget.release(n);
        }
    }

    /// The first failure of the upload, kept: the handle is done.
    fn fail(&mut self, e: &GcsError) -> FsError {
        let msg = format!("{}: {e}", self.name);
        tracing::warn!(object = %self.name, error = %e, "a write through the mount failed");
        self.failed = Some(msg.clone());
        FsError::WriteFailed(msg)
    }

    fn check(&self) -> Result<(), FsError> {
        match &self.failed {
            Some(m) => Err(FsError::WriteFailed(m.clone())),
            None => Ok(()),
        }
    }

    /// Hands the gathered bytes to the writer.
    async fn push(&mut self) -> Result<(), FsError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let piece = std::mem::take(&mut self.pending).freeze();
        self.held
            .push_back((self.size, std::mem::take(&mut self.gathering)));
        let Some(w) = self.writer.as_mut() else {
            return Err(FsError::WriteFailed(format!("{}: no upload", self.name)));
        };
        if let Err(e) = w.write(piece).await {
            return Err(self.fail(&e));
        }
        self.release_persisted();
        Ok(())
    }
}

/// An object that was just created, as the inode table keeps it.
fn fresh_info(name: &str, generation: i64) -> ObjectInfo {
    let now = SystemTime::now();
    ObjectInfo {
        name: name.to_string(),
        size: 0,
        generation,
        metageneration: 1,
        finalized: false,
        update_time: now,
        create_time: now,
        crc32c: None,
    }
}

/// A refusal to replace (a precondition) is EEXIST.
fn exists_if_refused(e: GcsError) -> FsError {
    match e {
        GcsError::PreconditionFailed(_) | GcsError::AlreadyExists(_) => FsError::Exists,
        other => other.into(),
    }
}

impl Fs {
    fn writable(&self) -> Result<(), FsError> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The object path of `name` in directory `parent`.
    fn child_path(&self, parent: u64, name: &str) -> Result<String, FsError> {
        if !super::dir::valid_component(name) {
            return Err(FsError::InvalidName);
        }
        let path = format!("{}{name}", self.dir_prefix(parent)?);
        if path.len() > 1023 {
            return Err(FsError::InvalidName);
        }
        Ok(path)
    }

    fn write_budget(&self) -> Arc<Budget> {
        self.engine.pool().budget().clone()
    }

    /// A change under directory `parent`: its cached listing is out of date.
    fn changed_dir(&self, parent: u64) {
        lock(&self.listings).remove(&parent);
    }

    fn open_write_handle(&self, ino: u64, state: WriteState) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = WriteHandle {
            state: Arc::new(tokio::sync::Mutex::new(state)),
        };
        lock(&self.handles).insert(
            fh,
            Handle {
                ino,
                io: Io::Write(h),
            },
        );
        fh
    }

    /// Records what inode `ino`'s file now is (a new generation, a new size).
    fn file_now(&self, ino: u64, info: ObjectInfo) {
        if let Some(n) = lock(&self.table).nodes.get_mut(&ino) {
            n.kind = Kind::File(info, Instant::now());
        }
    }

    /// `creat(2)`: a new empty appendable object `name` in `parent` (a new
    /// generation; `exclusive`: only if none exists), open for writing.
    pub async fn create(
        &self,
        parent: u64,
        name: &str,
        exclusive: bool,
    ) -> Result<(Attr, u64), FsError> {
        self.writable()?;
        let path = self.child_path(parent, name)?;
        let writer = self
            .client
            .create(&path, exclusive.then_some(0))
            .await
            .map_err(exists_if_refused)?;
        count(&self.writes.objects_created, 1);
        let info = fresh_info(&path, writer.generation());
        let kind = Kind::File(info.clone(), Instant::now());
        let ino = {
            let mut t = lock(&self.table);
            t.negative.remove(&path);
            self.intern(&mut t, parent, &path, kind.clone(), true)
        };
        self.changed_dir(parent);
        let fh = self.open_write_handle(
            ino,
            WriteState::new(info, Some(writer), self.write_budget()),
        );
        Ok((self.attr_of(ino, &kind), fh))
    }

    /// Opens file `ino` for writing. `truncate`: a new empty generation at
    /// once (the inode stands for it from now on); otherwise the object's
    /// current version, taken over at the first write (which must be at its
    /// end, and the object unfinalized).
    pub(super) async fn open_write(&self, ino: u64, truncate: bool) -> Result<u64, FsError> {
        self.writable()?;
        let kind = lock(&self.table)
            .nodes
            .get(&ino)
            .map(|n| n.kind.clone())
            .ok_or_else(|| FsError::Stale(format!("inode {ino}")))?;
        let info = match kind {
            Kind::Dir(_) => return Err(FsError::IsDir),
            Kind::File(info, _) => info,
        };
        if truncate {
            let writer = self.client.create(&info.name, None).await?;
            count(&self.writes.objects_created, 1);
            let fresh = fresh_info(&info.name, writer.generation());
            self.file_now(ino, fresh.clone());
            return Ok(self.open_write_handle(
                ino,
                WriteState::new(fresh, Some(writer), self.write_budget()),
            ));
        }
        // Appends go at the true end of the live version.
        let live = self.client.stat(&info.name).await?;
        if live.generation != info.generation {
            self.refreshed(ino, &info, live.clone());
            return Err(FsError::Stale(format!(
                "{}: generation {} was replaced by {}",
                info.name, info.generation, live.generation
            )));
        }
        self.file_now(ino, live.clone());
        Ok(self.open_write_handle(ino, WriteState::new(live, None, self.write_budget())))
    }

    fn write_state(&self, fh: u64) -> Result<(u64, WriteHandle), FsError> {
        match lock(&self.handles).get(&fh) {
            Some(Handle {
                ino,
                io: Io::Write(w),
            }) => Ok((*ino, w.clone())),
            Some(_) => Err(FsError::BadHandle),
            None => Err(FsError::BadHandle),
        }
    }

    /// A `write(2)` done at once, on the caller's thread, when it can be: the
    /// handle is free, streaming, the write is at the end and fits in the
    /// piece being gathered. None: it must go through [`Fs::write`].
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<u32> {
        let (ino, h) = self.write_state(fh).ok()?;
        let mut st = h.state.try_lock().ok()?;
        if st.failed.is_some()
            || st.writer.is_none()
            || offset != st.size
            || st.pending.len() + data.len() >= PIECE
            || !st.start_piece()
        {
            return None;
        }
        st.pending.extend_from_slice(data);
        st.size += data.len() as u64;
        count(&self.writes.bytes, data.len() as u64);
        let (size, generation) = (st.size, st.writer.as_ref().map(|w| w.generation()));
        drop(st);
        self.written_to(ino, size, generation);
        Some(data.len() as u32)
    }

    /// The file's size on its inode follows what was written.
    fn written_to(&self, ino: u64, size: u64, generation: Option<i64>) {
        if let Some(n) = lock(&self.table).nodes.get_mut(&ino) {
            if let Kind::File(info, _) = &mut n.kind {
                if Some(info.generation) == generation {
                    info.size = size;
                    info.update_time = SystemTime::now();
                }
            }
        }
    }

    /// `write(2)` at `offset`: only at the file's end (the bytes stream to
    /// the bucket in order).
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let (ino, h) = self.write_state(fh)?;
        let mut st = h.state.lock().await;
        st.check()?;
        if offset != st.size {
            count(&self.writes.unsupported, 1);
            return Err(FsError::Unsupported(format!(
                "{}: a write at {offset}, not at the end ({}): only appends are streamed",
                st.name, st.size
            )));
        }
        if st.writer.is_none() {
            if st.base.finalized {
                count(&self.writes.unsupported, 1);
                return Err(FsError::Unsupported(format!(
                    "{}: the object is finalized; rewriting it in place is not supported",
                    st.name
                )));
            }
            let (name, generation) = (st.name.clone(), st.base.generation);
            match self.client.append(&name, generation).await {
                Ok(w) => {
                    count(&self.writes.takeovers, 1);
                    st.writer = Some(w)
                }
                Err(e) => return Err(st.fail(&e)),
            }
        }
        let mut rest = data;
        while !rest.is_empty() {
            st.ensure_piece().await?;
            let n = rest.len().min(PIECE - st.pending.len());
            st.pending.extend_from_slice(&rest[..n]);
            st.size += n as u64;
            rest = &rest[n..];
            if st.pending.len() >= PIECE {
                st.push().await?;
            }
        }
        count(&self.writes.bytes, data.len() as u64);
        let (size, generation) = (st.size, st.writer.as_ref().map(|w| w.generation()));
        drop(st);
        self.written_to(ino, size, generation);
        Ok(data.len() as u32)
    }

    /// `fsync(2)` (`close`: false) or the kernel's flush at `close(2)`
    /// (`close`: true): everything written is persisted; at close with
    /// `--finalize-on-close` the object is finalized. A read handle has
    /// nothing to flush.
    pub async fn flush(&self, fh: u64, close: bool) -> Result<(), FsError> {
        let h = match lock(&self.handles).get(&fh) {
            Some(Handle {
                ino,
                io: Io::Write(w),
            }) => (*ino, w.clone()),
            Some(_) => return Ok(()),
            None => return Err(FsError::BadHandle),
        };
        let (ino, h) = h;
        let mut st = h.state.lock().await;
        st.check()?;
        if st.writer.is_none() {
            return Ok(());
        }
        st.push().await?;
        if close && self.cfg.finalize_on_close {
            let Some(w) = st.writer.take() else {
                return Ok(());
            };
            match w.finalize().await {
                Ok(info) => {
                    count(&self.writes.flushes, 1);
                    st.base = info.clone();
                    self.file_now(ino, info);
                }
                Err(e) => return Err(st.fail(&e)),
            }
            return Ok(());
        }
        let flushed = match st.writer.as_mut() {
            Some(w) => w.flush().await,
            None => return Ok(()),
        };
        if let Err(e) = flushed {
            return Err(st.fail(&e));
        }
        st.release_persisted();
        count(&self.writes.flushes, 1);
        Ok(())
    }

    /// What writes through this filesystem did.
    pub fn write_stats(&self) -> Arc<WriteStats> {
        self.writes.clone()
    }

    /// The last close of a write handle: its upload ends (what was written
    /// was persisted by the flush before; this persists anything left and
    /// lets the stream go). Errors can reach no one here: they are logged.
    pub async fn finish_write(h: WriteHandle) {
        let mut st = h.state.lock().await;
        if st.failed.is_some() {
            return;
        }
        if st.push().await.is_err() {
            return;
        }
        if let Some(w) = st.writer.take() {
            if let Err(e) = w.close().await {
                tracing::warn!(object = %st.name, error = %e, "closing an upload failed");
            }
        }
    }

    /// `truncate(2)`/`ftruncate(2)` and the other attribute changes. Mode,
    /// owner and times are not kept by the bucket: accepted and left as the
    /// mount shows them (as gcsfuse does). A size of 0 makes a new empty
    /// generation; the current size is no change; any other is not supported.
    pub async fn setattr(
        &self,
        ino: u64,
        size: Option<u64>,
        fh: Option<u64>,
    ) -> Result<Attr, FsError> {
        let Some(size) = size else {
            return self.getattr(ino).await;
        };
        self.writable()?;
        if let Some(Ok((_, h))) = fh.map(|fh| self.write_state(fh)) {
            let mut st = h.state.lock().await;
            st.check()?;
            if size == st.size {
                drop(st);
                return self.getattr(ino).await;
            }
            if size != 0 {
                count(&self.writes.unsupported, 1);
                return Err(FsError::Unsupported(format!(
                    "{}: resizing to {size} bytes (only to 0)",
                    st.name
                )));
            }
            // Start over: a new empty generation for this handle to write.
            let writer = self.client.create(&st.name, None).await?;
            count(&self.writes.objects_created, 1);
            let fresh = fresh_info(&st.name, writer.generation());
            if let Some(old) = st.writer.replace(writer) {
                let _ = old.close().await;
            }
            st.pending.clear();
            let held: u64 = st.held.drain(..).map(|(_, n)| n).sum();
            st.budget.release(held);
            st.size = 0;
            st.base = fresh.clone();
            drop(st);
            self.file_now(ino, fresh);
            return self.getattr(ino).await;
        }
        let attr = self.getattr(ino).await?;
        if attr.is_dir {
            return Err(FsError::IsDir);
        }
        if size == attr.size {
            return Ok(attr);
        }
        if size != 0 {
            count(&self.writes.unsupported, 1);
            return Err(FsError::Unsupported(format!(
                "resizing a file to {size} bytes (only to 0)"
            )));
        }
        let name = match lock(&self.table).nodes.get(&ino).map(|n| n.kind.clone()) {
            Some(Kind::File(info, _)) => info.name,
            _ => return Err(FsError::Stale(format!("inode {ino}"))),
        };
        let writer = self.client.create(&name, None).await?;
        count(&self.writes.objects_created, 1);
        let fresh = fresh_info(&name, writer.generation());
        writer.close().await?;
        self.file_now(ino, fresh);
        self.getattr(ino).await
    }

    /// `unlink(2)`: deletes the object.
    pub async fn unlink(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.writable()?;
        let path = self.child_path(parent, name)?;
        self.client.delete(&path, None).await?;
        let mut t = lock(&self.table);
        t.by_path.remove(&path);
        t.negative.insert(path, Instant::now());
        drop(t);
        self.changed_dir(parent);
        Ok(())
    }

    /// `mkdir(2)`: a folder.
    pub async fn mkdir(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        self.writable()?;
        let path = self.child_path(parent, name)?;
        let dir = format!("{path}/");
        self.client
            .create_folder(&dir)
            .await
            .map_err(exists_if_refused)?;
        let kind = Kind::Dir(dir.clone());
        let ino = {
            let mut t = lock(&self.table);
            t.negative.remove(&path);
            self.intern(&mut t, parent, &dir, kind.clone(), true)
        };
        self.changed_dir(parent);
        Ok(self.attr_of(ino, &kind))
    }

    /// `rmdir(2)`: an empty directory's folder goes (a directory that is only
    /// a prefix of objects is never empty).
    pub async fn rmdir(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.writable()?;
        let path = self.child_path(parent, name)?;
        let dir = format!("{path}/");
        let page = self.client.list(&dir, None).await?;
        let inside = page.objects.iter().any(|o| o.name != dir)
            || page.prefixes.iter().any(|p| p.len() > dir.len());
        if inside {
            return Err(FsError::NotEmpty);
        }
        match self.client.delete_folder(&dir).await {
            Ok(()) | Err(GcsError::NotFound(_)) => {}
            Err(GcsError::PreconditionFailed(_)) => return Err(FsError::NotEmpty),
            Err(e) => return Err(e.into()),
        }
        let mut t = lock(&self.table);
        t.by_path.remove(&dir);
        t.negative.insert(path, Instant::now());
        drop(t);
        self.changed_dir(parent);
        Ok(())
    }

    /// `rename(2)`: a file is moved atomically (MoveObject, its generation
    /// kept); a directory is renamed with everything below it
    /// (RenameFolder). `noreplace`: fail if the target exists.
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        noreplace: bool,
    ) -> Result<(), FsError> {
        self.writable()?;
        let from = self.child_path(parent, name)?;
        let to = self.child_path(newparent, newname)?;
        let (dir_from, dir_to) = (format!("{from}/"), format!("{to}/"));
        let known_dir = {
            let t = lock(&self.table);
            t.by_path
                .get(&dir_from)
                .and_then(|i| t.nodes.get(i))
                .is_some_and(|n| matches!(n.kind, Kind::Dir(_)))
        };
        let is_dir = known_dir
            || match self.client.stat(&from).await {
                Ok(_) => false,
                Err(GcsError::NotFound(_)) => {
                    let page = self.client.list(&dir_from, None).await?;
                    if page.objects.is_empty() && page.prefixes.is_empty() {
                        return Err(FsError::NotFound);
                    }
                    true
                }
                Err(e) => return Err(e.into()),
            };
        if is_dir {
            self.client.rename_folder(&dir_from, &dir_to).await?;
            self.renamed_prefix(&dir_from, &dir_to, newparent);
        } else {
            let info = self
                .client
                .rename(&from, &to, noreplace.then_some(0))
                .await
                .map_err(exists_if_refused)?;
            let mut t = lock(&self.table);
            if let Some(ino) = t.by_path.remove(&from) {
                if let Some(n) = t.nodes.get_mut(&ino) {
                    n.parent = newparent;
                    n.kind = Kind::File(info, Instant::now());
                }
                t.by_path.insert(to.clone(), ino);
            }
            t.negative.remove(&to);
            t.negative.insert(from, Instant::now());
        }
        self.changed_dir(parent);
        self.changed_dir(newparent);
        Ok(())
    }

    /// Every inode under directory prefix `from` now lives under `to`.
    fn renamed_prefix(&self, from: &str, to: &str, newparent: u64) {
        let mut t = lock(&self.table);
        let moved: Vec<(String, u64)> = t
            .by_path
            .iter()
            .filter(|(k, _)| k.starts_with(from))
            .map(|(k, i)| (k.clone(), *i))
            .collect();
        for (old, ino) in moved {
            t.by_path.remove(&old);
            let new = format!("{to}{}", &old[from.len()..]);
            if let Some(n) = t.nodes.get_mut(&ino) {
                match &mut n.kind {
                    Kind::Dir(p) => *p = new.clone(),
                    Kind::File(info, _) => info.name = new.clone(),
                }
                if old == from {
                    n.parent = newparent;
                }
            }
            t.by_path.insert(new, ino);
        }
        t.negative.remove(to.trim_end_matches('/'));
    }

    /// A read through a handle open for writing (`O_RDWR`): what it wrote is
    /// persisted first, then read like any version of the object, so the
    /// reader sees its own writes.
    pub(super) async fn read_written(
        &self,
        h: &WriteHandle,
        offset: u64,
        len: u32,
    ) -> Result<ReadData, FsError> {
        let mut st = h.state.lock().await;
        st.check()?;
        let generation = match st.writer.as_ref() {
            Some(w) => w.generation(),
            None => st.base.generation,
        };
        if st.writer.is_some() {
            st.push().await?;
            let flushed = match st.writer.as_mut() {
                Some(w) => w.flush().await,
                None => Ok(st.size),
            };
            if let Err(e) = flushed {
                return Err(st.fail(&e));
            }
        }
        let object = ObjectId {
            name: st.name.clone(),
            generation,
        };
        let size = st.size;
        drop(st);
        Ok(self
            .engine
            .read(&object, size, true, offset, u64::from(len))
            .await?)
    }
}
