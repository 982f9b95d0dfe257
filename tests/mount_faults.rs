//! Reliability through a real mount: the `zonalfs emulator` runs as a child
//! with fault flags (corrupted chunks, broken and stalled streams, redirects,
//! failed opens, all together), `zonalfs mount` reads from it, and every byte a
//! program reads is checked against the source. Also: what a reader sees when
//! the service is gone past the retry deadline (EIO, not a hang) and when it
//! comes back (reads work again), when an object is rewritten under open
//! readers (old bytes or ESTALE/EIO, never a mix), and when an appendable object
//! grows under a tailing reader (the new bytes, after the metadata TTL).
//!
//! Every blocking read runs in a thread bounded by a generous timeout, so a
//! hang fails the test instead of stalling the suite.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::mount::{scrape, sha_file, MountGuard};
use common::{must_wait_until, pattern, wait_until, EmuChild, Tree};
use sha2::{Digest, Sha256};

/// Objects of a few KiB to tens of MiB (odd sizes: no read lines up with the end).
const SIZES: [(&str, usize); 4] = [
    ("small", 4096 + 3),
    ("medium", (200 << 10) + 5),
    ("dir/large", (3 << 20) + 17),
    ("dir/huge", (20 << 20) + 1234),
];

/// Runs `f` in a thread and returns its result, failing the test if it takes
/// longer than `limit` (a hang). A stuck read ends when the mount guard kills
/// the daemon during the unwind.
fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread ended without an answer"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {limit:?} (a hang)")
        }
    }
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// A free local port for the metrics endpoint.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Reads exactly `len` bytes at `off` (fewer only at the end of the file).
fn pread(f: &std::fs::File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut out[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    out.truncate(got);
    Ok(out)
}

/// Random pread ranges first (so they go to the network, not to pages a whole
/// read cached), then whole sequential reads of all files at once; returns the
/// bytes verified. Panics on any error or wrong byte.
fn verify_all(mnt: &Path, files: &[(String, Vec<u8>)], seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n.max(1)
    };
    let mut verified = 0u64;
    for (name, data) in files {
        let f = std::fs::File::open(mnt.join(name)).expect("open");
        for _ in 0..6 {
            let off = rand(data.len() as u64);
            let len = 1 + rand(1 << 20) as usize;
            let got = pread(&f, off, len).unwrap_or_else(|e| panic!("{name} @{off}+{len}: {e}"));
            let end = (off as usize + len).min(data.len());
            assert!(
                got == data[off as usize..end],
                "{name} @{off}+{len}: wrong bytes"
            );
            verified += got.len() as u64;
        }
    }
    // Whole reads of every file at once: streams of several objects, and
    // their retries, share the connections.
    std::thread::scope(|s| {
        for (name, data) in files {
            s.spawn(move || {
                assert_eq!(sha_file(&mnt.join(name)), sha(data), "{name}: sha256");
            });
        }
    });
    verified + files.iter().map(|(_, d)| d.len() as u64).sum::<u64>()
}

/// Stops the emulator (SIGTERM) and returns the counters JSON it prints.
fn counters(emu: &mut EmuChild) -> serde_json::Value {
    let (status, err) = emu.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "emulator exit {status}: {err}");
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no counters line in {err}"));
    serde_json::from_str(line).expect("counters JSON")
}

