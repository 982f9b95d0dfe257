//! The memory layer: one budget for the whole daemon and every page-aligned
//! buffer that holds object bytes: read blocks, and the pieces writes gather
//! ([`Piece`]).
//!
//! # What it owns
//!
//! [`Budget`] is `--memory-limit`: the bytes of buffer memory resident at
//! once (less what the transport reserves for its HTTP/2 windows). [`Pool`]
//! hands out [`Buffer`]s under it. A buffer is sized to what it holds: a
//! request for `len` bytes gets the smallest *size class* that fits (whole
//! pages up to 64 KiB, then four classes per doubling up to the largest
//! buffer, a read block), so a 20 KiB object takes 20 KiB, not a block, and
//! the budget counts the bytes actually held.
//!
//! # How memory flows
//!
//! ```text
//!  alloc(len) ─▶ class c ─▶ hot free slot of c?  yes ─▶ Buffer (warm: no fault, no zeroing)
//!                               │ no
//!                               ▼
//!                budget.try_reserve(c) ─ no ─▶ release hot slots of other
//!                               │             classes, oldest first; retry
//!                               ▼ yes          (still no: None, the caller evicts)
//!                cold slot of c, or a new slot carved from a fresh arena
//!                (first touch faults and zeroes its pages once)
//!  drop(Buffer) ─▶ hot free list of its class (most recently freed is reused
//!                  first), still counted in the budget; tasks waiting for
//!                  memory (writers, [`Pool::wait_for_free`]) are woken
//!  maintain()   ─▶ hot slots idle longer than `idle_release`, or beyond the
//!                  warm reserve, or all of them under memory pressure (PSI),
//!                  are released: MADV_DONTNEED gives their pages back to the
//!                  OS, the slot becomes cold and leaves the budget
//! ```
//!
//! Slots live in *arenas*: anonymous private mappings of at least 2 MiB
//! (one slot each for classes of 2 MiB and up, which also get transparent huge
//! pages; many slots for small classes, which never do, so a 4 KiB object
//! never faults in a 2 MiB page). Arenas stay mapped for the pool's life:
//! only their pages come and go, so address space and the number of mappings
//! stay bounded by the budget's high-water mark, and releasing memory is one
//! `madvise`, never an `munmap` on the read path. Releasing runs in
//! [`Pool::maintain`] (a background thread, [`Pool::spawn_maintainer`]), and
//! on the allocation path only when the budget is full and another class's
//! hot slots must make room.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::sync::lock;

pub mod memfd;
pub mod piece;
pub use memfd::MemFile;
pub use piece::Piece;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Classes of this size and up get an arena of their own and huge pages.
const HUGE: usize = 2 * MIB;
/// Every class below this is a whole number of pages.
const PAGE_CLASSES_UP_TO: usize = 64 * KIB;

/// The global memory budget: bytes of buffer memory resident at once.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    /// Memory held outside buffers (the transport's buffers), left out of what
    /// buffers may use: they get `limit - reserved`.
    reserved: AtomicU64,
    /// Where `reserved` comes from (see [`Budget::reserve_for`]).
    reserver: std::sync::OnceLock<Reserver>,
    used: AtomicU64,
    peak: AtomicU64,
}

/// Says how much memory is held outside buffers right now.
struct Reserver(Box<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for Reserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reserver")
    }
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            reserved: AtomicU64::new(0),
            reserver: std::sync::OnceLock::new(),
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

    /// Sets the memory held outside buffers, at most half the limit (buffers
    /// always keep room to make progress).
    pub fn set_reserved(&self, n: u64) {
        self.reserved
            .store(n.min(self.limit / 2), Ordering::Relaxed);
    }

    /// Registers what holds memory outside buffers (the transport's
    /// windows and buffers, which grow as streams open): asked again each
    /// time [`Budget::refresh_reserved`] is called. Once per budget; later
    /// calls are ignored.
    pub fn reserve_for(&self, f: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.reserver.set(Reserver(Box::new(f)));
    }

    /// Updates the reserved memory from what was registered, if anything.
    pub fn refresh_reserved(&self) {
        if let Some(f) = self.reserver.get() {
            self.set_reserved((f.0)());
        }
    }

    /// What buffers may use now: the limit less the reserved memory.
    pub fn available(&self) -> u64 {
        self.limit - self.reserved.load(Ordering::Relaxed).min(self.limit / 2)
    }

    /// Buffers hold more than they may now (the reserve grew).
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

    /// Takes `n` bytes even past the limit: memory that must be held (a
    /// writer's next piece once it let go of everything else); counted, so
    /// the readers' buffers make room.
    pub fn take(&self, n: u64) {
        let now = self.used.fetch_add(n, Ordering::AcqRel) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
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

/// The system's page size (at least 4 KiB).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(4096)
}

