//! The client layer (metadata calls, MRD streams, the shared pool, `cat`) against
//! the emulator, with every fault flag alone and all together: the bytes are
//! always the object's (sha256), or the read fails cleanly within the deadline.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use zonalfs::emulator::{Config, Running, Shaping};
use zonalfs::gcs::auth::CredentialsSource;
use zonalfs::gcs::client::ClientConfig;
use zonalfs::gcs::mrd::{MrdStream, StreamStats, SEND_AHEAD};
use zonalfs::gcs::retry::RetryPolicy;
use zonalfs::gcs::{GcsClient, GcsError, MrdPool, ObjectId, PoolConfig, VecSink};
use zonalfs::tools::{self, CatOptions};

const MIB: usize = 1 << 20;

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

async fn client(emu: &Running, retry: RetryPolicy) -> GcsClient {
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::Anonymous;
    cfg.retry = retry;
    GcsClient::connect(cfg).await.expect("connect")
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(100),
        deadline: Duration::from_secs(20),
        stall_timeout: Duration::from_millis(300),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_calls() {
    let tree = Tree::new();
    let data = tree.put("dir/a.bin", &pattern(1234, 1));
    tree.put("dir/sub/b", b"b");
    tree.put("top", b"t");
    std::fs::create_dir_all(tree.path("empty-dir")).expect("mkdir");
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu, quick_retry()).await;
    let b = c.bucket_info().await.expect("bucket");
    assert!(b.is_zonal() && b.hierarchical_namespace, "{b:?}");
    let o = c.stat("dir/a.bin").await.expect("stat");
    assert_eq!(o.size, 1234);
    assert!(o.finalized && o.generation > 0);
    assert_eq!(o.crc32c, Some(crc32c::crc32c(&data)));
    let root = c.list("", None).await.expect("list");
    assert_eq!(root.prefixes, ["dir/", "empty-dir/"]);
    assert_eq!(root.objects.len(), 1);
    let dir = c.list("dir/", None).await.expect("list dir");
    assert_eq!(dir.prefixes, ["dir/sub/"]);
    assert_eq!(dir.objects[0].name, "dir/a.bin");
    match c.stat("dir/missing").await {
        Err(GcsError::NotFound(m)) => assert!(m.contains("gs://test-bucket/dir/missing"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(c.check_bucket().await.expect("check").is_zonal());
    let regional = start(
        &tree,
        Config {
            location_type: "region".into(),
            ..Default::default()
        },
    )
    .await;
    let r = client(&regional, quick_retry()).await;
    let info = r
        .check_bucket()
        .await
        .expect("a non-zonal bucket still works");
    assert!(!info.is_zonal());
    assert_eq!(r.stat("dir/a.bin").await.expect("stat").size, 1234);
    let mut cfg = ClientConfig::new("no-such-bucket");
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::Anonymous;
    let other = GcsClient::connect(cfg).await.expect("connect");
    match other.bucket_info().await {
        Err(GcsError::NotFound(m)) => assert!(m.contains("no-such-bucket"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// Reads the whole object with `cat` and 40 random ranges concurrently through
/// the pool; everything must equal the source.
async fn read_everything(pool: &MrdPool, data: &[u8]) {
    let mut out = Vec::new();
    let opts = CatOptions {
        offset: 0,
        length: None,
        window: 3 * MIB as u64 + 17,
        inflight: Some(4),
    };
    let n = tools::cat(pool, "obj", &opts, &mut out).await.expect("cat");
    assert_eq!(n as usize, data.len());
    assert_eq!(sha(&out), sha(data), "cat bytes differ");

    let info = pool.client().stat("obj").await.expect("stat");
    let id = ObjectId {
        name: "obj".into(),
        generation: info.generation,
    };
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let off = (i * 2_654_435_761) % (data.len() as u64 - 1);
        let len = (1 + (i * 97_531) % (3 * MIB as u64)).min(data.len() as u64 - off);
        let (pool, id) = (pool.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let sink = VecSink::new(len as usize);
            let n = pool.read(&id, info.size, off, len, sink.clone()).await;
            (off, len, n, sink.take())
        }));
    }
    for t in tasks {
        let (off, len, n, got) = t.await.expect("join");
        assert_eq!(n.expect("range read"), len);
        assert_eq!(
            got,
            &data[off as usize..(off + len) as usize],
            "range at {off}"
        );
    }
}

async fn faulted(shaping: Shaping) -> Arc<StreamStats> {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(24 * MIB + 5, 7));
    let emu = start(&tree, shaped(shaping)).await;
    let c = client(&emu, quick_retry()).await;
    let pool = MrdPool::new(
        c,
        PoolConfig {
            pool_size: Some(3),
            ..Default::default()
        },
    );
    read_everything(&pool, &data).await;
    let stats = &pool.stats();
    Arc::new(StreamStats {
        streams_opened: stats.streams_opened.load(Ordering::Relaxed).into(),
        bytes_fetched: stats.bytes_fetched.load(Ordering::Relaxed).into(),
        ranges_completed: stats.ranges_completed.load(Ordering::Relaxed).into(),
        retry_unavailable: stats.retry_unavailable.load(Ordering::Relaxed).into(),
        retry_redirect: stats.retry_redirect.load(Ordering::Relaxed).into(),
        retry_corrupt: stats.retry_corrupt.load(Ordering::Relaxed).into(),
        retry_stall: stats.retry_stall.load(Ordering::Relaxed).into(),
        retry_protocol: stats.retry_protocol.load(Ordering::Relaxed).into(),
    })
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_reads() {
    let s = faulted(Shaping::default()).await;
    assert_eq!(get(&s.retry_unavailable) + get(&s.retry_corrupt), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_failed_opens() {
    let s = faulted(Shaping {
        fail_open_rate: 0.4,
        seed: 3,
        ..Default::default()
    })
    .await;
    assert!(get(&s.retry_unavailable) > 0, "no open failed: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_broken_streams() {
    let s = faulted(Shaping {
        break_after_bytes: Some(5 * MIB as u64 + 3),
        ..Default::default()
    })
    .await;
    assert!(get(&s.retry_unavailable) > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_redirects() {
    let s = faulted(Shaping {
        redirect_every: Some(1),
        ..Default::default()
    })
    .await;
    assert!(get(&s.retry_redirect) > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunks_never_reach_the_caller() {
    let s = faulted(Shaping {
        corrupt_every: Some(3),
        ..Default::default()
    })
    .await;
    assert!(get(&s.retry_corrupt) > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_stalls() {
    let s = faulted(Shaping {
        stall_after_bytes: Some(7 * MIB as u64),
        ..Default::default()
    })
    .await;
    assert!(get(&s.retry_stall) > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_all_faults_together() {
    let s = faulted(Shaping {
        fail_open_rate: 0.2,
        break_after_bytes: Some(9 * MIB as u64),
        redirect_every: Some(3),
        corrupt_every: Some(7),
        stall_after_bytes: Some(11 * MIB as u64),
        latency: Duration::from_millis(1),
        seed: 11,
        ..Default::default()
    })
    .await;
    assert!(
        get(&s.retry_corrupt) > 0 && get(&s.retry_redirect) > 0,
        "{s:?}"
    );
}

/// Hands every (offset, length) read to `s` at once, from tasks of their
/// own, and checks each returns exactly `data`'s bytes there.
async fn read_at_once(s: &Arc<MrdStream>, data: &[u8], reads: impl Iterator<Item = (u64, u64)>) {
    let tasks: Vec<_> = reads
        .map(|(off, len)| {
            let s = s.clone();
            tokio::spawn(async move {
                let sink = VecSink::new(len as usize);
                let n = s.read(off, len, sink.clone()).await;
                (off, len, n, sink.take())
            })
        })
        .collect();
    for t in tasks {
        let (off, len, n, got) = t.await.expect("join");
        assert_eq!(n.expect("read"), len);
        assert!(
            got == data[off as usize..(off + len) as usize],
            "bytes at {off}+{len}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_ranges_on_one_stream() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(8 * MIB, 9));
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu, quick_retry()).await;
    let stats = Arc::new(StreamStats::default());
    let s = Arc::new(
        MrdStream::open(&c, "obj", 0, None, stats.clone())
            .await
            .expect("open"),
    );
    let reads = (0..200u64).map(|i| {
        (
            (i * 40_503) % (8 * MIB as u64 - 70_000),
            1 + (i * 337) % 70_000,
        )
    });
    read_at_once(&s, &data, reads).await;
    assert_eq!(get(&stats.streams_opened), 1, "all on one stream");
    assert_eq!(s.load(), 0);
}

/// Large ranges handed to one stream at once reach the server one after the
/// other, each sent as the one before nears its end (so the server never
/// splits the stream between them), and small ones go at once; every byte
/// arrives right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sends_a_large_range_as_the_last_one_nears_its_end() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(32 * MIB, 41));
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu, quick_retry()).await;
    let stats = Arc::new(StreamStats::default());
    let s = Arc::new(
        MrdStream::open(&c, "obj", 0, None, stats.clone())
            .await
            .expect("open"),
    );
    // Four 8 MiB blocks and, behind them, eight small reads.
    let reads = (0..4u64)
        .map(|i| (i * 8 * MIB as u64, 8 * MIB as u64))
        .chain((0..8u64).map(|i| (i * 3 * MIB as u64 + 100, 4096)));
    read_at_once(&s, &data, reads).await;
    let owed = emu.emu.counters.most_bytes_owed.load(Ordering::Relaxed);
    assert!(
        owed <= 8 * MIB as u64 + SEND_AHEAD + 8 * 4096,
        "the stream owed {owed} bytes at once: more than one block ahead"
    );
    assert_eq!(get(&stats.streams_opened), 1, "all on one stream");
    assert_eq!(s.load(), 0);
}

/// Streams spread evenly over the connections even when unary calls come
/// between their opens (round-robin alone put every stream on one of two
/// connections in this pattern), and a closed stream is uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_over_connections_between_unary_calls() {
    let tree = Tree::new();
    tree.put("obj", &pattern(MIB, 4));
    let emu = start(&tree, Config::default()).await;
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::Anonymous;
    cfg.connections = 2;
    let c = GcsClient::connect(cfg).await.expect("connect");
    let stats = Arc::new(StreamStats::default());
    let mut streams = Vec::new();
    for _ in 0..4 {
        c.stat("obj").await.expect("stat");
        streams.push(
            MrdStream::open(&c, "obj", 0, None, stats.clone())
                .await
                .expect("open"),
        );
    }
    assert_eq!(c.streams_per_connection(), vec![2, 2]);
    drop(streams);
    let uncounted = wait_until_async(Duration::from_secs(20), || {
        c.streams_per_connection() == [0, 0]
    })
    .await;
    assert!(uncounted, "streams never uncounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_reads_are_abandoned() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(4 * MIB, 10));
    let emu = start(
        &tree,
        shaped(Shaping {
            latency: Duration::from_millis(200),
            ..Default::default()
        }),
    )
    .await;
    let c = client(&emu, quick_retry()).await;
    let stats = Arc::new(StreamStats::default());
    let s = Arc::new(
        MrdStream::open(&c, "obj", 0, None, stats)
            .await
            .expect("open"),
    );
    let sink = VecSink::new(MIB);
    let weak = Arc::downgrade(&sink);
    let s2 = s.clone();
    let task = tokio::spawn(async move { s2.read(0, MIB as u64, sink).await });
    // Wait (bounded) until the stream has taken the range, then cancel the reader.
    assert!(
        wait_until_async(Duration::from_secs(10), || s.load() != 0).await,
        "range never registered"
    );
    task.abort();
    // Its data arrives after the latency; the range is dropped with its sink.
    assert!(
        wait_until_async(Duration::from_secs(10), || {
            s.load() == 0 && weak.upgrade().is_none()
        })
        .await,
        "abandoned range kept"
    );
    // The stream still serves new reads.
    let sink = VecSink::new(1000);
    assert_eq!(s.read(100, 1000, sink.clone()).await.expect("read"), 1000);
    assert_eq!(sink.take(), &data[100..1100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_deadline_gives_a_clean_error() {
    let tree = Tree::new();
    tree.put("obj", &pattern(MIB, 11));
    let emu = start(
        &tree,
        shaped(Shaping {
            fail_open_rate: 1.0,
            ..Default::default()
        }),
    )
    .await;
    let mut retry = quick_retry();
    retry.deadline = Duration::from_millis(400);
    let c = client(&emu, retry).await;
    let stats = Arc::new(StreamStats::default());
    match MrdStream::open(&c, "obj", 0, None, stats).await {
        Err(GcsError::RetryDeadline { attempts, last, .. }) => {
            assert!(attempts > 1);
            assert!(last.is_retryable(), "{last:?}");
            assert!(last.to_string().contains("injected fault"), "{last}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_gone_mid_read_fails_within_the_deadline() {
    let tree = Tree::new();
    tree.put("obj", &pattern(8 * MIB, 12));
    // A separate process, killed outright (no graceful drain of open streams).
    let mut emu = EmuChild::spawn(tree.root(), &["--stream-mbps", "20"]);
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(format!("http://{}", emu.addr));
    cfg.credentials = CredentialsSource::Anonymous;
    cfg.retry = RetryPolicy {
        deadline: Duration::from_millis(500),
        ..quick_retry()
    };
    let c = GcsClient::connect(cfg).await.expect("connect");
    let s = MrdStream::open(&c, "obj", 0, None, Arc::new(StreamStats::default()))
        .await
        .expect("open");
    let read = tokio::spawn(async move { s.read(0, 8 * MIB as u64, VecSink::new(8 * MIB)).await });
    let (status, _) = emu.signal_and_wait(libc::SIGKILL);
    assert!(!status.success());
    let r = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("no hang")
        .expect("join");
    assert!(matches!(r, Err(GcsError::RetryDeadline { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_fails_calls_and_opens_within_the_deadline() {
    let tree = Tree::new();
    tree.put("obj", &pattern(MIB, 13));
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(format!("http://{}", emu.addr));
    cfg.credentials = CredentialsSource::Anonymous;
    cfg.retry = RetryPolicy {
        deadline: Duration::from_secs(1),
        ..quick_retry()
    };
    let c = GcsClient::connect(cfg).await.expect("connect");
    c.stat("obj").await.expect("stat while the server answers");
    let pid = emu.child.as_ref().expect("running").id() as libc::pid_t;
    // SAFETY: kill(2) on our own unreaped child: it stops answering, its
    // connections stay open.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stat = tokio::time::timeout(Duration::from_secs(20), c.stat("obj"))
        .await
        .expect("a stat to a frozen server must not hang");
    assert!(
        matches!(stat, Err(GcsError::RetryDeadline { .. })),
        "{stat:?}"
    );
    let stats = Arc::new(StreamStats::default());
    let open = tokio::time::timeout(
        Duration::from_secs(20),
        MrdStream::open(&c, "obj", 0, None, stats),
    )
    .await
    .expect("a stream open to a frozen server must not hang");
    assert!(
        matches!(open, Err(GcsError::RetryDeadline { .. })),
        "{open:?}"
    );
    // SAFETY: as above; it answers again, and so does the client.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let back = tokio::time::timeout(Duration::from_secs(20), c.stat("obj"))
        .await
        .expect("no hang after the thaw");
    assert_eq!(back.expect("stat after the thaw").size, MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_fails_only_that_range() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(2 * MIB, 13));
    let emu = start(
        &tree,
        shaped(Shaping {
            latency: Duration::from_millis(50),
            ..Default::default()
        }),
    )
    .await;
    let c = client(&emu, quick_retry()).await;
    let s = Arc::new(
        MrdStream::open(&c, "obj", 0, None, Arc::new(StreamStats::default()))
            .await
            .expect("open"),
    );
    let (a, b) = (s.clone(), s.clone());
    let good = tokio::spawn(async move {
        let sink = VecSink::new(MIB);
        a.read(1000, MIB as u64, sink.clone())
            .await
            .map(|n| (n, sink.take()))
    });
    let bad = tokio::spawn(async move { b.read(3 * MIB as u64, 10, VecSink::new(10)).await });
    let bad = bad.await.expect("join");
    assert!(matches!(bad, Err(GcsError::OutOfRange(_))), "{bad:?}");
    let (n, got) = good.await.expect("join").expect("good range survives");
    assert_eq!(n, MIB as u64);
    assert_eq!(got, &data[1000..1000 + MIB]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_change_retires_streams() {
    let tree = Tree::new();
    tree.put("obj", &pattern(MIB, 14));
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu, quick_retry()).await;
    let pool = MrdPool::new(c.clone(), PoolConfig::default());
    let old = c.stat("obj").await.expect("stat");
    let old_id = ObjectId {
        name: "obj".into(),
        generation: old.generation,
    };
    assert_eq!(
        pool.read(&old_id, old.size, 0, 10, VecSink::new(10))
            .await
            .expect("read"),
        10
    );
    std::fs::remove_file(tree.path("obj")).expect("rm");
    let new_data = tree.put("obj", &pattern(3000, 15));
    let new = c.stat("obj").await.expect("stat");
    assert_ne!(new.generation, old.generation);
    let new_id = ObjectId {
        name: "obj".into(),
        generation: new.generation,
    };
    let sink = VecSink::new(3000);
    assert_eq!(
        pool.read(&new_id, new.size, 0, 3000, sink.clone())
            .await
            .expect("read"),
        3000
    );
    assert_eq!(sink.take(), new_data);
    // The old generation's streams were retired; a new one cannot open.
    match pool.read(&old_id, old.size, 0, 10, VecSink::new(10)).await {
        Err(GcsError::NotFound(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_sizes_shares_caps_and_reaps() {
    let tree = Tree::new();
    let objs: Vec<Vec<u8>> = (0..3)
        .map(|i| tree.put(&format!("o{i}"), &pattern(2 * MIB + i, 20 + i as u64)))
        .collect();
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu, quick_retry()).await;

    // --pool-size 3: open() brings up all three streams of the object.
    let pool = MrdPool::new(
        c.clone(),
        PoolConfig {
            pool_size: Some(3),
            ..Default::default()
        },
    );
    let info = pool.open("o0").await.expect("open");
    let id = ObjectId {
        name: "o0".into(),
        generation: info.generation,
    };
    assert_eq!(pool.streams_of(&id), 3);
    assert_eq!(pool.open_streams(), 3);

    // A global cap of 2 streams holds across objects, and every read succeeds.
    let capped = MrdPool::new(
        c.clone(),
        PoolConfig {
            pool_size: Some(2),
            max_streams: 2,
            ..Default::default()
        },
    );
    for round in 0..2 {
        for (i, data) in objs.iter().enumerate() {
            let info = c.stat(&format!("o{i}")).await.expect("stat");
            let id = ObjectId {
                name: format!("o{i}"),
                generation: info.generation,
            };
            let sink = VecSink::new(data.len());
            let n = capped
                .read(&id, info.size, 0, data.len() as u64, sink.clone())
                .await
                .expect("read under the cap");
            assert_eq!(n as usize, data.len());
            assert_eq!(&sink.take(), data, "round {round} object {i}");
            assert!(capped.open_streams() <= 2, "cap exceeded");
        }
    }

    // Idle streams are closed after the idle timeout.
    let reaped = MrdPool::new(
        c.clone(),
        PoolConfig {
            idle_timeout: Duration::ZERO,
            ..Default::default()
        },
    );
    reaped.open("o1").await.expect("open");
    assert!(reaped.open_streams() >= 1);
    assert!(
        wait_until_async(Duration::from_secs(20), || reaped.open_streams() == 0).await,
        "idle streams never closed"
    );
}

/// One round trip to the first byte: the stream a read opens carries that read
/// in its open request, and a reopen after a break carries what is left of it
/// (every open the emulator saw came with its range). A whole small object gets
/// a stream of its own, closed once the read is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_request_carries_the_first_read() {
    let tree = Tree::new();
    let big = tree.put("big", &pattern(20 * MIB, 31));
    let small = tree.put("small", &pattern(100 * 1024, 32));
    let emu = start(
        &tree,
        shaped(Shaping {
            break_after_bytes: Some(3 * MIB as u64),
            ..Default::default()
        }),
    )
    .await;
    let counters = &emu.emu.counters;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let c = client(&emu, quick_retry()).await;
    let pool = MrdPool::new(c.clone(), PoolConfig::default());

    let info = c.stat("small").await.expect("stat");
    let id = ObjectId {
        name: "small".into(),
        generation: info.generation,
    };
    let opened = count(&counters.streams_opened);
    let sink = VecSink::new(small.len());
    let got = pool.read(&id, info.size, 0, info.size, sink.clone()).await;
    assert_eq!(got.expect("read"), small.len() as u64);
    assert!(sink.take() == small, "the small object's bytes");
    assert_eq!(count(&counters.streams_opened) - opened, 1);
    assert_eq!(
        count(&counters.ranges_in_open),
        1,
        "the read rode in the open"
    );
    assert_eq!(pool.streams_of(&id), 0, "no stream left in the pool");
    assert_eq!(pool.open_streams(), 0, "its permit is back");

    let info = c.stat("big").await.expect("stat");
    let id = ObjectId {
        name: "big".into(),
        generation: info.generation,
    };
    let before = (
        count(&counters.streams_opened),
        count(&counters.ranges_in_open),
    );
    let sink = VecSink::new(8 * MIB);
    let got = pool
        .read(&id, info.size, MIB as u64, 8 * MIB as u64, sink.clone())
        .await;
    assert_eq!(got.expect("read"), 8 * MIB as u64);
    assert!(sink.take() == big[MIB..9 * MIB], "the range's bytes");
    let opens = count(&counters.streams_opened) - before.0;
    assert!(
        opens >= 3,
        "8 MiB over streams breaking every 3 MiB: {opens} opens"
    );
    assert_eq!(
        count(&counters.ranges_in_open) - before.1,
        opens + 1,
        "the first open carried the read's head and its rest, every reopen the unfinished rest"
    );
    assert_eq!(
        pool.streams_of(&id),
        1,
        "a partial read keeps a pooled stream"
    );
}

/// Records where each put landed, in arrival order, and the bytes.
struct RecordingSink {
    puts: std::sync::Mutex<Vec<(usize, usize)>>,
    bytes: Arc<VecSink>,
}

impl zonalfs::gcs::RangeSink for RecordingSink {
    fn put(&self, at: usize, data: &[u8]) {
        zonalfs::sync::lock(&self.puts).push((at, data.len()));
        self.bytes.put(at, data);
    }
}

/// The read that opens a stream asks for its head apart: its first bytes
/// arrive as a short chunk of their own, not inside a first 2 MiB chunk, and
/// the whole read still delivers exactly the object's bytes. With the head
/// turned off the first bytes come in a full chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_bytes_do_not_wait_for_a_whole_chunk() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(6 * MIB + 123, 41));
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu, quick_retry()).await;
    let info = c.stat("obj").await.expect("stat");
    let id = ObjectId {
        name: "obj".into(),
        generation: info.generation,
    };
    for (head, whole) in [(64 << 10, true), (64 << 10, false), (0, true)] {
        let pool = MrdPool::new(
            c.clone(),
            PoolConfig {
                head_bytes: head,
                ..Default::default()
            },
        );
        let (off, len) = if whole {
            (0, info.size)
        } else {
            (MIB as u64, 4 * MIB as u64)
        };
        let sink = Arc::new(RecordingSink {
            puts: Default::default(),
            bytes: VecSink::new(len as usize),
        });
        let got = pool.read(&id, info.size, off, len, sink.clone()).await;
        assert_eq!(got.expect("read"), len);
        assert!(
            sink.bytes.take() == data[off as usize..(off + len) as usize],
            "the read's bytes (head {head}, whole {whole})"
        );
        let puts = zonalfs::sync::lock(&sink.puts).clone();
        // The bytes that arrived first, before any past the head's end (a
        // chunk's bytes arrive in the pieces the frames cut them into).
        let first: usize = puts
            .iter()
            .take_while(|&&(at, n)| at + n <= 64 << 10)
            .map(|p| p.1)
            .sum();
        if head > 0 {
            assert_eq!(first, head as usize, "the head first, alone");
        } else {
            assert!(first < 64 << 10, "the head came inside a bigger chunk");
        }
        let total: usize = puts.iter().map(|p| p.1).sum();
        assert_eq!(total, len as usize, "every byte once");
    }
}
