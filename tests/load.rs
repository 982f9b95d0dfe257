//! Bounded load through a real mount: 32 reader threads over 8 files of 1–64
//! MiB (four readers per file) for `ZONALFS_LOAD_SECS` seconds (default 60;
//! `scripts/soak.sh` runs it longer). Half read whole files sequentially and
//! check their SHA-256, half pread random 4 KiB–1 MiB ranges and compare them
//! byte for byte with the source. Asserted: no error and no wrong byte, the
//! daemon's peak RSS (less its file-backed pages: the binary) within its
//! `--memory-limit` plus 64 MiB, and its file
//! descriptors, streams and handles back to their baseline afterwards. A
//! summary line is printed (visible with `--nocapture`).

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mount::*;
use common::*;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// `--memory-limit` of the mount.
const MEMORY_LIMIT: u64 = 256 * MIB;
/// What the daemon's anonymous memory may use beyond the read engine's budget:
/// the allocator's arenas, in-flight FUSE replies, tokio and tonic buffers.
/// (Measured at a 256 MiB limit: block budget peak 216 MiB, anonymous memory
/// 291-304 MiB, so 75-88 MiB outside the budget.)
const RSS_SLACK: u64 = 64 * MIB;
const THREADS: usize = 32;
/// Count bounds, so that the loop ends even if the clock misbehaves.
const MAX_PASSES: u64 = 10_000;
const MAX_RANDOM_READS: u64 = 1_000_000;

/// The 8 objects: sizes from 1 to 64 MiB, not block-aligned.
fn sizes() -> [u64; 8] {
    [
        MIB + 3,
        3 * MIB,
        8 * MIB - 1,
        13 * MIB + 4097,
        24 * MIB,
        33 * MIB + 12345,
        48 * MIB - 4096,
        64 * MIB,
    ]
}

struct Source {
    path: PathBuf,
    data: Vec<u8>,
    sha: Vec<u8>,
}

#[derive(Default)]
struct Totals {
    passes: AtomicU64,
    random_reads: AtomicU64,
    bytes_verified: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    first_problems: Mutex<Vec<String>>,
}

impl Totals {
    fn problem(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut p = self.first_problems.lock().expect("lock");
        if p.len() < 10 {
            p.push(what);
        }
    }
}

/// Drops the kernel's cached pages of `f`, so the next reads reach the daemon.
fn drop_cache(f: &std::fs::File) {
    // SAFETY: posix_fadvise on an open descriptor; advice only.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn sequential(src: &Source, totals: &Totals, stop: &AtomicBool) {
    use std::io::Read;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..MAX_PASSES {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut f = match std::fs::File::open(&src.path) {
            Ok(f) => f,
            Err(e) => {
                totals.problem(&totals.errors, format!("open {}: {e}", src.path.display()));
                continue;
            }
        };
        let mut h = Sha256::new();
        let mut n = 0u64;
        let ok = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match f.read(&mut buf) {
                Ok(0) => break true,
                Ok(k) => {
                    h.update(&buf[..k]);
                    n += k as u64;
                }
                Err(e) => {
                    let what = format!("read {} at {n}: {e}", src.path.display());
                    totals.problem(&totals.errors, what);
                    break false;
                }
            }
        };
        drop_cache(&f);
        if !ok {
            continue;
        }
        if n != src.data.len() as u64 || h.finalize().as_slice() != src.sha.as_slice() {
            let what = format!("{}: {n} bytes, wrong checksum", src.path.display());
            totals.problem(&totals.wrong, what);
        } else {
            totals.bytes_verified.fetch_add(n, Ordering::Relaxed);
        }
        totals.passes.fetch_add(1, Ordering::Relaxed);
    }
}