/// The size classes up to `largest` (rounded up to pages), ascending: every
/// page multiple up to 64 KiB, then four per doubling (at most 25% slack),
/// and `largest` itself.
fn size_classes(largest: usize, page: usize) -> Vec<usize> {
    let largest = largest.max(1).div_ceil(page) * page;
    let mut out = Vec::new();
    let mut c = page;
    while c < largest.min(PAGE_CLASSES_UP_TO) {
        out.push(c);
        c += page;
    }
    let mut base = PAGE_CLASSES_UP_TO.max(page);
    while base < largest {
        for q in 0..4 {
            let c = (base + base / 4 * q).div_ceil(page) * page;
            if c < largest && out.last().is_none_or(|l| *l < c) {
                out.push(c);
            }
        }
        base *= 2;
    }
    out.push(largest);
    out
}

/// One anonymous private mapping: an arena of slots.
struct Arena {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an Arena is plain memory; which slot of it is used by whom is decided
// by the pool (each slot is owned by exactly one Buffer or free list at a time).
unsafe impl Send for Arena {}
// SAFETY: as above; the Arena itself is never read or written through.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(len: usize, huge: bool) -> Option<Arena> {
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
        // Huge pages for big long-lived slots (a block is faulted in 2 MiB at a
        // time); never for arenas of small slots, where one small object's
        // first byte would fault in and zero a whole 2 MiB page. Advice only.
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: p/len are the mapping just created, owned by nobody else.
        unsafe {
            libc::madvise(p, len, advice);
        }
        NonNull::new(p.cast::<u8>()).map(|ptr| Arena { ptr, len })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped once, when
        // the pool (and so every Buffer, which holds the pool) is gone.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A slot's address (inside an arena that lives as long as the pool).
#[derive(Clone, Copy)]
struct SlotPtr(NonNull<u8>);

// SAFETY: a slot address is handed from one owner to the next (free list,
// Buffer); the pool never gives one slot to two owners.
unsafe impl Send for SlotPtr {}

#[derive(Default)]
struct ClassState {
    /// Free slots whose pages are resident (counted in the budget), oldest
    /// first: the last one is reused first.
    hot: VecDeque<(SlotPtr, Instant)>,
    /// Free slots whose pages were given back (not counted).
    cold: Vec<SlotPtr>,
    /// Slots of this class handed out now.
    in_use: usize,
}

struct Class {
    size: usize,
    state: Mutex<ClassState>,
}

/// Settings of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// The largest buffer (a read block); requests above it get this much.
    pub largest: usize,
    /// Free memory kept warm for reuse at most (`--memory-warm-reserve`).
    pub warm_reserve: u64,
    /// A free slot unused this long goes back to the OS.
    pub idle_release: Duration,
}

impl PoolConfig {
    pub fn new(largest: usize) -> PoolConfig {
        PoolConfig {
            largest,
            warm_reserve: u64::MAX,
            idle_release: Duration::from_secs(30),
        }
    }
}

/// Counters of the pool (for metrics and tests).
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Allocations served by a warm (hot) slot.
    pub warm: AtomicU64,
    /// Allocations that got memory whose pages fault in fresh (zeroed).
    pub fresh: AtomicU64,
    /// Bytes of fresh slots handed out.
    pub fresh_bytes: AtomicU64,
    /// Bytes released to the OS (MADV_DONTNEED).
    pub released_bytes: AtomicU64,
    /// Bytes of address space mapped in arenas.
    pub arena_bytes: AtomicU64,
}

