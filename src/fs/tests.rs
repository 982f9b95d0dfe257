use super::dir::valid_component;
use super::*;
use crate::gcs::mem::MemClient;
use crate::gcs::GcsError;
use crate::memory::{Budget, Pool, PoolConfig};
use crate::read::PrefetchConfig;
use crate::read::ReadError;
use crate::sync::lock;
use proptest::prelude::*;
use std::sync::atomic::Ordering;

fn fs(client: Arc<MemClient>) -> Arc<Fs> {
    fs_with(client, Budget::new(16 << 20), FsConfig::default())
}

/// A filesystem over `client` with this memory budget and these settings.
fn fs_with(client: Arc<MemClient>, budget: Arc<Budget>, cfg: FsConfig) -> Arc<Fs> {
    let engine = ReadEngine::new(
        client.clone(),
        Pool::new(budget, PoolConfig::new(1 << 20)),
        PrefetchConfig::default(),
    );
    Fs::new(client, engine, cfg)
}

/// The object version file inode `ino` stands for (the engine caches by
/// object).
fn object_of(fs: &Fs, ino: u64) -> crate::gcs::ObjectId {
    match lock(&fs.table).nodes.get(&ino).map(|n| n.kind.clone()) {
        Some(inode::Kind::File(info, _)) => crate::gcs::ObjectId {
            name: info.name,
            generation: info.generation,
        },
        other => panic!("inode {ino} is not a file: {other:?}"),
    }
}

/// Object names a bucket may hold, and names a misbehaving server may
/// send: valid segments mixed with empty, `.`, `..`, NUL, over-long and
/// arbitrary Unicode ones (which may contain `/` themselves).
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-c]{1,2}",
        1 => Just(String::new()),
        1 => Just(".".to_string()),
        1 => Just("..".to_string()),
        1 => Just("x\0y".to_string()),
        1 => Just("n".repeat(256)),
        1 => "[ %\\\n\u{301}\u{1F600}\u{5D0}e]{1,4}",
        1 => any::<String>(),
    ]
}

fn object_name() -> impl Strategy<Value = String> {
    proptest::collection::vec(segment(), 1..5).prop_map(|v| v.join("/"))
}

fn assert_valid(name: &str) -> Result<(), TestCaseError> {
    prop_assert!(!name.is_empty());
    prop_assert!(name != "." && name != "..", "{:?}", name);
    prop_assert!(!name.contains('/') && !name.contains('\0'), "{:?}", name);
    prop_assert!(name.len() <= 255);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(1024)))]

    /// Whatever a listing returns, an entry name is a valid POSIX name that
    /// leads back to exactly the listed name inside the directory.
    #[test]
    fn proptest_name_filter_entry_names(
        dir in prop_oneof![Just(String::new()), object_name().prop_map(|n| n + "/"), any::<String>()],
        listed in prop_oneof![object_name(), any::<String>()],
        inside in any::<bool>(),
        is_prefix in any::<bool>(),
    ) {
        let listed = if inside { format!("{dir}{listed}") } else { listed };
        if let Some(name) = entry_name(&dir, &listed, is_prefix) {
            assert_valid(name)?;
            let back = format!("{dir}{name}{}", if is_prefix { "/" } else { "" });
            prop_assert_eq!(back, listed);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(96)))]

    /// A bucket of arbitrary names, walked as a program would (readdir, then
    /// lookup of every entry): every entry is a valid name, `.` and `..`
    /// stay inside (the root's `..` is the root), every file reached is the
    /// object its path names, and every object whose segments are all valid
    /// (and that no directory of the same name hides) is reached.
    #[test]
    fn proptest_name_filter_listing(names in proptest::collection::vec(object_name(), 1..20)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let c = MemClient::new(Duration::ZERO);
            for n in &names {
                c.put(n, vec![1u8], true);
            }
            let fs = fs(c);
            for bad in [".", "..", "", "a/b"] {
                prop_assert!(fs.lookup(ROOT_INO, bad).await.is_err(), "{:?}", bad);
            }
            let depth = names.iter().map(|n| n.matches('/').count()).max().unwrap_or(0);
            let mut found = std::collections::HashSet::new();
            let mut todo = vec![(ROOT_INO, Vec::<String>::new())];
            while let Some((ino, path)) = todo.pop() {
                prop_assert!(path.len() <= depth, "deeper than any name: {:?}", path);
                let h = fs.opendir(ino).await.unwrap();
                let entries = fs.readdir(h, 0).unwrap();
                fs.releasedir(h);
                prop_assert_eq!(&entries[0].1.name, ".");
                prop_assert_eq!(entries[0].1.ino, ino);
                prop_assert_eq!(&entries[1].1.name, "..");
                if ino == ROOT_INO {
                    prop_assert_eq!(entries[1].1.ino, ROOT_INO);
                }
                for (_, e) in &entries[2..] {
                    assert_valid(&e.name)?;
                    let attr = fs.lookup(ino, &e.name).await.unwrap();
                    prop_assert_eq!((attr.ino, attr.is_dir), (e.ino, e.is_dir));
                    let mut p = path.clone();
                    p.push(e.name.clone());
                    if e.is_dir {
                        todo.push((e.ino, p));
                    } else {
                        found.insert(p.join("/"));
                    }
                }
            }
            for f in &found {
                prop_assert!(names.contains(f), "{:?} is no object", f);
            }
            for n in &names {
                let shown = n.split('/').all(valid_component)
                    && !names.iter().any(|m| m.starts_with(&format!("{n}/")));
                prop_assert_eq!(shown, found.contains(n), "{:?}", n);
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn invalid_names_are_skipped_once() {
    let c = MemClient::new(Duration::ZERO);
    c.put("ok", vec![1u8], true);
    c.put("bad//x", vec![1u8], true);
    c.put(&"n".repeat(300), vec![1u8], true);
    c.put("dots/./y", vec![1u8], true);
    let fs = fs(c);
    let names = |fs: &Fs, ino| {
        let h = futures::executor::block_on(fs.opendir(ino)).unwrap();
        let v: Vec<String> = fs
            .readdir(h, 2)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.name)
            .collect();
        fs.releasedir(h);
        v
    };
    assert_eq!(
        names(&fs, ROOT_INO),
        ["bad", "dots", "ok"],
        "the 300-byte name is skipped"
    );
    let bad = fs.lookup(ROOT_INO, "bad").await.unwrap();
    assert!(
        names(&fs, bad.ino).is_empty(),
        "an empty segment is skipped"
    );
    let dots = fs.lookup(ROOT_INO, "dots").await.unwrap();
    assert!(names(&fs, dots.ino).is_empty(), "a '.' segment is skipped");
    names(&fs, ROOT_INO);
    assert_eq!(lock(&fs.warned).len(), 3, "one warning per name");
}

#[tokio::test]
async fn inode_table_stays_bounded() {
    let c = MemClient::new(Duration::ZERO);
    for i in 0..50 {
        c.put(&format!("d/f{i}"), vec![1u8], true);
    }
    let engine = ReadEngine::new(
        c.clone(),
        Pool::new(Budget::new(4 << 20), PoolConfig::new(1 << 20)),
        PrefetchConfig::default(),
    );
    let fs = Fs::new(
        c,
        engine,
        FsConfig {
            max_nodes: 10,
            ..Default::default()
        },
    );
    let d = fs.lookup(ROOT_INO, "d").await.unwrap();
    let kept = fs.lookup(d.ino, "f7").await.unwrap();
    for _ in 0..3 {
        let h = fs.opendir(d.ino).await.unwrap();
        assert_eq!(fs.readdir(h, 0).unwrap().len(), 52);
        fs.releasedir(h);
    }
    let n = lock(&fs.table).nodes.len();
    assert!(n <= 10 + 52, "{n} nodes");
    // Looked-up inodes survive the pruning, with their numbers.
    assert_eq!(fs.lookup(d.ino, "f7").await.unwrap().ino, kept.ino);
}

/// Through the page cache, closing the last handle of a file that was
/// read to its end hands its blocks back to the memory pool, and the next
/// file's block is that same warm buffer (no fresh memory per file); a
/// second handle still open keeps them, and with direct I/O (no page
/// cache) they stay cached.
#[tokio::test]
async fn closing_a_file_read_through_gives_its_blocks_back_warm() {
    for release_consumed in [true, false] {
        let c = MemClient::new(Duration::ZERO);
        c.put("a", vec![1u8; 20 << 10], true);
        c.put("b", vec![2u8; 20 << 10], true);
        let pool = Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20));
        let engine = ReadEngine::new(
            c.clone(),
            pool.clone(),
            PrefetchConfig {
                release_consumed,
                ..Default::default()
            },
        );
        let fs = Fs::new(c.clone(), engine.clone(), FsConfig::default());
        let a = fs.lookup(ROOT_INO, "a").await.unwrap();
        let (h1, h2) = (
            fs.open(a.ino, false).await.unwrap(),
            fs.open(a.ino, false).await.unwrap(),
        );
        assert_eq!(fs.read(h1, 0, 1 << 20).await.unwrap().len(), 20 << 10);
        fs.release(h1);
        assert_eq!(
            engine.blocks_of(&object_of(&fs, a.ino)).len(),
            1,
            "another handle is open"
        );
        fs.release(h2);
        let kept = engine.blocks_of(&object_of(&fs, a.ino)).len();
        assert_eq!(kept, usize::from(!release_consumed), "{release_consumed}");
        let fresh = pool.stats().fresh.load(Ordering::Relaxed);
        let b = fs.lookup(ROOT_INO, "b").await.unwrap();
        let hb = fs.open(b.ino, false).await.unwrap();
        assert_eq!(
            fs.read(hb, 0, 1 << 20).await.unwrap().as_slice(),
            &vec![2u8; 20 << 10][..]
        );
        let fresh_for_b = pool.stats().fresh.load(Ordering::Relaxed) - fresh;
        assert_eq!(
            fresh_for_b,
            u64::from(!release_consumed),
            "{release_consumed}"
        );
    }
}

