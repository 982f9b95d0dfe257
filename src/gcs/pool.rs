//! The shared MRD pool: one for the whole daemon.
//!
//! Per object generation it keeps up to N [`MrdStream`]s (N from `--pool-size`,
//! or by object size as the peers do: 1 below 100 MiB, 2 below 500 MiB, else 4),
//! shared by every reader of that object. The first stream is opened when the
//! first read needs it; the rest open in the background with the first stream's
//! read handle. A new range goes to the least-loaded stream (fewest bytes
//! outstanding); a large one (over `mrd::SEND_AHEAD`) that would queue behind
//! a busy stream while another stream of the object is opening waits for that
//! one instead (else the first blocks of a read all queue on the first
//! stream, which carries them one after the other). Idle streams are kept for reuse, at most `--max-idle-streams` of
//! them (least recently used closed first), each closed after `idle_timeout`; a
//! semaphore holds the total at `--max-streams`, closing idle streams of other
//! objects when a new object needs one. A read of a new generation retires the
//! streams of the old one. The read that opens an object's first stream rides
//! in its open request (one round trip to the first byte). A read of a whole
//! small object (up to `whole_read_max`, 8 MiB) with no stream open for it
//! gets a stream of its own, opened with that read and closed once it is
//! done, as a program reading a file once needs nothing left open. Such a
//! first read asks for its first `head_bytes` as a range of their own, so the
//! first bytes do not wait for a whole first chunk (up to 2 MiB) to arrive.

use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::client::GcsClient;
use super::mrd::{FirstRead, MrdStream, PendingRead, StreamStats, SEND_AHEAD};
use super::write::{AppendableWriter, WriteOptions};
use super::{
    GcsError, HeadLoad, ListPage, ObjectClient, ObjectId, ObjectInfo, ObjectWrite, RangeSink,
};

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams per object; None: by object size.
    pub pool_size: Option<usize>,
    /// Total streams open at once.
    pub max_streams: usize,
    /// Idle streams kept for reuse.
    pub max_idle_streams: usize,
    /// An idle stream is closed after this long.
    pub idle_timeout: Duration,
    /// A read of a whole object up to this size (a small file) gets a stream
    /// of its own that carries the read in its open request and closes when
    /// the read is done, instead of a pooled stream left idle afterwards.
    pub whole_read_max: u64,
    /// The read that opens a stream asks for its first this many bytes as a
    /// range of their own (0: never), so the first bytes arrive without
    /// waiting for a whole first chunk: a program's first read (the kernel
    /// asks for 16 KiB at the start of a file) is answered in about one
    /// round trip.
    pub head_bytes: u64,
    /// How objects written through the pool's client are written.
    pub write: WriteOptions,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool_size: None,
            max_streams: 256,
            max_idle_streams: 64,
            idle_timeout: Duration::from_secs(10),
            whole_read_max: 8 << 20,
            head_bytes: 64 << 10,
            write: WriteOptions::default(),
        }
    }
}

/// Streams per object by size, as gcsfuse sizes its per-object MRD pools.
pub fn streams_for_size(size: u64) -> usize {
    const MIB: u64 = 1 << 20;
    match size {
        s if s < 100 * MIB => 1,
        s if s < 500 * MIB => 2,
        _ => 4,
    }
}

struct PooledStream {
    stream: MrdStream,
    last_used: Mutex<Instant>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Entry {
    streams: Vec<Arc<PooledStream>>,
    /// Background opens under way.
    opening: usize,
    /// Serializes the synchronous first open.
    first: Arc<tokio::sync::Mutex<()>>,
    /// Signalled whenever a background open finishes.
    opened: Arc<tokio::sync::Notify>,
}

struct Inner {
    client: GcsClient,
    cfg: PoolConfig,
    permits: Arc<Semaphore>,
    objects: Mutex<HashMap<ObjectId, Entry>>,
    stats: Arc<StreamStats>,
}

/// The shared pool (cheap to clone).
#[derive(Clone)]
pub struct MrdPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MrdPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MrdPool")
            .field("open_streams", &self.open_streams())
            .finish()
    }
}