/// The client's stream retries by cause, from its metrics.
fn client_retries(metrics: &str) -> String {
    let text = scrape(metrics);
    text.lines()
        .filter(|l| l.starts_with("zonalfs_stream_retries_total{"))
        .map(|l| {
            l.trim_start_matches("zonalfs_stream_retries_total{cause=\"")
                .replace("\"} ", "=")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Mounts an emulator started with `emu_flags`, reads and verifies every file,
/// and checks that the emulator injected the faults it was asked for
/// (`expect`: fault names of its counters that must be non-zero).
fn survive(emu_flags: &[&str], mount_flags: &[&str], expect: &[&str]) {
    let tree = Tree::new();
    let files: Vec<(String, Vec<u8>)> = SIZES
        .iter()
        .enumerate()
        .map(|(i, (name, len))| {
            (
                name.to_string(),
                tree.put(name, &pattern(*len, i as u64 + 1)),
            )
        })
        .collect();
    let mut flags = vec!["--seed", "42"];
    flags.extend_from_slice(emu_flags);
    let mut emu = EmuChild::spawn(tree.root(), &flags);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("mount.log").to_string_lossy().to_string();
    let metrics = free_addr();
    let mut args = vec!["--log-file", &log, "--metrics-addr", &metrics];
    args.extend_from_slice(mount_flags);
    let mut m = MountGuard::mount(&format!("http://{}", emu.addr), mnt.path(), &args);
    let started = Instant::now();
    let (dir, f) = (mnt.path().to_path_buf(), files.clone());
    let verified = bounded("reads under faults", Duration::from_secs(90), move || {
        verify_all(&dir, &f, 7)
    });
    let retries = client_retries(&metrics);
    assert!(m.stop().success(), "clean unmount");
    let c = counters(&mut emu);
    println!(
        "{emu_flags:?}: {verified} bytes verified in {:?}; emulator {c}; client retries {retries}",
        started.elapsed()
    );
    for name in expect {
        let n = c["faults"][name].as_u64().unwrap_or(0);
        assert!(n > 0, "no {name} fault was injected: {c}");
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("operation failed"),
        "a read failed under recoverable faults:\n{text}"
    );
}

#[test]
fn corrupted_chunks_are_never_delivered() {
    survive(
        &["--corrupt-every", "3", "--chunk-size", "262144"],
        &[],
        &["corrupt"],
    );
}

#[test]
fn broken_streams_are_resumed() {
    survive(&["--break-after-bytes", "1500000"], &[], &["break"]);
}

#[test]
fn stalled_streams_are_reopened() {
    survive(
        &["--stall-after-bytes", "6000000"],
        &["--read-stall-timeout", "1s"],
        &["stall"],
    );
}

#[test]
fn redirects_and_failed_opens_are_followed() {
    survive(
        &["--redirect-every", "2", "--fail-open-rate", "0.4"],
        &[],
        &["redirect", "fail_open"],
    );
}

/// Every fault flag together. (Stalls come after more bytes than breaks, so
/// they only show where a stream ends otherwise first; the stall test covers
/// them alone.)
const ALL_FAULTS: &[&str] = &[
    "--corrupt-every",
    "5",
    "--chunk-size",
    "524288",
    "--break-after-bytes",
    "4000000",
    "--stall-after-bytes",
    "9000000",
    "--redirect-every",
    "3",
    "--fail-open-rate",
    "0.3",
    "--latency-ms",
    "5",
];

#[test]
fn every_fault_at_once() {
    survive(
        ALL_FAULTS,
        &["--read-stall-timeout", "1s"],
        &["corrupt", "break", "redirect", "fail_open"],
    );
}

/// The same with direct I/O (every read reaches zonalfs, in the program's
/// sizes) and four streams per object (faults hit streams sharing reads).
#[test]
fn every_fault_at_once_with_direct_io_and_four_streams() {
    survive(
        ALL_FAULTS,
        &[
            "--read-stall-timeout",
            "1s",
            "--direct-io",
            "--pool-size",
            "4",
        ],
        &["corrupt", "break", "redirect", "fail_open"],
    );
}

fn errno_of(r: &std::io::Result<impl Sized>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

#[test]
fn service_gone_past_the_deadline_gives_eio_then_reads_recover() {
    let tree = Tree::new();
    let a = tree.put("a", &pattern(2 << 20, 1));
    // b is larger than what an open fetches ahead (its first block), so the
    // read at 16 MiB below needs the service.
    let b = tree.put("b", &pattern((20 << 20) + 9, 2));
    let c = tree.put("c", &pattern((5 << 20) + 3, 3));
    let d = tree.put("d", &pattern(300_000, 4));
    let mut emu = EmuChild::spawn(tree.root(), &[]);
    let addr = emu.addr.clone();
    let mnt = tempfile::tempdir().expect("mountpoint");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("mount.log").to_string_lossy().to_string();
    let _m = MountGuard::mount(
        &format!("http://{addr}"),
        mnt.path(),
        &["--retry-deadline", "3s", "--log-file", &log],
    );
    let p = mnt.path().to_path_buf();
    // Open b and c while the service is up (their metadata is then known), and
    // read a: served while the service is up.
    let fb = std::fs::File::open(p.join("b")).expect("open b");
    let fc = std::fs::File::open(p.join("c")).expect("open c");
    assert!(std::fs::read(p.join("a")).expect("read a") == a);

    // The service goes away, for longer than the retry deadline.
    emu.signal_and_wait(libc::SIGKILL);
    let fb = std::sync::Arc::new(fb);
    let (fb2, t) = (fb.clone(), Instant::now());
    let r = bounded(
        "read with the service gone",
        Duration::from_secs(40),
        move || pread(&fb2, 16 << 20, 64 << 10),
    );
    let took = t.elapsed();
    assert_eq!(errno_of(&r), Some(libc::EIO), "EIO, not wrong bytes: {r:?}");
    println!("service gone: EIO after {took:?}");
    // A name never looked up: EIO too (not ENOENT: the object may well exist).
    let pd = p.join("d");
    let r = bounded(
        "lookup with the service gone",
        Duration::from_secs(40),
        move || std::fs::metadata(pd).map(|m| m.len()),
    );
    assert_eq!(errno_of(&r), Some(libc::EIO), "{r:?}");

    // The service comes back on the same address: the client reconnects, and
    // data not cached yet is read again, also through the handle that failed.
    let _emu2 = EmuChild::spawn_on(tree.root(), &addr, &[]);
    let (pc, fb2) = (p.clone(), fb.clone());
    let got = bounded(
        "reads after the service came back",
        Duration::from_secs(40),
        move || {
            let b = pread(&fb2, 0, (20 << 20) + 100).expect("b through the handle that failed");
            let mut c = Vec::new();
            (&fc).read_to_end(&mut c).expect("read c");
            let d = std::fs::read(pc.join("d")).expect("read d");
            (b, c, d)
        },
    );
    assert!(got.0 == b, "b after recovery");
    assert!(got.1 == c, "c after recovery");
    assert!(got.2 == d, "d after recovery");
}

/// Rewrites an object in the emulator's tree the way a new generation appears:
/// a new file renamed over the old one (new inode, so a new generation).
fn rewrite(tree: &Tree, object: &str, data: &[u8]) {
    let staging = tempfile::NamedTempFile::new_in(tree.root()).expect("staging file");
    std::fs::write(staging.path(), data).expect("write staging");
    staging.persist(tree.path(object)).expect("rename over");
}

#[test]
fn rewritten_object_readers_see_old_bytes_or_an_error_never_a_mix() {
    rewritten_object(&[]);
}

#[test]
fn rewritten_object_with_direct_io() {
    rewritten_object(&["--direct-io"]);
}

fn rewritten_object(flags: &[&str]) {
    const MIB: usize = 1 << 20;
    let tree = Tree::new();
    // Same size, so nothing but the content tells the generations apart.
    let v1 = tree.put("obj", &pattern(12 * MIB, 11));
    let v2 = pattern(12 * MIB, 12);
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let mut args = vec!["--metadata-ttl", "1s", "--block-size", "1MiB"];
    args.extend_from_slice(flags);
    let _m = MountGuard::mount(&format!("http://{}", emu.addr), mnt.path(), &args);
    let path = mnt.path().join("obj");
    let (p, old, new) = (path.clone(), v1.clone(), v2.clone());
    let tree = std::sync::Arc::new(tree);
    let t2 = tree.clone();
    bounded(
        "rewrite under readers",
        Duration::from_secs(60),
        move || {
            // A reader that has read part of v1, and one that opened v1 but read
            // nothing yet.
            let mut r1 = std::fs::File::open(&p).expect("open r1");
            let r2 = std::fs::File::open(&p).expect("open r2");
            let mut buf = vec![0u8; MIB];
            for i in 0..3 {
                r1.read_exact(&mut buf).expect("read before the rewrite");
                assert!(buf == old[i * MIB..(i + 1) * MIB], "chunk {i} before");
            }
            rewrite(&t2, "obj", &new);
            // Both readers: each chunk is v1's bytes, or an error; never v2's.
            let check = |f: &std::fs::File, who: &str, from: usize| {
                let mut errors = 0;
                for i in from..12 {
                    match pread(f, (i * MIB) as u64, MIB) {
                        Ok(got) => assert!(
                            got == old[i * MIB..(i + 1) * MIB],
                            "{who}: chunk {i} is not the old content"
                        ),
                        Err(e) => {
                            let n = e.raw_os_error();
                            assert!(
                                n == Some(libc::ESTALE) || n == Some(libc::EIO),
                                "{who}: chunk {i}: {e}"
                            );
                            errors += 1;
                        }
                    }
                }
                errors
            };
            let e1 = check(&r1, "r1", 3);
            let e2 = check(&r2, "r2", 0);
            println!("old readers after the rewrite: r1 {e1} errors, r2 {e2} errors");
            r1.seek(SeekFrom::Start(0)).expect("seek");
            // New opens see v2 once the metadata TTL passed; until then v1 or an
            // error, never a mix.
            let saw_new = || match std::fs::read(&p) {
                Ok(got) if got == new => true,
                Ok(got) => {
                    assert!(got == old, "a new open read a mix of generations");
                    false
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
                    false
                }
            };
            must_wait_until(
                "new opens see the new content",
                Duration::from_secs(20),
                saw_new,
            );
            // Once the new generation was opened, the old handles still never
            // see its bytes (the kernel dropped the pages they had cached).
            let e1 = check(&r1, "r1 after a new open", 0);
            let e2 = check(&r2, "r2 after a new open", 0);
            println!("old readers after a new open: r1 {e1} errors, r2 {e2} errors");
        },
    );
    drop(emu);
}

#[test]
fn tailing_reader_of_an_appendable_object_reads_to_the_new_end() {
    tailing_reader(&["--metadata-ttl", "1s"]);
}

/// With direct I/O every read reaches zonalfs, which refreshes the size of an
/// appendable object at its end: no wait for the metadata TTL (60 s here).
#[test]
fn tailing_reader_with_direct_io_needs_no_metadata_ttl() {
    tailing_reader(&["--direct-io"]);
}

fn tailing_reader(flags: &[&str]) {
    let tree = Tree::new();
    let mut all = pattern(250_000, 21);
    let first = tree.put("log", &all[..100_000]);
    tree.mark_appendable("log");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let _m = MountGuard::mount(&format!("http://{}", emu.addr), mnt.path(), flags);
    let path = mnt.path().join("log");
    let src = tree.path("log");
    let tail = all.split_off(100_000);
    let (p, want) = (path.clone(), [first.clone(), tail.clone()].concat());
    bounded("tail -f", Duration::from_secs(60), move || {
        let mut f = std::fs::File::open(&p).expect("open");
        let mut got = Vec::new();
        f.read_to_end(&mut got).expect("read to EOF");
        assert!(got == first, "the first 100000 bytes");
        let mut buf = vec![0u8; 64 << 10];
        assert_eq!(f.read(&mut buf).expect("read at EOF"), 0, "EOF for now");
        // Two appends; after each, the tailing reader gets the new bytes.
        let mut appended = first.len();
        for part in tail.chunks(75_000) {
            let mut w = std::fs::OpenOptions::new()
                .append(true)
                .open(&src)
                .expect("open source for append");
            w.write_all(part).expect("append");
            drop(w);
            appended += part.len();
            let showed = wait_until(Duration::from_secs(20), || {
                // Read what is there now (possibly nothing, at EOF).
                while got.len() < appended {
                    let n = f.read(&mut buf).expect("tailing read");
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                got.len() >= appended
            });
            assert!(
                showed,
                "appended bytes never showed: have {} of {appended}",
                got.len()
            );
            assert!(got == want[..appended], "exactly the appended bytes");
            // stat agrees with what was read (once the kernel's attribute
            // cache, 1 s, expired).
            must_wait_until("stat shows the new size", Duration::from_secs(20), || {
                std::fs::metadata(&p).expect("stat").len() >= appended as u64
            });
        }
        assert_eq!(f.read(&mut buf).expect("read at the new EOF"), 0);
        assert_eq!(
            std::fs::metadata(&p).expect("stat").len(),
            want.len() as u64,
            "stat shows the new size, no more"
        );
    });
    drop(emu);
}

/// Sends `sig` to the emulator child.
fn signal(emu: &EmuChild, sig: i32) {
    let pid = emu.child.as_ref().expect("running").id();
    // SAFETY: kill(2) on our own unreaped child.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill");
}

#[test]
fn frozen_service_gives_eio_not_a_hang_then_recovers() {
    let tree = Tree::new();
    let a = tree.put("a", &pattern(1 << 20, 31));
    // b is larger than what an open fetches ahead (its first block), so the
    // read at 16 MiB below needs the service.
    let b = tree.put("b", &pattern((20 << 20) + 5, 32));
    let c = tree.put("c", &pattern(100_000, 33));
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("mount.log").to_string_lossy().to_string();
    let _m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &[
            "--retry-deadline",
            "4s",
            "--read-stall-timeout",
            "2s",
            "--log-file",
            &log,
        ],
    );
    let p = mnt.path().to_path_buf();
    let fb = std::sync::Arc::new(std::fs::File::open(p.join("b")).expect("open b"));
    assert!(std::fs::read(p.join("a")).expect("read a") == a);
    // The service stops answering (connections stay open, nothing comes back).
    signal(&emu, libc::SIGSTOP);
    let (fb2, t) = (fb.clone(), Instant::now());
    let r = bounded(
        "read from a frozen service",
        Duration::from_secs(40),
        move || pread(&fb2, 16 << 20, 64 << 10),
    );
    println!(
        "frozen service: read {:?} after {:?}",
        errno_of(&r),
        t.elapsed()
    );
    assert_eq!(errno_of(&r), Some(libc::EIO), "EIO, not wrong bytes: {r:?}");
    let (pc, t) = (p.join("c"), Instant::now());
    let r = bounded(
        "lookup on a frozen service",
        Duration::from_secs(40),
        move || std::fs::metadata(pc).map(|m| m.len()),
    );
    println!(
        "frozen service: lookup {:?} after {:?}",
        errno_of(&r),
        t.elapsed()
    );
    assert_eq!(errno_of(&r), Some(libc::EIO), "{r:?}");
    // It thaws: the same handle and new lookups work again.
    signal(&emu, libc::SIGCONT);
    let (fb2, pc) = (fb.clone(), p.join("c"));
    let got = bounded("reads after the thaw", Duration::from_secs(40), move || {
        let b = pread(&fb2, 0, (20 << 20) + 100).expect("b after the thaw");
        let c = std::fs::read(pc).expect("c after the thaw");
        (b, c)
    });
    assert!(got.0 == b, "b after the thaw");
    assert!(got.1 == c, "c after the thaw");
}

/// The client's retries of one cause so far, from its metrics.
fn retries_of(metrics: &str, cause: &str) -> u64 {
    let want = format!("zonalfs_stream_retries_total{{cause=\"{cause}\"}} ");
    scrape(metrics)
        .lines()
        .find_map(|l| l.strip_prefix(want.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn outage_shorter_than_the_deadline_is_invisible_to_readers() {
    let tree = Tree::new();
    let a = tree.put("a", &pattern(1 << 20, 41));
    let b = tree.put("b", &pattern((8 << 20) + 77, 42));
    let mut emu = EmuChild::spawn(tree.root(), &[]);
    let addr = emu.addr.clone();
    let mnt = tempfile::tempdir().expect("mountpoint");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("mount.log").to_string_lossy().to_string();
    let metrics = free_addr();
    let _m = MountGuard::mount(
        &format!("http://{addr}"),
        mnt.path(),
        &[
            "--retry-deadline",
            "30s",
            "--log-file",
            &log,
            "--metrics-addr",
            &metrics,
        ],
    );
    let p = mnt.path().to_path_buf();
    let fb = std::fs::File::open(p.join("b")).expect("open b");
    assert!(std::fs::read(p.join("a")).expect("read a") == a);
    let before = retries_of(&metrics, "unavailable");
    // The service goes away; a reader starts reading b meanwhile.
    emu.signal_and_wait(libc::SIGKILL);
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let r = (&fb).read_to_end(&mut got).map(|_| got);
        let _ = tx.send(());
        r
    });
    // Once the reader's read has failed at least once, the service comes back.
    must_wait_until(
        "the read tried the network",
        Duration::from_secs(20),
        || retries_of(&metrics, "unavailable") != before,
    );
    let _emu2 = EmuChild::spawn_on(tree.root(), &addr, &[]);
    rx.recv_timeout(Duration::from_secs(40))
        .expect("the read finished after the service came back");
    let got = reader.join().expect("reader").expect("no error");
    assert!(got == b, "b read across the outage");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("operation failed"), "{text}");
}

#[test]
fn deleted_object_old_reader_sees_old_bytes_or_an_error_new_lookups_enoent() {
    let tree = Tree::new();
    let v1 = tree.put("gone", &pattern((3 << 20) + 1, 51));
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let _m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &["--metadata-ttl", "1s", "--negative-ttl", "1s"],
    );
    let p = mnt.path().join("gone");
    let src = tree.path("gone");
    bounded(
        "delete under a reader",
        Duration::from_secs(60),
        move || {
            let f = std::fs::File::open(&p).expect("open");
            let head = pread(&f, 0, 1 << 20).expect("read before the delete");
            assert!(head == v1[..1 << 20]);
            std::fs::remove_file(&src).expect("delete the object");
            match pread(&f, 2 << 20, 1 << 20) {
                Ok(got) => assert!(got == v1[2 << 20..3 << 20], "old bytes"),
                Err(e) => {
                    let n = e.raw_os_error();
                    assert!(n == Some(libc::ESTALE) || n == Some(libc::EIO), "{e}");
                }
            }
            // New lookups find nothing once the metadata TTL passed.
            let gone = || match std::fs::metadata(&p) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Err(e) => panic!("{e}"),
                Ok(m) => {
                    assert_eq!(m.len(), v1.len() as u64);
                    false
                }
            };
            must_wait_until("the deleted object is gone", Duration::from_secs(20), gone);
        },
    );
    drop(emu);
}
