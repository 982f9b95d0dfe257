//! Sequential detection and prefetch windows, per read cursor.
//!
//! An inode may be read by several cursors at once (four threads reading four
//! quarters of a file are four sequential streams). Each read is matched to the
//! cursor whose last end it continues, within a forward tolerance (the kernel
//! reorders and skips async readahead requests) and a small backward one; a read
//! that continues no cursor starts a new one (replacing the least recently used
//! beyond `max_cursors`).
//!
//! A cursor is *sequential* from its third contiguous read, or at once when it
//! starts at offset 0 (a file read from the start is almost always read on): the
//! mountpoint-s3 heuristic (prefetch from the first read, window doubling) keeps
//! a cold sequential read from paying a round trip per kernel request, while
//! gcsfs' (prefetch only from the 3rd sequential read) wastes nothing on random
//! reads. The hybrid takes both: random reads elsewhere fetch only what they ask
//! for, and a sequential reader from offset 0 prefetches from its first read.
//! Measured (scripts/bench-engine.sh, docs/benchmarks.md): on sequential reads
//! the three policies are equal within noise (812–831 MB/s shaped, where 800 is
//! the 4-stream cap); on random 4 KiB reads `immediate` fetched ~3600x what it
//! delivered while hybrid and `After(2)` fetched exactly 1x at the latency of a
//! bare range read. Away from offset 0 the hybrid used to start after one
//! contiguous read; the suite (scripts/bench.sh) showed random 64 KiB–1 MiB reads
//! then fetching 1.2–2x what they read, because a random read now and then lands
//! exactly at another's end and turned its cursor sequential (a whole block
//! fetched for nothing). Two contiguous reads in a row almost never happen by
//! chance, so the hybrid now waits for them there, as gcsfs does.
//! Once sequential, the window (in blocks ahead of the reader) starts at
//! `initial_blocks`, never below a floor the cache passes: two blocks per
//! stream the client carries the object on, one arriving and one queued
//! behind it (the client sends the queued one as the first nears its end, so
//! a stream never idles for a round trip between blocks), shared by the
//! sequential readers of the moment (four readers keep that many blocks in
//! flight together, not each: their streams share the connections and the
//! CPUs, and every block held is memory, fresh on a fresh mount). It doubles when the
//! reader enters a block that has no bytes yet (the reader caught up with its
//! prefetch before the data even started: the window is short for the
//! latency), at most once per window's worth of blocks, up to the window cap
//! the cache grants (`--readahead-max`, shrunk by the memory budget's fair
//! share). The cache reports no such starving for blocks the client paces
//! itself (larger than one chunk): more of them queued would hold memory
//! without moving data sooner. A block that is loading when the reader gets
//! there means the transfer, not the window, sets the pace. (The window used
//! to double at every new block; on loopback one `dd` then grew a 256 MiB
//! window, every block of it fresh memory on a fresh mount.)

use tokio::time::Instant;

/// A read starting at most this far past a cursor's end is contiguous with it
/// (one FUSE request's worth: the kernel's async readahead may leave such gaps).
const CONTIGUOUS_SLACK: u64 = 1 << 20;

/// When a cursor turns sequential (starts prefetching).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPolicy {
    /// At its first read, wherever it is (mountpoint-s3).
    Immediate,
    /// After this many further contiguous reads (gcsfs: 2, i.e. the 3rd read).
    After(u32),
    /// At once for a cursor starting at offset 0, else after two contiguous
    /// reads (zonalfs' default; see the module doc and docs/benchmarks.md).
    Hybrid,
}

impl StartPolicy {
    fn at_start(self, off: u64) -> bool {
        match self {
            StartPolicy::Immediate => true,
            StartPolicy::After(n) => n == 0,
            StartPolicy::Hybrid => off == 0,
        }
    }

    fn after(self) -> u32 {
        match self {
            StartPolicy::Immediate => 0,
            StartPolicy::After(n) => n,
            StartPolicy::Hybrid => 2,
        }
    }
}