struct Inner {
    budget: Arc<Budget>,
    cfg: PoolConfig,
    classes: Vec<Class>,
    arenas: Mutex<Vec<Arena>>,
    /// Bytes in hot free slots, all classes.
    hot_bytes: AtomicU64,
    stats: PoolStats,
    /// Tasks waiting for a buffer to be freed ([`Pool::wait_for_free`]), and
    /// how they are woken.
    waiting: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

/// Hands out page-aligned [`Buffer`]s under the budget and takes them back warm.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("largest", &self.inner.cfg.largest)
            .field("budget_used", &self.inner.budget.used())
            .field("hot_bytes", &self.hot_bytes())
            .finish()
    }
}

impl Pool {
    pub fn new(budget: Arc<Budget>, cfg: PoolConfig) -> Pool {
        let page = page_size();
        let classes = size_classes(cfg.largest, page)
            .into_iter()
            .map(|size| Class {
                size,
                state: Mutex::new(ClassState::default()),
            })
            .collect::<Vec<_>>();
        let largest = classes.last().map_or(page, |c| c.size);
        Pool {
            inner: Arc::new(Inner {
                budget,
                cfg: PoolConfig { largest, ..cfg },
                classes,
                arenas: Mutex::new(Vec::new()),
                hot_bytes: AtomicU64::new(0),
                stats: PoolStats::default(),
                waiting: std::sync::atomic::AtomicUsize::new(0),
                freed: tokio::sync::Notify::new(),
            }),
        }
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.inner.budget
    }

    /// The largest buffer.
    pub fn largest(&self) -> usize {
        self.inner.cfg.largest
    }

    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Free bytes kept warm (resident, counted in the budget).
    pub fn hot_bytes(&self) -> u64 {
        self.inner.hot_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of buffers handed out now.
    pub fn in_use_bytes(&self) -> u64 {
        self.inner
            .classes
            .iter()
            .map(|c| (lock(&c.state).in_use * c.size) as u64)
            .sum()
    }

    /// Bytes of buffer memory resident: handed out plus kept warm.
    pub fn resident(&self) -> u64 {
        self.in_use_bytes() + self.hot_bytes()
    }

    /// The capacity a request for `len` bytes gets.
    pub fn class_size(&self, len: usize) -> usize {
        self.inner.classes[self.inner.class_of(len)].size
    }

    /// A buffer of at least `len` bytes (at most the largest class): a warm
    /// one when there is one, else new memory if the budget allows (making
    /// room from other classes' warm slots first). None when the budget is
    /// spent by buffers in use: the caller frees some and asks again.
    pub fn try_alloc(&self, len: usize) -> Option<Buffer> {
        self.alloc(len, false)
    }

    /// A buffer of at least `len` bytes even past the budget (counted, so
    /// others make room): memory a writer must have once it let go of
    /// everything else it held. None only when no memory can be mapped.
    pub fn alloc_past_limit(&self, len: usize) -> Option<Buffer> {
        self.alloc(len, true)
    }

    /// Waits until a buffer is freed or `timeout` passes. `attempt` runs once
    /// more after the wait is registered, so a buffer freed between the
    /// caller's failed attempt and this wait is not missed: its result is
    /// returned at once when it has one.
    pub async fn wait_for_free<T>(
        &self,
        timeout: Duration,
        attempt: impl FnOnce() -> Option<T>,
    ) -> Option<T> {
        let inner = &self.inner;
        inner.waiting.fetch_add(1, Ordering::AcqRel);
        let freed = inner.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let got = attempt();
        if got.is_none() {
            let _ = tokio::time::timeout(timeout, freed).await;
        }
        inner.waiting.fetch_sub(1, Ordering::AcqRel);
        got
    }

    fn alloc(&self, len: usize, past_limit: bool) -> Option<Buffer> {
        let inner = &self.inner;
        let ci = inner.class_of(len);
        let class = &inner.classes[ci];
        let size = class.size as u64;
        if inner.budget.over() {
            // The reserve grew: warm memory goes first.
            inner.release_hot(u64::MAX, |_| true);
            if inner.budget.over() && !past_limit {
                return None;
            }
        }
        {
            let mut st = lock(&class.state);
            if let Some((slot, _)) = st.hot.pop_back() {
                st.in_use += 1;
                drop(st);
                inner.hot_bytes.fetch_sub(size, Ordering::Relaxed);
                inner.stats.warm.fetch_add(1, Ordering::Relaxed);
                return Some(self.buffer(slot, ci));
            }
        }
        if !inner.budget.try_reserve(size) {
            // Make room from warm slots of other classes, oldest first.
            let need = (inner.budget.used() + size).saturating_sub(inner.budget.available());
            inner.release_hot(need, |c| c != ci);
            if !inner.budget.try_reserve(size) {
                if !past_limit {
                    return None;
                }
                inner.budget.take(size);
            }
        }
        let slot = {
            let mut st = lock(&class.state);
            let s = st.cold.pop();
            if s.is_some() {
                st.in_use += 1;
            }
            s
        };
        let slot = match slot {
            Some(s) => s,
            None => match inner.carve(ci) {
                Some(s) => s,
                None => {
                    inner.budget.release(size);
                    return None;
                }
            },
        };
        inner.stats.fresh.fetch_add(1, Ordering::Relaxed);
        inner.stats.fresh_bytes.fetch_add(size, Ordering::Relaxed);
        Some(self.buffer(slot, ci))
    }

    fn buffer(&self, slot: SlotPtr, class: usize) -> Buffer {
        Buffer {
            ptr: slot.0,
            class,
            pool: self.inner.clone(),
        }
    }

    /// Gives warm memory back to the OS where it is not worth keeping: slots
    /// free for longer than `idle_release`, hot memory beyond the warm
    /// reserve, and all of it when `pressure` (the system is short of
    /// memory). Returns the bytes released. Runs off the read path
    /// ([`Pool::spawn_maintainer`]).
    pub fn maintain(&self, now: Instant, pressure: bool) -> u64 {
        let inner = &self.inner;
        if pressure {
            return inner.release_hot(u64::MAX, |_| true);
        }
        let idle = inner.cfg.idle_release;
        let mut released = 0;
        for c in &inner.classes {
            let stale: Vec<SlotPtr> = {
                let mut st = lock(&c.state);
                let n = st
                    .hot
                    .iter()
                    .take_while(|(_, t)| now.saturating_duration_since(*t) >= idle)
                    .count();
                st.hot.drain(..n).map(|(s, _)| s).collect()
            };
            released += inner.release_slots(c, stale);
        }
        let hot = self.hot_bytes();
        if hot > inner.cfg.warm_reserve {
            released += inner.release_hot(hot - inner.cfg.warm_reserve, |_| true);
        }
        released
    }

    /// Gives every warm slot back to the OS now.
    pub fn release_all(&self) -> u64 {
        self.inner.release_hot(u64::MAX, |_| true)
    }

    /// Starts a thread that calls [`Pool::maintain`] every `period` (with
    /// memory pressure read from PSI) until the pool is dropped.
    pub fn spawn_maintainer(&self, period: Duration) -> std::io::Result<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let pressure = Pressure::open();
        std::thread::Builder::new()
            .name("zonalfs-memory".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                let Some(inner) = weak.upgrade() else { return };
                let pool = Pool { inner };
                let under = pressure.as_ref().is_some_and(Pressure::high);
                let n = pool.maintain(Instant::now(), under);
                if n > 0 {
                    tracing::debug!(
                        released = n,
                        pressure = under,
                        "memory: warm memory released"
                    );
                }
            })
            .map(|_| ())
    }
}

