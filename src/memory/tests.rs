//! Tests of the memory layer: size classes, warm reuse, the budget, and
//! releasing memory (idle, beyond the warm reserve, under pressure), with a
//! property test over random sequences of allocations, frees and trims.

use super::*;
use proptest::prelude::*;
use std::collections::HashSet;

const PAGE: usize = 4096;

fn pool(limit: u64, largest: usize) -> Pool {
    Pool::new(Budget::new(limit), PoolConfig::new(largest))
}

/// Resident pages of `[ptr, ptr + len)`, per mincore(2).
fn resident_pages(ptr: *mut u8, len: usize) -> usize {
    let pages = len.div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: ptr is page-aligned and [ptr, ptr + len) lies in a live mapping;
    // vec has one byte per page.
    let rc = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore");
    vec.iter().filter(|b| **b & 1 == 1).count()
}

fn fill(b: &Buffer, byte: u8) {
    // SAFETY: the buffer owns capacity() bytes at as_ptr().
    unsafe { std::ptr::write_bytes(b.as_ptr(), byte, b.capacity()) }
}

fn first_byte(b: &Buffer) -> u8 {
    // SAFETY: capacity() >= one page, owned by the buffer.
    unsafe { *b.as_ptr() }
}

#[test]
fn classes_fit_their_contents() {
    let c = size_classes(8 * MIB, PAGE);
    assert_eq!(c[0], PAGE);
    assert_eq!(*c.last().unwrap(), 8 * MIB);
    assert!(c.windows(2).all(|w| w[0] < w[1]), "ascending");
    assert!(c.iter().all(|s| s % PAGE == 0), "whole pages");
    // Every size up to 64 KiB takes its size rounded to pages; above, at most
    // 25% slack.
    let p = pool(64 * MIB as u64, 8 * MIB);
    for len in [1, 4096, 4097, 20 * 1024, 65536] {
        assert_eq!(p.class_size(len), len.div_ceil(PAGE) * PAGE, "{len}");
    }
    for len in (65537..8 * MIB).step_by(77_777) {
        let got = p.class_size(len);
        assert!(
            got >= len && (got as f64) <= len as f64 * 1.25 + PAGE as f64,
            "{len} -> {got}"
        );
    }
    assert_eq!(p.class_size(64 * MIB), 8 * MIB, "capped at the largest");
}

#[test]
fn a_small_object_takes_its_size_and_no_huge_page() {
    let p = pool(64 * MIB as u64, 8 * MIB);
    let b = p.try_alloc(20 * 1024).expect("fits");
    assert_eq!(b.capacity(), 20 * 1024);
    assert_eq!(b.as_ptr() as usize % PAGE, 0, "page-aligned");
    assert_eq!(
        p.budget().used(),
        20 * 1024,
        "the budget counts what is held"
    );
    fill(&b, 1);
    // Touching it faults in its own pages only, not a 2 MiB huge page.
    // The object's slot is the first of its arena (2 MiB of 20 KiB slots).
    let arena_len = 2 * MIB / (20 * 1024) * (20 * 1024);
    let around = resident_pages(b.as_ptr(), arena_len);
    assert!(
        around <= 5 + 16,
        "{around} pages resident around a 5-page object"
    );
}

#[test]
fn freed_buffers_come_back_warm_most_recent_first() {
    let p = pool(64 * MIB as u64, MIB);
    let a = p.try_alloc(64 * 1024).expect("a");
    let b = p.try_alloc(64 * 1024).expect("b");
    fill(&a, 0xaa);
    fill(&b, 0xbb);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    drop(a);
    drop(b);
    assert_eq!(p.hot_bytes(), 128 * 1024);
    assert_eq!(p.budget().used(), 128 * 1024, "warm memory stays counted");
    let fresh = p.stats().fresh.load(Ordering::Relaxed);
    let again = p.try_alloc(64 * 1024 - 100).expect("warm");
    assert_eq!(again.as_ptr(), pb, "the most recently freed first");
    assert_eq!(first_byte(&again), 0xbb, "its pages were kept, not zeroed");
    assert_eq!(resident_pages(again.as_ptr(), again.capacity()), 16);
    let next = p.try_alloc(64 * 1024).expect("warm");
    assert_eq!(next.as_ptr(), pa);
    assert_eq!(
        p.stats().fresh.load(Ordering::Relaxed),
        fresh,
        "no fresh memory"
    );
    assert_eq!(p.stats().warm.load(Ordering::Relaxed), 2);
}