fn random(src: &Source, seed: u64, totals: &Totals, stop: &AtomicBool) {
    let f = match std::fs::File::open(&src.path) {
        Ok(f) => f,
        Err(e) => {
            return totals.problem(&totals.errors, format!("open {}: {e}", src.path.display()))
        }
    };
    let size = src.data.len() as u64;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..MAX_RANDOM_READS {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let want = 4096 + next() % (MIB - 4096 + 1);
        let off = next() % size;
        let len = want.min(size - off) as usize;
        match f.read_exact_at(&mut buf[..len], off) {
            Ok(()) => {
                let expect = &src.data[off as usize..off as usize + len];
                if &buf[..len] != expect {
                    let at = buf.iter().zip(expect).position(|(a, b)| a != b);
                    let what = format!(
                        "{} [{off}, +{len}): first wrong byte at +{at:?}",
                        src.path.display()
                    );
                    totals.problem(&totals.wrong, what);
                } else {
                    totals
                        .bytes_verified
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
            }
            Err(e) => {
                let what = format!("pread {} [{off}, +{len}): {e}", src.path.display());
                totals.problem(&totals.errors, what);
            }
        }
        totals.random_reads.fetch_add(1, Ordering::Relaxed);
        if i % 64 == 63 {
            drop_cache(&f);
        }
    }
}

/// A `Name: value kB` line of /proc/PID/status, in bytes.
fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        * 1024
}

/// What each descriptor of `pid` refers to (for a report when they leak).
fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    v.sort();
    v
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// The value of a metrics line `name value` (name with its labels).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics"))
}

/// Daemon resources that must return to their baseline after the load.
#[derive(Debug, PartialEq, Clone, Copy)]
struct Resources {
    fds: usize,
    streams: u64,
    files: u64,
}

fn resources(pid: u32, metrics: &str) -> Resources {
    let m = scrape(metrics);
    Resources {
        fds: fd_count(pid),
        streams: metric(&m, "zonalfs_open_streams"),
        files: metric(&m, "zonalfs_open_handles{kind=\"file\"}"),
    }
}

/// Samples the daemon's resources until `settled` holds of them, or for at
/// most 30 s (then the caller's assertions report the difference): the last
/// sample.
fn settle(pid: u32, metrics: &str, settled: impl Fn(&Resources) -> bool) -> Resources {
    let mut last = None;
    wait_until(Duration::from_secs(30), || {
        let r = resources(pid, metrics);
        let done = settled(&r);
        last = Some(r);
        done
    });
    last.expect("sampled at least once")
}

fn load_secs() -> u64 {
    std::env::var("ZONALFS_LOAD_SECS")
        .ok()
        .map(|v| v.parse().expect("ZONALFS_LOAD_SECS: whole seconds"))
        .unwrap_or(60)
}