impl Inner {
    fn class_of(&self, len: usize) -> usize {
        let len = len.max(1);
        self.classes
            .partition_point(|c| c.size < len)
            .min(self.classes.len() - 1)
    }

    /// A new slot of class `ci`, carved from a new arena (whose other slots
    /// go to the class's cold list). Counts the slot as in use.
    fn carve(&self, ci: usize) -> Option<SlotPtr> {
        let class = &self.classes[ci];
        let huge = class.size >= HUGE;
        let arena_len = if huge {
            class.size
        } else {
            (HUGE / class.size).max(1) * class.size
        };
        let arena = Arena::new(arena_len, huge)?;
        let base = arena.ptr;
        lock(&self.arenas).push(arena);
        self.stats
            .arena_bytes
            .fetch_add(arena_len as u64, Ordering::Relaxed);
        let slots = arena_len / class.size;
        let mut st = lock(&class.state);
        // Slots beyond the first are cold: their pages were never touched.
        for i in (1..slots).rev() {
            // SAFETY: i * size < arena_len: the address is inside the arena.
            let p = unsafe { base.as_ptr().add(i * class.size) };
            if let Some(p) = NonNull::new(p) {
                st.cold.push(SlotPtr(p));
            }
        }
        st.in_use += 1;
        Some(SlotPtr(base))
    }

