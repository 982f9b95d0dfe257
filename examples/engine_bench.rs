//! The read engine alone (no FUSE) over the gRPC client and an emulator: the
//! patterns a filesystem sees, for scripts/bench-engine.sh.
//!
//! ```text
//! engine_bench ENDPOINT BUCKET OBJECT PATTERN [POLICY]
//!   PATTERN: seq (1 MiB requests from 0, 4 outstanding as kernel readahead
//!            keeps them), seqmid (the same from the middle), rand4k (2000
//!            random 4 KiB reads, one at a time), skip (read 64 MiB, skip 16 MiB),
//!            rtt (2000 raw 4 KiB range reads through the pool: the round trip),
//!            head (the first 4 MiB in 1 MiB reads, one at a time: a small file
//!            read cold; repeated over 20 objects' worth of offsets),
//!            small (OBJECT is a prefix: every object below it read whole
//!            through the pool, 8 in flight, the bytes checked and dropped;
//!            also prints this process's CPU per object)
//!   POLICY:  hybrid (default) | immediate | after2
//! ```
//! Prints one line: `pattern=.. policy=.. mbps=.. delivered=.. fetched=..
//! ratio=.. p50_us=..`.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use zonalfs::gcs::auth::CredentialsSource;
use zonalfs::gcs::client::ClientConfig;
use zonalfs::gcs::{GcsClient, MrdPool, ObjectId, PoolConfig, VecSink};
use zonalfs::memory::{Budget, Pool, PoolConfig as MemoryConfig};
use zonalfs::read::prefetch::StartPolicy;
use zonalfs::read::{PrefetchConfig, ReadEngine};

type Error = Box<dyn std::error::Error + Send + Sync>;

const MIB: u64 = 1 << 20;

fn p50(mut v: Vec<Duration>) -> u128 {
    v.sort();
    v.get(v.len() / 2).map_or(0, |d| d.as_micros())
}

async fn run(
    ep: &str,
    bucket: &str,
    object: &str,
    pattern: &str,
    policy: &str,
) -> Result<(), Error> {
    let mut cfg = ClientConfig::new(bucket);
    cfg.endpoint = Some(ep.to_string());
    cfg.credentials = CredentialsSource::Anonymous;
    let client = GcsClient::connect(cfg).await?;
    let pool = Arc::new(MrdPool::new(client, PoolConfig::default()));
    if pattern == "small" {
        return small(&pool, object).await;
    }
    if pattern == "calls" {
        return calls(&pool, object).await;
    }
    let info = pool.open(object).await?;
    let id = ObjectId {
        name: object.to_string(),
        generation: info.generation,
    };
    let start = match policy {
        "hybrid" => StartPolicy::Hybrid,
        "immediate" => StartPolicy::Immediate,
        "after2" => StartPolicy::After(2),
        other => return Err(format!("unknown policy {other}").into()),
    };
    let engine = ReadEngine::new(
        pool.clone(),
        Pool::new(Budget::new(1 << 30), MemoryConfig::new(8 << 20)),
        PrefetchConfig {
            start,
            ..Default::default()
        },
    );
    let size = info.size;
    let mut lat = Vec::new();
    let t0 = Instant::now();
    let mut delivered = 0u64;
    match pattern {
        "seq" | "seqmid" => {
            let from = if pattern == "seq" {
                0
            } else {
                size / 2 / MIB * MIB
            };
            let offs: Vec<u64> = (from..size).step_by(MIB as usize).collect();
            let mut reads = futures::stream::iter(offs)
                .map(|off| {
                    let (e, id) = (engine.clone(), id.clone());
                    async move {
                        e.read(&id, size, true, off, MIB)
                            .await
                            .map(|d| d.len() as u64)
                    }
                })
                .buffered(4);
            while let Some(n) = reads.next().await {
                delivered += n?;
            }
        }
        "skip" => {
            let mut off = 0;
            while off < size {
                let end = (off + 64 * MIB).min(size);
                while off < end {
                    delivered += engine.read(&id, size, true, off, MIB).await?.len() as u64;
                    off += MIB;
                }
                off += 16 * MIB;
            }
        }
        "head" => {
            // 20 cold starts: each at a fresh 64 MiB-aligned offset, new inode.
            for k in 0..20u64 {
                let base = (k * 64 * MIB) % (size - 4 * MIB) / MIB * MIB;
                let t = Instant::now();
                for i in 0..4 {
                    delivered += engine
                        .read(&id, size, true, base + i * MIB, MIB)
                        .await?
                        .len() as u64;
                }
                lat.push(t.elapsed());
            }
        }
        "rand4k" | "rtt" => {
            let count = std::env::var("BENCH_RANDOM_READS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000);
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..count {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let off = ((x >> 17) % (size / 4096)) * 4096;
                let t = Instant::now();
                if pattern == "rtt" {
                    let sink = VecSink::new(4096);
                    delivered += pool.read(&id, size, off, 4096, sink).await?;
                } else {
                    delivered += engine.read(&id, size, true, off, 4096).await?.len() as u64;
                }
                lat.push(t.elapsed());
            }
        }
        other => return Err(format!("unknown pattern {other}").into()),
    }
    let secs = t0.elapsed().as_secs_f64();
    let fetched = if pattern == "rtt" {
        delivered
    } else {
        engine.stats.bytes_fetched.load(Ordering::Relaxed)
    };
    println!(
        "pattern={pattern} policy={policy} mbps={:.0} delivered={delivered} fetched={fetched} ratio={:.3} p50_us={}",
        delivered as f64 / secs / 1e6,
        fetched as f64 / delivered.max(1) as f64,
        p50(lat)
    );
    Ok(())
}

/// This process's CPU time (user + system) so far.
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is valid.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Where the "small" pattern's bytes go: checked to arrive whole, then
/// dropped (the client's cost alone, no buffer to fill).
struct CountSink(std::sync::atomic::AtomicU64);

impl zonalfs::gcs::RangeSink for CountSink {
    fn put(&self, _at: usize, data: &[u8]) {
        self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
}

/// The latency of the calls a cold file's first read makes, one at a time
/// (200 each, p50 and p90): a stat (GetObject), a listing, and a read
/// stream's open to its first response.
async fn calls(pool: &Arc<MrdPool>, object: &str) -> Result<(), Error> {
    let client = pool.client();
    let pick = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2].as_micros(), v[v.len() * 9 / 10].as_micros())
    };
    let (mut stats, mut lists, mut opens) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..200 {
        let t = Instant::now();
        let info = client.stat(object).await?;
        stats.push(t.elapsed());
        let t = Instant::now();
        client.list(&format!("{object}/"), None).await?;
        lists.push(t.elapsed());
        let t = Instant::now();
        let s = zonalfs::gcs::mrd::MrdStream::open(
            client,
            object,
            info.generation,
            None,
            Arc::new(Default::default()),
        )
        .await?;
        opens.push(t.elapsed());
        drop(s);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ((s50, s90), (l50, l90), (o50, o90)) = (pick(stats), pick(lists), pick(opens));
    println!(
        "pattern=calls stat_p50_us={s50} stat_p90_us={s90} list_p50_us={l50} list_p90_us={l90} open_p50_us={o50} open_p90_us={o90}"
    );
    Ok(())
}