/// Opening a small file (one block) starts fetching it whole before any
/// read; a larger file waits for its reads; a file already read through
/// and closed (whose bytes the kernel's page cache holds) fetches nothing
/// at its next open.
#[tokio::test]
async fn open_starts_fetching_a_small_file_whole() {
    let c = MemClient::new(Duration::ZERO);
    c.put("small", vec![3u8; 50_000], true);
    c.put("big", vec![4u8; 3 << 20], true);
    let engine = ReadEngine::new(
        c.clone(),
        Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20)),
        PrefetchConfig {
            release_consumed: true,
            ..Default::default()
        },
    );
    let fs = Fs::new(c.clone(), engine.clone(), FsConfig::default());
    let small = fs.lookup(ROOT_INO, "small").await.unwrap();
    let big = fs.lookup(ROOT_INO, "big").await.unwrap();
    let fh = fs.open(small.ino, false).await.unwrap();
    assert_eq!(
        engine.blocks_of(&object_of(&fs, small.ino)).len(),
        1,
        "loading since the open"
    );
    let hb = fs.open(big.ino, false).await.unwrap();
    assert!(
        engine.blocks_of(&object_of(&fs, big.ino)).is_empty(),
        "a big file waits for reads"
    );
    let data = fs.read(fh, 0, 1 << 20).await.unwrap();
    assert_eq!(data.as_slice(), &vec![3u8; 50_000][..]);
    drop(data);
    assert_eq!(c.requests.load(Ordering::Relaxed), 1, "one fetch, at open");
    fs.release(fh);
    fs.release(hb);
    let again = fs.open(small.ino, false).await.unwrap();
    assert!(
        engine.blocks_of(&object_of(&fs, small.ino)).is_empty(),
        "read through once: the page cache has it"
    );
    assert_eq!(c.requests.load(Ordering::Relaxed), 1);
    fs.release(again);
}

