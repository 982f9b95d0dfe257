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
//!
//! A piece can also checksum what is pushed into it as it copies
//! ([`Piece::with_crcs`]): the CRC32C of each `crc_every`-byte region (the
//! writer's chunks) is computed a few KiB behind the copy, while those bytes
//! are still in the CPU's cache, instead of in a second pass over memory when
//! the chunk is sent.

use bytes::Bytes;

use super::Buffer;

/// A buffer being filled, owned by one writer.
#[derive(Debug)]
pub struct Piece {
    buf: Buffer,
    len: usize,
    /// Region size whose CRC32Cs are kept (0: none are).
    crc_every: usize,
    /// The CRC32C of each region so far (the last one partial).
    crcs: Vec<u32>,
}

/// Bytes copied before the copy checksums them (in cache).
const CRC_STEP: usize = 256 << 10;

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
        Piece {
            buf,
            len: 0,
            crc_every: 0,
            crcs: Vec::new(),
        }
    }

    /// A piece that keeps the CRC32C of every `crc_every` bytes pushed into it
    /// ([`Piece::freeze_with_crcs`]).
    pub fn with_crcs(buf: Buffer, crc_every: usize) -> Piece {
        Piece {
            crc_every,
            ..Piece::new(buf)
        }
    }

    /// Folds the bytes at [from, to) into the regions' CRC32Cs.
    fn checksum(&mut self, from: usize, to: usize) {
        if self.crc_every == 0 {
            return;
        }
        let mut at = from;
        while at < to {
            let region = at / self.crc_every;
            let end = to.min((region + 1) * self.crc_every);
            // SAFETY: [at, end) lies within the first `len` bytes, written by
            // this piece's owner; the buffer is owned by this piece alone.
            let bytes = unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(at), end - at) };
            if region == self.crcs.len() {
                self.crcs.push(0);
            }
            self.crcs[region] = crc32c::crc32c_append(self.crcs[region], bytes);
            at = end;
        }
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
        let step = if self.crc_every == 0 {
            n.max(1)
        } else {
            CRC_STEP
        };
        for part in data[..n].chunks(step) {
            let at = self.len;
            // SAFETY: `len + part.len()` ≤ capacity, so the destination is
            // inside the buffer, which this piece owns alone; `data` is
            // another allocation (a caller's slice cannot point into a buffer
            // it does not own).
            unsafe {
                std::ptr::copy_nonoverlapping(part.as_ptr(), self.buf.as_ptr().add(at), part.len());
            }
            self.len += part.len();
            self.checksum(at, self.len);
        }
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
        let at = self.len;
        self.len += n;
        self.checksum(at, self.len);
        Ok(n)
    }

    /// Forgets the bytes gathered (the buffer is kept for new ones).
    pub fn clear(&mut self) {
        self.len = 0;
        self.crcs.clear();
    }

    /// The gathered bytes as shared, read-only [`Bytes`]; the buffer goes
    /// back to the pool when the last of them is dropped.
    pub fn freeze(self) -> Bytes {
        self.freeze_with_crcs().0
    }

    /// [`Piece::freeze`], with the CRC32C of each `crc_every`-byte region
    /// (empty for a piece made by [`Piece::new`]).
    pub fn freeze_with_crcs(self) -> (Bytes, Vec<u32>) {
        let Piece { buf, len, crcs, .. } = self;
        (Bytes::from_owner(Frozen { buf, len }), crcs)
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

    /// The CRC32Cs kept while copying are those of the regions' bytes,
    /// however the bytes were pushed and filled.
    #[test]
    fn crcs_kept_while_copying_match_the_regions() {
        let pool = pool(4 << 20);
        let data: Vec<u8> = (0..(1 << 20) + 777).map(|i| (i * 7 % 253) as u8).collect();
        for cut in [1usize, 4096, 100_000, 300_001] {
            let mut p = Piece::with_crcs(pool.try_alloc(1 << 20).expect("room"), 256 << 10);
            let mut rest = &data[..];
            let mut filled = false;
            while !rest.is_empty() && !p.is_full() {
                let n = rest.len().min(cut);
                let took = if filled {
                    p.push(&rest[..n])
                } else {
                    p.fill_with(|t| {
                        let k = n.min(t.len());
                        t[..k].copy_from_slice(&rest[..k]);
                        Ok::<_, ()>(k)
                    })
                    .expect("fill")
                };
                filled = !filled;
                rest = &rest[took..];
            }
            let (bytes, crcs) = p.freeze_with_crcs();
            let want: Vec<u32> = bytes.chunks(256 << 10).map(crc32c::crc32c).collect();
            assert_eq!(crcs, want, "cut {cut}");
        }
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