/// Tunables of the prefetcher.
#[derive(Debug, Clone)]
pub struct PrefetchConfig {
    pub block_size: u64,
    /// Largest window ahead of a reader, in bytes.
    pub readahead_max: u64,
    /// Window when a cursor turns sequential, in blocks.
    pub initial_blocks: u64,
    /// A read up to this far past a cursor's end still continues it.
    pub forward_tolerance: u64,
    /// A read starting up to this far before a cursor's end still continues it.
    pub backward_tolerance: u64,
    /// When a new cursor starts prefetching.
    pub start: StartPolicy,
    /// Cursors tracked per inode.
    pub max_cursors: usize,
    /// Drop a block from the cache soon after a sequential reader has read it
    /// to its end, so its memory is reused warm (no page faults, no zeroing).
    /// Right when the kernel's page cache keeps the bytes anyway (the mount
    /// without `--direct-io`); the engine then keeps only a few consumed blocks
    /// per reader for reads that arrive slightly out of order.
    pub release_consumed: bool,
    /// Bytes of a file's head fetched with the lookup of a name the mount
    /// had not listed (one round trip for both; 0: lookups only stat).
    pub lookup_head: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            block_size: 8 << 20,
            readahead_max: 256 << 20,
            initial_blocks: 1,
            forward_tolerance: 16 << 20,
            backward_tolerance: 1 << 20,
            start: StartPolicy::Hybrid,
            max_cursors: 8,
            release_consumed: false,
            lookup_head: 16 << 10,
        }
    }
}

/// One reader's position and window.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// End of the furthest read so far.
    pub end: u64,
    /// Contiguous reads matched.
    pub hits: u32,
    /// Forward skips since the last contiguous read.
    pub skips: u32,
    pub sequential: bool,
    /// Blocks to keep ahead of `end`.
    pub window: u64,
    /// The block index the reader was last in.
    pub block: u64,
    /// The block where the window last grew.
    pub grown_at: u64,
    /// The block the reader was in when the cursor turned sequential: the
    /// window's floor applies once it has read past that block (a random
    /// reader that happens to read two pieces in a row does not take it).
    pub turned_at: u64,
    /// The furthest byte its window has reached (block-aligned).
    pub frontier: u64,
    pub last_used: Instant,
}

impl Cursor {
    /// Whether a read at `off` belongs to this cursor: a sequential cursor
    /// takes reads within its tolerances (the kernel reorders and skips async
    /// readahead); a cursor not yet sequential only an exact continuation (a
    /// random reader rarely lands exactly there).
    fn takes(&self, cfg: &PrefetchConfig, off: u64) -> bool {
        if self.sequential {
            off <= self.end.saturating_add(cfg.forward_tolerance)
                && off.saturating_add(cfg.backward_tolerance) >= self.end
        } else {
            off == self.end
        }
    }
}

/// What the cache should do for one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Fetch exactly this span, not through the block cache.
    Direct,
    /// Serve from blocks, and make sure blocks up to `ahead_to` (exclusive byte
    /// offset, block-aligned) are requested.
    Blocks { ahead_to: u64 },
}

/// What the cache sees ahead of a read, for the window's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ahead {
    /// The block the read ends in has no bytes yet (not requested, or
    /// requested and nothing arrived).
    pub starved: bool,
    /// The least window, in blocks (two per stream of the object).
    pub floor: u64,
}

impl Ahead {
    /// A reader that always finds its blocks empty (the most growth).
    pub const STARVED: Ahead = Ahead {
        starved: true,
        floor: 1,
    };
}

/// The cursors of one inode.
#[derive(Debug, Default)]
pub struct Cursors {
    pub list: Vec<Cursor>,
}