/// Prefetch across files: opening a directory's files in listing order
/// starts the next ones loading whole (at most `prefetch_files` ahead);
/// they are counted as used when read; random order fetches nothing
/// extra; a full budget stops it without evicting the open file's block.
#[tokio::test]
async fn files_opened_in_listing_order_are_fetched_ahead() {
    let setup = |budget: u64| {
        let c = MemClient::new(Duration::ZERO);
        for i in 0..30 {
            c.put(&format!("d/f{i:02}"), vec![i as u8; 20 << 10], true);
        }
        let engine = ReadEngine::new(
            c.clone(),
            Pool::new(Budget::new(budget), PoolConfig::new(1 << 20)),
            PrefetchConfig {
                release_consumed: true,
                ..Default::default()
            },
        );
        let cfg = FsConfig {
            prefetch_files: 4,
            ..Default::default()
        };
        (c.clone(), engine.clone(), Fs::new(c, engine, cfg))
    };
    async fn files(fs: &Fs) -> Vec<u64> {
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        let dh = fs.opendir(d.ino).await.unwrap();
        let inos = fs
            .readdir(dh, 0)
            .unwrap()
            .into_iter()
            .filter(|(_, e)| !e.is_dir)
            .map(|(_, e)| e.ino)
            .collect();
        fs.releasedir(dh);
        inos
    }
    let loading = |fs: &Arc<Fs>, e: &ReadEngine, inos: &[u64]| -> Vec<bool> {
        inos.iter()
            .map(|i| !e.blocks_of(&object_of(fs, *i)).is_empty())
            .collect()
    };

    // In listing order: from the fourth open, the next four files.
    let (_c, engine, fs) = setup(16 << 20);
    let inos = files(&fs).await;
    assert_eq!(inos.len(), 30);
    for (i, ino) in inos.iter().take(4).enumerate() {
        let fh = fs.open(*ino, false).await.unwrap();
        let got = fs.read(fh, 0, 1 << 20).await.unwrap();
        assert_eq!(got.as_slice(), &vec![i as u8; 20 << 10][..]);
        drop(got);
        fs.release(fh);
    }
    assert_eq!(
        loading(&fs, &engine, &inos[4..10]),
        [true, true, true, true, false, false]
    );
    assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 4);
    let fh = fs.open(inos[4], false).await.unwrap();
    assert_eq!(
        fs.read(fh, 0, 1 << 20).await.unwrap().as_slice(),
        &vec![4u8; 20 << 10][..]
    );
    assert_eq!(engine.stats.prefetch_used.load(Ordering::Relaxed), 1);
    assert_eq!(
        loading(&fs, &engine, &inos[8..10]),
        [true, false],
        "topped up by one"
    );
    assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 5);
    assert_eq!(
        engine.stats.block_misses.load(Ordering::Relaxed),
        9,
        "4 opened + 5 ahead, none fetched twice"
    );

    // Random order: nothing is fetched but what is opened.
    let (_c, engine, fs) = setup(16 << 20);
    let inos = files(&fs).await;
    for i in [17, 3, 25, 9, 21, 0, 14, 28] {
        let fh = fs.open(inos[i], false).await.unwrap();
        fs.release(fh);
    }
    assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 0);
    assert_eq!(engine.stats.block_misses.load(Ordering::Relaxed), 8);

    // A budget with room for three files: the open files keep theirs and
    // the files ahead take only what is free.
    let (_c, engine, fs) = setup(3 * (20 << 10));
    let inos = files(&fs).await;
    let mut open = Vec::new();
    for ino in inos.iter().take(4) {
        open.push(fs.open(*ino, false).await.unwrap());
    }
    assert_eq!(engine.stats.prefetch_started.load(Ordering::Relaxed), 0);
    for fh in open {
        fs.release(fh);
    }
}

/// Objects replaced or deleted between the listing and the read, while
/// the files around them are fetched ahead: a reader gets a file's old
/// bytes whole, or ESTALE/ENOENT, and a new lookup the new bytes, never a
/// mix of generations.
#[tokio::test]
async fn files_changed_after_the_listing_never_mix_generations() {
    for metadata_ttl in [Duration::from_secs(60), Duration::ZERO] {
        let c = MemClient::new(Duration::ZERO);
        for i in 0..12 {
            c.put(&format!("d/f{i:02}"), vec![i as u8; 30 << 10], true);
        }
        let engine = ReadEngine::new(
            c.clone(),
            Pool::new(Budget::new(16 << 20), PoolConfig::new(1 << 20)),
            PrefetchConfig {
                release_consumed: true,
                ..Default::default()
            },
        );
        let cfg = FsConfig {
            prefetch_files: 8,
            metadata_ttl,
            ..Default::default()
        };
        let fs = Fs::new(c.clone(), engine.clone(), cfg);
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        let dh = fs.opendir(d.ino).await.unwrap();
        let listed: Vec<DirEntry> = fs
            .readdir(dh, 0)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| !e.is_dir)
            .collect();
        fs.releasedir(dh);
        // Opened in order: the files after the fourth are fetched ahead
        // with the listing's generations; then two of them change.
        for e in &listed[..4] {
            let fh = fs.open(e.ino, false).await.unwrap();
            fs.release(fh);
        }
        assert!(engine.stats.prefetch_started.load(Ordering::Relaxed) > 0);
        c.put("d/f06", vec![0xee; 20 << 10], true);
        c.delete("d/f08");
        for (i, e) in listed.iter().enumerate().skip(4) {
            let read = async {
                let fh = fs.open(e.ino, false).await?;
                let r = fs.read(fh, 0, 1 << 20).await.map(|d| d.as_slice().to_vec());
                fs.release(fh);
                r
            };
            match read.await {
                Ok(bytes) => assert!(
                    bytes == vec![i as u8; 30 << 10],
                    "{metadata_ttl:?}: file {i} is not its listed generation's bytes"
                ),
                Err(err) => {
                    assert!(i == 6 || i == 8, "file {i}: {err}");
                    assert!(
                        [libc::ESTALE, libc::ENOENT].contains(&err.errno()),
                        "file {i}: {err}"
                    );
                }
            }
        }
        // A new lookup finds the new generation, whole.
        let fresh = fs.lookup(d.ino, "f06").await.unwrap();
        let fh = fs.open(fresh.ino, false).await.unwrap();
        if fresh.ino != listed[6].ino {
            let got = fs.read(fh, 0, 1 << 20).await.unwrap();
            assert!(got.as_slice() == vec![0xee; 20 << 10].as_slice());
        }
        fs.release(fh);
    }
}

