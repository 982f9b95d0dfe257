//! The appendable writer against the emulator: create, flush, close
//! unfinalized, take over, finalize with the whole CRC32C; the errors a user
//! can meet; and every write fault alone and all together, with 0 bytes lost
//! and 0 written twice (sha256 of the object against the source), while tail
//! readers see only persisted bytes and never a short read before them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use sha2::{Digest, Sha256};
use zonalfs::emulator::{Config, Running, Shaping};
use zonalfs::gcs::auth::CredentialsSource;
use zonalfs::gcs::client::ClientConfig;
use zonalfs::gcs::retry::RetryPolicy;
use zonalfs::gcs::write::{AppendableWriter, WriteOptions};
use zonalfs::gcs::{GcsClient, GcsError, MrdPool, ObjectId, PoolConfig, VecSink};

const MIB: usize = 1 << 20;

async fn client(emu: &Running) -> GcsClient {
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::Anonymous;
    cfg.retry = RetryPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(100),
        deadline: Duration::from_secs(20),
        stall_timeout: Duration::from_millis(500),
    };
    GcsClient::connect(cfg).await.expect("connect")
}

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// Writes `data` in pieces of uneven sizes (some over a chunk).
async fn write_pieces(w: &mut AppendableWriter, data: &[u8], seed: usize) {
    let mut off = 0;
    let mut i = seed;
    while off < data.len() {
        let n = [1, 4095, 65_536, 3 * MIB + 7, 700_001][i % 5].min(data.len() - off);
        w.write(Bytes::copy_from_slice(&data[off..off + n]))
            .await
            .expect("write");
        off += n;
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_close_take_over_and_finalize() {
    let tree = Tree::new();
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu).await;
    let first = pattern(9 * MIB + 3, 1);
    let second = pattern(5 * MIB + 11, 2);
    let opts = WriteOptions {
        flush_every: 4 * MIB as u64,
    };

    let mut w = AppendableWriter::create(&c, "out/log", Some(0), opts.clone())
        .await
        .expect("create");
    let generation = w.generation();
    write_pieces(&mut w, &first, 0).await;
    assert_eq!(w.flush().await.expect("flush"), first.len() as u64);
    let info = c.stat("out/log").await.expect("stat");
    assert_eq!((info.size, info.finalized), (first.len() as u64, false));
    assert_eq!(w.close().await.expect("close"), first.len() as u64);
    assert_eq!(std::fs::read(tree.path("out/log")).unwrap(), first);

    let mut w = AppendableWriter::append(&c, "out/log", None, opts.clone())
        .await
        .expect("take over");
    assert_eq!(w.generation(), generation);
    assert_eq!(w.written(), first.len() as u64);
    write_pieces(&mut w, &second, 3).await;
    let info = w.finalize().await.expect("finalize");
    let whole = [first.clone(), second.clone()].concat();
    assert_eq!(
        info.generation, generation,
        "finalizing keeps the generation"
    );
    assert!(info.finalized);
    assert_eq!(info.size, whole.len() as u64);
    assert_eq!(info.crc32c, Some(crc32c::crc32c(&whole)));
    assert_eq!(
        sha(&std::fs::read(tree.path("out/log")).unwrap()),
        sha(&whole)
    );

    // The errors a user can meet.
    let e = AppendableWriter::append(&c, "out/log", None, opts.clone())
        .await
        .err()
        .expect("finalized");
    assert!(matches!(e, GcsError::PreconditionFailed(_)), "{e:?}");
    let e = AppendableWriter::append(&c, "missing", None, opts.clone())
        .await
        .err()
        .expect("missing");
    assert!(matches!(e, GcsError::NotFound(_)), "{e:?}");
    let e = AppendableWriter::create(&c, "out/log", Some(0), opts)
        .await
        .err()
        .expect("exists");
    assert!(matches!(e, GcsError::PreconditionFailed(_)), "{e:?}");
}

/// Every write fault alone and all together: the object is the source, byte
/// for byte; the writer reopened; nothing was written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_fault_loses_and_repeats_nothing() {
    let source = pattern(21 * MIB + 5, 7);
    let cases: Vec<(&str, Shaping)> = vec![
        (
            "break",
            Shaping {
                break_after_bytes: Some(3 * MIB as u64 + 17),
                ..Default::default()
            },
        ),
        (
            "redirect",
            Shaping {
                redirect_every: Some(2),
                ..Default::default()
            },
        ),
        (
            "stall",
            Shaping {
                stall_after_bytes: Some(5 * MIB as u64),
                ..Default::default()
            },
        ),
        (
            "fail-open",
            Shaping {
                fail_open_rate: 0.4,
                seed: 3,
                ..Default::default()
            },
        ),
        (
            "all",
            Shaping {
                break_after_bytes: Some(7 * MIB as u64),
                redirect_every: Some(3),
                stall_after_bytes: Some(11 * MIB as u64),
                fail_open_rate: 0.3,
                seed: 5,
                ..Default::default()
            },
        ),
    ];
    for (name, shaping) in cases {
        let tree = Tree::new();
        let emu = start(&tree, shaped(shaping)).await;
        let c = client(&emu).await;
        let opts = WriteOptions {
            flush_every: 2 * MIB as u64,
        };
        let mut w = AppendableWriter::create(&c, "f", None, opts.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: create: {e}"));
        write_pieces(&mut w, &source[..9 * MIB], 1).await;
        let persisted = w
            .close()
            .await
            .unwrap_or_else(|e| panic!("{name}: close: {e}"));
        assert_eq!(persisted, 9 * MIB as u64, "{name}");
        let mut w = AppendableWriter::append(&c, "f", None, opts)
            .await
            .unwrap_or_else(|e| panic!("{name}: take over: {e}"));
        write_pieces(&mut w, &source[9 * MIB..], 2).await;
        let reopens = w.stats().reopens;
        let info = w
            .finalize()
            .await
            .unwrap_or_else(|e| panic!("{name}: finalize: {e}"));
        assert_eq!(info.size, source.len() as u64, "{name}");
        assert_eq!(info.crc32c, Some(crc32c::crc32c(&source)), "{name}");
        let on_disk = std::fs::read(tree.path("f")).unwrap();
        assert_eq!(on_disk.len(), source.len(), "{name}: length");
        assert!(sha(&on_disk) == sha(&source), "{name}: bytes differ");
        if name != "fail-open" {
            assert!(reopens > 0, "{name}: the fault was met");
        }
        let written = emu
            .emu
            .counters
            .bytes_written
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            written,
            source.len() as u64,
            "{name}: every byte persisted once"
        );
    }
}

