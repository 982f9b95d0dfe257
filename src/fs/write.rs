//! Writes through the mount: files created (or truncated) are streamed to the
//! bucket as new appendable objects, appends at the end of an unfinalized
//! object take it over, every other write goes to a staged local copy that
//! is uploaded as a new generation, and unlink, mkdir, rmdir and rename
//! change the namespace.
//!
//! # Streaming (the fast path)
//!
//! `write(2)`s at the file's end are copied into the handle's current
//! [`Piece`] (a warm buffer from the memory layer, shared with the read cache
//! under `--memory-limit`), on the FUSE loop thread ([`Fs::write_now`]). A
//! full piece is frozen and queued to the handle's upload task, which owns
//! the object's writer (`gcs::ObjectWrite`): it streams the piece in
//! checksummed chunks and holds it until the service says it is persisted,
//! then the buffer goes back to the pool warm. The queue is [`QUEUE`] pieces
//! deep, so a program writes on while the previous pieces travel; when the
//! queue is full or no memory is free the write waits (in a task), first for
//! its own pieces to be persisted, then for anyone's buffer to come back: a
//! slow service slows writers down instead of growing memory. Only after
//! [`MEMORY_WAIT`] without any does a writer take one piece past the budget
//! (a writer whose peers hold all memory and write nothing must not hang).
//!
//! # Staging (everything else)
//!
//! A write anywhere but at the end (seeking back, holes), a write to a
//! finalized object, and resizing to other than 0 or the current size move
//! the handle to a [`Staged`] copy: an unnamed file in `--temp-dir` (nothing
//! is left behind, even after a crash) holding the object's bytes, fetched
//! straight from the wire into it. Writes then go to that file; `fsync` and
//! `close` upload it whole as a new generation of the object, on condition
//! that the generation it was copied from is still the live one (else
//! ESTALE: someone else replaced the object). All staged copies together
//! may take `--temp-dir-limit` bytes; past it such writes fail with ENOSPC.
//!
//! # Persisting
//!
//! `fsync` and `close` (the kernel's flush) persist what was written: another
//! mount then sees the new size and bytes. `close` leaves the object
//! unfinalized (appendable), as gcsfuse does on zonal buckets;
//! `--finalize-on-close` finalizes it. The file's inode follows the writes:
//! its size is what was written, and a truncating open, a create or a staged
//! upload makes it stand for the new generation.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::inode::Kind;
use super::{Attr, Fs, FsError, Handle, Io};
use crate::gcs::write::MAX_CHUNK;
use crate::gcs::{GcsError, ObjectClient, ObjectId, ObjectInfo, ObjectWrite, RangeSink};
use crate::memory::Piece;
use crate::read::ReadData;
use crate::sync::lock;

/// The size of a full piece (the writer sends it as 2 MiB chunks, slices of
/// it). Capped by the pool's largest buffer (the read block).
pub const PIECE: usize = 8 << 20;
/// A handle's first piece: a small file takes 1 MiB of memory, not a piece.
const FIRST_PIECE: usize = 1 << 20;
/// Full pieces queued to a handle's upload besides the one it is sending.
pub const QUEUE: usize = 2;
/// How long a writer waits for memory before it takes a piece past the
/// budget.
pub const MEMORY_WAIT: Duration = Duration::from_secs(2);

/// What writes through the mount did, for the metrics.
#[derive(Debug, Default)]
pub struct WriteStats {
    /// Bytes programs wrote.
    pub bytes: AtomicU64,
    /// Flushes (fsync, close) that persisted a handle's bytes.
    pub flushes: AtomicU64,
    /// Unfinalized objects taken over to append to them.
    pub takeovers: AtomicU64,
    /// New object generations made (creates, truncations, staged uploads).
    pub objects_created: AtomicU64,
    /// Handles that fell back to a staged copy (writes that cannot stream).
    pub fallbacks: AtomicU64,
    /// Staged copies uploaded as new generations.
    pub staged_uploads: AtomicU64,
    /// Pieces taken past the memory budget after waiting [`MEMORY_WAIT`].
    pub over_budget: AtomicU64,
}

fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Room for staged copies: `--temp-dir` and `--temp-dir-limit`.
#[derive(Debug)]
pub struct TempSpace {
    dir: PathBuf,
    limit: u64,
    used: AtomicU64,
}