#[tokio::test]
async fn a_new_generation_gets_a_new_inode_and_old_handles_keep_theirs() {
    let c = MemClient::new(Duration::ZERO);
    c.put("o", b"first".to_vec(), true);
    let fs = fs_with(
        c.clone(),
        Budget::new(16 << 20),
        FsConfig {
            metadata_ttl: Duration::ZERO,
            ..Default::default()
        },
    );
    let old = fs.lookup(ROOT_INO, "o").await.unwrap();
    let fh = fs.open(old.ino, false).await.unwrap();
    assert_eq!(fs.read(fh, 0, 5).await.unwrap().as_slice(), b"first");
    c.put("o", b"other!".to_vec(), true);
    // The old inode still describes (and opens) nothing but its generation.
    assert_eq!(fs.getattr(old.ino).await.unwrap().size, 5);
    assert!(matches!(
        fs.open(old.ino, false).await,
        Err(FsError::Stale(_))
    ));
    // The name now leads to a new inode with the new generation.
    let new = fs.lookup(ROOT_INO, "o").await.unwrap();
    assert_ne!(new.ino, old.ino, "a new generation is a new inode");
    assert_eq!(new.size, 6);
    let fh2 = fs.open(new.ino, false).await.unwrap();
    assert_eq!(fs.read(fh2, 0, 6).await.unwrap().as_slice(), b"other!");
    // The old handle reads its own generation, or fails; never the new one.
    match fs.read(fh, 0, 5).await {
        Ok(d) => assert_eq!(d.as_slice(), b"first"),
        Err(e) => assert_eq!(e.errno(), libc::ESTALE, "{e}"),
    }
    // Listing shows the new inode too.
    let dh = fs.opendir(ROOT_INO).await.unwrap();
    let listed = fs.readdir(dh, 2).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.ino, new.ino);
}

#[tokio::test]
async fn reads_past_the_known_end_of_an_appendable_object_refresh_its_size() {
    let c = MemClient::new(Duration::ZERO);
    c.put("log", b"12345".to_vec(), false);
    let fs = fs(c.clone()); // default metadata TTL: 60 s
    let ino = fs.lookup(ROOT_INO, "log").await.unwrap().ino;
    let fh = fs.open(ino, false).await.unwrap();
    assert_eq!(fs.read(fh, 0, 100).await.unwrap().as_slice(), b"12345");
    assert!(fs.read(fh, 5, 100).await.unwrap().is_empty(), "EOF for now");
    c.append("log", b"678");
    assert_eq!(fs.read(fh, 5, 100).await.unwrap().as_slice(), b"678");
    assert_eq!(
        fs.getattr(ino).await.unwrap().size,
        8,
        "the attributes agree with what was read, within the TTL"
    );
    // Replaced by a new generation: ESTALE, not the new object's bytes.
    c.put("log", b"something else".to_vec(), false);
    let err = fs.read(fh, 8, 100).await.err().expect("an error");
    assert_eq!(err.errno(), libc::ESTALE, "{err:?}");
}

/// The kernel may cache a finalized object's entry and attributes as long
/// as this mount trusts its metadata; an appendable object's, a directory's
/// and a file being created here only briefly (they change under one name).
#[tokio::test]
async fn only_finalized_objects_are_cached_by_the_kernel_for_the_metadata_ttl() {
    let c = MemClient::new(Duration::ZERO);
    c.put("d/done", b"12345".to_vec(), true);
    c.put("d/log", b"12345".to_vec(), false);
    let fs = fs(c.clone()); // default metadata TTL: 60 s
    let ttl = fs.config().metadata_ttl;
    let before = std::time::Instant::now();
    let dir = fs.lookup(ROOT_INO, "d").await.unwrap();
    let done = fs.lookup(dir.ino, "done").await.unwrap();
    let log = fs.lookup(dir.ino, "log").await.unwrap();
    let until = done.fresh_until.expect("a finalized object is cached");
    assert!(
        until >= before + ttl && until <= std::time::Instant::now() + ttl,
        "cached for the metadata TTL from its fetch"
    );
    assert_eq!(fs.getattr(done.ino).await.unwrap().fresh_until, Some(until));
    assert_eq!(log.fresh_until, None, "an appendable object grows");
    assert_eq!(dir.fresh_until, None, "a directory changes");
    let (created, _fh) = fs.create(dir.ino, "new", false).await.unwrap();
    assert_eq!(created.fresh_until, None, "a file being written changes");
}

#[tokio::test]
async fn namespace_and_reads() {
    let c = MemClient::new(Duration::ZERO);
    c.put("a/b.txt", b"hello".to_vec(), true);
    c.put("a/c/d", b"x".to_vec(), true);
    c.put("top", b"top!".to_vec(), true);
    c.put("dup", b"file".to_vec(), true);
    c.put("dup/inner", b"i".to_vec(), true);
    let fs = fs(c);
    let a = fs.lookup(ROOT_INO, "a").await.unwrap();
    assert!(a.is_dir);
    let b = fs.lookup(a.ino, "b.txt").await.unwrap();
    assert_eq!((b.is_dir, b.size), (false, 5));
    assert_eq!(
        fs.lookup(ROOT_INO, "a").await.unwrap().ino,
        a.ino,
        "stable inode"
    );
    assert!(
        fs.lookup(ROOT_INO, "dup").await.unwrap().is_dir,
        "directory wins"
    );
    assert!(matches!(
        fs.lookup(ROOT_INO, "nope").await,
        Err(FsError::NotFound)
    ));
    assert!(matches!(
        fs.lookup(ROOT_INO, "..").await,
        Err(FsError::NotFound)
    ));
    let dh = fs.opendir(ROOT_INO).await.unwrap();
    let names: Vec<String> = fs
        .readdir(dh, 0)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.name)
        .collect();
    assert_eq!(names, [".", "..", "a", "dup", "top"]);
    let rest: Vec<String> = fs
        .readdir(dh, 3)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.name)
        .collect();
    assert_eq!(rest, ["dup", "top"], "offsets are stable indexes");
    assert!(matches!(fs.open(a.ino, true).await, Err(FsError::IsDir)));
    assert!(matches!(fs.open(a.ino, false).await, Err(FsError::IsDir)));
    let fh = fs.open(b.ino, false).await.unwrap();
    assert_eq!(fs.read(fh, 1, 100).await.unwrap().as_slice(), b"ello");
    fs.release(fh);
    assert!(matches!(fs.read(fh, 0, 1).await, Err(FsError::BadHandle)));
    fs.forget(b.ino, 1);
    assert!(matches!(fs.getattr(b.ino).await, Err(FsError::Stale(_))));
    assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
}