#[test]
fn idle_and_excess_warm_memory_goes_back_to_the_os() {
    let budget = Budget::new(64 * MIB as u64);
    let mut cfg = PoolConfig::new(MIB);
    cfg.warm_reserve = 256 * 1024;
    cfg.idle_release = Duration::from_secs(30);
    let p = Pool::new(budget.clone(), cfg);
    let bufs: Vec<Buffer> = (0..8)
        .map(|_| p.try_alloc(128 * 1024).expect("fits"))
        .collect();
    for b in &bufs {
        fill(b, 7);
    }
    let ptrs: Vec<*mut u8> = bufs.iter().map(|b| b.as_ptr()).collect();
    drop(bufs);
    assert_eq!(p.hot_bytes(), MIB as u64);
    // Beyond the warm reserve: the oldest freed go first.
    let released = p.maintain(Instant::now(), false);
    assert_eq!(released, (MIB - 256 * 1024) as u64);
    assert_eq!(p.hot_bytes(), 256 * 1024);
    assert_eq!(budget.used(), 256 * 1024);
    assert_eq!(resident_pages(ptrs[0], 128 * 1024), 0, "given back");
    assert_eq!(resident_pages(ptrs[7], 128 * 1024), 32, "kept warm");
    // Idle for longer than idle_release: everything goes.
    let later = Instant::now() + Duration::from_secs(31);
    assert_eq!(p.maintain(later, false), 256 * 1024);
    assert_eq!((p.hot_bytes(), budget.used()), (0, 0));
    // A released slot is reused (fresh pages, zeroed by the kernel).
    let b = p.try_alloc(128 * 1024).expect("cold slot");
    assert_eq!(first_byte(&b), 0, "released pages come back zeroed");
}

#[test]
fn pressure_releases_all_warm_memory() {
    let p = pool(64 * MIB as u64, MIB);
    let held = p.try_alloc(MIB).expect("held");
    drop(p.try_alloc(4096).expect("small"));
    drop(p.try_alloc(300 * 1024).expect("medium"));
    assert!(p.hot_bytes() > 0);
    p.maintain(Instant::now(), true);
    assert_eq!(p.hot_bytes(), 0);
    assert_eq!(p.budget().used(), MIB as u64, "only what is held");
    drop(held);
}

#[test]
fn a_full_budget_takes_room_from_other_classes_warm_memory() {
    let p = pool(MIB as u64, MIB);
    let smalls: Vec<Buffer> = (0..16)
        .map(|_| p.try_alloc(64 * 1024).expect("fits"))
        .collect();
    assert_eq!(p.budget().used(), MIB as u64);
    assert!(p.try_alloc(4096).is_none(), "spent by buffers in use");
    drop(smalls);
    let big = p
        .try_alloc(MIB)
        .expect("warm small slots released to make room");
    assert_eq!(big.capacity(), MIB);
    assert_eq!(p.hot_bytes(), 0);
    assert_eq!(p.budget().used(), MIB as u64);
}

#[test]
fn a_grown_reserve_releases_warm_memory_first() {
    let budget = Budget::new(8 * 65536);
    let p = Pool::new(budget.clone(), PoolConfig::new(65536));
    let mut held: Vec<Buffer> = (0..6).map(|_| p.try_alloc(65536).expect("fits")).collect();
    budget.set_reserved(1 << 40);
    assert_eq!(budget.available(), 4 * 65536, "at most half is reserved");
    assert!(p.try_alloc(1).is_none(), "over: the caller must evict");
    held.pop();
    assert_eq!(p.hot_bytes(), 0, "released, not kept, while over");
    held.pop();
    assert!(!budget.over());
    assert!(p.try_alloc(1).is_none(), "exactly at the reduced limit");
    budget.set_reserved(0);
    assert!(
        p.try_alloc(1).is_some(),
        "room again once the reserve shrinks"
    );
}

