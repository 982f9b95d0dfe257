//! Page-aligned mmap'd blocks and the global memory budget.
//!
//! Every byte of prefetch and cache lives in a [`Block`]: a fixed-size buffer
//! carved from an anonymous `mmap` (so it is page-aligned and its pages can be
//! handed back to the OS), handed out by a [`BlockPool`] only while the
//! [`Budget`] allows. A dropped block goes back to the pool's free list still
//! mapped (and still counted against the budget), so the next allocation reuses
//! warm pages instead of unmapping and faulting in fresh ones; [`BlockPool::trim`]
//! unmaps free blocks and gives their budget back when the cache shrinks.
//!
//! Data flow: the MRD stream writes a range's verified chunks into a block in
//! order through [`RangeSink`] (one writer, appending at the fill mark); readers
//! wait with [`Block::wait_for`] for just the bytes they need and read the filled
//! prefix with [`Block::bytes`]; the fill mark is published with release/acquire
//! ordering, so a reader never sees bytes before they were written.

use crate::sync::lock;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::gcs::RangeSink;

/// The global memory budget: bytes of blocks mapped for data at once.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    /// Memory held outside blocks (the transport's buffers), left out of what
    /// blocks may use: blocks get `limit - reserved`.
    reserved: AtomicU64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            reserved: AtomicU64::new(0),
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Highest `used` ever seen.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Sets the memory held outside blocks, at most half the limit (blocks
    /// always keep room to make progress).
    pub fn set_reserved(&self, n: u64) {
        self.reserved
            .store(n.min(self.limit / 2), Ordering::Relaxed);
    }

    /// What blocks may use now: the limit less the reserved memory.
    pub fn available(&self) -> u64 {
        self.limit - self.reserved.load(Ordering::Relaxed).min(self.limit / 2)
    }

    /// Blocks hold more than they may now (the reserve grew).
    pub fn over(&self) -> bool {
        self.used() > self.available()
    }

    /// Takes `n` bytes if they fit under the limit (less the reserve).
    pub fn try_reserve(&self, n: u64) -> bool {
        let limit = self.available();
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            let Some(next) = cur.checked_add(n).filter(|v| *v <= limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    pub fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The default `--memory-limit`: a quarter of the memory this process may use
/// (the cgroup limit when there is one, else the machine's RAM), at least
/// 64 MiB and at most 4 GiB.
pub fn default_memory_limit() -> u64 {
    const MIB: u64 = 1 << 20;
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(4096 * MIB, |kb| kb * 1024);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    let avail = cgroup.map_or(ram, |c| c.min(ram));
    (avail / 4).clamp(64 * MIB, 4096 * MIB)
}

/// One anonymous private mapping.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is plain memory owned by exactly one Block or free list at
// a time; access to its bytes is coordinated by Block (one writer appending past
// the published fill mark, readers only below it).
unsafe impl Send for Mapping {}
// SAFETY: see above; shared references only read below the fill mark.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Option<Mapping> {
        // SAFETY: an anonymous private mapping of `len` bytes at an address the
        // kernel picks; no file, no aliasing with other memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // Transparent huge pages where the system allows them on request: a
        // fresh block is faulted in 2 MiB at a time instead of 4 KiB (a
        // reader's first blocks are all fresh memory). Advice only: if the
        // kernel refuses, the block works the same with small pages.
        // SAFETY: p/len are the mapping just created, owned by nobody else.
        unsafe {
            libc::madvise(p, len, libc::MADV_HUGEPAGE);
        }
        NonNull::new(p.cast::<u8>()).map(|ptr| Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

struct PoolInner {
    block_size: usize,
    budget: Arc<Budget>,
    /// Free mappings, still counted against the budget.
    free: Mutex<Vec<Mapping>>,
    mapped: AtomicU64,
}

impl PoolInner {
    /// Unmaps mappings taken off the books (free or just released) and gives
    /// their bytes back to the budget.
    fn unmap(&self, maps: Vec<Mapping>) {
        let bytes: u64 = maps.iter().map(|m| m.len as u64).sum();
        drop(maps);
        self.mapped.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.release(bytes);
    }
}

/// Hands out [`Block`]s under the budget and recycles them.
#[derive(Clone)]
pub struct BlockPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockPool")
            .field("block_size", &self.inner.block_size)
            .field("budget_used", &self.inner.budget.used())
            .finish()
    }
}

impl BlockPool {
    /// A pool of `block_size`-byte blocks (rounded up to whole pages).
    pub fn new(block_size: usize, budget: Arc<Budget>) -> BlockPool {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(4096);
        let block_size = block_size.max(1).div_ceil(page) * page;
        BlockPool {
            inner: Arc::new(PoolInner {
                block_size,
                budget,
                free: Mutex::new(Vec::new()),
                mapped: AtomicU64::new(0),
            }),
        }
    }

    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.inner.budget
    }

    /// Bytes mapped right now (blocks in use plus free ones kept warm).
    pub fn mapped(&self) -> u64 {
        self.inner.mapped.load(Ordering::Relaxed)
    }

    /// A block for `len` bytes (at most the block size), from the free list or,
    /// budget permitting, a new mapping. None when the budget is spent.
    pub fn try_alloc(&self, len: usize) -> Option<Block> {
        let len = len.min(self.inner.block_size);
        if self.inner.budget.over() {
            // The reserve grew: unmap free blocks until blocks fit again; if
            // blocks in use alone are over, the caller must evict first.
            while self.inner.budget.over() {
                let m = lock(&self.inner.free).pop()?;
                self.inner.unmap(vec![m]);
            }
        }
        let map = match lock(&self.inner.free).pop() {
            Some(m) => m,
            None => {
                let size = self.inner.block_size as u64;
                if !self.inner.budget.try_reserve(size) {
                    return None;
                }
                match Mapping::new(self.inner.block_size) {
                    Some(m) => {
                        self.inner.mapped.fetch_add(size, Ordering::Relaxed);
                        m
                    }
                    None => {
                        self.inner.budget.release(size);
                        return None;
                    }
                }
            }
        };
        Some(Block {
            map: Some(map),
            len,
            filled: AtomicUsize::new(0),
            done: AtomicBool::new(false),
            writer: Mutex::new(()),
            notify: Notify::new(),
            pool: Arc::downgrade(&self.inner),
        })
    }

    /// Unmaps free blocks beyond `keep` and returns their budget (and their
    /// memory to the OS).
    pub fn trim(&self, keep: usize) {
        let drop_these: Vec<Mapping> = {
            let mut free = lock(&self.inner.free);
            let n = free.len().saturating_sub(keep);
            free.drain(..n).collect()
        };
        self.inner.unmap(drop_these);
    }

    /// Free blocks kept warm.
    pub fn free_blocks(&self) -> usize {
        lock(&self.inner.free).len()
    }
}

/// A page-aligned buffer being filled front to back by one writer while any
/// number of readers read what is already there.
pub struct Block {
    map: Option<Mapping>,
    /// Bytes this block is meant to hold.
    len: usize,
    /// Bytes written so far (a prefix); published with Release.
    filled: AtomicUsize,
    /// No more bytes will come (complete, or the load failed).
    done: AtomicBool,
    /// Serializes writers.
    writer: Mutex<()>,
    notify: Notify,
    pool: Weak<PoolInner>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("len", &self.len)
            .field("filled", &self.filled())
            .field("done", &self.is_done())
            .finish()
    }
}