/// Errors reach the errno mapping whole: the kind decides the errno and
/// whether it is retried, and the source chain still names the cause.
#[test]
fn errors_keep_kind_and_source_down_to_the_errno() {
    use crate::gcs::AuthError;
    let auth = |transient| {
        GcsError::from(AuthError::Token {
            origin: "key file k.json".into(),
            detail: "invalid_grant".into(),
            transient,
        })
    };
    let chain = |e: &dyn std::error::Error| {
        let mut out = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push(s.to_string());
            cur = s.source();
        }
        out
    };
    // A permanent credentials failure: not retried, EACCES, whichever
    // layer hands it up.
    let permanent = auth(false);
    assert!(!permanent.is_retryable() && permanent.is_denied());
    for e in [
        FsError::from(permanent.clone()),
        FsError::from(ReadError::Gcs(permanent.clone())),
    ] {
        assert_eq!(e.errno(), libc::EACCES, "{e}");
        assert!(
            chain(&e).iter().any(|m| m.contains("invalid_grant")),
            "{:?}",
            chain(&e)
        );
    }
    // A transient one is retried; if retrying runs out of time, the last
    // failure is the source of the deadline error, and the errno is EIO.
    let transient = auth(true);
    assert!(transient.is_retryable() && !transient.is_denied());
    let deadline = GcsError::RetryDeadline {
        attempts: 3,
        secs: 1.0,
        last: Arc::new(transient),
    };
    assert!(!deadline.is_retryable());
    let e = FsError::from(ReadError::Gcs(deadline));
    assert_eq!(e.errno(), libc::EIO);
    let c = chain(&e);
    assert!(c.len() >= 3, "deadline -> credentials -> token: {c:?}");
    assert!(
        c.last().is_some_and(|m| m.contains("invalid_grant")),
        "{c:?}"
    );
    // Kinds of the layers below keep their errnos.
    let cases = [
        (FsError::from(GcsError::NotFound("x".into())), libc::ENOENT),
        (
            FsError::from(GcsError::PermissionDenied("x".into())),
            libc::EACCES,
        ),
        (
            FsError::from(ReadError::Gcs(GcsError::Unauthenticated("x".into()))),
            libc::EACCES,
        ),
        (
            FsError::from(ReadError::Gcs(GcsError::NotFound("gone".into()))),
            libc::ESTALE,
        ),
        (
            FsError::from(ReadError::Stale {
                object: "o".into(),
                generation: 1,
            }),
            libc::ESTALE,
        ),
        (FsError::from(GcsError::Unavailable("x".into())), libc::EIO),
        (FsError::Inconsistent("shrank".into()), libc::EIO),
    ];
    for (e, errno) in cases {
        assert_eq!(e.errno(), errno, "{e:?}");
    }
}

/// The filesystem over a client that fails reads (the failure-injecting
/// client): the namespace still works (only reads fail), a failed read is
/// EIO with the client's error kept whole underneath, and with failures
/// now and then a read returns the file's true bytes or EIO, never others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reads_are_eio_and_never_wrong_bytes() {
    use crate::gcs::mem::FaultyClient;
    let mem = MemClient::new(Duration::ZERO);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    mem.put("d/big", data.clone(), true);
    mem.put("d/small", b"small file".to_vec(), true);
    for every in [1u64, 2] {
        let client = FaultyClient::new(mem.clone(), every);
        let engine = ReadEngine::new(
            client.clone(),
            Pool::new(Budget::new(64 << 20), PoolConfig::new(1 << 20)),
            PrefetchConfig::default(),
        );
        let fs = Fs::new(client, engine, FsConfig::default());
        let d = fs.lookup(ROOT_INO, "d").await.expect("lookup d");
        let dh = fs.opendir(d.ino).await.expect("opendir");
        assert_eq!(fs.readdir(dh, 0).expect("readdir").len(), 4);
        for (name, want) in [("big", &data[..]), ("small", &b"small file"[..])] {
            let a = fs.lookup(d.ino, name).await.expect("lookup");
            let fh = fs.open(a.ino, false).await.expect("open");
            let (mut ok, mut eio) = (0, 0);
            for (off, len) in [
                (0u64, 4096u32),
                (1_000_000, 131_072),
                (2_999_000, 65_536),
                (5, 3),
            ] {
                match fs.read(fh, off, len).await {
                    Ok(got) => {
                        let lo = (off as usize).min(want.len());
                        let hi = (off as usize + len as usize).min(want.len());
                        assert!(
                            got.as_slice() == &want[lo..hi],
                            "{name} every={every}: bytes at {off}"
                        );
                        ok += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.errno(), libc::EIO, "{name}: {e:?}");
                        assert!(
                            matches!(&e, FsError::Read(ReadError::Gcs(GcsError::Unavailable(_)))),
                            "the client's error kept whole: {e:?}"
                        );
                        eio += 1;
                    }
                }
            }
            if every == 1 {
                // Reads past the end need no fetch; every other one fails.
                let inside = [0u64, 1_000_000, 2_999_000, 5]
                    .iter()
                    .filter(|o| (**o as usize) < want.len())
                    .count();
                assert_eq!((ok, eio), (4 - inside, inside), "{name}: every fetch fails");
            } else {
                assert!(ok > 0, "{name} every={every}: {eio} EIO, no read succeeded");
            }
            fs.release(fh);
        }
    }
}