#[test]
fn thirty_two_readers_for_a_bounded_time_no_errors_bounded_memory_no_leaks() {
    let secs = load_secs();
    let tree = Tree::new();
    let mut objects = Vec::new();
    for (i, size) in sizes().into_iter().enumerate() {
        let name = format!("load/f{i}.bin");
        let data = tree.put(&name, &pattern(size as usize, 700 + i as u64));
        objects.push((name, data));
    }
    let emu = EmuChild::spawn(tree.root(), &[]);
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").to_string()
    };
    let mnt = tempfile::tempdir().expect("mountpoint");
    let limit = MEMORY_LIMIT.to_string();
    let mut m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &[
            "--metrics-addr",
            &metrics_addr,
            "--memory-limit",
            &limit,
            // Idle streams are closed after this long, so that the stream
            // count returns to its baseline soon after the load.
            "--stream-idle-timeout",
            "2s",
        ],
    );
    let pid = m.child.as_ref().expect("running").id();
    let sources: Arc<Vec<Source>> = Arc::new(
        objects
            .into_iter()
            .map(|(name, data)| Source {
                path: mnt.path().join(&name),
                sha: Sha256::digest(&data).to_vec(),
                data,
            })
            .collect(),
    );
    // Warm up: one whole read of every file, so that the client's lazily
    // opened connections are all up before the baseline is taken.
    for src in sources.iter() {
        assert_eq!(sha_file(&src.path), src.sha, "{}", src.path.display());
    }
    let before = settle(pid, &metrics_addr, |r| (r.streams, r.files) == (0, 0));
    let fds_before = fd_targets(pid);

    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, done) = std::sync::mpsc::channel();
    let start = Instant::now();
    for t in 0..THREADS {
        let (sources, totals, stop, tx) =
            (sources.clone(), totals.clone(), stop.clone(), tx.clone());
        std::thread::spawn(move || {
            let src = &sources[t % sources.len()];
            if t < THREADS / 2 {
                sequential(src, &totals, &stop);
            } else {
                random(src, 0x5eed_0000 + t as u64, &totals, &stop);
            }
            let _ = tx.send(t);
        });
    }
    drop(tx);
    // Run for the set time (or until every thread hit its count bound).
    let end = start + Duration::from_secs(secs);
    let mut finished = 0;
    while finished < THREADS && Instant::now() < end {
        if done
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .is_ok()
        {
            finished += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // A read in flight ends within the client's retry deadline; a thread that
    // does not end at all is a hang.
    let join_deadline = Instant::now() + Duration::from_secs(120);
    while finished < THREADS {
        done.recv_timeout(join_deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{} reader threads hang", THREADS - finished));
        finished += 1;
    }
    let ran = start.elapsed();
    let peak_rss = status_kb(pid, "VmHWM");
    let (rss_anon, rss_file) = (status_kb(pid, "RssAnon"), status_kb(pid, "RssFile"));
    let budget_peak = metric(
        &scrape(&metrics_addr),
        "zonalfs_memory_bytes{kind=\"peak\"}",
    );

    // Streams are closed after the idle timeout, handles after the kernel's
    // (asynchronous) release: poll until everything is back to the baseline.
    let after = settle(pid, &metrics_addr, |r| *r == before);

    let t = &*totals;
    let (passes, randoms) = (
        t.passes.load(Ordering::Relaxed),
        t.random_reads.load(Ordering::Relaxed),
    );
    let verified = t.bytes_verified.load(Ordering::Relaxed);
    let (errors, wrong) = (
        t.errors.load(Ordering::Relaxed),
        t.wrong.load(Ordering::Relaxed),
    );
    println!(
        "load: {ran:.1?}, {THREADS} readers: {passes} whole-file reads + {randoms} random reads, \
         {:.1} MiB verified ({:.1} MiB/s), {errors} errors, {wrong} wrong; \
         peak RSS {:.1} MiB (limit {} MiB + {} MiB; now anon {:.1} MiB, file {:.1} MiB), \
         engine budget peak {:.1} MiB; \
         fds {} -> {}, streams {} -> {}, file handles {} -> {}",
        verified as f64 / MIB as f64,
        verified as f64 / MIB as f64 / ran.as_secs_f64(),
        peak_rss as f64 / MIB as f64,
        MEMORY_LIMIT / MIB,
        RSS_SLACK / MIB,
        rss_anon as f64 / MIB as f64,
        rss_file as f64 / MIB as f64,
        budget_peak as f64 / MIB as f64,
        before.fds,
        after.fds,
        before.streams,
        after.streams,
        before.files,
        after.files,
    );
    let problems = t.first_problems.lock().expect("lock").clone();
    assert_eq!((errors, wrong), (0, 0), "first problems: {problems:#?}");
    assert!(passes > 0 && randoms > 0, "the readers did not run");
    // VmHWM also counts the file-backed pages of the binary and libraries
    // (about 19 MiB for a debug build), which do not grow with the load: they
    // are taken off, as measured at the end.
    assert!(
        peak_rss.saturating_sub(rss_file) <= MEMORY_LIMIT + RSS_SLACK,
        "daemon peak RSS {peak_rss} (file-backed {rss_file}) > limit {MEMORY_LIMIT} + {RSS_SLACK}"
    );
    assert_eq!(
        after,
        before,
        "daemon resources did not return to the baseline; fds before {fds_before:#?}, after {:#?}",
        fd_targets(pid)
    );
    let status = m.stop();
    assert!(status.success(), "mount exited with {status}");
    assert!(!is_mounted(Path::new(mnt.path())));
}
