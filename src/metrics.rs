//! Prometheus metrics for `--metrics-addr`: FUSE operations and their latency
//! histograms (recorded by the FUSE adapter), bytes read and fetched, cache hits
//! and misses, evictions, open streams and retries by cause (from the pool),
//! memory in use against the budget, and the daemon's own resources (file and
//! directory handles the kernel holds open, open file descriptors), so that a
//! leak shows as a gauge that does not return to its baseline. [`serve`] answers `GET /metrics` with the
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
pub const OPS: [&str; 16] = [
    "lookup", "getattr", "open", "read", "readdir", "opendir", "statfs", "create", "write",
    "flush", "fsync", "setattr", "mkdir", "unlink", "rmdir", "rename",
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

/// Per-operation statistics of the FUSE adapter, and the handles it has open.
#[derive(Debug, Default)]
pub struct FuseStats {
    pub ops: [OpStats; OPS.len()],
    /// File handles open (open replied, release not yet seen).
    pub open_files: AtomicU64,
    /// Directory handles open (opendir replied, releasedir not yet seen).
    pub open_dirs: AtomicU64,
    /// Opens answered with FUSE passthrough (their reads never reach us).
    pub passthrough_opens: AtomicU64,
}

impl FuseStats {
    /// The stats of an operation named in [`OPS`].
    pub fn op(&self, name: &str) -> Option<&OpStats> {
        OPS.iter().position(|o| *o == name).map(|i| &self.ops[i])
    }

    /// A handle was opened (`dir`: a directory handle).
    pub fn handle_opened(&self, dir: bool) {
        self.handles(dir).fetch_add(1, Ordering::Relaxed);
    }

    /// A handle was released; never goes below zero.
    pub fn handle_released(&self, dir: bool) {
        let _ = self
            .handles(dir)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn handles(&self, dir: bool) -> &AtomicU64 {
        if dir {
            &self.open_dirs
        } else {
            &self.open_files
        }
    }
}

/// File descriptors this process has open (from /proc/self/fd), if known.
pub fn open_fds() -> Option<u64> {
    // The listing itself holds one descriptor on /proc/self/fd: not counted.
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// The gauges of the daemon's own resources: handles and descriptors.
fn resource_gauges(out: &mut String, fuse: &FuseStats, fds: Option<u64>) {
    let _ = writeln!(
        out,
        "# HELP zonalfs_open_handles Handles the kernel holds open.\n# TYPE zonalfs_open_handles gauge\nzonalfs_open_handles{{kind=\"file\"}} {}\nzonalfs_open_handles{{kind=\"dir\"}} {}",
        load(&fuse.open_files),
        load(&fuse.open_dirs)
    );
    if let Some(n) = fds {
        let _ = writeln!(
            out,
            "# HELP zonalfs_open_fds File descriptors the daemon has open.\n# TYPE zonalfs_open_fds gauge\nzonalfs_open_fds {n}"
        );
    }
}

/// Everything the endpoint reports.
#[derive(Clone)]
pub struct Sources {
    pub fuse: Arc<FuseStats>,
    pub engine: Arc<ReadEngine>,
    pub pool: Arc<MrdPool>,
    pub writes: Arc<crate::fs::write::WriteStats>,
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
        "zonalfs_reads_behind_total",
        "Reads that came after their reader had moved on, served from cached blocks.",
        load(&e.behind_reads),
    );
    counter(
        "zonalfs_lookup_heads_total",
        "Lookups of names not listed that fetched the file's first bytes with its metadata.",
        load(&e.heads_fetched),
    );
    counter(
        "zonalfs_lookup_head_reads_total",
        "Reads served from the first bytes fetched with a lookup.",
        load(&e.head_reads),
    );
    counter(
        "zonalfs_cache_evictions_total",
        "Blocks evicted under the memory budget.",
        load(&e.evictions),
    );
    counter(
        "zonalfs_prefetch_files_total",
        "Files fetched whole ahead of a reader opening a directory's files in listing order.",
        load(&e.prefetch_started),
    );
    counter(
        "zonalfs_prefetch_files_used_total",
        "Files fetched ahead that were then read.",
        load(&e.prefetch_used),
    );
    counter(
        "zonalfs_prefetch_files_wasted_total",
        "Files fetched ahead and dropped without being read.",
        load(&e.prefetch_wasted),
    );
    counter(
        "zonalfs_passthrough_opens_total",
        "Opens of small files answered with FUSE passthrough to a memory file (the kernel serves their reads).",
        load(&s.fuse.passthrough_opens),
    );
    counter(
        "zonalfs_open_prefetches_total",
        "Small files whose whole object started loading when they were opened.",
        load(&e.opens_prefetched),
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
    let calls = s.pool.client().calls();
    let _ = writeln!(
        out,
        "# HELP zonalfs_gcs_requests_total Metadata calls made to the service (retries included).\n# TYPE zonalfs_gcs_requests_total counter\nzonalfs_gcs_requests_total{{method=\"GetObject\"}} {}\nzonalfs_gcs_requests_total{{method=\"ListObjects\"}} {}",
        load(&calls.get_object),
        load(&calls.list_objects)
    );
    let (readers, max_w, total_w) = s.engine.windows();
    let _ = writeln!(
        out,
        "# HELP zonalfs_prefetch_readers Sequential readers prefetching now.\n# TYPE zonalfs_prefetch_readers gauge\nzonalfs_prefetch_readers {readers}\n# HELP zonalfs_prefetch_window_bytes Prefetch windows ahead of readers.\n# TYPE zonalfs_prefetch_window_bytes gauge\nzonalfs_prefetch_window_bytes{{stat=\"max\"}} {max_w}\nzonalfs_prefetch_window_bytes{{stat=\"total\"}} {total_w}"
    );
    let memory = s.engine.pool();
    let budget = memory.budget();
    let _ = writeln!(
        out,
        "# HELP zonalfs_open_streams Streams open now.\n# TYPE zonalfs_open_streams gauge\nzonalfs_open_streams {}",
        s.pool.open_streams()
    );
    let _ = writeln!(
        out,
        "# HELP zonalfs_memory_bytes Memory of buffers (used = in use + warm).\n# TYPE zonalfs_memory_bytes gauge\nzonalfs_memory_bytes{{kind=\"used\"}} {}\nzonalfs_memory_bytes{{kind=\"limit\"}} {}\nzonalfs_memory_bytes{{kind=\"peak\"}} {}\nzonalfs_memory_bytes{{kind=\"warm\"}} {}",
        budget.used(),
        budget.limit(),
        budget.peak(),
        memory.hot_bytes()
    );
    let ms = memory.stats();
    let _ = writeln!(
        out,
        "# HELP zonalfs_memory_allocations_total Buffers handed out, by whether their pages were warm (reused) or fresh (faulted in and zeroed).\n# TYPE zonalfs_memory_allocations_total counter\nzonalfs_memory_allocations_total{{pages=\"warm\"}} {}\nzonalfs_memory_allocations_total{{pages=\"fresh\"}} {}\n# HELP zonalfs_memory_fresh_bytes_total Bytes of buffers handed out with fresh pages.\n# TYPE zonalfs_memory_fresh_bytes_total counter\nzonalfs_memory_fresh_bytes_total {}\n# HELP zonalfs_memory_released_bytes_total Warm memory given back to the OS.\n# TYPE zonalfs_memory_released_bytes_total counter\nzonalfs_memory_released_bytes_total {}",
        load(&ms.warm),
        load(&ms.fresh),
        load(&ms.fresh_bytes),
        load(&ms.released_bytes)
    );
    let w = &s.writes;
    for (name, help, c) in [
        (
            "zonalfs_write_bytes_total",
            "Bytes programs wrote through the mount.",
            &w.bytes,
        ),
        (
            "zonalfs_write_flushes_total",
            "Flushes (fsync, close) that persisted written bytes.",
            &w.flushes,
        ),
        (
            "zonalfs_write_takeovers_total",
            "Unfinalized objects taken over to append to them.",
            &w.takeovers,
        ),
        (
            "zonalfs_write_objects_created_total",
            "New object generations made by creates, truncations and staged uploads.",
            &w.objects_created,
        ),
        (
            "zonalfs_write_fallbacks_total",
            "Write handles that fell back to a staged copy in --temp-dir (not at the end, finalized objects, other sizes).",
            &w.fallbacks,
        ),
        (
            "zonalfs_write_staged_uploads_total",
            "Staged copies uploaded as new generations.",
            &w.staged_uploads,
        ),
        (
            "zonalfs_write_over_budget_total",
            "Write pieces taken past --memory-limit after waiting for memory.",
            &w.over_budget,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            load(c)
        );
    }
    resource_gauges(&mut out, &s.fuse, open_fds());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(text: &str, name: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn handle_gauges_follow_open_and_release() {
        let f = FuseStats::default();
        f.handle_opened(false);
        f.handle_opened(false);
        f.handle_opened(true);
        f.handle_released(false);
        let mut out = String::new();
        resource_gauges(&mut out, &f, Some(7));
        assert_eq!(gauge(&out, "zonalfs_open_handles{kind=\"file\"}"), Some(1));
        assert_eq!(gauge(&out, "zonalfs_open_handles{kind=\"dir\"}"), Some(1));
        assert_eq!(gauge(&out, "zonalfs_open_fds"), Some(7));
        // A release without an open (never expected) does not wrap around.
        f.handle_released(true);
        f.handle_released(true);
        assert_eq!(load(&f.open_dirs), 0);
        let mut out = String::new();
        resource_gauges(&mut out, &f, None);
        assert_eq!(gauge(&out, "zonalfs_open_fds"), None);
    }

    #[test]
    fn open_fds_counts_this_process_descriptors() {
        // Other test threads may open or close descriptors meanwhile: retry
        // until one quiet attempt sees exactly the five opened here.
        let exact = (0..20).any(|_| {
            let before = open_fds().expect("/proc/self/fd");
            let files: Vec<std::fs::File> = (0..5)
                .map(|_| std::fs::File::open("/proc/self/status").expect("open"))
                .collect();
            let during = open_fds().expect("/proc/self/fd");
            drop(files);
            let after = open_fds().expect("/proc/self/fd");
            during == before + 5 && after == before
        });
        assert!(exact, "open_fds never tracked five opens and closes");
    }
}