/// Writes through the filesystem over the in-memory client: a created file
/// streams as an appendable object (persisted by flush, left unfinalized at
/// close), O_TRUNC makes a new generation, appends take the object over,
/// only sequential writes are streamed, a read through a write handle sees
/// its own writes, and the namespace calls change the bucket.
#[tokio::test]
async fn writes_stream_as_appendable_objects() {
    let c = MemClient::new(Duration::ZERO);
    let fs = fs(c.clone());
    let dir = fs.mkdir(ROOT_INO, "out").await.expect("mkdir");
    assert!(dir.is_dir);
    assert_eq!(c.folders(), ["out/"]);

    let (a, fh) = fs.create(dir.ino, "log", false).await.expect("create");
    assert_eq!(a.size, 0);
    let body = pattern_bytes(5 << 20);
    let (mut off, mut at_once) = (0, 0);
    for piece in body.chunks(128 << 10) {
        let n = match fs.write_now(fh, off, piece) {
            Some(r) => {
                at_once += 1;
                r.expect("write")
            }
            None => fs.write(fh, off, piece).await.unwrap(),
        };
        assert_eq!(n as usize, piece.len());
        off += piece.len() as u64;
    }
    assert!(
        at_once > 30,
        "most writes go straight into the piece: {at_once} of 40"
    );
    assert_eq!(fs.getattr(a.ino).await.unwrap().size, body.len() as u64);
    assert_eq!(fs.write_stats().fallbacks.load(Ordering::Relaxed), 0);
    // A read through the write handle sees its own writes.
    let got = fs.read(fh, (4 << 20) + 5, 1000).await.unwrap();
    assert_eq!(got.as_slice(), &body[(4 << 20) + 5..(4 << 20) + 1005]);
    fs.flush(fh, true).await.expect("close");
    if let Some(w) = fs.release(fh) {
        fs.finish_write(w).await;
    }
    let info = c.stat("out/log").await.unwrap();
    assert_eq!((info.size, info.finalized), (body.len() as u64, false));

    // O_APPEND-style: open without truncation, write at the end.
    let fh = fs.open(a.ino, true).await.expect("open for append");
    fs.write(fh, body.len() as u64, b"tail")
        .await
        .expect("append");
    fs.flush(fh, false).await.expect("fsync");
    let after = c.stat("out/log").await.unwrap();
    assert_eq!(
        after.generation, info.generation,
        "an append keeps the generation"
    );
    assert_eq!(after.size, body.len() as u64 + 4);
    if let Some(w) = fs.release(fh) {
        fs.finish_write(w).await;
    }

    // O_TRUNC: a new generation, which the inode stands for from now on.
    let fh = fs.open_file(a.ino, true, true).await.expect("truncate").fh;
    fs.write(fh, 0, b"new").await.unwrap();
    fs.flush(fh, true).await.unwrap();
    let _ = fs.release(fh);
    let now = c.stat("out/log").await.unwrap();
    assert_ne!(now.generation, info.generation);
    assert_eq!(now.size, 3);
    assert_eq!(fs.getattr(a.ino).await.unwrap().size, 3);
    let rfh = fs.open(a.ino, false).await.unwrap();
    assert_eq!(fs.read(rfh, 0, 10).await.unwrap().as_slice(), b"new");
    let _ = fs.release(rfh);

    // Truncation to 0 by setattr: a new empty generation.
    assert_eq!(fs.setattr(a.ino, Some(0), None).await.unwrap().size, 0);
    assert_eq!(c.stat("out/log").await.unwrap().size, 0);
    // Mode and times are accepted and not kept.
    assert_eq!(fs.setattr(a.ino, None, None).await.unwrap().ino, a.ino);

    // Rename (atomic, same generation), exclusive create, unlink, rmdir.
    let g = c.stat("out/log").await.unwrap().generation;
    fs.rename(dir.ino, "log", ROOT_INO, "moved", false)
        .await
        .expect("rename");
    assert_eq!(c.stat("moved").await.unwrap().generation, g);
    assert!(c.stat("out/log").await.is_err());
    let (_, fh) = fs.create(ROOT_INO, "other", false).await.unwrap();
    let _ = fs.release(fh);
    assert!(matches!(
        fs.rename(ROOT_INO, "moved", ROOT_INO, "other", true).await,
        Err(FsError::Exists)
    ));
    assert!(matches!(
        fs.create(ROOT_INO, "other", true).await,
        Err(FsError::Exists)
    ));
    let (_, fh) = fs.create(dir.ino, "keep", false).await.unwrap();
    let _ = fs.release(fh);
    assert!(matches!(
        fs.rmdir(ROOT_INO, "out").await,
        Err(FsError::NotEmpty)
    ));
    fs.unlink(dir.ino, "keep").await.expect("unlink");
    assert!(c.stat("out/keep").await.is_err());
    fs.rmdir(ROOT_INO, "out").await.expect("rmdir");
    assert!(c.folders().is_empty());
    assert!(matches!(
        fs.lookup(ROOT_INO, "out").await,
        Err(FsError::NotFound)
    ));
}

/// A read-only mount refuses every change with EROFS.
#[tokio::test]
async fn a_read_only_mount_refuses_changes() {
    let c = MemClient::new(Duration::ZERO);
    c.put("f", b"x".to_vec(), true);
    let fs = fs_with(
        c.clone(),
        Budget::new(16 << 20),
        FsConfig {
            read_only: true,
            ..Default::default()
        },
    );
    let f = fs.lookup(ROOT_INO, "f").await.unwrap();
    let refused = [
        fs.open(f.ino, true).await.err(),
        fs.create(ROOT_INO, "n", false).await.err(),
        fs.mkdir(ROOT_INO, "d").await.err(),
        fs.unlink(ROOT_INO, "f").await.err(),
        fs.rename(ROOT_INO, "f", ROOT_INO, "g", false).await.err(),
        fs.setattr(f.ino, Some(0), None).await.err(),
    ];
    for (i, e) in refused.iter().enumerate() {
        assert_eq!(
            e.as_ref().map(FsError::errno),
            Some(libc::EROFS),
            "case {i}: {e:?}"
        );
    }
    assert_eq!(c.stat("f").await.unwrap().size, 1, "nothing changed");
}

fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Write pieces are buffers of the memory layer, counted in the budget
/// shared with reads: writers that find it full persist what they hold and
/// wait for memory to come back, so four concurrent writers stay within the
/// budget (no piece taken past it), and the buffers go back to the pool warm.
#[tokio::test]
async fn writes_stay_within_the_memory_budget() {
    let c = MemClient::new(Duration::ZERO);
    // Pieces are 1 MiB here (the test pool's largest buffer).
    let limit = 4 << 20;
    let budget = Budget::new(limit);
    let fs = fs_with(c.clone(), budget.clone(), FsConfig::default());
    let body = pattern_bytes(24 << 20);
    let mut writers = Vec::new();
    for w in 0..4 {
        let (fs, body) = (fs.clone(), body.clone());
        writers.push(tokio::spawn(async move {
            let name = format!("big{w}");
            let (_, fh) = fs.create(ROOT_INO, &name, false).await.unwrap();
            for (i, piece) in body.chunks(300 << 10).enumerate() {
                let off = (i * (300 << 10)) as u64;
                match fs.write_now(fh, off, piece) {
                    Some(r) => r.map(|_| ()).unwrap(),
                    None => fs.write(fh, off, piece).await.map(|_| ()).unwrap(),
                }
            }
            fs.flush(fh, true).await.unwrap();
            if let Some(w) = fs.release(fh) {
                fs.finish_write(w).await;
            }
            name
        }));
    }
    for w in writers {
        let name = w.await.expect("writer");
        assert_eq!(c.get(&name).expect("written").1, body.as_slice(), "{name}");
    }
    let pool = fs.engine.pool();
    assert!(
        budget.peak() <= limit,
        "held {} bytes at most under a budget of {limit}",
        budget.peak()
    );
    assert!(budget.peak() >= 2 << 20, "the pieces were counted");
    assert_eq!(
        fs.write_stats().over_budget.load(Ordering::Relaxed),
        0,
        "no piece past the budget"
    );
    assert_eq!(pool.in_use_bytes(), 0, "every piece given back at close");
    assert!(pool.hot_bytes() > 0, "and kept warm for the next writer");
}

/// Writes that cannot stream go through a staged copy in `--temp-dir`,
/// uploaded as a new generation at fsync and close: writing back, holes,
/// rewriting a finalized object, resizing to any size; a read through the
/// handle sees the copy; a replaced object is ESTALE; the copies stay within
/// `--temp-dir-limit` (ENOSPC past it) and their room is given back.
#[tokio::test]
async fn writes_that_cannot_stream_go_through_a_staged_copy() {
    let c = MemClient::new(Duration::ZERO);
    let temp = std::env::temp_dir().join(format!("zonalfs-staged-test-{}", std::process::id()));
    std::fs::create_dir_all(&temp).unwrap();
    let cfg = FsConfig {
        temp_dir: temp.clone(),
        temp_limit: 8 << 20,
        ..Default::default()
    };
    let fs = fs_with(c.clone(), Budget::new(16 << 20), cfg);
    let write = |fh: u64, off: u64, data: &'static [u8]| {
        let fs = fs.clone();
        async move {
            match fs.write_now(fh, off, data) {
                Some(r) => r,
                None => fs.write(fh, off, data).await,
            }
        }
    };
    let close = |fh: u64| {
        let fs = fs.clone();
        async move {
            fs.flush(fh, true).await.expect("close");
            if let Some(w) = fs.release(fh) {
                fs.finish_write(w).await;
            }
        }
    };

    // Seeking back in a file being streamed: what was streamed is persisted,
    // copied, changed in the copy and uploaded as a new generation.
    let (a, fh) = fs.create(ROOT_INO, "back", false).await.unwrap();
    write(fh, 0, b"hello world").await.unwrap();
    let first = c.stat("back").await.unwrap().generation;
    write(fh, 0, b"J").await.unwrap();
    assert_eq!(
        fs.read(fh, 0, 100).await.unwrap().as_slice(),
        b"Jello world"
    );
    assert!(fs.staged_bytes() > 0);
    close(fh).await;
    let info = c.stat("back").await.unwrap();
    assert_ne!(info.generation, first, "a new generation");
    assert!(!info.finalized);
    assert_eq!(&c.get("back").unwrap().1[..], b"Jello world");
    assert_eq!(fs.getattr(a.ino).await.unwrap().size, 11);
    let rfh = fs.open(a.ino, false).await.unwrap();
    assert_eq!(
        fs.read(rfh, 0, 100).await.unwrap().as_slice(),
        b"Jello world"
    );
    let _ = fs.release(rfh);

    // A hole: zeros in between.
    let (_, fh) = fs.create(ROOT_INO, "holes", false).await.unwrap();
    write(fh, 0, b"a").await.unwrap();
    write(fh, 4, b"b").await.unwrap();
    close(fh).await;
    assert_eq!(&c.get("holes").unwrap().1[..], b"a\0\0\0b");

    // A finalized object rewritten in place.
    c.put("fin", b"0123456789".to_vec(), true);
    let f = fs.lookup(ROOT_INO, "fin").await.unwrap();
    let fh = fs.open(f.ino, true).await.unwrap();
    write(fh, 2, b"AB").await.unwrap();
    fs.flush(fh, false).await.expect("fsync uploads");
    assert_eq!(&c.get("fin").unwrap().1[..], b"01AB456789");
    write(fh, 10, b"!").await.unwrap();
    close(fh).await;
    assert_eq!(&c.get("fin").unwrap().1[..], b"01AB456789!");
    assert_eq!(fs.write_stats().staged_uploads.load(Ordering::Relaxed), 4);

    // Resizing without a handle, down and up.
    assert_eq!(fs.setattr(f.ino, Some(4), None).await.unwrap().size, 4);
    assert_eq!(&c.get("fin").unwrap().1[..], b"01AB");
    assert_eq!(fs.setattr(f.ino, Some(6), None).await.unwrap().size, 6);
    assert_eq!(&c.get("fin").unwrap().1[..], b"01AB\0\0");
    // ... and through a handle (uploaded at its close).
    let fh = fs.open(f.ino, true).await.unwrap();
    assert_eq!(fs.setattr(f.ino, Some(3), Some(fh)).await.unwrap().size, 3);
    write(fh, 3, b"x").await.unwrap();
    close(fh).await;
    assert_eq!(&c.get("fin").unwrap().1[..], b"01Ax");

    // Someone else replaced the object meanwhile: ESTALE, nothing clobbered.
    let fh = fs.open(f.ino, true).await.unwrap();
    write(fh, 0, b"Z").await.unwrap();
    c.put("fin", b"theirs".to_vec(), false);
    let e = fs.flush(fh, true).await.unwrap_err();
    assert_eq!(e.errno(), libc::ESTALE, "{e}");
    assert_eq!(&c.get("fin").unwrap().1[..], b"theirs");
    let _ = fs.release(fh);

    // Past --temp-dir-limit: ENOSPC.
    c.put("big", vec![7; 6 << 20], true);
    let b = fs.lookup(ROOT_INO, "big").await.unwrap();
    let fh = fs.open(b.ino, true).await.unwrap();
    write(fh, 0, b"x").await.unwrap();
    let far = vec![1u8; 3 << 20];
    let e = fs.write(fh, 6 << 20, &far).await.unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    close(fh).await;
    assert_eq!(&c.get("big").unwrap().1[..2], b"x\x07");
    assert_eq!(fs.staged_bytes(), 0, "every copy's room given back");
    assert!(
        fs.write_stats().fallbacks.load(Ordering::Relaxed) >= 6,
        "fallbacks are counted"
    );
    assert_eq!(
        std::fs::read_dir(&temp).unwrap().count(),
        0,
        "the copies are unnamed: nothing is left in --temp-dir"
    );
    std::fs::remove_dir(&temp).unwrap();
}

