//! A minimal raw google.storage.v2 client for the quickstart and the emulator
//! benchmark, until `zonalfs ls`/`cat` (the real client layer) exist.
//!
//! ```text
//! emuclient ls    ENDPOINT BUCKET [PREFIX]
//! emuclient cat   ENDPOINT BUCKET OBJECT          (bytes to stdout)
//! emuclient bench ENDPOINT BUCKET OBJECT [RUNS]   (read over one stream, discard)
//! ```
//! Every chunk's CRC32C and the whole object's CRC32C are checked; a mismatch
//! is an error, never silently passed on.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Request;
use zonalfs::proto::storage::storage_client::StorageClient;
use zonalfs::proto::storage::{
    BidiReadObjectRequest, BidiReadObjectSpec, ListObjectsRequest, ReadRange,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn routed<T>(msg: T, bucket: &str) -> Result<Request<T>, Error> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "x-goog-request-params",
        format!("bucket=projects/_/buckets/{bucket}").parse()?,
    );
    Ok(r)
}

/// The HTTP/2 max frame size this client advertises: 1 MiB by default (the
/// server may then send 1 MiB DATA frames; with the protocol default of 16 KiB,
/// single-stream throughput roughly halves, see docs/benchmarks.md), or
/// `EMUCLIENT_MAX_FRAME` bytes.
fn max_frame() -> u32 {
    std::env::var("EMUCLIENT_MAX_FRAME")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20)
}

async fn connect(endpoint: &str) -> Result<StorageClient<Channel>, Error> {
    let ch = Channel::from_shared(endpoint.to_string())?
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .tcp_nodelay(true)
        .max_frame_size(max_frame())
        .connect()
        .await?;
    Ok(StorageClient::new(ch).max_decoding_message_size(16 << 20))
}

async fn ls(endpoint: &str, bucket: &str, prefix: &str) -> Result<(), Error> {
    let mut c = connect(endpoint).await?;
    let mut req = ListObjectsRequest {
        parent: format!("projects/_/buckets/{bucket}"),
        prefix: prefix.to_string(),
        delimiter: "/".into(),
        include_folders_as_prefixes: true,
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    loop {
        let r = c
            .list_objects(routed(req.clone(), bucket)?)
            .await?
            .into_inner();
        for p in &r.prefixes {
            writeln!(out, "{:>14}  {p}", "PRE")?;
        }
        for o in &r.objects {
            writeln!(out, "{:>14}  {}", o.size, o.name)?;
        }
        if r.next_page_token.is_empty() {
            return Ok(());
        }
        req.page_token = r.next_page_token;
    }
}

/// Reads a whole object over one BidiReadObject stream; calls `sink` with each
/// verified chunk in order. Returns the number of bytes.
async fn read_whole(
    c: &mut StorageClient<Channel>,
    bucket: &str,
    object: &str,
    mut sink: impl FnMut(&[u8]) -> Result<(), Error>,
) -> Result<u64, Error> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(BidiReadObjectRequest {
        read_object_spec: Some(BidiReadObjectSpec {
            bucket: format!("projects/_/buckets/{bucket}"),
            object: object.to_string(),
            ..Default::default()
        }),
        read_ranges: vec![ReadRange {
            read_offset: 0,
            read_length: 0,
            read_id: 1,
        }],
    })
    .await?;
    let mut stream = c
        .bidi_read_object(routed(ReceiverStream::new(rx), bucket)?)
        .await?
        .into_inner();
    let mut expected_crc = None;
    let mut size = None;
    let (mut next, mut crc) = (0u64, 0u32);
    while let Some(m) = stream.message().await? {
        if let Some(md) = m.metadata {
            expected_crc = md.checksums.and_then(|c| c.crc32c);
            size = Some(md.size as u64);
        }
        for d in m.object_data_ranges {
            let rr = d.read_range.ok_or("chunk without read_range")?;
            let cd = d.checksummed_data.ok_or("chunk without data")?;
            if rr.read_offset as u64 != next {
                return Err(format!("chunk at {} but expected {next}", rr.read_offset).into());
            }
            if let Some(want) = cd.crc32c {
                if crc32c::crc32c(&cd.content) != want {
                    return Err(format!("CRC32C mismatch in the chunk at {next}").into());
                }
            }
            crc = crc32c::crc32c_append(crc, &cd.content);
            next += cd.content.len() as u64;
            sink(&cd.content)?;
            if d.range_end {
                drop(tx);
                if size.is_some_and(|s| s != next) {
                    return Err(format!("short read: {next} bytes of {size:?}").into());
                }
                if expected_crc.is_some_and(|e| e != crc) {
                    return Err("whole-object CRC32C mismatch".into());
                }
                return Ok(next);
            }
        }
    }
    Err("stream ended before the range did".into())
}

async fn cat(endpoint: &str, bucket: &str, object: &str) -> Result<(), Error> {
    let mut c = connect(endpoint).await?;
    let mut out = std::io::stdout().lock();
    let t = Instant::now();
    let n = read_whole(&mut c, bucket, object, |b| Ok(out.write_all(b)?)).await?;
    out.flush()?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "read {n} bytes in {secs:.3} s: {:.0} MB/s",
        n as f64 / secs / 1e6
    );
    Ok(())
}

async fn bench(endpoint: &str, bucket: &str, object: &str, runs: usize) -> Result<(), Error> {
    let mut c = connect(endpoint).await?;
    let mut rates = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let n = read_whole(&mut c, bucket, object, |_| Ok(())).await?;
        rates.push(n as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let all: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    println!("median_mbps={median:.0} runs_mbps={}", all.join(","));
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a.as_slice() {
        ["ls", ep, b] => ls(ep, b, "").await,
        ["ls", ep, b, p] => ls(ep, b, p).await,
        ["cat", ep, b, o] => cat(ep, b, o).await,
        ["bench", ep, b, o] => bench(ep, b, o, 3).await,
        ["bench", ep, b, o, n] => match n.parse() {
            Ok(n) if n > 0 => bench(ep, b, o, n).await,
            _ => Err(format!("bad run count {n:?}").into()),
        },
        _ => Err("usage: emuclient ls|cat|bench ENDPOINT BUCKET [OBJECT|PREFIX] [RUNS]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emuclient: {e}");
            ExitCode::FAILURE
        }
    }
}
