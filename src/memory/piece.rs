//! A piece: a pool [`Buffer`] filled front to back by one owner, then frozen
//! into [`Bytes`] that any number of holders share read-only.
//!
//! Writes gather their bytes in pieces: `write(2)`s are copied into the
//! piece's free tail ([`Piece::push`], or [`Piece::fill_with`] for a `pread`
//! straight into it); a full piece is [`Piece::freeze`]d and handed to the
//! upload, whose chunks are slices of it. When the last slice is dropped
//! (the service said the bytes are persisted) the buffer goes back to its
//! pool warm, and its budget with it: the memory a writer holds is exactly the
//! pieces it has not seen persisted.

use bytes::Bytes;

use super::Buffer;

/// A buffer being filled, owned by one writer.
#[derive(Debug)]
pub struct Piece {
    buf: Buffer,
    len: usize,
}

/// A full (or final) piece, shared read-only through [`Bytes`].
struct Frozen {
    buf: Buffer,
    len: usize,
}

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the buffer's first `len` bytes were written by the piece's
        // owner before it was frozen (`len` ≤ capacity); after freezing
        // nothing writes to it again, and the buffer lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr(), self.len) }
    }
}

impl Piece {
    pub fn new(buf: Buffer) -> Piece {
        Piece { buf, len: 0 }
    }

    /// Bytes gathered.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes that still fit.
    pub fn room(&self) -> usize {
        self.capacity() - self.len
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    /// The bytes gathered so far.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written through `push` or
        // `fill_with`; the buffer is owned by this piece alone.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr(), self.len) }
    }

    /// Copies as much of `data` as fits; returns how much.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        // SAFETY: `len + n` ≤ capacity, so the destination is inside the
        // buffer, which this piece owns alone; `data` is another allocation
        // (a caller's slice cannot point into a buffer it does not own).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf.as_ptr().add(self.len), n);
        }
        self.len += n;
        n
    }

    /// Lets `fill` write into the free tail (e.g. a `pread` straight into
    /// it) and keeps the bytes it says it wrote (at most the tail).
    pub fn fill_with<E>(
        &mut self,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let room = self.room();
        // SAFETY: the tail [len, capacity) is inside the buffer, which this
        // piece owns alone; mapped memory is always initialized (zeros or
        // earlier bytes), so handing it out as `&mut [u8]` is sound.
        let tail = unsafe { std::slice::from_raw_parts_mut(self.buf.as_ptr().add(self.len), room) };
        let n = fill(tail)?.min(room);
        self.len += n;
        Ok(n)
    }

    /// Forgets the bytes gathered (the buffer is kept for new ones).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The gathered bytes as shared, read-only [`Bytes`]; the buffer goes
    /// back to the pool when the last of them is dropped.
    pub fn freeze(self) -> Bytes {
        let Piece { buf, len } = self;
        Bytes::from_owner(Frozen { buf, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Budget, Pool, PoolConfig};

    fn pool(limit: u64) -> Pool {
        Pool::new(Budget::new(limit), PoolConfig::new(1 << 20))
    }

    #[test]
    fn a_piece_gathers_then_shares_its_bytes_and_goes_back_warm() {
        let pool = pool(4 << 20);
        let mut p = Piece::new(pool.try_alloc(1 << 20).expect("room"));
        assert_eq!(p.push(b"hello "), 6);
        let n = p
            .fill_with(|tail| {
                tail[..5].copy_from_slice(b"world");
                Ok::<_, ()>(5)
            })
            .expect("fill");
        assert_eq!(n, 5);
        assert_eq!(p.as_slice(), b"hello world");
        let used = pool.budget().used();
        let bytes = p.freeze();
        let slice = bytes.slice(6..);
        drop(bytes);
        assert_eq!(&slice[..], b"world");
        assert_eq!(pool.hot_bytes(), 0, "a slice still holds the buffer");
        drop(slice);
        assert_eq!(pool.hot_bytes(), 1 << 20, "the buffer went back warm");
        assert_eq!(pool.budget().used(), used, "and stays counted while warm");
        let again = pool.try_alloc(1 << 20).expect("warm");
        assert_eq!(
            pool.stats().warm.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        drop(again);
    }

    #[test]
    fn a_push_takes_only_what_fits() {
        let pool = pool(4 << 20);
        let mut p = Piece::new(pool.try_alloc(4096).expect("room"));
        let cap = p.capacity();
        let data = vec![7u8; cap + 100];
        assert_eq!(p.push(&data), cap);
        assert!(p.is_full());
        assert_eq!(p.push(&data), 0);
        assert_eq!(p.fill_with(|t| Ok::<_, ()>(t.len() + 5)), Ok(0));
        p.clear();
        assert_eq!(p.room(), cap);
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_a_buffer_is_freed() {
        let pool = pool(1 << 20);
        let held = pool.try_alloc(1 << 20).expect("room");
        assert!(pool.try_alloc(1 << 20).is_none(), "the budget is spent");
        let p2 = pool.clone();
        let freer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(held);
        });
        let mut got = None;
        while got.is_none() {
            got = pool
                .wait_for_free(std::time::Duration::from_secs(30), || p2.try_alloc(1 << 20))
                .await;
            if got.is_none() {
                got = pool.try_alloc(1 << 20);
            }
        }
        freer.await.expect("freer");
        assert!(got.is_some());
        assert!(
            pool.alloc_past_limit(1 << 20).is_some(),
            "past the limit when asked"
        );
    }
}