/// Every object below `prefix` read whole, 8 in flight.
async fn small(pool: &Arc<MrdPool>, prefix: &str) -> Result<(), Error> {
    let client = pool.client();
    let (mut objects, mut dirs) = (Vec::new(), vec![prefix.to_string()]);
    while let Some(dir) = dirs.pop() {
        let mut token = None;
        loop {
            let page = client.list(&dir, token).await?;
            objects.extend(page.objects);
            dirs.extend(page.prefixes);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
    }
    objects.sort_by(|a, b| a.name.cmp(&b.name));
    let (t0, c0) = (Instant::now(), cpu_time());
    let mut reads = futures::stream::iter(objects.iter())
        .map(|o| {
            let pool = pool.clone();
            async move {
                let id = ObjectId {
                    name: o.name.clone(),
                    generation: o.generation,
                };
                let sink = Arc::new(CountSink(Default::default()));
                let n = pool.read(&id, o.size, 0, o.size, sink.clone()).await?;
                if n != o.size || sink.0.load(Ordering::Relaxed) != o.size {
                    return Err(format!("{}: {n} bytes of {}", o.name, o.size).into());
                }
                Ok::<u64, Error>(n)
            }
        })
        .buffer_unordered(8);
    let mut delivered = 0;
    while let Some(n) = reads.next().await {
        delivered += n?;
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_time() - c0);
    let files = objects.len().max(1);
    println!(
        "pattern=small files={} delivered={delivered} files_s={:.0} cpu_us_per_file={:.1}",
        objects.len(),
        files as f64 / secs,
        cpu.as_secs_f64() * 1e6 / files as f64
    );
    Ok(())
}

/// `ENGINE_BENCH_WORKERS=N`: the runtime's worker threads (0: one thread,
/// the current-thread scheduler); default: tokio's (one per core).
fn main() -> ExitCode {
    let workers = std::env::var("ENGINE_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let rt = match workers {
        Some(0) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("engine_bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = rt.block_on(async {
        match a.as_slice() {
            [ep, b, o, p] => run(ep, b, o, p, "hybrid").await,
            [ep, b, o, p, pol] => run(ep, b, o, p, pol).await,
            _ => Err("usage: engine_bench ENDPOINT BUCKET OBJECT PATTERN [POLICY]".into()),
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