#[test]
fn psi_lines_parse() {
    let t = "some avg10=12.50 avg60=3.00 avg300=0.10 total=123\nfull avg10=1.00 avg60=0 avg300=0 total=1\n";
    assert_eq!(parse_some_avg10(t), Some(12.5));
    assert_eq!(parse_some_avg10("full avg10=3"), None);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Free(usize),
    Maintain { later_secs: u64, pressure: bool },
    Reserve(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..600_000).prop_map(Op::Alloc),
        4 => any::<usize>().prop_map(Op::Free),
        1 => (0u64..40, any::<bool>()).prop_map(|(later_secs, pressure)| Op::Maintain { later_secs, pressure }),
        1 => (0u64..(2 << 20)).prop_map(Op::Reserve),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(64)))]

    /// Whatever the sequence: no buffer overlaps another live one, the budget
    /// is never exceeded and always equals what is held plus what is warm,
    /// every buffer keeps the bytes its owner wrote, and trimming returns the
    /// warm memory while the pool keeps working.
    #[test]
    fn pool_invariants_hold(ops in prop::collection::vec(op(), 1..120)) {
        let limit = 3 * MIB as u64;
        let budget = Budget::new(limit);
        let mut cfg = PoolConfig::new(512 * 1024);
        cfg.warm_reserve = MIB as u64;
        let p = Pool::new(budget.clone(), cfg);
        let mut live: Vec<(Buffer, u8)> = Vec::new();
        let mut tag = 0u8;
        for op in ops {
            match op {
                Op::Alloc(len) => {
                    if let Some(b) = p.try_alloc(len) {
                        prop_assert!(b.capacity() >= len.min(512 * 1024));
                        prop_assert_eq!(b.as_ptr() as usize % PAGE, 0);
                        tag = tag.wrapping_add(1);
                        fill(&b, tag);
                        live.push((b, tag));
                    } else {
                        // Refused only when what is held leaves no room.
                        let need = p.class_size(len) as u64;
                        prop_assert!(p.in_use_bytes() + need > budget.available(),
                            "refused with {} held of {}", p.in_use_bytes(), budget.available());
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let (b, t) = live.swap_remove(i % live.len());
                    // SAFETY: the buffer owns capacity() bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(b.as_ptr(), b.capacity()) };
                    prop_assert!(bytes.iter().all(|x| *x == t), "a buffer's bytes changed under it");
                }
                Op::Free(_) => {}
                Op::Maintain { later_secs, pressure } => {
                    p.maintain(Instant::now() + Duration::from_secs(later_secs), pressure);
                    prop_assert!(p.hot_bytes() <= MIB as u64 || pressure);
                    if pressure {
                        prop_assert_eq!(p.hot_bytes(), 0);
                    }
                }
                Op::Reserve(n) => budget.set_reserved(n),
            }
            // No two live buffers overlap.
            let mut spans: Vec<(usize, usize)> = live.iter()
                .map(|(b, _)| (b.as_ptr() as usize, b.as_ptr() as usize + b.capacity()))
                .collect();
            spans.sort();
            prop_assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "overlapping buffers");
            let distinct: HashSet<usize> = spans.iter().map(|s| s.0).collect();
            prop_assert_eq!(distinct.len(), live.len());
            prop_assert!(budget.used() <= limit);
            prop_assert!(budget.peak() <= limit);
            prop_assert_eq!(budget.used(), p.in_use_bytes() + p.hot_bytes());
        }
        for (b, t) in &live {
            // SAFETY: as above.
            let bytes = unsafe { std::slice::from_raw_parts(b.as_ptr(), b.capacity()) };
            prop_assert!(bytes.iter().all(|x| *x == *t));
        }
        drop(live);
        p.release_all();
        prop_assert_eq!(budget.used(), 0);
    }
}

/// Memory held outside buffers (registered by the mount: the transport's
/// windows) is left out of what buffers may use, as it changes, and never
/// more than half the limit.
#[test]
fn a_registered_reserve_is_left_out_of_the_budget() {
    let budget = Budget::new(100 * MIB as u64);
    budget.refresh_reserved();
    assert_eq!(budget.available(), 100 * MIB as u64, "nothing registered");
    let held = Arc::new(AtomicU64::new(10 * MIB as u64));
    let h = held.clone();
    budget.reserve_for(move || h.load(Ordering::Relaxed));
    budget.refresh_reserved();
    assert_eq!(budget.available(), 90 * MIB as u64);
    held.store(80 * MIB as u64, Ordering::Relaxed);
    assert_eq!(budget.available(), 90 * MIB as u64, "until refreshed");
    budget.refresh_reserved();
    assert_eq!(budget.available(), 50 * MIB as u64, "at most half");
}
