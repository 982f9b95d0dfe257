//! Blocks: the read engine's unit of prefetch and cache.
//!
//! A [`Block`] is a page-aligned [`Buffer`] from the memory layer
//! ([`crate::memory`], which owns the budget, size classes and warm reuse)
//! plus a fill mark: the MRD stream writes a range's verified chunks into it
//! through [`RangeSink`], each part of the range in order (a stream may fetch
//! a block's first bytes as a range of their own, whose chunks can arrive
//! before, after or between the rest's). Bytes written past the fill mark wait
//! there, unpublished, until the bytes before them arrive; readers wait with
//! [`Block::wait_for`] for just the bytes they need and read the filled prefix
//! with [`Block::bytes`]. The fill mark is published with release/acquire
//! ordering, so a reader never sees bytes before they were written. A dropped
//! block's buffer goes back to the pool warm.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::gcs::RangeSink;
use crate::memory::{Buffer, MemFile, Pool};
use crate::sync::lock;

/// Where a block's bytes live: a pool buffer, or (a whole small object to be
/// served by the kernel through FUSE passthrough) a memory file.
enum Backing {
    Pool(Buffer),
    File(MemFile),
}

impl Backing {
    fn as_ptr(&self) -> *mut u8 {
        match self {
            Backing::Pool(b) => b.as_ptr(),
            Backing::File(f) => f.as_ptr(),
        }
    }

    fn capacity(&self) -> usize {
        match self {
            Backing::Pool(b) => b.capacity(),
            Backing::File(f) => f.size(),
        }
    }
}

/// A page-aligned buffer being filled by its writers while any number of
/// readers read the prefix already there.
pub struct Block {
    buf: Backing,
    /// Bytes this block is meant to hold.
    len: usize,
    /// Bytes written so far (a prefix); published with Release.
    filled: AtomicUsize,
    /// No more bytes will come (complete, or the load failed).
    done: AtomicBool,
    /// Serializes writers; holds the extents written past the fill mark (in
    /// no order, disjoint), which join the prefix once the gap before them
    /// is filled.
    writer: Mutex<Vec<(usize, usize)>>,
    notify: Notify,
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
    /// A block for `len` bytes in a buffer from the memory layer: `None` when
    /// the pool has no room (the caller evicts and asks again).
    pub fn alloc(pool: &Pool, len: usize) -> Option<Block> {
        let len = len.min(pool.largest());
        let buf = Backing::Pool(pool.try_alloc(len)?);
        Some(Self::new(buf, len))
    }

    /// A block for a whole small object of `len` bytes held in a memory file
    /// (its budget taken from the pool's), which the kernel can serve itself.
    pub fn alloc_file(pool: &Pool, len: usize) -> Option<Block> {
        let file = MemFile::new(pool.budget(), len)?;
        Some(Self::new(Backing::File(file), len))
    }

    fn new(buf: Backing, len: usize) -> Block {
        Block {
            buf,
            len,
            filled: AtomicUsize::new(0),
            done: AtomicBool::new(false),
            writer: Mutex::new(Vec::new()),
            notify: Notify::new(),
        }
    }

    /// The memory file holding this block, if it is one.
    pub fn memfile(&self) -> Option<&MemFile> {
        match &self.buf {
            Backing::File(f) => Some(f),
            Backing::Pool(_) => None,
        }
    }

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