impl Block {
    /// Bytes this block is meant to hold.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes written so far.
    pub fn filled(&self) -> usize {
        self.filled.load(Ordering::Acquire)
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Appends `data` at `at`, which must be the current fill mark; returns false
    /// (writing nothing) otherwise or if it would not fit.
    pub fn write_at(&self, at: usize, data: &[u8]) -> bool {
        let _w = lock(&self.writer);
        let filled = self.filled.load(Ordering::Acquire);
        let Some(map) = &self.map else { return false };
        if at != filled || data.len() > self.len - filled.min(self.len) {
            return false;
        }
        // SAFETY: [filled, filled + data.len()) lies inside the mapping (checked
        // against len <= mapping length above); no reader reads at or past
        // `filled` until the store below publishes it, and the writer lock makes
        // this the only writer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), map.ptr.as_ptr().add(filled), data.len());
        }
        self.filled.store(filled + data.len(), Ordering::Release);
        self.notify.notify_waiters();
        true
    }

    /// No more bytes will come (the range completed or failed): wake waiters.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// The bytes in `range` if they are all filled.
    pub fn bytes(&self, range: std::ops::Range<usize>) -> Option<&[u8]> {
        let filled = self.filled();
        let map = self.map.as_ref()?;
        if range.start > range.end || range.end > filled {
            return None;
        }
        // SAFETY: [start, end) is below the published fill mark (Acquire load
        // above), so those bytes were written and are never written again while
        // this block lives; the mapping outlives `&self`.
        Some(unsafe {
            std::slice::from_raw_parts(map.ptr.as_ptr().add(range.start), range.end - range.start)
        })
    }

    /// Waits until at least `n` bytes are filled or no more will come; returns
    /// the fill mark.
    pub async fn wait_for(&self, n: usize) -> usize {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let filled = self.filled();
            if filled >= n.min(self.len) || self.is_done() {
                return filled;
            }
            notified.await;
        }
    }

    /// The mapping's address (for alignment checks).
    pub fn as_ptr(&self) -> *const u8 {
        self.map
            .as_ref()
            .map_or(std::ptr::null(), |m| m.ptr.as_ptr() as *const u8)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        match self.pool.upgrade() {
            // Blocks hold more than the budget allows now: unmap, not keep.
            Some(pool) if pool.budget.over() => pool.unmap(vec![map]),
            Some(pool) => lock(&pool.free).push(map),
            None => drop(map),
        }
    }
}