    /// Releases hot slots (oldest first, in the classes `which` accepts) until
    /// `need` bytes were released or none are left; returns the bytes.
    fn release_hot(&self, need: u64, which: impl Fn(usize) -> bool) -> u64 {
        let mut released = 0;
        while released < need {
            // The class whose oldest hot slot is oldest.
            let oldest = self
                .classes
                .iter()
                .enumerate()
                .filter(|(i, _)| which(*i))
                .filter_map(|(i, c)| lock(&c.state).hot.front().map(|(_, t)| (*t, i)))
                .min();
            let Some((_, ci)) = oldest else { break };
            let class = &self.classes[ci];
            let slot = {
                match lock(&class.state).hot.pop_front() {
                    Some((slot, _)) => slot,
                    None => continue,
                }
            };
            released += self.release_slots(class, vec![slot]);
        }
        released
    }

    /// Gives the pages of hot slots of `class` (already off its hot list) back
    /// to the OS and files them as cold.
    fn release_slots(&self, class: &Class, slots: Vec<SlotPtr>) -> u64 {
        if slots.is_empty() {
            return 0;
        }
        for s in &slots {
            // SAFETY: the slot is a page-aligned range of `class.size` bytes
            // inside a live arena, owned by nobody (it was taken off the free
            // list): dropping its pages affects no one's data.
            unsafe {
                libc::madvise(s.0.as_ptr().cast(), class.size, libc::MADV_DONTNEED);
            }
        }
        let bytes = (slots.len() * class.size) as u64;
        lock(&class.state).cold.extend(slots);
        self.hot_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.release(bytes);
        self.stats
            .released_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        bytes
    }
}

/// A page-aligned buffer of one size class, owned by its holder until dropped
/// (then it goes back to its class's warm list). Its bytes are whatever the
/// last user left (or zeros when fresh): callers track what they wrote.
pub struct Buffer {
    ptr: NonNull<u8>,
    class: usize,
    /// Keeps the arenas mapped while the buffer lives.
    pool: Arc<Inner>,
}

// SAFETY: a Buffer is the only owner of its slot; its memory is plain bytes.
unsafe impl Send for Buffer {}
// SAFETY: shared references only hand out raw pointers / shared slices whose
// synchronization is the caller's (see read::buffer::Block).
unsafe impl Sync for Buffer {}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl Buffer {
    /// Bytes the buffer holds (its class size).
    pub fn capacity(&self) -> usize {
        self.pool.classes[self.class].size
    }

    /// The first byte (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let inner = &self.pool;
        let class = &inner.classes[self.class];
        let slot = SlotPtr(self.ptr);
        let mut st = lock(&class.state);
        st.in_use -= 1;
        if inner.budget.over() {
            // Buffers hold more than the budget allows now: give it back.
            drop(st);
            inner
                .hot_bytes
                .fetch_add(class.size as u64, Ordering::Relaxed);
            inner.release_slots(class, vec![slot]);
        } else {
            st.hot.push_back((slot, Instant::now()));
            drop(st);
            inner
                .hot_bytes
                .fetch_add(class.size as u64, Ordering::Relaxed);
        }
        if inner.waiting.load(Ordering::Acquire) > 0 {
            inner.freed.notify_waiters();
        }
    }
}

/// Memory pressure from PSI: the cgroup's `memory.pressure` (cgroup v2), else
/// the system's `/proc/pressure/memory`.
struct Pressure {
    path: std::path::PathBuf,
}

impl Pressure {
    /// Share of time (`some avg10`, percent) above which warm memory is let go.
    const HIGH: f64 = 10.0;

    fn open() -> Option<Pressure> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            })
            .map(|p| {
                std::path::Path::new("/sys/fs/cgroup")
                    .join(p.trim_start_matches('/'))
                    .join("memory.pressure")
            });
        let path = own
            .filter(|p| p.exists())
            .unwrap_or_else(|| "/proc/pressure/memory".into());
        std::fs::metadata(&path).ok().map(|_| Pressure { path })
    }

    fn high(&self) -> bool {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| parse_some_avg10(&t))
            .is_some_and(|v| v >= Self::HIGH)
    }
}

/// `some avg10=V ...` of a PSI file.
fn parse_some_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;