impl TempSpace {
    pub fn new(dir: PathBuf, limit: u64) -> TempSpace {
        TempSpace {
            dir,
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Bytes staged copies take now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: u64) -> bool {
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            let Some(next) = cur.checked_add(n).filter(|v| *v <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A local failure of staging as the error a program sees (its errno kept;
/// a full disk is ENOSPC).
fn staging_error(what: &str, e: &std::io::Error) -> FsError {
    FsError::Staging {
        msg: format!("{what}: {e}"),
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// A handle's staged copy of its file.
pub struct Staged {
    file: std::fs::File,
    /// The generation the copy was made from (or last uploaded as): the next
    /// upload replaces exactly it.
    generation: i64,
    /// Written since the last upload.
    dirty: bool,
    space: Arc<TempSpace>,
    /// Bytes of `space` this copy holds (its length).
    held: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.space.give_back(self.held);
    }
}

impl Staged {
    /// An empty unnamed file in `--temp-dir` ([`crate::fileio::scratch_file`]).
    fn new(space: Arc<TempSpace>, generation: i64) -> Result<Staged, FsError> {
        let file = crate::fileio::scratch_file(&space.dir)
            .map_err(|e| staging_error(&format!("--temp-dir {}", space.dir.display()), &e))?;
        Ok(Staged {
            file,
            generation,
            dirty: false,
            space,
            held: 0,
        })
    }

    /// Makes the copy `len` bytes long (zeros past the old end), within
    /// `--temp-dir-limit`.
    fn set_len(&mut self, len: u64) -> Result<(), FsError> {
        if len > self.held {
            if !self.space.try_take(len - self.held) {
                return Err(FsError::Staging {
                    msg: format!(
                        "--temp-dir-limit: staged copies would take more than {} bytes",
                        self.space.limit
                    ),
                    errno: libc::ENOSPC,
                });
            }
        } else {
            self.space.give_back(self.held - len);
        }
        self.held = len;
        self.file
            .set_len(len)
            .map_err(|e| staging_error("a staged copy", &e))
    }

    /// Writes `data` at `offset` (the copy grows to hold it).
    fn write_at(&mut self, offset: u64, data: &[u8], size: &mut u64) -> Result<(), FsError> {
        let end = offset + data.len() as u64;
        if end > *size {
            self.set_len(end)?;
            *size = end;
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| staging_error("a staged copy", &e))?;
        self.dirty = true;
        Ok(())
    }

    /// Reads up to `len` bytes at `offset` of a copy of `size` bytes.
    fn read_at(&self, offset: u64, len: u64, size: u64) -> Result<Vec<u8>, FsError> {
        let n = len.min(size.saturating_sub(offset)) as usize;
        let mut buf = vec![0; n];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| staging_error("a staged copy", &e))?;
        Ok(buf)
    }
}

/// Where object bytes fetched for a staged copy go: straight into the file,
/// at their offset (the first local error is kept).
struct FileSink {
    file: std::fs::File,
    error: std::sync::Mutex<Option<std::io::Error>>,
}

impl RangeSink for FileSink {
    fn put(&self, at: usize, data: &[u8]) {
        if let Err(e) = self.file.write_all_at(data, at as u64) {
            lock(&self.error).get_or_insert(e);
        }
    }
}

/// A piece for a buffer: it checksums each of the writer's chunks as it
/// copies (the bytes are checksummed while in cache, not read again).
fn piece(buf: crate::memory::Buffer) -> Piece {
    Piece::with_crcs(buf, MAX_CHUNK)
}

/// What a handle's upload task is asked to do, in order.
enum Cmd {
    /// Append a piece (with the CRC32C of each of its chunks).
    Data(Bytes, Vec<u32>),
    /// Persist everything appended; answers the persisted size.
    Flush(oneshot::Sender<Result<u64, String>>),
    /// Persist everything and end the upload: finalized (answers the
    /// object) or left appendable.
    End {
        finalize: bool,
        done: oneshot::Sender<Result<Option<ObjectInfo>, String>>,
    },
}

/// A handle's upload: the task that owns the object's writer, and the
/// piece being gathered for it.
pub struct Stream {
    tx: mpsc::Sender<Cmd>,
    /// The object's generation: 0 until the task has opened the writer (a
    /// create answered before the service was asked).
    generation: Arc<AtomicI64>,
    /// The piece being gathered (no buffer until a byte comes).
    piece: Option<Piece>,
    /// Pieces queued so far.
    sent: u64,
    /// The upload's first failure, set by the task.
    failed: Arc<OnceLock<String>>,
}

/// Where an upload task's writer comes from.
enum Opening {
    /// Already open.
    Open(Box<dyn ObjectWrite>),
    /// To be created by the task (`if_generation_match`: Some(0), only if
    /// no object has the name).
    Create {
        client: Arc<dyn ObjectClient>,
        if_generation_match: Option<i64>,
    },
}

impl Stream {
    /// Starts the upload task for `writer`.
    fn spawn(name: String, writer: Box<dyn ObjectWrite>) -> Stream {
        Self::start(name, Opening::Open(writer))
    }

    /// Starts an upload task that first creates the object: the create is
    /// answered at once, and a failure to create shows at the handle's next
    /// write, fsync or close.
    fn spawn_create(
        name: String,
        client: Arc<dyn ObjectClient>,
        if_generation_match: Option<i64>,
    ) -> Stream {
        Self::start(
            name,
            Opening::Create {
                client,
                if_generation_match,
            },
        )
    }

    fn start(name: String, opening: Opening) -> Stream {
        let (tx, rx) = mpsc::channel(QUEUE);
        let failed = Arc::new(OnceLock::new());
        let generation = Arc::new(AtomicI64::new(match &opening {
            Opening::Open(w) => w.generation(),
            Opening::Create { .. } => 0,
        }));
        tokio::spawn(upload(
            name,
            opening,
            rx,
            failed.clone(),
            generation.clone(),
        ));
        Stream {
            tx,
            generation,
            piece: None,
            sent: 0,
            failed,
        }
    }

    /// The object's generation (0 while the task is still creating it).
    fn generation(&self) -> i64 {
        self.generation.load(Ordering::Acquire)
    }

    fn failure(&self) -> Option<String> {
        self.failed.get().cloned()
    }

    /// The size the next piece should have.
    fn next_piece_len(&self) -> usize {
        if self.sent == 0 {
            FIRST_PIECE
        } else {
            PIECE
        }
    }

    /// Queues the piece being gathered (if it holds anything), waiting for
    /// room in the queue.
    async fn send_piece(&mut self) -> Result<(), String> {
        let Some(p) = self.piece.take() else {
            return Ok(());
        };
        if p.is_empty() {
            self.piece = Some(p);
            return Ok(());
        }
        self.sent += 1;
        let (bytes, crcs) = p.freeze_with_crcs();
        self.tx
            .send(Cmd::Data(bytes, crcs))
            .await
            .map_err(|_| self.ended())
    }

    fn ended(&self) -> String {
        self.failure()
            .unwrap_or_else(|| "the upload ended".to_string())
    }

    /// Persists everything written; the persisted size.
    async fn flush(&mut self) -> Result<u64, String> {
        self.send_piece().await?;
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(done))
            .await
            .map_err(|_| self.ended())?;
        answer.await.map_err(|_| self.ended())?
    }

    /// Persists everything and ends the upload (finalized: the object).
    async fn end(mut self, finalize: bool) -> Result<Option<ObjectInfo>, String> {
        self.send_piece().await?;
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Cmd::End { finalize, done })
            .await
            .map_err(|_| self.ended())?;
        answer.await.map_err(|_| self.ended())?
    }
}

/// The upload task: appends, flushes and ends in the order asked. After a
/// failure it does nothing more (every later ask gets the failure). Pieces
/// are let go as the writer sees them persisted, so their buffers go back to
/// the pool.
async fn upload(
    name: String,
    opening: Opening,
    mut rx: mpsc::Receiver<Cmd>,
    failed: Arc<OnceLock<String>>,
    generation: Arc<AtomicI64>,
) {
    let fail = |e: &GcsError| -> String {
        tracing::warn!(object = %name, error = %e, "a write through the mount failed");
        let msg = format!("{name}: {e}");
        let _ = failed.set(msg.clone());
        msg
    };
    let ended = || {
        failed
            .get()
            .cloned()
            .unwrap_or_else(|| format!("{name}: the upload ended"))
    };
    let mut w = match opening {
        Opening::Open(w) => Some(w),
        Opening::Create {
            client,
            if_generation_match,
        } => match client.create(&name, if_generation_match).await {
            Ok(w) => Some(w),
            Err(e) => {
                fail(&e);
                None
            }
        },
    };
    if let Some(w) = &w {
        generation.store(w.generation(), Ordering::Release);
    }
    while let Some(cmd) = rx.recv().await {
        let live = if failed.get().is_none() {
            w.as_mut()
        } else {
            None
        };
        match cmd {
            Cmd::Data(piece, crcs) => {
                if let Some(w) = live {
                    if let Err(e) = w.write_with_crcs(piece, crcs).await {
                        fail(&e);
                    }
                }
            }
            Cmd::Flush(done) => {
                let r = match live {
                    Some(w) => w.flush().await.map_err(|e| fail(&e)),
                    None => Err(ended()),
                };
                let _ = done.send(r);
            }
            Cmd::End { finalize, done } => {
                let open = if failed.get().is_none() {
                    w.take()
                } else {
                    None
                };
                let r = match open {
                    Some(w) if finalize => w.finalize().await.map(Some).map_err(|e| fail(&e)),
                    Some(w) => w.close().await.map(|_| None).map_err(|e| fail(&e)),
                    None => Err(ended()),
                };
                let _ = done.send(r);
                return;
            }
        }
    }
    // The handle went without ending the upload: persist and let go.
    if let Some(w) = w.take().filter(|_| failed.get().is_none()) {
        if let Err(e) = w.close().await {
            fail(&e);
        }
    }
}

/// A handle open for writing.
#[derive(Clone)]
pub struct WriteHandle {
    pub state: Arc<tokio::sync::Mutex<WriteState>>,
}

/// How a write handle writes now.
pub enum Mode {
    /// Opened on an existing version, nothing written yet: a first write at
    /// its end takes an unfinalized object over; any other write stages.
    Opened,
    /// Streaming to the object.
    Stream(Stream),
    /// Writing to a staged copy.
    Staged(Staged),
}

/// What a write handle knows and holds.
pub struct WriteState {
    ino: u64,
    name: String,
    /// The version the handle writes (or opened).
    base: ObjectInfo,
    /// The file's size as written here (where an append goes).
    size: u64,
    mode: Mode,
    /// A failure that ended the handle: later writes and flushes say so.
    failed: Option<String>,
}

impl WriteState {
    fn new(ino: u64, base: ObjectInfo, mode: Mode) -> WriteState {
        WriteState {
            ino,
            name: base.name.clone(),
            size: base.size,
            base,
            mode,
            failed: None,
        }
    }

    fn failure(&self) -> Option<String> {
        match (&self.failed, &self.mode) {
            (Some(m), _) => Some(m.clone()),
            (None, Mode::Stream(s)) => s.failure(),
            _ => None,
        }
    }

    fn check(&self) -> Result<(), FsError> {
        match self.failure() {
            Some(m) => Err(FsError::WriteFailed(m)),
            None => Ok(()),
        }
    }

    /// Keeps `msg` as the handle's failure and returns it as the error.
    fn fail(&mut self, msg: String) -> FsError {
        FsError::WriteFailed(self.failed.get_or_insert(msg).clone())
    }

    /// The generation the handle's bytes go to.
    fn generation(&self) -> i64 {
        match &self.mode {
            Mode::Stream(s) => s.generation(),
            Mode::Staged(f) => f.generation,
            Mode::Opened => self.base.generation,
        }
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

    /// A change under directory `parent`: its cached listing is out of date.
    fn changed_dir(&self, parent: u64) {
        lock(&self.listings).remove(&parent);
    }

    fn open_write_handle(&self, state: WriteState) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let ino = state.ino;
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
        let precondition = exclusive.then_some(0);
        // In a directory this mount made (known whole) the name is known to
        // be free: answered at once, the service asked by the upload task.
        let free = {
            let t = lock(&self.table);
            let prefix = &path[..path.len() - name.len()];
            t.complete
                .get(prefix)
                .is_some_and(|since| since.elapsed() < self.cfg.negative_ttl)
                && !t.by_path.contains_key(&path)
                && !t.by_path.contains_key(&format!("{path}/"))
        };
        let stream = if free {
            Stream::spawn_create(path.clone(), self.client.clone(), precondition)
        } else {
            let writer = self
                .client
                .create(&path, precondition)
                .await
                .map_err(exists_if_refused)?;
            Stream::spawn(path.clone(), writer)
        };
        count(&self.writes.objects_created, 1);
        let info = ObjectInfo::created(&path, stream.generation());
        let kind = Kind::File(info.clone(), Instant::now());
        let ino = {
            let mut t = lock(&self.table);
            t.negative.remove(&path);
            self.intern(&mut t, parent, &path, kind.clone(), true)
        };
        self.changed_dir(parent);
        let fh = self.open_write_handle(WriteState::new(ino, info, Mode::Stream(stream)));
        Ok((self.attr_of(ino, &kind), fh))
    }

    /// Opens file `ino` for writing. `truncate`: a new empty generation at
    /// once (the inode stands for it from now on); otherwise the object's
    /// live version, taken over at a first write at its end (or staged).
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
            self.settle_create(&info.name).await;
            let writer = self.client.create(&info.name, None).await?;
            count(&self.writes.objects_created, 1);
            let fresh = ObjectInfo::created(&info.name, writer.generation());
            self.file_now(ino, fresh.clone());
            let stream = Stream::spawn(info.name, writer);
            return Ok(self.open_write_handle(WriteState::new(ino, fresh, Mode::Stream(stream))));
        }
        // Writes go to the live version: appends at its true end.
        self.settle_create(&info.name).await;
        let live = self.client.stat(&info.name).await?;
        if live.generation != info.generation {
            self.refreshed(ino, &info, live.clone());
            return Err(FsError::Stale(format!(
                "{}: generation {} was replaced by {}",
                info.name, info.generation, live.generation
            )));
        }
        self.file_now(ino, live.clone());
        Ok(self.open_write_handle(WriteState::new(ino, live, Mode::Opened)))
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

    /// A piece for `s` if memory is free now (idle cached blocks give way).
    fn piece_now(&self, len: usize) -> Option<Piece> {
        self.engine.alloc_buffer(len).map(piece)
    }

    /// A piece for stream `s`, waiting for memory: first for the pieces `s`
    /// holds to be persisted (they come back to the pool), then for anyone's
    /// buffer, and after [`MEMORY_WAIT`] taking one past the budget.
    async fn piece_waiting(&self, s: &mut Stream) -> Result<Piece, String> {
        let len = s.next_piece_len();
        if let Some(p) = self.piece_now(len) {
            return Ok(p);
        }
        s.flush().await?;
        let deadline = Instant::now() + MEMORY_WAIT;
        let pool = self.engine.pool();
        loop {
            if let Some(p) = self.piece_now(len) {
                return Ok(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                count(&self.writes.over_budget, 1);
                return pool
                    .alloc_past_limit(len)
                    .map(piece)
                    .ok_or_else(|| "no memory can be mapped for a write".to_string());
            }
            if let Some(b) = pool
                .wait_for_free(left, || self.engine.alloc_buffer(len))
                .await
            {
                return Ok(piece(b));
            }
        }
    }

    /// A `write(2)` done at once, on the caller's thread, when it can be: the
    /// handle is free and either streaming with the write at the end (memory
    /// at hand, and room in the upload's queue if the write fills a piece) or
    /// staged. None: it must go through [`Fs::write`].
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<Result<u32, FsError>> {
        let (ino, h) = self.write_state(fh).ok()?;
        let mut guard = h.state.try_lock().ok()?;
        let st = &mut *guard;
        if st.failure().is_some() {
            return None;
        }
        match &mut st.mode {
            Mode::Stream(s) if offset == st.size => {
                if s.piece.is_none() {
                    s.piece = Some(self.piece_now(s.next_piece_len())?);
                }
                let room = s.piece.as_ref().map_or(0, Piece::room);
                if data.len() >= room {
                    // This write fills the piece: it goes to the queue at
                    // once, so there must be room there (and a next piece
                    // for what does not fit). Only this handle's lock holder
                    // sends, so the room checked stays.
                    if s.tx.capacity() == 0 {
                        return None;
                    }
                    let next = if data.len() > room {
                        let next = self.piece_now(PIECE)?;
                        if data.len() - room > next.room() {
                            // More than a piece holds (pieces smaller than
                            // a write): the task's loop takes it.
                            return None;
                        }
                        Some(next)
                    } else {
                        None
                    };
                    let mut full = std::mem::replace(&mut s.piece, next)?;
                    full.push(&data[..room]);
                    s.sent += 1;
                    let (bytes, crcs) = full.freeze_with_crcs();
                    if s.tx.try_send(Cmd::Data(bytes, crcs)).is_err() {
                        let msg = s.ended();
                        return Some(Err(st.fail(msg)));
                    }
                    if let Some(p) = s.piece.as_mut() {
                        p.push(&data[room..]);
                    }
                } else if let Some(p) = s.piece.as_mut() {
                    p.push(data);
                }
                st.size += data.len() as u64;
            }
            Mode::Staged(f) => {
                if let Err(e) = f.write_at(offset, data, &mut st.size) {
                    return Some(Err(e));
                }
            }
            _ => return None,
        }
        count(&self.writes.bytes, data.len() as u64);
        let (size, generation) = (st.size, st.generation());
        drop(guard);
        self.written_to(ino, size, generation);
        Some(Ok(data.len() as u32))
    }

    /// The file's size on its inode follows what was written.
    fn written_to(&self, ino: u64, size: u64, generation: i64) {
        if let Some(n) = lock(&self.table).nodes.get_mut(&ino) {
            if let Kind::File(info, _) = &mut n.kind {
                // Generation 0: a create answered before the service made
                // the object; the first write after it did names it.
                if info.generation == generation || info.generation == 0 {
                    info.generation = generation;
                    info.size = size;
                    info.update_time = SystemTime::now();
                }
            }
        }
    }

    /// `write(2)` at `offset`: streamed when it is at the end (taking an
    /// unfinalized object over at the handle's first write), else staged.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let (ino, h) = self.write_state(fh)?;
        let mut st = h.state.lock().await;
        st.check()?;
        let at_end = offset == st.size;
        match &st.mode {
            Mode::Opened if at_end && !st.base.finalized => {
                let (name, generation) = (st.name.clone(), st.base.generation);
                match self.client.append(&name, generation).await {
                    Ok(w) => {
                        count(&self.writes.takeovers, 1);
                        st.mode = Mode::Stream(Stream::spawn(name, w));
                    }
                    Err(e) => {
                        tracing::warn!(object = %name, error = %e, "taking an object over to append failed");
                        return Err(st.fail(format!("{name}: {e}")));
                    }
                }
            }
            Mode::Opened => self.stage(&mut st, None).await?,
            Mode::Stream(_) if !at_end => self.stage(&mut st, None).await?,
            _ => {}
        }
        let st = &mut *st;
        match &mut st.mode {
            Mode::Stream(s) => {
                let mut rest = data;
                while !rest.is_empty() {
                    if s.piece.is_none() {
                        match self.piece_waiting(s).await {
                            Ok(p) => s.piece = Some(p),
                            Err(m) => return Err(st.fail(m)),
                        }
                    }
                    let Some(p) = s.piece.as_mut() else { continue };
                    let n = p.push(rest);
                    rest = &rest[n..];
                    st.size += n as u64;
                    if p.is_full() {
                        if let Err(m) = s.send_piece().await {
                            return Err(st.fail(m));
                        }
                    }
                }
            }
            Mode::Staged(f) => f.write_at(offset, data, &mut st.size)?,
            Mode::Opened => {
                return Err(FsError::WriteFailed(format!("{}: no upload", st.name)));
            }
        }
        count(&self.writes.bytes, data.len() as u64);
        let (size, generation) = (st.size, st.generation());
        self.written_to(ino, size, generation);
        Ok(data.len() as u32)
    }

    /// Moves handle `st` to a staged copy of its file: an upload in progress
    /// is persisted and ended first, then the bytes of the version it wrote
    /// (the first `keep` of them, when given) are fetched into the copy.
    async fn stage(&self, st: &mut WriteState, keep: Option<u64>) -> Result<(), FsError> {
        let generation = match std::mem::replace(&mut st.mode, Mode::Opened) {
            Mode::Staged(f) => {
                st.mode = Mode::Staged(f);
                return Ok(());
            }
            Mode::Stream(s) => {
                let generation = s.generation.clone();
                if let Err(m) = s.end(false).await {
                    return Err(st.fail(m));
                }
                generation.load(Ordering::Acquire)
            }
            Mode::Opened => st.base.generation,
        };
        count(&self.writes.fallbacks, 1);
        tracing::debug!(object = %st.name, size = st.size, "a write that cannot stream: staging a copy");
        let mut f = Staged::new(self.temp.clone(), generation)?;
        let len = keep.map_or(st.size, |k| k.min(st.size));
        f.set_len(len)?;
        if len > 0 {
            let sink = Arc::new(FileSink {
                file: f
                    .file
                    .try_clone()
                    .map_err(|e| staging_error("a staged copy", &e))?,
                error: std::sync::Mutex::new(None),
            });
            let object = ObjectId {
                name: st.name.clone(),
                generation,
            };
            let got = self
                .client
                .read(&object, st.size, 0, len, sink.clone())
                .await?;
            if let Some(e) = lock(&sink.error).take() {
                return Err(staging_error("a staged copy", &e));
            }
            if got < len {
                return Err(FsError::Inconsistent(format!(
                    "{}: {got} of its {len} bytes could be read to stage it",
                    st.name
                )));
            }
        }
        st.size = len;
        st.mode = Mode::Staged(f);
        Ok(())
    }

    /// Uploads handle `st`'s staged copy as a new generation of its object,
    /// replacing the one it was copied from (or last uploaded as): if that is
    /// no longer the live one, ESTALE. `finalize`: the new generation is
    /// finalized, else it stays appendable.
    async fn upload_staged(&self, st: &mut WriteState, finalize: bool) -> Result<(), FsError> {
        let Mode::Staged(f) = &st.mode else {
            return Ok(());
        };
        let (name, len, replaces) = (st.name.clone(), st.size, f.generation);
        let writer = match self.client.create(&name, Some(replaces)).await {
            Ok(w) => w,
            Err(GcsError::PreconditionFailed(_)) => {
                return Err(FsError::Stale(format!(
                    "{name}: generation {replaces} was replaced while this file was open"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        count(&self.writes.objects_created, 1);
        let generation = writer.generation();
        let mut s = Stream::spawn(name.clone(), writer);
        let mut off = 0;
        while off < len {
            let mut piece = match self.piece_waiting(&mut s).await {
                Ok(p) => p,
                Err(m) => return Err(st.fail(m)),
            };
            let want = (piece.room() as u64).min(len - off) as usize;
            let Mode::Staged(f) = &st.mode else {
                return Ok(());
            };
            piece
                .fill_with(|tail| f.file.read_exact_at(&mut tail[..want], off).map(|()| want))
                .map_err(|e| staging_error("a staged copy", &e))?;
            off += want as u64;
            s.piece = Some(piece);
            if let Err(m) = s.send_piece().await {
                return Err(st.fail(m));
            }
        }
        let info = match s.end(finalize).await {
            Ok(Some(info)) => info,
            Ok(None) => ObjectInfo {
                size: len,
                ..ObjectInfo::created(&name, generation)
            },
            Err(m) => return Err(st.fail(m)),
        };
        count(&self.writes.staged_uploads, 1);
        if let Mode::Staged(f) = &mut st.mode {
            f.generation = generation;
            f.dirty = false;
        }
        st.base = info.clone();
        self.file_now(st.ino, info);
        Ok(())
    }

    /// `fsync(2)` (`close`: false) or the kernel's flush at `close(2)`
    /// (`close`: true): everything written is persisted (a staged copy
    /// uploaded); at close with `--finalize-on-close` the object is
    /// finalized. A read handle has nothing to flush.
    pub async fn flush(&self, fh: u64, close: bool) -> Result<(), FsError> {
        let h = match lock(&self.handles).get(&fh) {
            Some(Handle {
                io: Io::Write(w), ..
            }) => w.clone(),
            Some(_) => return Ok(()),
            None => return Err(FsError::BadHandle),
        };
        let mut st = h.state.lock().await;
        st.check()?;
        let finalize = close && self.cfg.finalize_on_close;
        match &mut st.mode {
            Mode::Opened => return Ok(()),
            Mode::Staged(f) if !f.dirty => return Ok(()),
            Mode::Staged(_) => self.upload_staged(&mut st, finalize).await?,
            Mode::Stream(_) if finalize => {
                let Mode::Stream(s) = std::mem::replace(&mut st.mode, Mode::Opened) else {
                    return Ok(());
                };
                match s.end(true).await {
                    Ok(Some(info)) => {
                        st.base = info.clone();
                        self.file_now(st.ino, info);
                    }
                    Ok(None) => {}
                    Err(m) => return Err(st.fail(m)),
                }
            }
            Mode::Stream(s) => {
                if let Err(m) = s.flush().await {
                    return Err(st.fail(m));
                }
                let (ino, size, generation) = (st.ino, st.size, st.generation());
                self.written_to(ino, size, generation);
            }
        }
        count(&self.writes.flushes, 1);
        Ok(())
    }

    /// What writes through this filesystem did.
    pub fn write_stats(&self) -> Arc<WriteStats> {
        self.writes.clone()
    }

    /// Bytes staged copies take in `--temp-dir` now.
    pub fn staged_bytes(&self) -> u64 {
        self.temp.used()
    }

    /// The last close of a write handle: its upload ends (what was written
    /// was persisted by the flush before; this persists anything left, a
    /// staged copy written since included, and lets go). Errors can reach no
    /// one here: they are logged.
    pub async fn finish_write(&self, h: WriteHandle) {
        let mut st = h.state.lock().await;
        if st.failure().is_some() {
            return;
        }
        let r = match std::mem::replace(&mut st.mode, Mode::Opened) {
            Mode::Stream(s) => s.end(false).await.map(|_| ()).map_err(FsError::WriteFailed),
            Mode::Staged(f) if f.dirty => {
                st.mode = Mode::Staged(f);
                self.upload_staged(&mut st, self.cfg.finalize_on_close)
                    .await
            }
            _ => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(object = %st.name, error = %e, "ending an upload at close failed");
        }
        st.mode = Mode::Opened;
    }

    /// `truncate(2)`/`ftruncate(2)` and the other attribute changes. Mode,
    /// owner and times are not kept by the bucket: accepted and left as the
    /// mount shows them (as gcsfuse does). A size of 0 makes a new empty
    /// generation; the current size is no change; any other size stages a
    /// copy resized to it (uploaded at once when no handle is open for
    /// writing, else at its fsync or close).
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
            self.resize(&mut st, size).await?;
            drop(st);
            return self.getattr(ino).await;
        }
        let attr = self.getattr(ino).await?;
        if attr.is_dir {
            return Err(FsError::IsDir);
        }
        if size == attr.size {
            return Ok(attr);
        }
        let info = match lock(&self.table).nodes.get(&ino).map(|n| n.kind.clone()) {
            Some(Kind::File(info, _)) => info,
            _ => return Err(FsError::Stale(format!("inode {ino}"))),
        };
        if size == 0 {
            let writer = self.client.create(&info.name, None).await?;
            count(&self.writes.objects_created, 1);
            let fresh = ObjectInfo::created(&info.name, writer.generation());
            writer.close().await?;
            self.file_now(ino, fresh);
        } else {
            let live = self.client.stat(&info.name).await?;
            let mut st = WriteState::new(ino, live, Mode::Opened);
            self.resize(&mut st, size).await?;
            self.upload_staged(&mut st, self.cfg.finalize_on_close)
                .await?;
        }
        self.getattr(ino).await
    }

    /// Resizes what handle `st` writes to `size` bytes.
    async fn resize(&self, st: &mut WriteState, size: u64) -> Result<(), FsError> {
        if size == st.size {
            return Ok(());
        }
        if size == 0 && !matches!(st.mode, Mode::Staged(_)) {
            // Start over: a new empty generation for this handle to write.
            let writer = self.client.create(&st.name, None).await?;
            count(&self.writes.objects_created, 1);
            let fresh = ObjectInfo::created(&st.name, writer.generation());
            if let Mode::Stream(old) = std::mem::replace(
                &mut st.mode,
                Mode::Stream(Stream::spawn(st.name.clone(), writer)),
            ) {
                // The old generation is replaced: what it still had to
                // persist no longer matters.
                let _ = old.end(false).await;
            }
            st.size = 0;
            st.base = fresh.clone();
            self.file_now(st.ino, fresh);
            return Ok(());
        }
        self.stage(st, Some(size)).await?;
        if let Mode::Staged(f) = &mut st.mode {
            f.set_len(size)?;
            f.dirty = true;
        }
        st.size = size;
        let (ino, generation) = (st.ino, st.generation());
        self.written_to(ino, size, generation);
        Ok(())
    }

    /// Waits until the object at `path` exists in the service if a create of
    /// it was answered before the service made it (its inode's generation
    /// is still 0): the handles writing it flush, which waits for the create.
    pub(super) async fn settle_create(&self, path: &str) {
        let handles: Vec<WriteHandle> = {
            let t = lock(&self.table);
            let pending = t.by_path.get(path).filter(|ino| {
                matches!(t.nodes.get(ino).map(|n| &n.kind), Some(Kind::File(i, _)) if i.generation == 0)
            });
            let Some(&ino) = pending else {
                return;
            };
            drop(t);
            lock(&self.handles)
                .values()
                .filter(|h| h.ino == ino)
                .filter_map(|h| match &h.io {
                    Io::Write(w) => Some(w.clone()),
                    _ => None,
                })
                .collect()
        };
        for h in handles {
            let mut guard = h.state.lock().await;
            let st = &mut *guard;
            if let Mode::Stream(s) = &mut st.mode {
                if s.generation() == 0 && s.flush().await.is_ok() {
                    let (ino, size, generation) = (st.ino, st.size, s.generation());
                    self.written_to(ino, size, generation);
                }
            }
        }
    }

    /// `unlink(2)`: deletes the object.
    pub async fn unlink(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.writable()?;
        let path = self.child_path(parent, name)?;
        self.settle_create(&path).await;
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
            // New and empty: this mount knows all it will hold.
            t.complete.insert(dir.clone(), Instant::now());
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
        t.complete.remove(&dir);
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
        // What arrives may not be in the table: no directory stays known whole.
        lock(&self.table).complete.clear();
        self.settle_create(&from).await;
        self.settle_create(&to).await;
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

    /// A read through a handle open for writing (`O_RDWR`): a streaming
    /// handle persists what it wrote first, then reads it like any version
    /// of the object; a staged one reads its copy. The reader sees its own
    /// writes.
    pub(super) async fn read_written(
        &self,
        h: &WriteHandle,
        offset: u64,
        len: u32,
    ) -> Result<ReadData, FsError> {
        let mut st = h.state.lock().await;
        st.check()?;
        if let Mode::Staged(f) = &st.mode {
            return Ok(ReadData::Owned(f.read_at(
                offset,
                u64::from(len),
                st.size,
            )?));
        }
        if let Mode::Stream(s) = &mut st.mode {
            if let Err(m) = s.flush().await {
                return Err(st.fail(m));
            }
        }
        let generation = st.generation();
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
