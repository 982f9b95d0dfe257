//! The read engine over in-memory object clients: exact bytes for any sequence
//! of reads, the memory budget never exceeded, prefetch ahead of sequential
//! readers, no waste on random reads, generations and appendable objects.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use zonalfs::gcs::mem::MemClient;
use zonalfs::gcs::{ObjectClient, ObjectId};
use zonalfs::memory::{Budget, Pool, PoolConfig as MemoryConfig};
use zonalfs::read::{PrefetchConfig, ReadEngine, ReadError};

const KIB: u64 = 1024;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn engine(client: Arc<MemClient>, block: usize, budget: u64, readahead: u64) -> Arc<ReadEngine> {
    let pool = Pool::new(Budget::new(budget), MemoryConfig::new(block));
    ReadEngine::new(
        client,
        pool,
        PrefetchConfig {
            readahead_max: readahead,
            forward_tolerance: 4 * block as u64,
            backward_tolerance: block as u64 / 4,
            ..Default::default()
        },
    )
}

async fn read_all(e: &ReadEngine, id: &ObjectId, size: u64, step: u64) -> Vec<u8> {
    read_all_of(e, id, size, true, step).await
}

async fn read_all_of(
    e: &ReadEngine,
    id: &ObjectId,
    size: u64,
    finalized: bool,
    step: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let d = e.read(id, size, finalized, off, step).await.expect("read");
        if d.is_empty() {
            return out;
        }
        off += d.len() as u64;
        out.extend_from_slice(d.as_slice());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any reads, from several tasks at once, return exactly the object's bytes,
    /// and the budget is never exceeded.
    #[test]
    fn random_read_sequences_return_exact_bytes(
        size in 1usize..600_000,
        reads in proptest::collection::vec((0u64..700_000, 1u64..200_000, 0usize..4), 1..60),
        budget_blocks in 1u64..12,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let client = MemClient::new(Duration::ZERO);
            let truth = data(size, size as u64);
            let info = client.put("obj", truth.clone(), true);
            let id = ObjectId { name: "obj".into(), generation: info.generation };
            let budget = budget_blocks * 64 * KIB;
            let e = engine(client, 64 * KIB as usize, budget, 512 * KIB);
            let truth = Arc::new(truth);
            let mut tasks = Vec::new();
            for lane in 0..4usize {
                let mine: Vec<(u64, u64)> = reads.iter().filter(|r| r.2 == lane).map(|r| (r.0, r.1)).collect();
                let (e, id, truth) = (e.clone(), id.clone(), truth.clone());
                tasks.push(tokio::spawn(async move {
                    for (off, len) in mine {
                        let d = e.read(&id, size as u64, true, off, len).await.expect("read");
                        let lo = (off as usize).min(size);
                        let hi = (off + len).min(size as u64) as usize;
                        assert_eq!(d.as_slice(), &truth[lo..hi.max(lo)], "read {off}+{len}");
                    }
                }));
            }
            for t in tasks { t.await.expect("reader"); }
            assert!(e.pool().budget().peak() <= budget);
            assert!(e.pool().resident() <= budget);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reader_stays_two_blocks_ahead() {
    let client = MemClient::new(Duration::from_millis(2));
    let size = 64 * 256 * KIB;
    let truth = data(size as usize, 3);
    let info = client.put("big", truth.clone(), true);
    let id = ObjectId {
        name: "big".into(),
        generation: info.generation,
    };
    let bs = 256 * KIB;
    let e = engine(client.clone(), bs as usize, 64 << 20, 4 << 20);
    let mut ahead_min = u64::MAX;
    let mut off = 0;
    let mut got = Vec::new();
    while off < size {
        let d = e.read(&id, size, true, off, 128 * KIB).await.expect("read");
        got.extend_from_slice(d.as_slice());
        off += d.len() as u64;
        let blk = (off - 1) / bs;
        if blk >= 4 && off + 3 * bs < size {
            let cached = e.blocks_of(&id);
            let ahead = (1..=16)
                .take_while(|k| cached.iter().any(|(o, _)| *o == (blk + k) * bs))
                .count() as u64;
            ahead_min = ahead_min.min(ahead);
        }
    }
    assert_eq!(got, truth);
    assert!(
        ahead_min >= 2,
        "only {ahead_min} blocks ahead at some point"
    );
    let fetched = client.fetched.load(Ordering::Relaxed);
    assert!(fetched <= size + 2 * bs, "fetched {fetched} for {size}");
}

/// With `release_consumed` (the mount through the page cache) a sequential
/// reader's consumed blocks go back to the pool as it passes them: the bytes
/// are exact, the cache holds only the window plus a few consumed blocks, and
/// the pool maps no more than that (new blocks reuse warm memory). Without it
/// every consumed block stays cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_blocks_are_released_and_reused_when_asked() {
    let client = MemClient::new(Duration::from_millis(1));
    let bs = 256 * KIB;
    let size = 48 * bs;
    let truth = data(size as usize, 9);
    let info = client.put("seq", truth.clone(), true);
    let id = ObjectId {
        name: "seq".into(),
        generation: info.generation,
    };
    for release in [true, false] {
        let pool = Pool::new(Budget::new(64 << 20), MemoryConfig::new(bs as usize));
        let e = ReadEngine::new(
            client.clone(),
            pool.clone(),
            PrefetchConfig {
                readahead_max: 4 * bs,
                release_consumed: release,
                ..Default::default()
            },
        );
        let got = read_all(&e, &id, size, 128 * KIB).await;
        assert_eq!(got, truth);
        let cached = e.blocks_of(&id).len() as u64;
        let released = e.stats.released.load(Ordering::Relaxed);
        if release {
            assert!(released >= 40, "released only {released} blocks");
            assert!(cached <= 2 + 5, "{cached} blocks still cached");
            assert!(
                pool.resident() <= 12 * bs,
                "mapped {} bytes for a window of 4 blocks",
                pool.resident()
            );
        } else {
            assert_eq!(released, 0);
            assert_eq!(cached, 48, "every block stays cached");
        }
    }
}

/// The kernel may answer a sequential reader's request late, after the
/// reader moved on by more than the cursor's backward tolerance. Such a read
/// is served from the blocks still cached: nothing is fetched again, and it
/// starts no cursor of its own (which would count as a reader and hold
/// blocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_read_behind_its_reader_is_served_from_cached_blocks() {
    let client = MemClient::new(Duration::from_micros(200));
    let bs = 256 * KIB;
    let size = 16 * bs;
    let truth = data(size as usize, 5);
    let info = client.put("late", truth.clone(), true);
    let id = ObjectId {
        name: "late".into(),
        generation: info.generation,
    };
    let e = engine(client.clone(), bs as usize, 64 << 20, 4 * bs);
    // Read the first six blocks and a bit of the seventh.
    let mut off = 0;
    while off < 6 * bs + 64 * KIB {
        let d = e.read(&id, size, true, off, 64 * KIB).await.expect("read");
        assert_eq!(d.as_slice(), &truth[off as usize..off as usize + d.len()]);
        off += d.len() as u64;
    }
    let cached: Vec<u64> = e.blocks_of(&id).iter().map(|(o, _)| *o).collect();
    assert!(
        cached.contains(&(5 * bs)),
        "the block behind the reader is kept: {cached:?}"
    );
    let fetched = client.fetched.load(Ordering::Relaxed);
    // The end of block 5: more than the backward tolerance (bs / 4) behind.
    let late = 6 * bs - 64 * KIB;
    let d = e
        .read(&id, size, true, late, 64 * KIB)
        .await
        .expect("late read");
    assert_eq!(
        d.as_slice(),
        &truth[late as usize..(late + 64 * KIB) as usize]
    );
    assert_eq!(
        client.fetched.load(Ordering::Relaxed),
        fetched,
        "fetched again"
    );
    assert_eq!(e.stats.behind_reads.load(Ordering::Relaxed), 1);
    assert_eq!(e.stats.direct_reads.load(Ordering::Relaxed), 0);
    // The reader goes on as before, to the exact end.
    let mut rest = truth[..off as usize].to_vec();
    while off < size {
        let d = e.read(&id, size, true, off, 64 * KIB).await.expect("read");
        rest.extend_from_slice(d.as_slice());
        off += d.len() as u64;
    }
    assert_eq!(rest, truth);
    assert_eq!(e.windows().0, 1, "one sequential reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_4k_reads_fetch_little_more_than_delivered() {
    let client = MemClient::new(Duration::from_micros(200));
    let size = 64 << 20;
    let truth = data(size, 4);
    let info = client.put("r", truth.clone(), true);
    let id = ObjectId {
        name: "r".into(),
        generation: info.generation,
    };
    let e = engine(client.clone(), 8 << 20, 256 << 20, 256 << 20);
    let mut x: u64 = 12345;
    for _ in 0..500 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((x >> 20) % (size as u64 / 4096)) * 4096;
        let d = e
            .read(&id, size as u64, true, off, 4096)
            .await
            .expect("read");
        assert_eq!(d.as_slice(), &truth[off as usize..off as usize + 4096]);
    }
    let delivered = e.stats.bytes_delivered.load(Ordering::Relaxed);
    let fetched = client.fetched.load(Ordering::Relaxed);
    assert_eq!(delivered, 500 * 4096);
    assert!(
        fetched as f64 <= 1.25 * delivered as f64,
        "fetched {fetched} for {delivered} delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_readers_stay_within_the_budget() {
    let client = MemClient::new(Duration::from_micros(500));
    let mut objects = Vec::new();
    for i in 0..32u64 {
        let truth = data(3 << 20, 100 + i);
        let info = client.put(&format!("o{i}"), truth.clone(), true);
        objects.push((
            ObjectId {
                name: format!("o{i}"),
                generation: info.generation,
            },
            truth,
        ));
    }
    let budget = 16 << 20;
    let e = engine(client.clone(), 1 << 20, budget, 8 << 20);
    let mut tasks = Vec::new();
    for (i, (id, truth)) in objects.into_iter().enumerate() {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let got = read_all(&e, &id, truth.len() as u64, 128 * KIB).await;
            assert_eq!(got, truth, "reader {i}");
        }));
    }
    for t in tasks {
        t.await.expect("reader");
    }
    assert!(
        e.pool().budget().peak() <= budget,
        "peak {}",
        e.pool().budget().peak()
    );
    assert!(
        e.stats.evictions.load(Ordering::Relaxed) > 0,
        "the budget was never under pressure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_generation_invalidates_and_old_handles_go_stale() {
    let client = MemClient::new(Duration::ZERO);
    let v1 = data(1 << 20, 5);
    let i1 = client.put("f", v1.clone(), true);
    let id1 = ObjectId {
        name: "f".into(),
        generation: i1.generation,
    };
    let e = engine(client.clone(), 256 * 1024, 8 << 20, 1 << 20);
    assert_eq!(read_all(&e, &id1, i1.size, 64 * KIB).await, v1);
    let v2 = data(700_000, 6);
    let i2 = client.put("f", v2.clone(), true);
    let id2 = ObjectId {
        name: "f".into(),
        generation: i2.generation,
    };
    assert_eq!(read_all(&e, &id2, i2.size, 64 * KIB).await, v2);
    assert!(e.blocks_of(&id2).iter().all(|(o, _)| *o < 700_000));
    // A handle opened on the old generation: its own bytes (still cached)
    // or ESTALE, never new bytes, never a mix.
    match e.read(&id1, i1.size, true, 800_000, 1000).await {
        Err(ReadError::Stale { .. }) => {}
        Ok(d) => assert!(
            d.as_slice() == &v1[800_000..801_000],
            "old handle got other bytes"
        ),
        Err(other) => panic!("{other:?}"),
    }
    // Once nothing caches generation 1, the service's answer decides: gone.
    e.forget(&id1);
    assert!(matches!(
        e.read(&id1, i1.size, true, 800_000, 1000).await,
        Err(ReadError::Stale { .. }) | Err(ReadError::Gcs(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appendable_object_is_read_to_its_new_end() {
    let client = MemClient::new(Duration::ZERO);
    let first = data(300_000, 7);
    let info = client.put("log", first.clone(), false);
    let id = ObjectId {
        name: "log".into(),
        generation: info.generation,
    };
    let e = engine(client.clone(), 256 * 1024, 8 << 20, 1 << 20);
    // The handle knows 300,000 bytes; the object grows behind it.
    assert_eq!(
        read_all_of(&e, &id, info.size, false, 64 * KIB).await,
        first
    );
    let more = data(500_000, 8);
    client.append("log", &more);
    let mut want = first.clone();
    want.extend_from_slice(&more);
    let got = read_all_of(&e, &id, info.size, false, 64 * KIB).await;
    assert_eq!(got.len(), want.len(), "no short read before the true end");
    assert_eq!(got, want);
    assert_eq!(
        client.stat("log").await.expect("stat").generation,
        id.generation
    );
    // The one place growth is looked up: the size now, a shorter object than
    // was read (the service cannot be right) and a new generation refused.
    let now = e.grown(&id, info.size).await.expect("grown");
    assert_eq!(now.size, want.len() as u64);
    assert!(matches!(
        e.grown(&id, want.len() as u64 + 1).await,
        Err(ReadError::Shrank { from, to, .. }) if from == want.len() as u64 + 1 && to == want.len() as u64
    ));
    client.put("log", b"new".to_vec(), false);
    assert!(matches!(
        e.grown(&id, 0).await,
        Err(ReadError::Stale { .. })
    ));
}

/// The same engine over the real gRPC client and the emulator, with faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_over_grpc_and_the_emulator() {
    use zonalfs::emulator::{Config, Shaping};
    use zonalfs::gcs::auth::CredentialsSource;
    use zonalfs::gcs::client::ClientConfig;
    use zonalfs::gcs::retry::RetryPolicy;
    use zonalfs::gcs::{GcsClient, MrdPool, PoolConfig};
    let tree = common::Tree::new();
    let truth = tree.put("obj", &data(40 << 20, 9));
    let emu = common::start(
        &tree,
        Config {
            shaping: Shaping {
                break_after_bytes: Some(13 << 20),
                corrupt_every: Some(9),
                redirect_every: Some(4),
                latency: Duration::from_millis(1),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let mut cfg = ClientConfig::new(common::BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::Anonymous;
    cfg.retry = RetryPolicy {
        initial: Duration::from_millis(5),
        ..Default::default()
    };
    let client = GcsClient::connect(cfg).await.expect("connect");
    let pool = Arc::new(MrdPool::new(client, PoolConfig::default()));
    let info = pool.stat("obj").await.expect("stat");
    let id = ObjectId {
        name: "obj".into(),
        generation: info.generation,
    };
    let e = ReadEngine::new(
        pool,
        Pool::new(Budget::new(64 << 20), MemoryConfig::new(4 << 20)),
        PrefetchConfig::default(),
    );
    let got = read_all(&e, &id, info.size, 1 << 20).await;
    assert!(got == truth, "sequential bytes differ");
    for k in 0..50u64 {
        let off = (k * 7_777_777) % (info.size - 4096);
        let d = e
            .read(&id, info.size, true, off, 4096)
            .await
            .expect("random read");
        assert_eq!(d.as_slice(), &truth[off as usize..off as usize + 4096]);
    }
}

/// The lookup of a name not listed brings the file's head with its
/// metadata, over one stream whose open carries the range: the first read
/// within the head is served from it with exact bytes and waits for no
/// other stream (the emulator saw one stream open when it returned). An
/// empty object and a missing one answer as a stat would; without memory
/// for a head the lookup is a plain stat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_brings_the_head_and_the_first_read_is_served_from_it() {
    use zonalfs::emulator::Config;
    use zonalfs::gcs::auth::CredentialsSource;
    use zonalfs::gcs::client::ClientConfig;
    use zonalfs::gcs::{GcsClient, GcsError, MrdPool, PoolConfig};
    let tree = common::Tree::new();
    let truth = tree.put("obj", &data(3 << 20, 21));
    tree.put("empty", b"");
    let emu = common::start(&tree, Config::default()).await;
    let mut cfg = ClientConfig::new(common::BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::Anonymous;
    let client = GcsClient::connect(cfg).await.expect("connect");
    let pool = Arc::new(MrdPool::new(client, PoolConfig::default()));
    let e = ReadEngine::new(
        pool.clone(),
        Pool::new(Budget::new(64 << 20), MemoryConfig::new(4 << 20)),
        PrefetchConfig::default(),
    );
    let head = e.config().lookup_head;
    assert!(head >= 4096);
    let streams =
        |emu: &zonalfs::emulator::Running| emu.emu.counters.streams_opened.load(Ordering::Relaxed);

    let info = e.stat_with_head("obj").await.expect("lookup");
    assert_eq!(info.size, truth.len() as u64);
    assert_eq!(streams(&emu), 1, "one stream: metadata and head together");
    let id = ObjectId {
        name: "obj".into(),
        generation: info.generation,
    };
    let d = e
        .read(&id, info.size, true, 0, 4096)
        .await
        .expect("first read");
    assert_eq!(d.as_slice(), &truth[..4096]);
    let d = e
        .read(&id, info.size, true, head - 100, 100)
        .await
        .expect("head's end");
    assert_eq!(d.as_slice(), &truth[(head - 100) as usize..head as usize]);
    assert_eq!(e.stats.heads_fetched.load(Ordering::Relaxed), 1);
    assert_eq!(e.stats.head_reads.load(Ordering::Relaxed), 2);
    // Past the head: the blocks, to the exact end.
    let got = read_all(&e, &id, info.size, 1 << 20).await;
    assert!(got == truth, "whole object");

    let empty = e.stat_with_head("empty").await.expect("empty object");
    assert_eq!(empty.size, 0);
    let id = ObjectId {
        name: "empty".into(),
        generation: empty.generation,
    };
    assert!(e
        .read(&id, 0, true, 0, 4096)
        .await
        .expect("read")
        .is_empty());
    assert!(matches!(
        e.stat_with_head("missing").await,
        Err(GcsError::NotFound(_))
    ));

    // No memory for a head: a plain stat, no stream.
    let tight = ReadEngine::new(
        pool,
        Pool::new(Budget::new(0), MemoryConfig::new(4 << 20)),
        PrefetchConfig::default(),
    );
    let before = streams(&emu);
    let info = tight.stat_with_head("obj").await.expect("plain stat");
    assert_eq!(info.size, truth.len() as u64);
    assert_eq!(streams(&emu), before);
    assert_eq!(tight.stats.heads_fetched.load(Ordering::Relaxed), 0);
}

/// The engine over a client that fails every Nth read (the failure-injecting
/// client): a read returns the object's true bytes or an error that keeps
/// its kind (UNAVAILABLE, retryable), never wrong or partial bytes; a failed
/// block is not kept, so the same read again succeeds; and the budget is all
/// given back once the object is forgotten (its loads aborted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fetches_give_errors_never_wrong_bytes_and_are_retried() {
    use zonalfs::gcs::mem::FaultyClient;
    use zonalfs::gcs::GcsError;
    let block = 256 * KIB as usize;
    let mem = MemClient::new(Duration::ZERO);
    let obj = data(5 * block + 12_345, 77);
    let info = mem.put("f", obj.clone(), true);
    let id = ObjectId {
        name: "f".into(),
        generation: info.generation,
    };
    let size = obj.len() as u64;
    for every in [1u64, 2, 3, 7] {
        let client = FaultyClient::new(mem.clone(), every);
        let pool = Pool::new(Budget::new(64 * block as u64), MemoryConfig::new(block));
        let e = ReadEngine::new(
            client,
            pool.clone(),
            PrefetchConfig {
                readahead_max: 4 * block as u64,
                ..Default::default()
            },
        );
        // A sequential pass and then scattered reads, each retried until it
        // succeeds (at most a few times: every Nth fetch fails).
        let mut reads: Vec<(u64, u64)> = (0..size).step_by(100_000).map(|o| (o, 100_000)).collect();
        reads.extend((0..40u64).map(|i| ((i * 7_919 * 131) % size, 1 + (i * 4_099) % 70_000)));
        let (mut errors, mut ok) = (0, 0);
        for (off, len) in reads {
            let want = &obj[off as usize..(off + len).min(size) as usize];
            let mut tries = 0;
            loop {
                tries += 1;
                match e.read(&id, size, true, off, len).await {
                    Ok(d) => {
                        assert!(
                            d.as_slice() == want,
                            "every={every}: wrong bytes at {off}+{len}"
                        );
                        ok += 1;
                        break;
                    }
                    Err(ReadError::Gcs(g)) => {
                        assert!(
                            matches!(g, GcsError::Unavailable(_)),
                            "every={every}: {g:?}"
                        );
                        assert!(g.is_retryable(), "the kind survives: {g:?}");
                        errors += 1;
                        if every == 1 {
                            break;
                        }
                        assert!(tries < 20, "every={every}: {off}+{len} never succeeded");
                    }
                    Err(other) => panic!("every={every}: {other:?}"),
                }
            }
        }
        if every == 1 {
            assert_eq!(ok, 0, "every fetch fails, so every read does");
            assert!(errors > 0);
        } else {
            // A failed prefetch is fetched again when a read needs the block,
            // so readers may never see the injected failures at all.
            assert!(ok > 0, "every={every}: {errors} errors, {ok} reads");
        }
        e.forget(&id);
        // A prefetch still loading when the object is forgotten is aborted;
        // its task lets go of the buffer when it next runs.
        let freed =
            common::wait_until_async(Duration::from_secs(10), || pool.in_use_bytes() == 0).await;
        assert!(
            freed,
            "every={every}: {} bytes still held 10 s after the object was forgotten",
            pool.in_use_bytes()
        );
    }
}
