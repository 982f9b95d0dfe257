//! Prometheus metrics for `--metrics-addr`: FUSE operations and their latency
//! histograms (recorded by the FUSE adapter), bytes read and fetched, cache hits
//! and misses, evictions, open streams and retries by cause (from the pool),
//! memory in use against the budget. [`serve`] answers `GET /metrics` with the
//! text format on a plain HTTP/1.1 listener; nothing else is served.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gcs::MrdPool;
use crate::read::ReadEngine;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
];

/// The FUSE operations counted.
pub const OPS: [&str; 7] = [
    "lookup", "getattr", "open", "read", "readdir", "opendir", "statfs",
];

/// Count, errors and latency histogram of one operation.
#[derive(Debug, Default)]
pub struct OpStats {
    pub count: AtomicU64,
    pub errors: AtomicU64,
    sum_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS_US.len()],
}

impl OpStats {
    pub fn record(&self, took: Duration, ok: bool) {
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Per-operation statistics of the FUSE adapter.
#[derive(Debug, Default)]
pub struct FuseStats {
    pub ops: [OpStats; OPS.len()],
}

impl FuseStats {
    /// The stats of an operation named in [`OPS`].
    pub fn op(&self, name: &str) -> Option<&OpStats> {
        OPS.iter().position(|o| *o == name).map(|i| &self.ops[i])
    }
}

/// Everything the endpoint reports.
#[derive(Clone)]
pub struct Sources {
    pub fuse: Arc<FuseStats>,
    pub engine: Arc<ReadEngine>,
    pub pool: Arc<MrdPool>,
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The metrics in Prometheus text format.
pub fn render(s: &Sources) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    let e = &s.engine.stats;
    counter(
        "zonalfs_bytes_read_total",
        "Bytes returned to readers.",
        load(&e.bytes_delivered),
    );
    counter(
        "zonalfs_bytes_fetched_total",
        "Bytes fetched from the bucket by the read engine.",
        load(&e.bytes_fetched),
    );
    counter(
        "zonalfs_cache_hits_total",
        "Reads served by cached or loading blocks.",
        load(&e.block_hits),
    );
    counter(
        "zonalfs_cache_misses_total",
        "Blocks that had to be fetched.",
        load(&e.block_misses),
    );
    counter(
        "zonalfs_direct_reads_total",
        "Reads fetched directly (random access).",
        load(&e.direct_reads),
    );
    counter(
        "zonalfs_cache_evictions_total",
        "Blocks evicted under the memory budget.",
        load(&e.evictions),
    );
    let p = s.pool.stats();
    counter(
        "zonalfs_streams_opened_total",
        "BidiReadObject streams opened (reopens included).",
        load(&p.streams_opened),
    );
    for (cause, c) in [
        ("unavailable", &p.retry_unavailable),
        ("redirect", &p.retry_redirect),
        ("corrupt", &p.retry_corrupt),
        ("stall", &p.retry_stall),
        ("protocol", &p.retry_protocol),
    ] {
        let _ = writeln!(
            out,
            "zonalfs_stream_retries_total{{cause=\"{cause}\"}} {}",
            load(c)
        );
    }
    let (readers, max_w, total_w) = s.engine.windows();
    let _ = writeln!(
        out,
        "# HELP zonalfs_prefetch_readers Sequential readers prefetching now.\n# TYPE zonalfs_prefetch_readers gauge\nzonalfs_prefetch_readers {readers}\n# HELP zonalfs_prefetch_window_bytes Prefetch windows ahead of readers.\n# TYPE zonalfs_prefetch_window_bytes gauge\nzonalfs_prefetch_window_bytes{{stat=\"max\"}} {max_w}\nzonalfs_prefetch_window_bytes{{stat=\"total\"}} {total_w}"
    );
    let budget = s.engine.pool().budget();
    let _ = writeln!(
        out,
        "# HELP zonalfs_open_streams Streams open now.\n# TYPE zonalfs_open_streams gauge\nzonalfs_open_streams {}",
        s.pool.open_streams()
    );
    let _ = writeln!(
        out,
        "# HELP zonalfs_memory_bytes Memory of prefetch and cache blocks.\n# TYPE zonalfs_memory_bytes gauge\nzonalfs_memory_bytes{{kind=\"used\"}} {}\nzonalfs_memory_bytes{{kind=\"limit\"}} {}\nzonalfs_memory_bytes{{kind=\"peak\"}} {}",
        budget.used(),
        budget.limit(),
        budget.peak()
    );
    let _ = writeln!(out, "# HELP zonalfs_fuse_op_seconds FUSE operation latency.\n# TYPE zonalfs_fuse_op_seconds histogram");
    for (name, op) in OPS.iter().zip(s.fuse.ops.iter()) {
        let mut cum = 0;
        for (b, c) in BUCKETS_US.iter().zip(op.buckets.iter()) {
            cum += load(c);
            let _ = writeln!(
                out,
                "zonalfs_fuse_op_seconds_bucket{{op=\"{name}\",le=\"{}\"}} {cum}",
                *b as f64 / 1e6
            );
        }
        let n = load(&op.count);
        let _ = writeln!(
            out,
            "zonalfs_fuse_op_seconds_bucket{{op=\"{name}\",le=\"+Inf\"}} {n}"
        );
        let _ = writeln!(
            out,
            "zonalfs_fuse_op_seconds_sum{{op=\"{name}\"}} {}",
            load(&op.sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "zonalfs_fuse_op_seconds_count{{op=\"{name}\"}} {n}");
        let _ = writeln!(
            out,
            "zonalfs_fuse_op_errors_total{{op=\"{name}\"}} {}",
            load(&op.errors)
        );
    }
    out
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, sources: Sources) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
            }
            let ok = buf[..n].starts_with(b"GET /metrics ");
            let (status, body) = if ok {
                ("200 OK", render(&sources))
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}
