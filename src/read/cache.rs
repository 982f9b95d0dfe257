//! The per-inode readahead cache: the only way the filesystem reads data.
//!
//! It is keyed by object version (name and generation): a file inode stands
//! for exactly one version (the filesystem gives a new generation a new
//! inode), so this is the inode's cache, and the engine needs no notion of
//! inodes. Each version has blocks keyed by their block-aligned offset,
//! shared by every handle that reads it, plus its read cursors
//! ([`super::prefetch`]). A read is planned by the prefetcher:
//! - *Direct* (a random read): exactly the requested span is fetched into a
//!   buffer of its own and returned; nothing else is fetched.
//! - *Blocks* (a sequential reader): the blocks covering the read, and the window
//!   ahead of it, are requested, the block the reader waits for first, each as
//!   one range through the object client (so they spread over the object's MRD
//!   streams) into a page-aligned block from the memory [`Pool`]. The read then
//!   waits for just the bytes it needs. A read inside one block is returned as a
//!   slice of that block (zero copy); a read spanning blocks is assembled once.
//!
//! Memory: blocks come from the pool only while the global budget allows. When it
//! does not, the least recently used complete block nobody is reading (from any
//! object) is evicted; a reader's window is capped to its fair share of one
//! window's worth of memory (min(budget, `--readahead-max`) / sequential
//! readers), so one greedy reader cannot take every block and several readers
//! together keep few blocks in flight (which then cycle through warm buffers
//! rather than each reader faulting in a whole window of fresh memory);
//! and if even the block a read needs cannot be had, the read falls back to a
//! direct fetch of just its span (always one unit of progress).
//!
//! Generations: each has its own blocks, so a handle opened before a change
//! keeps reading the version it pinned (from its blocks, or ESTALE once the
//! service no longer serves it); the filesystem drops a version's blocks
//! when the kernel forgets its inode ([`ReadEngine::forget`]). For appendable objects,
//! a read at or past the known size refreshes the size (stat) before it reports
//! end of file, and a short last block is fetched again once the object grew.

use crate::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::buffer::Block;
use super::prefetch::{Ahead, Cursors, Plan, PrefetchConfig};
use crate::gcs::{GcsError, ObjectClient, ObjectId, ObjectInfo, VecSink};
use crate::memory::{Buffer, Pool};

/// A sequential cursor used this recently counts toward the budget's split.
const ACTIVE_CURSOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors of the read layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Gcs(#[from] GcsError),
    #[error("{object}: the object changed while being read (generation {generation} is gone)")]
    Stale { object: String, generation: i64 },
    /// What the service says of an appendable object cannot be right: it
    /// is shorter than bytes already read from it.
    #[error("{object}: the appendable object shrank from {from} to {to} bytes")]
    Shrank { object: String, from: u64, to: u64 },
    #[error("{object}: short read at offset {offset}: got {got} of {want} bytes")]
    Short {
        object: String,
        offset: u64,
        got: u64,
        want: u64,
    },
}

/// What a read returns: a slice of a cached block, a buffer of its own from
/// the memory layer (a direct read, or a read assembled from several blocks),
/// or, when the budget has no room, plain heap bytes.
pub enum ReadData {
    Block {
        slot: Arc<Slot>,
        range: Range<usize>,
    },
    Buffer(Arc<Block>),
    Owned(Vec<u8>),
}