impl RangeSink for Block {
    fn put(&self, at: usize, data: &[u8]) {
        // A refused write leaves the fill mark short: the reader sees fewer bytes
        // than the read reported and fails, never reads bytes that are not there.
        let _ = self.write_at(at, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_never_exceeded() {
        let b = Budget::new(10);
        assert!(b.try_reserve(6));
        assert!(!b.try_reserve(5));
        assert!(b.try_reserve(4));
        assert_eq!((b.used(), b.peak()), (10, 10));
        b.release(10);
        assert_eq!(b.used(), 0);
    }

    /// Memory reserved for the transport shrinks what blocks may use: while
    /// blocks are over, freed blocks are unmapped (not kept warm) and no block
    /// is handed out; the reserve never takes more than half the limit.
    #[test]
    fn reserve_shrinks_the_block_budget() {
        let budget = Budget::new(8 * 4096);
        let pool = BlockPool::new(4096, budget.clone());
        let mut held: Vec<Block> = (0..6)
            .map(|_| pool.try_alloc(4096).expect("fits"))
            .collect();
        budget.set_reserved(1 << 40);
        assert_eq!(budget.available(), 4 * 4096, "at most half is reserved");
        assert!(budget.over());
        assert!(pool.try_alloc(1).is_none(), "over: the caller must evict");
        held.pop();
        assert_eq!(pool.free_blocks(), 0, "unmapped, not kept");
        assert_eq!(budget.used(), 5 * 4096);
        held.pop();
        assert!(!budget.over());
        assert!(pool.try_alloc(1).is_none(), "exactly at the reduced limit");
        budget.set_reserved(0);
        assert!(
            pool.try_alloc(1).is_some(),
            "room again once the reserve shrinks"
        );
        assert_eq!(pool.mapped(), budget.used());
    }

    #[test]
    fn blocks_are_page_aligned_recycled_and_trimmed() {
        let budget = Budget::new(3 * 4096 * 2);
        let pool = BlockPool::new(5000, budget.clone());
        assert_eq!(pool.block_size(), 8192);
        let a = pool.try_alloc(8192).expect("first");
        let b = pool.try_alloc(100).expect("second");
        let c = pool.try_alloc(8192).expect("third");
        assert!(pool.try_alloc(1).is_none(), "budget spent");
        for blk in [&a, &b, &c] {
            assert_eq!(blk.as_ptr() as usize % 4096, 0);
        }
        let addr = a.as_ptr();
        drop(a);
        assert_eq!(pool.free_blocks(), 1);
        assert_eq!(budget.used(), 3 * 8192, "free blocks stay counted");
        let again = pool.try_alloc(10).expect("reused");
        assert_eq!(again.as_ptr(), addr, "the warm mapping is reused");
        drop((again, b, c));
        pool.trim(1);
        assert_eq!(pool.free_blocks(), 1);
        assert_eq!(budget.used(), 8192);
        assert_eq!(pool.mapped(), 8192);
        pool.trim(0);
        assert_eq!((budget.used(), pool.mapped()), (0, 0));
    }

    #[test]
    fn writes_append_at_the_fill_mark_only() {
        let pool = BlockPool::new(4096, Budget::new(1 << 20));
        let blk = pool.try_alloc(10).expect("block");
        assert!(blk.write_at(0, b"hello"));
        assert!(!blk.write_at(0, b"again"), "overlap refused");
        assert!(!blk.write_at(7, b"x"), "gap refused");
        assert!(!blk.write_at(5, b"too long!!"), "overrun refused");
        assert!(blk.write_at(5, b"world"));
        assert_eq!(blk.bytes(0..10), Some(&b"helloworld"[..]));
        assert_eq!(blk.bytes(3..11), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_wait_for_just_their_bytes() {
        let pool = BlockPool::new(1 << 20, Budget::new(4 << 20));
        let blk = Arc::new(pool.try_alloc(1 << 20).expect("block"));
        let reader = {
            let blk = blk.clone();
            tokio::spawn(async move {
                let n = blk.wait_for(1000).await;
                blk.bytes(0..1000).map(|b| (n, b.to_vec()))
            })
        };
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        assert!(blk.write_at(0, &data[..400]));
        assert!(blk.write_at(400, &data[400..]));
        let (n, got) = reader.await.expect("join").expect("bytes");
        assert!(n >= 1000);
        assert_eq!(got, data);
        assert!(!blk.is_done(), "the block is still loading");
        let waiter = {
            let blk = blk.clone();
            tokio::spawn(async move { blk.wait_for(1 << 20).await })
        };
        blk.finish();
        assert_eq!(
            waiter.await.expect("join"),
            1000,
            "a finished block wakes its waiters"
        );
    }
}