    /// Writes `data` at `at`: at the fill mark it extends the filled prefix
    /// (with any bytes already written just past it); further on it waits
    /// there until the gap before it is filled. Returns false (writing
    /// nothing) if it would overlap bytes already written or not fit.
    pub fn write_at(&self, at: usize, data: &[u8]) -> bool {
        let mut ahead = lock(&self.writer);
        let filled = self.filled.load(Ordering::Acquire);
        let Some(end) = at.checked_add(data.len()) else {
            return false;
        };
        if at < filled || end > self.len || ahead.iter().any(|&(s, e)| at < e && s < end) {
            return false;
        }
        // SAFETY: [at, end) lies inside the buffer (end <= len <= its
        // capacity); it starts at or past the published fill mark, so no
        // reader reads it until a later store publishes it; it overlaps no
        // bytes written before (checked above), so nothing written is ever
        // written again; and the writer lock makes this the only writer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf.as_ptr().add(at), data.len());
        }
        if at != filled {
            ahead.push((at, end));
            return true;
        }
        let mut mark = end;
        while let Some(i) = ahead.iter().position(|&(s, _)| s == mark) {
            mark = ahead.swap_remove(i).1;
        }
        self.filled.store(mark, Ordering::Release);
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
        if range.start > range.end || range.end > filled {
            return None;
        }
        // SAFETY: [start, end) is below the published fill mark (Acquire load
        // above), so those bytes were written and are never written again while
        // this block lives; the buffer outlives `&self`.
        Some(unsafe {
            std::slice::from_raw_parts(self.buf.as_ptr().add(range.start), range.end - range.start)
        })
    }

    /// Waits until no more bytes will come (the load completed or failed).
    pub async fn wait_done(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
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

    /// The buffer's address (for alignment checks).
    pub fn as_ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }

    /// The memory this block holds (its buffer's size class).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl RangeSink for Block {
    fn put(&self, at: usize, data: &[u8]) {
        // A refused write leaves the fill mark short: the reader sees fewer bytes
        // than the read reported and fails, never reads bytes that are not there
        // (nor, past a gap, bytes whose predecessors never came).
        let _ = self.write_at(at, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Budget, PoolConfig};
    use std::sync::Arc;

    #[test]
    fn writes_publish_a_prefix_only() {
        let pool = Pool::new(Budget::new(1 << 20), PoolConfig::new(4096));
        let blk = Block::alloc(&pool, 16).expect("block");
        assert_eq!(blk.as_ptr() as usize % 4096, 0, "page-aligned");
        assert!(blk.write_at(0, b"hello"));
        assert!(!blk.write_at(0, b"again"), "overlap refused");
        assert!(!blk.write_at(5, b"too long!!!!"), "overrun refused");
        // Bytes past a gap wait unpublished until the gap is filled.
        assert!(blk.write_at(10, b"tail"));
        assert!(!blk.write_at(12, b"xx"), "overlap with bytes ahead refused");
        assert!(!blk.write_at(9, b"xx"), "overlap with bytes ahead refused");
        assert_eq!(blk.filled(), 5);
        assert_eq!(blk.bytes(0..10), None);
        assert!(blk.write_at(5, b"world"));
        assert_eq!(blk.filled(), 14, "the gap filled joins the bytes ahead");
        assert_eq!(blk.bytes(0..14), Some(&b"helloworldtail"[..]));
        assert_eq!(blk.bytes(3..15), None);
        assert!(!blk.write_at(usize::MAX, b"x"), "no overflow");
    }

    /// Any order of disjoint parts gives the same bytes, published as a
    /// prefix that never shrinks and never covers an unwritten byte.
    #[test]
    fn parts_in_any_order_make_the_same_block() {
        let pool = Pool::new(Budget::new(1 << 20), PoolConfig::new(4096));
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let cuts = [0, 100, 1000, 1001, 3000, 4096];
        let parts: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        let mut seed = 0x9e37_79b9_u32;
        for _ in 0..200 {
            let mut order = parts.clone();
            for i in (1..order.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                order.swap(i, seed as usize % (i + 1));
            }
            let blk = Block::alloc(&pool, data.len()).expect("block");
            let mut written = vec![false; data.len()];
            let mut last = 0;
            for (s, e) in order {
                assert!(blk.write_at(s, &data[s..e]));
                written[s..e].iter_mut().for_each(|w| *w = true);
                let f = blk.filled();
                assert!(f >= last, "the prefix never shrinks");
                assert!(
                    written[..f].iter().all(|&w| w),
                    "nothing unwritten published"
                );
                assert!(
                    f == data.len() || !written[f],
                    "the whole written prefix is published"
                );
                last = f;
            }
            assert_eq!(blk.bytes(0..data.len()), Some(&data[..]));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_wait_for_just_their_bytes() {
        let pool = Pool::new(Budget::new(4 << 20), PoolConfig::new(1 << 20));
        let blk = Arc::new(Block::alloc(&pool, 1 << 20).expect("block"));
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