impl MrdPool {
    /// A pool over `client`; starts the idle reaper.
    pub fn new(client: GcsClient, cfg: PoolConfig) -> MrdPool {
        let inner = Arc::new(Inner {
            permits: Arc::new(Semaphore::new(cfg.max_streams.max(1))),
            client,
            cfg,
            objects: Mutex::new(HashMap::new()),
            stats: Arc::new(StreamStats::default()),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(reaper(weak));
        MrdPool { inner }
    }

    pub fn client(&self) -> &GcsClient {
        &self.inner.client
    }

    pub fn stats(&self) -> &StreamStats {
        &self.inner.stats
    }

    /// An upper bound of the memory the transport may hold for reads right
    /// now (HTTP/2 receive windows, per-stream decode buffers): the mount
    /// has the memory budget leave it out of what buffers may use, so the
    /// whole daemon stays within `--memory-limit`.
    pub fn transport_memory(&self) -> u64 {
        let windows = self.inner.client.transport.connections() as u64
            * u64::from(super::transport::CONNECTION_WINDOW);
        windows + self.open_streams() as u64 * super::transport::STREAM_BUFFER_ALLOWANCE
    }

    /// Streams open now (busy and idle).
    pub fn open_streams(&self) -> usize {
        self.inner.cfg.max_streams.max(1) - self.inner.permits.available_permits()
    }

    fn target(&self, size: u64) -> usize {
        self.inner
            .cfg
            .pool_size
            .unwrap_or_else(|| streams_for_size(size))
            .max(1)
    }

    /// Closes idle streams (least recently used first) until `keep` idle remain.
    fn trim_idle(inner: &Inner, keep: usize, older_than: Option<Duration>) {
        let mut objects = lock(&inner.objects);
        let mut idle: Vec<(Instant, ObjectId, usize)> = Vec::new();
        for (id, e) in objects.iter() {
            for (i, s) in e.streams.iter().enumerate() {
                if s.stream.load() == 0 && Arc::strong_count(s) == 1 {
                    idle.push((*lock(&s.last_used), id.clone(), i));
                }
            }
        }
        idle.sort_by_key(|(t, _, _)| *t);
        let excess = idle.len().saturating_sub(keep);
        let mut close: HashMap<ObjectId, Vec<usize>> = HashMap::new();
        for (n, (t, id, i)) in idle.into_iter().enumerate() {
            if n < excess || older_than.is_some_and(|d| t.elapsed() >= d) {
                close.entry(id).or_default().push(i);
            }
        }
        for (id, mut idx) in close {
            if let Some(e) = objects.get_mut(&id) {
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    e.streams.remove(i);
                }
            }
        }
        objects.retain(|_, e| !e.streams.is_empty() || e.opening > 0);
    }

    /// A permit for a new stream: at once if one is free, else after closing an
    /// idle stream elsewhere (waiting for one to become idle if need be).
    async fn permit(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(p) = self.inner.permits.clone().try_acquire_owned() {
                return p;
            }
            let idle_now = {
                let objects = lock(&self.inner.objects);
                objects
                    .values()
                    .flat_map(|e| e.streams.iter())
                    .filter(|s| s.stream.load() == 0)
                    .count()
            };
            Self::trim_idle(&self.inner, idle_now.saturating_sub(1), None);
            tokio::select! {
                p = self.inner.permits.clone().acquire_owned() => {
                    if let Ok(p) = p { return p; }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Opens background streams for `id` up to its target, sharing `handle`.
    fn grow(&self, id: &ObjectId, size: u64, handle: bytes::Bytes) {
        let target = self.target(size);
        let mut objects = lock(&self.inner.objects);
        let Some(e) = objects.get_mut(id) else {
            return;
        };
        while e.streams.len() + e.opening < target {
            let Ok(permit) = self.inner.permits.clone().try_acquire_owned() else {
                break;
            };
            e.opening += 1;
            let (pool, id, handle) = (self.clone(), id.clone(), handle.clone());
            tokio::spawn(async move {
                let opened = MrdStream::open(
                    &pool.inner.client,
                    &id.name,
                    id.generation,
                    Some(handle),
                    pool.inner.stats.clone(),
                )
                .await;
                let mut objects = lock(&pool.inner.objects);
                if let Some(e) = objects.get_mut(&id) {
                    e.opening -= 1;
                    e.opened.notify_waiters();
                    match opened {
                        Ok(stream) => e.streams.push(Arc::new(PooledStream {
                            stream,
                            last_used: Mutex::new(Instant::now()),
                            _permit: permit,
                        })),
                        Err(err) => {
                            tracing::debug!(object = %id.name, error = %err, "background stream open failed")
                        }
                    }
                }
            });
        }
    }

    /// The least-loaded live stream of `id`, opening the first if there is
    /// none. A stream opened here carries `first_read` in its open request (one
    /// round trip to the first byte), whose outcome is then returned with it;
    /// with an existing stream, the read is left to the caller.
    async fn stream(
        &self,
        id: &ObjectId,
        size: u64,
        first_read: Option<FirstRead>,
    ) -> Result<(Arc<PooledStream>, Option<PendingRead>), GcsError> {
        loop {
            // Where a read waits for a stream that is opening (see below).
            let opened: Arc<tokio::sync::Notify>;
            let mut next = None;
            let first = {
                let mut objects = lock(&self.inner.objects);
                if !objects.contains_key(id) {
                    // A new generation retires the streams of the old ones.
                    objects.retain(|k, _| k.name != id.name);
                }
                let e = objects.entry(id.clone()).or_default();
                e.streams.retain(|s| !s.stream.is_closed());
                if let Some(best) = e.streams.iter().min_by_key(|s| s.stream.load()) {
                    let best = best.clone();
                    let missing = e.streams.len() + e.opening < self.target(size);
                    // A large read that would wait behind a busy stream's
                    // data (see `mrd::SEND_AHEAD`) waits for a stream that is
                    // opening instead: it takes the read at once.
                    let large = first_read.as_ref().is_some_and(|f| f.len > SEND_AHEAD);
                    if large && e.opening > 0 && best.stream.load() > SEND_AHEAD {
                        // Registered before the lock is let go: an open
                        // finishing now still wakes it.
                        opened = e.opened.clone();
                        next = Some(opened.notified());
                        None
                    } else {
                        drop(objects);
                        if missing {
                            self.grow(id, size, best.stream.read_handle());
                        }
                        return Ok((best, None));
                    }
                } else {
                    Some(e.first.clone())
                }
            };
            let Some(first) = first else {
                if let Some(next) = next {
                    next.await;
                }
                continue;
            };
            let _guard = first.lock().await;
            let has = lock(&self.inner.objects)
                .get(id)
                .is_some_and(|e| e.streams.iter().any(|s| !s.stream.is_closed()));
            if has {
                continue;
            }
            let permit = self.permit().await;
            let (stream, pending) = self.open_stream(id, first_read).await?;
            let handle = stream.read_handle();
            let pooled = Arc::new(PooledStream {
                stream,
                last_used: Mutex::new(Instant::now()),
                _permit: permit,
            });
            lock(&self.inner.objects)
                .entry(id.clone())
                .or_default()
                .streams
                .push(pooled.clone());
            self.grow(id, size, handle);
            return Ok((pooled, pending));
        }
    }

    /// A new stream on `id` (no read handle to reuse), its open carrying `first`.
    async fn open_stream(
        &self,
        id: &ObjectId,
        first: Option<FirstRead>,
    ) -> Result<(MrdStream, Option<PendingRead>), GcsError> {
        let stats = self.inner.stats.clone();
        MrdStream::open_reading(
            &self.inner.client,
            &id.name,
            id.generation,
            None,
            stats,
            first,
        )
        .await
    }

    /// A whole small object: a stream of its own (under a permit) whose open
    /// request carries the read; it closes once the read is done.
    async fn read_whole(
        &self,
        id: &ObjectId,
        size_hint: u64,
        len: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<u64, GcsError> {
        // A new generation retires the streams of the old ones, as in `stream`.
        lock(&self.inner.objects).retain(|k, _| k.name != id.name || k == id);
        let _permit = self.permit().await;
        let first = FirstRead {
            offset: 0,
            len,
            head: self.head_for(0, len, size_hint),
            sink,
        };
        let (stream, pending) = self.open_stream(id, Some(first)).await?;
        // The stream half-closes once its only read is done.
        drop(stream);
        match pending {
            Some(p) => p.wait().await,
            None => Ok(0),
        }
    }

    /// The live version's metadata and its first `head` bytes in one round
    /// trip: a stream of its own (under a permit) opened on the latest
    /// generation, its open carrying the range, answered with the metadata
    /// first. Returns once the metadata is in; the head's load goes on (the
    /// stream half-closes when it is done).
    pub async fn stat_with_head(
        &self,
        name: &str,
        head: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<(ObjectInfo, Option<HeadLoad>), GcsError> {
        let permit = self.permit().await;
        let first = FirstRead {
            offset: 0,
            len: head,
            head: 0,
            sink,
        };
        let (stream, pending) = MrdStream::open_reading(
            &self.inner.client,
            name,
            0,
            None,
            self.inner.stats.clone(),
            Some(first),
        )
        .await?;
        let info = stream.info().clone();
        drop(stream);
        let load: Option<HeadLoad> = pending.map(|p| -> HeadLoad {
            Box::pin(async move {
                let _permit = permit;
                p.wait().await
            })
        });
        Ok((info, load))
    }

    /// Reads a range of an object version through the pool.
    pub async fn read(
        &self,
        id: &ObjectId,
        size_hint: u64,
        offset: u64,
        len: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<u64, GcsError> {
        if offset == 0
            && len >= size_hint
            && size_hint <= self.inner.cfg.whole_read_max
            && !self.has_stream(id)
        {
            return self.read_whole(id, size_hint, len, sink).await;
        }
        let mut tries = 0;
        loop {
            let first = FirstRead {
                offset,
                len,
                head: self.head_for(offset, len, size_hint),
                sink: sink.clone(),
            };
            let (s, pending) = self.stream(id, size_hint, Some(first)).await?;
            let r = match pending {
                Some(p) => p.wait().await,
                None => s.stream.read(offset, len, sink.clone()).await,
            };
            *lock(&s.last_used) = Instant::now();
            match r {
                // The stream died before taking the range: use another one.
                Err(GcsError::Unavailable(_)) if s.stream.is_closed() && tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    /// Opens (or reuses) the streams of an object's live version, waiting until
    /// the pool has its full count for the object (so that the first burst of
    /// reads spreads over all of them), and returns what the first stream's
    /// response said, e.g. to pin the generation before reading.
    pub async fn open(&self, name: &str) -> Result<ObjectInfo, GcsError> {
        let info = self.inner.client.stat(name).await?;
        let id = ObjectId {
            name: name.to_string(),
            generation: info.generation,
        };
        let (s, _) = self.stream(&id, info.size, None).await?;
        self.grow(&id, info.size, s.stream.read_handle());
        // Wait for every background open (ours and any started by `stream`).
        loop {
            let Some(opened) = lock(&self.inner.objects).get(&id).map(|e| e.opened.clone()) else {
                break;
            };
            let wait = opened.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if lock(&self.inner.objects)
                .get(&id)
                .is_none_or(|e| e.opening == 0)
            {
                break;
            }
            wait.await;
        }
        Ok(s.stream.info().clone())
    }

    /// The head a first read of `len` bytes at `offset` asks for apart: only
    /// where the rest starts inside the object (`size_hint` is a lower bound
    /// of its size), as a range starting past the end is an error.
    fn head_for(&self, offset: u64, len: u64, size_hint: u64) -> u64 {
        let head = self.inner.cfg.head_bytes;
        let rest_inside = offset.saturating_add(head) < size_hint;
        if head > 0 && rest_inside && len > 2 * head {
            head
        } else {
            0
        }
    }

    /// Has the object version a live pooled stream?
    fn has_stream(&self, id: &ObjectId) -> bool {
        lock(&self.inner.objects)
            .get(id)
            .is_some_and(|e| e.streams.iter().any(|s| !s.stream.is_closed()))
    }

    /// Live streams of an object version (for tests and metrics).
    pub fn streams_of(&self, id: &ObjectId) -> usize {
        lock(&self.inner.objects).get(id).map_or(0, |e| {
            e.streams.iter().filter(|s| !s.stream.is_closed()).count()
        })
    }
}

/// Closes idle streams past the idle timeout and beyond the idle budget.
async fn reaper(pool: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        MrdPool::trim_idle(
            &inner,
            inner.cfg.max_idle_streams,
            Some(inner.cfg.idle_timeout),
        );
    }
}

#[tonic::async_trait]
impl ObjectClient for MrdPool {
    fn parallelism(&self, size: u64) -> usize {
        self.target(size)
    }

    fn paces_above(&self) -> u64 {
        SEND_AHEAD
    }

    async fn stat(&self, name: &str) -> Result<ObjectInfo, GcsError> {
        self.inner.client.stat(name).await
    }

    async fn stat_with_head(
        &self,
        name: &str,
        head: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<(ObjectInfo, Option<HeadLoad>), GcsError> {
        MrdPool::stat_with_head(self, name, head, sink).await
    }

    async fn list(&self, prefix: &str, page_token: Option<String>) -> Result<ListPage, GcsError> {
        self.inner.client.list(prefix, page_token).await
    }

    async fn read(
        &self,
        object: &ObjectId,
        size_hint: u64,
        offset: u64,
        len: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<u64, GcsError> {
        MrdPool::read(self, object, size_hint, offset, len, sink).await
    }

    async fn create(
        &self,
        name: &str,
        if_generation_match: Option<i64>,
    ) -> Result<Box<dyn ObjectWrite>, GcsError> {
        let opts = self.inner.cfg.write.clone();
        let w =
            AppendableWriter::create(&self.inner.client, name, if_generation_match, opts).await?;
        Ok(Box::new(w))
    }

    async fn append(&self, name: &str, generation: i64) -> Result<Box<dyn ObjectWrite>, GcsError> {
        let opts = self.inner.cfg.write.clone();
        let w = AppendableWriter::append(&self.inner.client, name, Some(generation), opts).await?;
        Ok(Box::new(w))
    }

    async fn delete(&self, name: &str, generation: Option<i64>) -> Result<(), GcsError> {
        self.inner.client.delete(name, generation).await
    }

    async fn rename(
        &self,
        from: &str,
        to: &str,
        if_generation_match: Option<i64>,
    ) -> Result<ObjectInfo, GcsError> {
        self.inner
            .client
            .move_object(from, to, if_generation_match)
            .await
    }

    async fn create_folder(&self, path: &str) -> Result<(), GcsError> {
        self.inner.client.create_folder(path, true).await
    }

    async fn delete_folder(&self, path: &str) -> Result<(), GcsError> {
        self.inner.client.delete_folder(path).await
    }

    async fn folder_exists(&self, path: &str) -> Result<bool, GcsError> {
        match self.inner.client.folder_exists(path).await {
            // A bucket without a hierarchical namespace has no folders.
            Err(GcsError::PreconditionFailed(_) | GcsError::Other(_)) => Ok(false),
            r => r,
        }
    }

    async fn rename_folder(&self, from: &str, to: &str) -> Result<(), GcsError> {
        self.inner.client.rename_folder(from, to).await
    }
}