/// Tail readers while a writer appends and flushes: every size they see is
/// a persisted size, and reading up to it returns the source's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_readers_see_only_persisted_bytes() {
    let tree = Tree::new();
    let emu = start(&tree, Config::default()).await;
    let c = client(&emu).await;
    let source = Arc::new(pattern(12 * MIB + 1, 9));
    let mut w = AppendableWriter::create(
        &c,
        "tail",
        None,
        WriteOptions {
            flush_every: MIB as u64,
        },
    )
    .await
    .expect("create");
    let generation = w.generation();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let reader = {
        let (c, source) = (c.clone(), source.clone());
        tokio::spawn(async move {
            let pool = MrdPool::new(c.clone(), PoolConfig::default());
            let id = ObjectId {
                name: "tail".into(),
                generation,
            };
            let (mut reads, mut last) = (0, 0u64);
            loop {
                let finished = *done_rx.borrow_and_update();
                let size = c.stat("tail").await.expect("stat").size;
                assert!(size >= last, "the size went back: {last} -> {size}");
                if size > last {
                    let sink = VecSink::new((size - last) as usize);
                    let n = pool
                        .read(&id, size, last, size - last, sink.clone())
                        .await
                        .expect("read up to the persisted size");
                    assert_eq!(n, size - last, "a short read before the persisted end");
                    assert!(
                        sink.take() == source[last as usize..size as usize],
                        "bytes {last}..{size}"
                    );
                    reads += 1;
                    last = size;
                }
                if finished {
                    return (reads, last);
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), done_rx.changed()).await;
            }
        })
    };
    for piece in source.chunks(MIB / 2 + 3) {
        w.write(Bytes::copy_from_slice(piece)).await.expect("write");
    }
    w.close().await.expect("close");
    done_tx.send(true).expect("reader alive");
    let (reads, last) = reader.await.expect("reader");
    assert_eq!(last, source.len() as u64);
    assert!(reads >= 1);
}