impl Cursors {
    /// Matches a read to a cursor (or starts one) and plans it. `cap` is the
    /// largest window (in blocks) the cache grants this reader now; `size` the
    /// object's size; `ahead` what the cache sees ahead of the read. Returns
    /// the plan and the cursors dropped to make room (their prefetch can be
    /// cancelled).
    pub fn plan(
        &mut self,
        cfg: &PrefetchConfig,
        off: u64,
        len: u64,
        size: u64,
        cap: u64,
        ahead: Ahead,
    ) -> (Plan, Vec<Cursor>) {
        let now = Instant::now();
        let end = off.saturating_add(len);
        let bs = cfg.block_size.max(1);
        let found = self.list.iter().position(|c| c.takes(cfg, off));
        let mut dropped = Vec::new();
        let idx = match found {
            Some(i) => {
                let c = &mut self.list[i];
                let contiguous = off <= c.end.saturating_add(CONTIGUOUS_SLACK);
                if contiguous {
                    c.hits += 1;
                    c.skips = 0;
                } else {
                    // A forward skip within tolerance: the kernel reordering a
                    // sequential reader's requests, or a random reader. Three in
                    // a row without a contiguous read: random after all.
                    c.skips += 1;
                    if c.skips >= 3 {
                        c.sequential = false;
                        c.hits = 0;
                        c.window = 0;
                    }
                }
                c.end = c.end.max(end);
                if !c.sequential && c.hits >= cfg.start.after() {
                    c.sequential = true;
                    c.window = cfg.initial_blocks;
                    c.turned_at = end.saturating_sub(1) / bs;
                }
                i
            }
            None => {
                if self.list.len() >= cfg.max_cursors.max(1) {
                    if let Some((j, _)) = self
                        .list
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, c)| c.last_used)
                    {
                        dropped.push(self.list.swap_remove(j));
                    }
                }
                let sequential = cfg.start.at_start(off);
                self.list.push(Cursor {
                    end,
                    hits: 0,
                    skips: 0,
                    sequential,
                    window: if sequential { cfg.initial_blocks } else { 0 },
                    block: off / bs,
                    grown_at: off / bs,
                    turned_at: off / bs,
                    frontier: 0,
                    last_used: now,
                });
                self.list.len() - 1
            }
        };
        let c = &mut self.list[idx];
        c.last_used = now;
        if !c.sequential {
            return (Plan::Direct, dropped);
        }
        let block = end.saturating_sub(1) / bs;
        if block > c.block {
            // Entered a block with no bytes yet: the window is short for the
            // latency; grow it (once per window's worth of blocks, the time
            // a larger window takes to show).
            if ahead.starved && block >= c.grown_at.saturating_add(c.window) {
                c.window = c.window.saturating_mul(2).max(1);
                c.grown_at = block;
            }
            c.block = block;
        }
        let max_blocks = (cfg.readahead_max / bs).max(1);
        let floor = if block > c.turned_at { ahead.floor } else { 1 };
        c.window = c.window.max(floor).min(max_blocks).min(cap.max(1));
        let ahead_to = ((block + 1 + c.window) * bs).min(size.div_ceil(bs) * bs);
        c.frontier = c.frontier.max(ahead_to);
        (Plan::Blocks { ahead_to }, dropped)
    }

    /// Whether a read at `off` continues one of the cursors (else it would
    /// start a cursor of its own).
    pub fn continued_by(&self, cfg: &PrefetchConfig, off: u64) -> bool {
        self.list.iter().any(|c| c.takes(cfg, off))
    }

    /// Forgets every cursor (a new generation).
    pub fn clear(&mut self) {
        self.list.clear();
    }

    /// Sequential cursors used within `recent` (for the budget's fair share).
    pub fn sequential(&self, recent: std::time::Duration) -> usize {
        self.list
            .iter()
            .filter(|c| c.sequential && c.last_used.elapsed() <= recent)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 1 << 20;

    fn cfg() -> PrefetchConfig {
        PrefetchConfig {
            block_size: BS,
            readahead_max: 16 * BS,
            ..Default::default()
        }
    }

    #[test]
    fn from_zero_is_sequential_at_once_and_window_doubles() {
        let mut c = Cursors::default();
        let size = 100 * BS;
        let (p, _) = c.plan(&cfg(), 0, 128 << 10, size, 64, Ahead::STARVED);
        assert_eq!(p, Plan::Blocks { ahead_to: 2 * BS });
        let mut last = 0;
        for i in 1..40u64 {
            let (p, _) = c.plan(&cfg(), i * (512 << 10), 512 << 10, size, 64, Ahead::STARVED);
            if let Plan::Blocks { ahead_to, .. } = p {
                assert!(ahead_to >= last);
                last = ahead_to;
            }
        }
        assert_eq!(c.list[0].window, 16, "capped by readahead_max");
        assert_eq!(c.list.len(), 1);
    }

    #[test]
    fn random_reads_go_direct_and_start_new_cursors() {
        let mut c = Cursors::default();
        let size = 1000 * BS;
        for i in 0..20u64 {
            let off = (i * 7919 * 4096 + 4096) % size;
            let (p, _) = c.plan(&cfg(), off, 4096, size, 64, Ahead::STARVED);
            assert_eq!(p, Plan::Direct, "read {i} at {off}");
        }
        assert!(c.list.len() <= cfg().max_cursors);
    }

    #[test]
    fn third_contiguous_read_turns_sequential_and_tolerates_skips() {
        let mut c = Cursors::default();
        let size = 1000 * BS;
        let (p, _) = c.plan(&cfg(), 500 * BS, 4096, size, 64, Ahead::STARVED);
        assert_eq!(p, Plan::Direct);
        // One read landing at another's end is not enough (random readers do
        // that now and then).
        let (p, _) = c.plan(&cfg(), 500 * BS + 4096, 4096, size, 64, Ahead::STARVED);
        assert_eq!(p, Plan::Direct);
        let (p, _) = c.plan(&cfg(), 500 * BS + 8192, 4096, size, 64, Ahead::STARVED);
        assert!(matches!(p, Plan::Blocks { .. }));
        // The kernel skips ahead within tolerance: same cursor.
        let (p, _) = c.plan(&cfg(), 500 * BS + 3 * BS, 4096, size, 64, Ahead::STARVED);
        assert!(matches!(p, Plan::Blocks { .. }));
        assert_eq!(c.list.len(), 1);
        // Skips, and only skips: it was random after all.
        for k in 1..=3u64 {
            c.plan(
                &cfg(),
                500 * BS + 3 * BS + k * 5 * BS,
                4096,
                size,
                64,
                Ahead::STARVED,
            );
        }
        let (p, _) = c.plan(&cfg(), 500 * BS + 40 * BS, 4096, size, 64, Ahead::STARVED);
        assert_eq!(p, Plan::Direct);
    }

    #[test]
    fn four_quarters_are_four_cursors() {
        let mut c = Cursors::default();
        let size = 400 * BS;
        for step in 0..10u64 {
            for q in 0..4u64 {
                let off = q * 100 * BS + step * (256 << 10);
                c.plan(&cfg(), off, 256 << 10, size, 64, Ahead::STARVED);
            }
        }
        assert_eq!(c.list.len(), 4);
        assert_eq!(c.sequential(std::time::Duration::from_secs(60)), 4);
    }

    /// A reader that finds each new block loading keeps its window (but
    /// never below the floor); one that finds them empty grows it, once per
    /// window's worth of blocks.
    #[test]
    fn the_window_grows_only_when_the_reader_outruns_the_data() {
        let mut c = Cursors::default();
        let size = 1000 * BS;
        let loading = Ahead {
            starved: false,
            floor: 4,
        };
        for i in 0..20u64 {
            c.plan(&cfg(), i * BS, BS, size, 64, loading);
        }
        assert_eq!(c.list[0].window, 4, "the floor");
        let starved = Ahead {
            starved: true,
            floor: 4,
        };
        for i in 20..29u64 {
            c.plan(&cfg(), i * BS, BS, size, 64, starved);
        }
        // 4 -> 8 at block 20, 16 at 28.
        assert_eq!(c.list[0].window, 16, "capped by readahead_max");
        let (p, _) = c.plan(&cfg(), 29 * BS, BS, size, 64, loading);
        assert_eq!(c.list[0].window, 16, "kept, not shrunk");
        assert_eq!(
            p,
            Plan::Blocks {
                ahead_to: (30 + 16) * BS
            }
        );
        // The cap (the memory budget's share) wins over the floor.
        let (_, _) = c.plan(&cfg(), 30 * BS, BS, size, 2, loading);
        assert_eq!(c.list[0].window, 2);
    }

    /// The floor waits until the reader has read past the block where its
    /// cursor turned sequential: two random reads that happen to be
    /// contiguous fetch one block ahead, not a whole floor of them.
    #[test]
    fn the_floor_applies_once_the_reader_leaves_its_first_block() {
        let mut c = Cursors::default();
        let size = 1000 * BS;
        let ahead = Ahead {
            starved: false,
            floor: 8,
        };
        let at = 500 * BS + 4096;
        c.plan(&cfg(), at, 4096, size, 64, ahead);
        c.plan(&cfg(), at + 4096, 4096, size, 64, ahead);
        let (p, _) = c.plan(&cfg(), at + 8192, 4096, size, 64, ahead);
        assert_eq!(p, Plan::Blocks { ahead_to: 502 * BS }, "one block ahead");
        let (p, _) = c.plan(&cfg(), 501 * BS, 4096, size, 64, ahead);
        assert_eq!(p, Plan::Blocks { ahead_to: 510 * BS }, "the floor");
        // From offset 0 the same: the floor from the second block on.
        let mut c = Cursors::default();
        let (p, _) = c.plan(&cfg(), 0, 4096, size, 64, ahead);
        assert_eq!(p, Plan::Blocks { ahead_to: 2 * BS });
        let (p, _) = c.plan(&cfg(), BS, 4096, size, 64, ahead);
        assert_eq!(p, Plan::Blocks { ahead_to: 10 * BS });
    }

    #[test]
    fn window_obeys_the_cap() {
        let mut c = Cursors::default();
        let size = 1000 * BS;
        for i in 0..64u64 {
            c.plan(&cfg(), i * BS, BS, size, 3, Ahead::STARVED);
        }
        assert_eq!(c.list[0].window, 3);
    }
}