/// A directory this mount made is known whole: within `negative_ttl` a name
/// in it that the mount did not create is missing without asking the
/// service (here: an object another writer put there meanwhile is not seen
/// yet); what the mount created there is found; once the knowledge may be
/// wrong (a rename) or is older than `negative_ttl`, the service is asked.
#[tokio::test]
async fn a_directory_made_here_is_known_whole() {
    let c = MemClient::new(Duration::ZERO);
    let fs = fs(c.clone());
    let d = fs.mkdir(ROOT_INO, "new").await.unwrap();
    let (_, fh) = fs.create(d.ino, "mine", false).await.unwrap();
    fs.flush(fh, true).await.unwrap();
    if let Some(w) = fs.release(fh) {
        fs.finish_write(w).await;
    }
    assert!(c.get("mine").is_none() && c.get("new/mine").is_some());
    c.put("new/theirs", b"x".to_vec(), true);
    assert!(fs.lookup(d.ino, "mine").await.is_ok());
    assert!(
        matches!(fs.lookup(d.ino, "theirs").await, Err(FsError::NotFound)),
        "not asked: the directory is known whole"
    );
    fs.rename(d.ino, "mine", d.ino, "mine2", false)
        .await
        .unwrap();
    assert!(
        fs.lookup(d.ino, "theirs").await.is_ok(),
        "after a rename the service is asked"
    );

    let quick = fs_with(
        c.clone(),
        Budget::new(16 << 20),
        FsConfig {
            negative_ttl: Duration::ZERO,
            ..Default::default()
        },
    );
    let d = quick.mkdir(ROOT_INO, "other").await.unwrap();
    c.put("other/theirs", b"x".to_vec(), true);
    assert!(
        quick.lookup(d.ino, "theirs").await.is_ok(),
        "with --negative-ttl 0 nothing is assumed missing"
    );
}

/// A create in a directory made here is answered before the service makes
/// the object (generation 0 on the inode until it does): writes, fsync and
/// reads through the handle work at once; unlink right after the create
/// waits for it (nothing reappears); a failed create (someone else made the
/// name meanwhile, O_EXCL) shows as EIO at the next call and replaces
/// nothing.
#[tokio::test]
async fn creates_in_a_directory_made_here_are_answered_at_once() {
    let c = MemClient::new(Duration::ZERO);
    let fs = fs(c.clone());
    let d = fs.mkdir(ROOT_INO, "d").await.unwrap();
    let (a, fh) = fs.create(d.ino, "f", true).await.unwrap();
    assert_eq!(
        lock(&fs.table).nodes.get(&a.ino).map(|n| match &n.kind {
            inode::Kind::File(i, _) => i.generation,
            _ => -1,
        }),
        Some(0),
        "answered before the service made it"
    );
    fs.write(fh, 0, b"hello").await.unwrap();
    fs.flush(fh, false).await.unwrap();
    let g = c.stat("d/f").await.unwrap().generation;
    assert_eq!(object_of(&fs, a.ino).generation, g, "named once it exists");
    assert_eq!(fs.read(fh, 0, 10).await.unwrap().as_slice(), b"hello");
    fs.flush(fh, true).await.unwrap();
    if let Some(w) = fs.release(fh) {
        fs.finish_write(w).await;
    }

    // Opened for reading by another program before the writer's first
    // fsync: the open waits for the create and reads what is persisted.
    let (b, wfh) = fs.create(d.ino, "early", false).await.unwrap();
    fs.write(wfh, 0, b"abc").await.unwrap();
    let rfh = fs
        .open(b.ino, false)
        .await
        .expect("open waits for the create");
    assert_eq!(fs.read(rfh, 0, 10).await.unwrap().as_slice(), b"abc");
    assert_ne!(object_of(&fs, b.ino).generation, 0);
    let _ = fs.release(rfh);
    fs.flush(wfh, true).await.unwrap();
    if let Some(w) = fs.release(wfh) {
        fs.finish_write(w).await;
    }

    // Created and unlinked while still open: gone, and it stays gone.
    let (_, fh) = fs.create(d.ino, "tmp", false).await.unwrap();
    fs.unlink(d.ino, "tmp")
        .await
        .expect("unlink waits for the create");
    fs.flush(fh, true).await.ok();
    if let Some(w) = fs.release(fh) {
        fs.finish_write(w).await;
    }
    assert!(c.get("d/tmp").is_none(), "nothing reappears");

    // Someone else made the name meanwhile: O_EXCL fails, theirs stays.
    let (_, fh) = fs.create(d.ino, "race", true).await.unwrap();
    c.put("d/race", b"theirs".to_vec(), false);
    tokio::task::yield_now().await;
    let e = fs.flush(fh, true).await.unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let _ = fs.release(fh);
    assert_eq!(&c.get("d/race").unwrap().1[..], b"theirs");
}