impl ReadData {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReadData::Block { slot, range } => slot.block.bytes(range.clone()).unwrap_or(&[]),
            ReadData::Buffer(b) => b.bytes(0..b.filled()).unwrap_or(&[]),
            ReadData::Owned(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One cached block of one object generation.
pub struct Slot {
    pub offset: u64,
    pub generation: i64,
    pub block: Block,
    /// Bytes the block will hold when loaded (short at the end of the object).
    want: u64,
    /// Set when the load ended: bytes delivered, or the error.
    result: Mutex<Option<Result<u64, ReadError>>>,
    last_used: AtomicU64,
    /// A reader has read to the end of it: evict these first.
    consumed: std::sync::atomic::AtomicBool,
    /// Fetched ahead by prefetch across files and not read yet.
    speculative: std::sync::atomic::AtomicBool,
    stats: Arc<ReadStats>,
    /// The load, to cancel when nobody will read the block.
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.speculative.load(Ordering::Relaxed) {
            self.stats.prefetch_wasted.fetch_add(1, Ordering::Relaxed);
        }
        // A block dropped while loading (evicted, cancelled, a new generation):
        // stop its fetch so the stream abandons the range.
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

impl Slot {
    fn loaded(&self) -> Option<Result<u64, ReadError>> {
        lock(&self.result).clone()
    }
}

/// Counters of the engine.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub bytes_delivered: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub block_hits: AtomicU64,
    pub block_misses: AtomicU64,
    pub direct_reads: AtomicU64,
    pub evictions: AtomicU64,
    /// Consumed blocks handed back to the pool early (`release_consumed`).
    pub released: AtomicU64,
    pub budget_fallbacks: AtomicU64,
    /// Reads behind every cursor served from cached blocks.
    pub behind_reads: AtomicU64,
    /// Heads fetched with lookups, and reads they served.
    pub heads_fetched: AtomicU64,
    pub head_reads: AtomicU64,
    /// Small files whose block started loading at open.
    pub opens_prefetched: AtomicU64,
    /// Files fetched ahead by prefetch across files, then read, and dropped
    /// unread.
    pub prefetch_started: AtomicU64,
    pub prefetch_used: AtomicU64,
    pub prefetch_wasted: AtomicU64,
}

#[derive(Default)]
struct Cached {
    blocks: BTreeMap<u64, Arc<Slot>>,
    cursors: Cursors,
    /// Read to the end through the page cache and closed: the kernel holds
    /// its bytes, so a later open fetches nothing ahead.
    read_through: bool,
}

/// How a block is loaded.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    /// Speculative (prefetch across files): takes memory only if the budget
    /// has it free (evicts nothing), and is counted as used or wasted.
    ahead: bool,
    /// A whole small object into a memory file (for FUSE passthrough).
    file: bool,
}

/// The read engine: cache, prefetcher and block pool over an object client.
pub struct ReadEngine {
    client: Arc<dyn ObjectClient>,
    pool: Pool,
    cfg: PrefetchConfig,
    objects: Mutex<HashMap<ObjectId, Cached>>,
    /// When the active sequential readers were last counted, and how many.
    readers: Mutex<(std::time::Instant, usize)>,
    clock: AtomicU64,
    /// See [`ReadEngine::set_whole_files`].
    whole_files: std::sync::atomic::AtomicBool,
    /// Heads fetched with lookups ([`ReadEngine::stat_with_head`]), with
    /// when they came; at most [`MAX_HEADS`].
    heads: Mutex<HashMap<ObjectId, (u64, Arc<Slot>)>>,
    pub stats: Arc<ReadStats>,
}

/// Heads of looked-up files kept at most (the oldest go first): they serve
/// the first reads of a file opened right after its lookup.
const MAX_HEADS: usize = 64;

impl ReadEngine {
    pub fn new(
        client: Arc<dyn ObjectClient>,
        pool: Pool,
        mut cfg: PrefetchConfig,
    ) -> Arc<ReadEngine> {
        cfg.block_size = pool.largest() as u64;
        Arc::new(ReadEngine {
            client,
            pool,
            cfg,
            objects: Mutex::new(HashMap::new()),
            readers: Mutex::new((
                std::time::Instant::now()
                    .checked_sub(std::time::Duration::from_secs(1))
                    .unwrap_or_else(std::time::Instant::now),
                1,
            )),
            clock: AtomicU64::new(0),
            whole_files: std::sync::atomic::AtomicBool::new(false),
            heads: Mutex::new(HashMap::new()),
            stats: Arc::new(ReadStats::default()),
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn config(&self) -> &PrefetchConfig {
        &self.cfg
    }

    /// Prefetch windows of the sequential readers active lately: (readers,
    /// largest window, all windows together), in bytes.
    pub fn windows(&self) -> (usize, u64, u64) {
        let objects = lock(&self.objects);
        let mut out = (0, 0, 0);
        for i in objects.values() {
            for c in &i.cursors.list {
                if c.sequential && c.last_used.elapsed() <= ACTIVE_CURSOR {
                    let w = c.window * self.cfg.block_size;
                    out = (out.0 + 1, out.1.max(w), out.2 + w);
                }
            }
        }
        out
    }

    /// Sequential readers active lately, recounted at most every 100 ms (it
    /// walks every object).
    fn active_readers(&self, objects: &HashMap<ObjectId, Cached>) -> usize {
        let mut cached = lock(&self.readers);
        if cached.0.elapsed() >= std::time::Duration::from_millis(100) {
            let n = objects
                .values()
                .map(|i| i.cursors.sequential(ACTIVE_CURSOR))
                .sum();
            *cached = (std::time::Instant::now(), n);
        }
        cached.1.max(1)
    }

    /// Makes the next [`Self::active_readers`] count again.
    fn recount_readers(&self) {
        let mut cached = lock(&self.readers);
        if let Some(past) = cached.0.checked_sub(std::time::Duration::from_secs(1)) {
            cached.0 = past;
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops an object version's blocks and cursors (forget, or the object is gone);
    /// their buffers go back to the memory pool warm (the pool's maintainer,
    /// not this call, gives idle memory back to the OS).
    pub fn forget(&self, object: &ObjectId) {
        let gone = lock(&self.objects).remove(object);
        drop(gone);
        let head = lock(&self.heads).remove(object);
        drop(head);
    }

    /// The live version's metadata, for the lookup of a name not listed;
    /// the object's first `lookup_head` bytes come in the same round trip
    /// where the client can (a read stream's open carries the range and is
    /// answered with the metadata first), into a buffer the first reads of
    /// the file are then served from ([`Self::read`]). Without memory for
    /// the head, or if that open fails for another reason than the object
    /// not being there, a plain stat.
    pub async fn stat_with_head(&self, name: &str) -> Result<ObjectInfo, GcsError> {
        let len = self.cfg.lookup_head;
        let block = (len > 0)
            .then(|| Block::alloc(&self.pool, len as usize))
            .flatten();
        let Some(block) = block else {
            return self.client.stat(name).await;
        };
        let slot = Arc::new(Slot {
            offset: 0,
            generation: 0,
            block,
            want: len,
            speculative: std::sync::atomic::AtomicBool::new(true),
            stats: self.stats.clone(),
            result: Mutex::new(None),
            last_used: AtomicU64::new(self.tick()),
            consumed: std::sync::atomic::AtomicBool::new(false),
            task: Mutex::new(None),
        });
        let sink: Arc<dyn crate::gcs::RangeSink> =
            Arc::new(SlotSink(Arc::downgrade(&slot), self.stats.clone()));
        let (info, load) = match self.client.stat_with_head(name, len, sink).await {
            Ok(got) => got,
            Err(e @ GcsError::NotFound(_)) => return Err(e),
            Err(e) => {
                tracing::debug!(object = name, error = %e, "lookup with the head failed; stat");
                return self.client.stat(name).await;
            }
        };
        let Some(load) = load else {
            return Ok(info);
        };
        self.stats.heads_fetched.fetch_add(1, Ordering::Relaxed);
        let id = ObjectId {
            name: name.to_string(),
            generation: info.generation,
        };
        {
            let mut heads = lock(&self.heads);
            if heads.len() >= MAX_HEADS {
                let oldest = heads
                    .iter()
                    .min_by_key(|(_, (t, _))| *t)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    heads.remove(&k);
                }
            }
            heads.insert(id, (self.tick(), slot.clone()));
        }
        tokio::spawn(async move {
            let r = load.await;
            *lock(&slot.result) = Some(r.map_err(ReadError::from));
            slot.block.finish();
        });
        Ok(info)
    }

    /// The head fetched with the lookup of `object`, if it holds (or is
    /// loading) the bytes up to `end` and the object's first block is not
    /// complete yet (then the block serves, and the head goes).
    fn head_covering(&self, object: &ObjectId, end: u64) -> Option<Arc<Slot>> {
        let mut heads = lock(&self.heads);
        let head = heads.get(object).map(|(_, h)| h.clone())?;
        if matches!(head.loaded(), Some(Err(_))) {
            heads.remove(object);
            return None;
        }
        let first_done = lock(&self.objects)
            .get(object)
            .and_then(|e| e.blocks.get(&0))
            .is_some_and(|s| matches!(s.loaded(), Some(Ok(_))));
        if first_done {
            heads.remove(object);
            return None;
        }
        (end <= head.want).then_some(head)
    }

    /// A file was opened: if the object fits in one block (a small file, which
    /// is almost always read whole), its block starts loading now, whole, so
    /// the first read finds it on the way. Larger files wait for their reads
    /// (a random reader must not pay for a block it never reads). Needs the
    /// tokio runtime (the load is a task).
    pub fn start_small(&self, object: &ObjectId, size: u64, finalized: bool) {
        if size == 0 || size > self.cfg.block_size {
            return;
        }
        {
            let mut objects = lock(&self.objects);
            let entry = objects.entry(object.clone()).or_default();
            if entry.read_through || entry.blocks.contains_key(&0) {
                // Read through already, or loading (e.g. fetched ahead).
                return;
            }
        }
        let load = Load {
            ahead: false,
            file: finalized && self.whole_files(),
        };
        if self.slot_for(object, size, 0, load).is_some() {
            self.stats.opens_prefetched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Small finalized objects loaded whole go into memory files from now on
    /// (the kernel offered FUSE passthrough).
    pub fn set_whole_files(&self, on: bool) {
        self.whole_files.store(on, Ordering::Relaxed);
    }

    /// Are small finalized objects loaded into memory files (passthrough on)?
    pub fn whole_files(&self) -> bool {
        self.whole_files.load(Ordering::Relaxed)
    }

    /// FUSE passthrough for an open of a small finalized object: its whole
    /// bytes in a memory file, loaded (waiting for them), for the kernel to
    /// serve every read of this open itself. None when passthrough is off,
    /// the object is not small, or it is cached in a plain block (then the
    /// open takes the normal read path). The slot stays cached while the
    /// caller holds it.
    pub async fn whole_file(
        &self,
        object: &ObjectId,
        size: u64,
        finalized: bool,
    ) -> Option<Arc<Slot>> {
        if !finalized || !self.whole_files() || size == 0 || size > self.cfg.block_size {
            return None;
        }
        self.start_small(object, size, finalized);
        let slot = {
            let objects = lock(&self.objects);
            let entry = objects.get(object)?;
            entry.blocks.get(&0)?.clone()
        };
        slot.block.memfile()?;
        if slot.speculative.swap(false, Ordering::Relaxed) {
            self.stats.prefetch_used.fetch_add(1, Ordering::Relaxed);
        }
        // The load's outcome is recorded before the block is marked done.
        slot.block.wait_done().await;
        let whole = slot.block.filled() as u64 == size && matches!(slot.loaded(), Some(Ok(_)));
        whole.then_some(slot)
    }

    /// Prefetch across files: starts loading a small file whole ahead of its
    /// reader, if the memory budget has room for it without evicting
    /// anything. False when it had no room (the caller stops there); a file
    /// larger than one block, or already loading or read, is skipped.
    pub fn prefetch_file(&self, object: &ObjectId, size: u64, finalized: bool) -> bool {
        if size == 0 || size > self.cfg.block_size {
            return true;
        }
        {
            let mut objects = lock(&self.objects);
            let entry = objects.entry(object.clone()).or_default();
            if entry.read_through || entry.blocks.contains_key(&0) {
                return true;
            }
        }
        let load = Load {
            ahead: true,
            file: finalized && self.whole_files(),
        };
        match self.slot_for(object, size, 0, load) {
            Some(_) => {
                self.stats.prefetch_started.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Blocks cached (or loading) for an object version, as (offset, filled) pairs.
    pub fn blocks_of(&self, object: &ObjectId) -> Vec<(u64, usize)> {
        lock(&self.objects)
            .get(object)
            .map(|i| {
                i.blocks
                    .values()
                    .map(|s| (s.offset, s.block.filled()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What an appendable object holds now, looked up: the same generation
    /// (else [`ReadError::Stale`]) and no shorter than `known` bytes (else
    /// [`ReadError::Shrank`]). The one place an object's growth is looked up:
    /// the filesystem's handles ask here, and so does [`ReadEngine::read`] for
    /// a read past the size it was given.
    pub async fn grown(&self, object: &ObjectId, known: u64) -> Result<ObjectInfo, ReadError> {
        let info = self.client.stat(&object.name).await?;
        if info.generation != object.generation {
            return Err(ReadError::Stale {
                object: object.name.clone(),
                generation: object.generation,
            });
        }
        if info.size < known {
            return Err(ReadError::Shrank {
                object: object.name.clone(),
                from: known,
                to: info.size,
            });
        }
        Ok(info)
    }

    /// Reads up to `len` bytes at `off` of `object` (whose size is `size` as far
    /// as the caller knows; `finalized` false for appendable objects). Returns
    /// fewer bytes only at the end of the object.
    pub async fn read(
        &self,
        object: &ObjectId,
        mut size: u64,
        finalized: bool,
        off: u64,
        len: u64,
    ) -> Result<ReadData, ReadError> {
        if off.saturating_add(len) > size && !finalized {
            // An appendable object may have grown: refresh before a short read.
            size = self.grown(object, size).await?.size;
        }
        if off >= size || len == 0 {
            return Ok(ReadData::Owned(Vec::new()));
        }
        let len = len.min(size - off);
        let plan = {
            let mut objects = lock(&self.objects);
            let sequential_total = self.active_readers(&objects);
            let entry = objects.entry(object.clone()).or_default();
            let cap = window_cap(
                self.pool.budget().available(),
                self.cfg.readahead_max,
                self.cfg.block_size,
                sequential_total,
            );
            let bs = self.cfg.block_size.max(1);
            let last = (off + len - 1) / bs * bs;
            // Blocks the client paces (see `ObjectClient::paces_above`)
            // move no sooner for a longer window: it keeps two per stream
            // (one arriving, one sent as the first ends) and grows only
            // for blocks the client sends at once.
            let ahead = Ahead {
                starved: bs <= self.client.paces_above()
                    && entry
                        .blocks
                        .get(&last)
                        .is_none_or(|s| s.block.filled() == 0 && !s.block.is_done()),
                floor: stream_floor(self.client.parallelism(size), sequential_total),
            };
            // A read no cursor takes whose bytes are cached already (the
            // kernel answered late for a request a sequential reader passed):
            // served from the blocks, and no cursor of its own, which would
            // count as a reader and hold blocks back from the pool.
            let (plan, dropped) = if !entry.cursors.continued_by(&self.cfg, off)
                && cached_span(&entry.blocks, off, off + len, bs)
            {
                self.stats.behind_reads.fetch_add(1, Ordering::Relaxed);
                (Plan::Blocks { ahead_to: 0 }, Vec::new())
            } else {
                let before = entry.cursors.sequential(ACTIVE_CURSOR);
                let planned = entry.cursors.plan(&self.cfg, off, len, size, cap, ahead);
                if entry.cursors.sequential(ACTIVE_CURSOR) > before {
                    // A new reader: the others' share shrinks from the next
                    // read on, not 100 ms later.
                    self.recount_readers();
                }
                planned
            };
            for c in dropped {
                // Cancel that cursor's prefetch that nobody reads.
                let lo = c.end / self.cfg.block_size * self.cfg.block_size;
                let doomed: Vec<u64> = entry
                    .blocks
                    .range(lo..c.frontier.max(lo))
                    .filter(|(_, s)| Arc::strong_count(s) == 1)
                    .map(|(k, _)| *k)
                    .collect();
                for k in doomed {
                    entry.blocks.remove(&k);
                }
            }
            plan
        };
        // The first bytes of a file its lookup fetched: served from there
        // (the blocks the plan wants still start loading). Reads past the
        // head's length never take the heads' lock.
        let head = (off + len <= self.cfg.lookup_head)
            .then(|| self.head_covering(object, off + len))
            .flatten();
        if let Some(head) = head {
            if let Plan::Blocks { ahead_to } = plan {
                drop(self.start_blocks(object, size, off, len, ahead_to));
            }
            let end = off + len;
            if head.block.wait_for(end as usize).await as u64 >= end {
                self.stats.head_reads.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_delivered.fetch_add(len, Ordering::Relaxed);
                return Ok(ReadData::Block {
                    slot: head,
                    range: off as usize..end as usize,
                });
            }
        }
        let result = match plan {
            Plan::Direct => self.direct(object, size, off, len).await,
            Plan::Blocks { ahead_to } => {
                self.through_blocks(object, size, off, len, ahead_to).await
            }
        };
        if let Ok(d) = &result {
            self.stats
                .bytes_delivered
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        result
    }

    /// Fetches exactly `[off, off + len)` into a buffer of its own.
    async fn direct(
        &self,
        object: &ObjectId,
        size: u64,
        off: u64,
        len: u64,
    ) -> Result<ReadData, ReadError> {
        self.stats.direct_reads.fetch_add(1, Ordering::Relaxed);
        // A warm buffer from the pool when the budget has room (no eviction
        // for it: this read is not cached); else heap bytes.
        let buffer = (len as usize <= self.pool.largest())
            .then(|| Block::alloc(&self.pool, len as usize))
            .flatten()
            .map(Arc::new);
        let mut heap = None;
        let sink: Arc<dyn crate::gcs::RangeSink> = match &buffer {
            Some(b) => b.clone(),
            None => heap.insert(VecSink::new(len as usize)).clone(),
        };
        let n = match self.client.read(object, size, off, len, sink).await {
            Ok(n) => n,
            Err(GcsError::NotFound(_)) => {
                return Err(ReadError::Stale {
                    object: object.name.clone(),
                    generation: object.generation,
                })
            }
            Err(e) => return Err(e.into()),
        };
        self.stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
        let got = buffer.as_ref().map_or(n, |b| b.filled() as u64);
        if n < len || got < len {
            return Err(ReadError::Short {
                object: object.name.clone(),
                offset: off,
                got: got.min(n),
                want: len,
            });
        }
        Ok(match (buffer, heap) {
            (Some(b), _) => ReadData::Buffer(b),
            (None, Some(v)) => ReadData::Owned(v.take()),
            (None, None) => ReadData::Owned(Vec::new()),
        })
    }

    /// A buffer from the shared pool for someone else than the cache (a
    /// writer's piece), evicting idle cached blocks to make room: readers and
    /// writers share one budget, and cached bytes give way to written ones.
    /// None when nothing more can be evicted.
    pub fn alloc_buffer(&self, len: usize) -> Option<Buffer> {
        self.pool.budget().refresh_reserved();
        loop {
            if let Some(b) = self.pool.try_alloc(len) {
                return Some(b);
            }
            if !self.evict_one() {
                return None;
            }
        }
    }

    /// Allocates a block, evicting the least recently used idle block if the
    /// budget is spent.
    fn alloc(&self, len: usize, file: bool) -> Option<Block> {
        self.pool.budget().refresh_reserved();
        loop {
            let got = if file {
                Block::alloc_file(&self.pool, len)
            } else {
                Block::alloc(&self.pool, len)
            };
            if let Some(b) = got {
                return Some(b);
            }
            if !self.evict_one() {
                return None;
            }
        }
    }

    /// Evicts a complete block nobody holds: blocks already read past first,
    /// then blocks prefetched ahead of readers, least recently used first in
    /// each (files fetched ahead by prefetch across files and not read yet
    /// go before all of them); false if there is none.
    fn evict_one(&self) -> bool {
        let mut objects = lock(&self.objects);
        let mut best: Option<(u8, u64, &ObjectId, u64)> = None;
        for (key_of, entry) in objects.iter() {
            for (off, s) in &entry.blocks {
                if Arc::strong_count(s) == 1 && s.block.is_done() {
                    // Files fetched ahead and never read go first, then
                    // blocks read past, then the rest.
                    let rank = if s.speculative.load(Ordering::Relaxed) {
                        0
                    } else if s.consumed.load(Ordering::Relaxed) {
                        1
                    } else {
                        2
                    };
                    let key = (rank, s.last_used.load(Ordering::Relaxed));
                    if best.is_none_or(|(c, t, _, _)| key < (c, t)) {
                        best = Some((key.0, key.1, key_of, *off));
                    }
                }
            }
        }
        let Some((_, _, object, off)) = best else {
            return false;
        };
        let object = object.clone();
        if let Some(entry) = objects.get_mut(&object) {
            entry.blocks.remove(&off);
        }
        drop(objects);
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The slot for the block at `boff`, starting its load if needed. None when
    /// no memory can be had for it.
    fn slot(&self, object: &ObjectId, size: u64, boff: u64) -> Option<Arc<Slot>> {
        self.slot_for(object, size, boff, Load::default())
    }

    /// [`Self::slot`], loaded as `load` says.
    fn slot_for(&self, object: &ObjectId, size: u64, boff: u64, load: Load) -> Option<Arc<Slot>> {
        let Load { ahead, file } = load;
        let want = self.cfg.block_size.min(size - boff);
        // Only a whole object goes into a memory file.
        let file = file && boff == 0 && want == size;
        {
            let mut objects = lock(&self.objects);
            let entry = objects.get_mut(object)?;
            if let Some(s) = entry.blocks.get(&boff) {
                let failed = matches!(s.loaded(), Some(Err(_)));
                if !failed && s.want >= want {
                    s.last_used.store(self.tick(), Ordering::Relaxed);
                    self.stats.block_hits.fetch_add(1, Ordering::Relaxed);
                    if !ahead && s.speculative.swap(false, Ordering::Relaxed) {
                        self.stats.prefetch_used.fetch_add(1, Ordering::Relaxed);
                    }
                    return Some(s.clone());
                }
                // A failed load, or the object grew past a short block: again.
                entry.blocks.remove(&boff);
            }
        }
        let block = match (ahead, file) {
            (true, true) => Block::alloc_file(&self.pool, want as usize)?,
            (true, false) => Block::alloc(&self.pool, want as usize)?,
            (false, _) => self.alloc(want as usize, file)?,
        };
        let slot = Arc::new(Slot {
            offset: boff,
            generation: object.generation,
            block,
            want,
            speculative: std::sync::atomic::AtomicBool::new(ahead),
            stats: self.stats.clone(),
            result: Mutex::new(None),
            last_used: AtomicU64::new(self.tick()),
            consumed: std::sync::atomic::AtomicBool::new(false),
            task: Mutex::new(None),
        });
        {
            let mut objects = lock(&self.objects);
            let entry = objects.get_mut(object)?;
            if let Some(existing) = entry.blocks.get(&boff) {
                // Another reader got there first.
                return Some(existing.clone());
            }
            entry.blocks.insert(boff, slot.clone());
        }
        self.stats.block_misses.fetch_add(1, Ordering::Relaxed);
        let (client, object, stats, weak) = (
            self.client.clone(),
            object.clone(),
            self.stats.clone(),
            Arc::downgrade(&slot),
        );
        let task = tokio::spawn(async move {
            let sink: Arc<dyn crate::gcs::RangeSink> = Arc::new(SlotSink(weak.clone(), stats));
            let r = client.read(&object, size, boff, want, sink).await;
            if let Some(s) = weak.upgrade() {
                *lock(&s.result) = Some(r.map_err(ReadError::from));
                lock(&s.task).take();
                s.block.finish();
            }
        });
        let mut t = lock(&slot.task);
        if !slot.block.is_done() {
            *t = Some(task.abort_handle());
        }
        drop(t);
        Some(slot)
    }

    /// The last handle of an object version was closed. Through the page cache
    /// ([`PrefetchConfig::release_consumed`]) the kernel keeps what was read,
    /// so the blocks read to their end go back to the memory pool now, warm
    /// for the next file (a dataset read file by file then cycles through the
    /// same few warm buffers instead of faulting in fresh memory per file).
    /// Blocks prefetched but not read stay cached.
    pub fn closed(&self, object: &ObjectId) {
        if self.cfg.release_consumed && self.drop_consumed(object, 0) > 0 {
            if let Some(entry) = lock(&self.objects).get_mut(object) {
                entry.read_through = true;
            }
        }
    }

    /// Drops the version's consumed, complete, idle blocks beyond the most
    /// recently used one per sequential reader (for the kernel's late
    /// requests behind it; the block a reader is in is held, not idle), so
    /// their memory goes back to the pool's free list warm. Only with
    /// [`PrefetchConfig::release_consumed`].
    fn release_consumed(&self, object: &ObjectId) {
        let keep = {
            let objects = lock(&self.objects);
            let Some(entry) = objects.get(object) else {
                return;
            };
            entry.cursors.sequential(ACTIVE_CURSOR).max(1)
        };
        self.drop_consumed(object, keep);
    }

    /// Drops the version's consumed, complete blocks nobody holds, but for the
    /// `keep` most recently used; returns how many went.
    fn drop_consumed(&self, object: &ObjectId, keep: usize) -> usize {
        let mut objects = lock(&self.objects);
        let Some(entry) = objects.get_mut(object) else {
            return 0;
        };
        let mut done: Vec<(u64, u64)> = entry
            .blocks
            .iter()
            .filter(|(_, s)| {
                s.consumed.load(Ordering::Relaxed) && s.block.is_done() && Arc::strong_count(s) == 1
            })
            .map(|(k, s)| (s.last_used.load(Ordering::Relaxed), *k))
            .collect();
        if done.len() <= keep {
            return 0;
        }
        done.sort_unstable();
        let n = done.len() - keep;
        let gone: Vec<Arc<Slot>> = done[..n]
            .iter()
            .filter_map(|(_, k)| entry.blocks.remove(k))
            .collect();
        drop(objects);
        self.stats
            .released
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        gone.len()
    }

    /// Starts loading the blocks covering `[off, off + len)` and the window
    /// ahead up to `ahead_to` (as far as memory allows); returns the blocks
    /// the read needs, or None when there is no memory for one of them.
    fn start_blocks(
        &self,
        object: &ObjectId,
        size: u64,
        off: u64,
        len: u64,
        ahead_to: u64,
    ) -> Option<Vec<Arc<Slot>>> {
        let bs = self.cfg.block_size;
        let end = off + len;
        // The blocks this read needs, first.
        let mut needed = Vec::new();
        let mut b = off / bs * bs;
        while b < end {
            needed.push(self.slot(object, size, b)?);
            b += bs;
        }
        // Then the window ahead (the blocks not cached yet).
        let missing: Vec<u64> = {
            let objects = lock(&self.objects);
            let have = objects.get(object).map(|i| &i.blocks);
            (b..ahead_to.min(size))
                .step_by(bs as usize)
                .filter(|p| have.is_none_or(|m| !m.contains_key(p)))
                .collect()
        };
        for p in missing {
            if self.slot(object, size, p).is_none() {
                break;
            }
        }
        Some(needed)
    }

    async fn through_blocks(
        &self,
        object: &ObjectId,
        size: u64,
        off: u64,
        len: u64,
        ahead_to: u64,
    ) -> Result<ReadData, ReadError> {
        let end = off + len;
        let Some(mut needed) = self.start_blocks(object, size, off, len, ahead_to) else {
            // No memory for a block: one unit of progress, fetched directly.
            self.stats.budget_fallbacks.fetch_add(1, Ordering::Relaxed);
            return self.direct(object, size, off, len).await;
        };
        // Wait for just the bytes needed from each block.
        for s in &needed {
            let lo = off.max(s.offset) - s.offset;
            let hi = end.min(s.offset + s.want) - s.offset;
            let filled = s.block.wait_for(hi as usize).await as u64;
            if hi == s.want
                && !s.consumed.swap(true, Ordering::Relaxed)
                && self.cfg.release_consumed
            {
                self.release_consumed(object);
            }
            if filled < hi {
                return Err(match s.loaded() {
                    Some(Err(ReadError::Gcs(GcsError::NotFound(_)))) => ReadError::Stale {
                        object: object.name.clone(),
                        generation: object.generation,
                    },
                    Some(Err(e)) => e,
                    _ => ReadError::Short {
                        object: object.name.clone(),
                        offset: s.offset + lo,
                        got: filled.saturating_sub(lo),
                        want: hi - lo,
                    },
                });
            }
        }
        if needed.len() == 1 {
            let s = needed.remove(0);
            let lo = (off - s.offset) as usize;
            let hi = (end - s.offset) as usize;
            return Ok(ReadData::Block {
                slot: s,
                range: lo..hi,
            });
        }
        // Spanning blocks: assembled once, into a warm buffer when there is room.
        let parts = needed.iter().map(|s| {
            let lo = (off.max(s.offset) - s.offset) as usize;
            let hi = (end.min(s.offset + s.want) - s.offset) as usize;
            s.block.bytes(lo..hi).unwrap_or(&[])
        });
        let room = (len as usize <= self.pool.largest())
            .then(|| Block::alloc(&self.pool, len as usize))
            .flatten();
        if let Some(out) = room {
            for p in parts {
                out.write_at(out.filled(), p);
            }
            return Ok(ReadData::Buffer(Arc::new(out)));
        }
        let mut out = Vec::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(p);
        }
        Ok(ReadData::Owned(out))
    }
}

/// The most blocks one sequential reader may prefetch ahead (beyond the block
/// it reads) while `readers` read at once: the readers share one window's
/// worth of memory (`readahead_max`, and never more than the budget), so
/// several readers together keep few blocks in flight, which then cycle
/// through warm buffers instead of each reader faulting in a whole window of
/// fresh memory. At least one block.
fn window_cap(available: u64, readahead_max: u64, block_size: u64, readers: usize) -> u64 {
    let bs = block_size.max(1);
    let total = available.min(readahead_max.saturating_add(bs));
    let share = total / (readers.max(1) as u64) / bs;
    share.saturating_sub(1).max(1)
}

/// The least window (in blocks) of a sequential reader of an object the
/// client carries on `streams` streams while `readers` read at once: two
/// blocks per stream (one arriving, one queued behind it, so a stream never
/// idles for a round trip between blocks) for one reader; readers together
/// keep that many in flight, not each of them (their streams share the same
/// connections and CPUs, and each block held is memory), at least one each.
fn stream_floor(streams: usize, readers: usize) -> u64 {
    ((2 * streams.max(1)) as u64)
        .div_ceil(readers.max(1) as u64)
        .max(1)
}

/// Whether every block covering `[off, end)` is cached (loaded or loading,
/// not failed) and holds the bytes up to `end`.
fn cached_span(blocks: &BTreeMap<u64, Arc<Slot>>, off: u64, end: u64, bs: u64) -> bool {
    let mut b = off / bs * bs;
    while b < end {
        match blocks.get(&b) {
            Some(s)
                if s.offset + s.want >= end.min(b + bs) && !matches!(s.loaded(), Some(Err(_))) => {}
            _ => return false,
        }
        b += bs;
    }
    true
}

/// Writes a range's verified chunks into a slot's block, for as long as the
/// slot is cached (a dropped slot's late chunks go nowhere).
struct SlotSink(std::sync::Weak<Slot>, Arc<ReadStats>);

impl crate::gcs::RangeSink for SlotSink {
    fn put(&self, at: usize, data: &[u8]) {
        self.1
            .bytes_fetched
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(s) = self.0.upgrade() {
            s.block.put(at, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{stream_floor, window_cap};

    #[test]
    fn readers_share_the_streams_floor() {
        // One reader keeps two blocks per stream.
        assert_eq!(stream_floor(2, 1), 4);
        assert_eq!(stream_floor(4, 1), 8);
        // Readers together keep that many, rounded up, at least one each.
        assert_eq!(stream_floor(2, 2), 2);
        assert_eq!(stream_floor(4, 3), 3);
        assert_eq!(stream_floor(2, 4), 1);
        assert_eq!(stream_floor(1, 100), 1);
        assert_eq!(stream_floor(0, 0), 2);
    }

    #[test]
    fn readers_share_one_window_of_memory() {
        const MIB: u64 = 1 << 20;
        let (bs, max) = (8 * MIB, 256 * MIB);
        // One reader alone gets the whole window (32 blocks ahead).
        assert_eq!(window_cap(4096 * MIB, max, bs, 1), 32);
        // Four share it: together no more than one window ahead.
        let four = window_cap(4096 * MIB, max, bs, 4);
        assert_eq!(four, 7);
        assert!(4 * (four + 1) * bs <= max + bs);
        // A small budget caps it further, and a crowd still gets a block.
        assert_eq!(window_cap(64 * MIB, max, bs, 1), 7);
        assert_eq!(window_cap(4096 * MIB, max, bs, 1000), 1);
        assert_eq!(window_cap(0, max, 0, 0), 1);
    }
}
