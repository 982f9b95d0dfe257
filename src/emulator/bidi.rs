//! The emulator's read streams: `BidiReadObject` (and the simpler `ReadObject`).
//!
//! [`open`] handles a new BidiReadObject stream: it reads the first request's
//! `read_object_spec` (bucket, object, generation, read handle, routing token),
//! injects open-time faults (failed opens, redirects), pins the object generation
//! by keeping its file open, and answers at once with the object's metadata and a
//! read handle. A spawned [`Engine`] task then owns the stream: it takes in
//! further requests' `read_ranges` as they arrive (many `read_id`s outstanding at
//! once), and sends responses that interleave the ready ranges round-robin, each
//! chunk at most 2 MiB with its own CRC32C, its own offset and length, and
//! `range_end` on the last one. A response ends with a range's last chunk, so a
//! short range goes out at once rather than sharing a message with the next
//! range's data (the protocol allows either; the client handles both). Shaping (latency before each range's first byte,
//! a bandwidth cap per stream) and data-time faults (break, stall, corruption)
//! are applied here. Responses go out through a bounded channel, so a slow
//! client holds the engine back instead of filling memory.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::store::{self, ObjectMeta};
use super::wire::{self, check_routing, object_proto, status_with_detail};
use super::{EmuError, Emulator};
use crate::proto::storage::{
    BidiReadHandle, BidiReadObjectError, BidiReadObjectRedirectedError, BidiReadObjectRequest,
    BidiReadObjectResponse, BidiReadObjectSpec, ChecksummedData, ContentRange, ObjectChecksums,
    ObjectRangeData, ReadObjectRequest, ReadObjectResponse, ReadRange, ReadRangeError,
};
use crate::proto::RpcStatus;

/// The response stream of a BidiReadObject call.
pub type ResponseStream = ReceiverStream<Result<BidiReadObjectResponse, Status>>;

/// Responses buffered between the engine and the transport.
const CHANNEL_DEPTH: usize = 4;

const HANDLE_MAGIC: &str = "zemu1";

/// An opaque read handle naming (bucket, object, generation).
fn encode_handle(bucket: &str, object: &str, generation: i64) -> Bytes {
    wire::encode_handle(HANDLE_MAGIC, bucket, object, generation)
}

#[cfg(test)]
fn decode_handle(h: &[u8]) -> Option<(String, String, i64)> {
    wire::decode_handle(HANDLE_MAGIC, h)
}

fn invalid(msg: impl Into<String>) -> Status {
    EmuError::InvalidArgument(msg.into()).into_status()
}

/// Checks the spec's generation/metageneration preconditions.
fn check_preconditions(spec: &BidiReadObjectSpec, meta: &ObjectMeta) -> Result<(), Status> {
    let failed = |what: &str| {
        Err(Status::failed_precondition(format!(
            "At least one of the pre-conditions you specified did not hold ({what})"
        )))
    };
    if spec
        .if_generation_match
        .is_some_and(|g| g != meta.generation)
    {
        return failed("if_generation_match");
    }
    if spec.if_generation_not_match == Some(meta.generation) {
        return failed("if_generation_not_match");
    }
    if spec.if_metageneration_match.is_some_and(|m| m != 1) {
        return failed("if_metageneration_match");
    }
    if spec.if_metageneration_not_match == Some(1) {
        return failed("if_metageneration_not_match");
    }
    Ok(())
}

/// Opens an object version with its whole checksum, off the reactor (it may
/// checksum a file): BidiReadObject's and GetObject's lookup.
pub(super) async fn open_object(
    emu: &Arc<Emulator>,
    bucket: &str,
    object: &str,
    generation: i64,
) -> Result<(ObjectMeta, File), Status> {
    let (emu, bucket, object) = (emu.clone(), bucket.to_string(), object.to_string());
    wire::blocking(move || -> Result<(ObjectMeta, File), EmuError> {
        let (mut meta, file) = emu.store.open(&bucket, &object, generation)?;
        emu.store.checksum(&mut meta, &file)?;
        Ok((meta, file))
    })
    .await
}

/// Starts a BidiReadObject stream (see the module doc).
pub async fn open(
    emu: Arc<Emulator>,
    params: HashMap<String, String>,
    mut inbound: Streaming<BidiReadObjectRequest>,
) -> Result<ResponseStream, Status> {
    emu.counters.streams_opened.fetch_add(1, Ordering::Relaxed);
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| invalid("the stream ended before its first message"))?;
    let spec = first
        .read_object_spec
        .clone()
        .ok_or_else(|| invalid("the first message must carry read_object_spec"))?;
    check_routing(&params, &spec.bucket)?;
    let bucket = store::parse_bucket_resource(&spec.bucket)?.to_string();
    store::check_object_name(&spec.object)?;

    let generation = wire::pinned_generation(
        HANDLE_MAGIC,
        "read_handle",
        spec.read_handle.as_ref().map(|h| h.handle.as_ref()),
        &bucket,
        &spec.object,
        spec.generation,
    )?;

    // A routing token comes in the spec and/or the routing header; it must be one
    // a redirect handed out, and a redirected reopen must also bring the handle.
    let token = wire::routing_token(&emu, spec.routing_token.as_ref(), &params)?;
    if token.is_some() && spec.read_handle.is_none() {
        return Err(invalid(
            "A redirected stream must be reopened with its read_handle",
        ));
    }

    if emu.faults.fail_open() {
        emu.counters.fault_fail_open.fetch_add(1, Ordering::Relaxed);
        return Err(Status::unavailable("injected fault: stream open failed"));
    }

    let (meta, file) = open_object(&emu, &bucket, &spec.object, generation).await?;
    check_preconditions(&spec, &meta)?;
    let handle = encode_handle(&bucket, &spec.object, meta.generation);

    if token.is_none() {
        if let Some(t) = emu.faults.redirect() {
            emu.counters.fault_redirect.fetch_add(1, Ordering::Relaxed);
            let detail = BidiReadObjectRedirectedError {
                read_handle: Some(BidiReadHandle { handle }),
                routing_token: Some(t),
            };
            return Err(status_with_detail(
                Code::Aborted,
                "injected fault: redirected",
                "google.storage.v2.BidiReadObjectRedirectedError",
                &detail,
            ));
        }
    }

    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let first_response = BidiReadObjectResponse {
        metadata: Some(object_proto(&meta)),
        object_data_ranges: vec![],
        read_handle: Some(BidiReadHandle { handle }),
    };
    emu.counters
        .ranges_in_open
        .fetch_add(first.read_ranges.len() as u64, Ordering::Relaxed);
    let engine = Engine::new(emu, meta, file, tx);
    tokio::spawn(engine.run(first_response, first.read_ranges, inbound));
    Ok(ReceiverStream::new(rx))
}

/// One outstanding range of a stream.
#[derive(Debug)]
struct Range {
    id: i64,
    next: u64,
    end: u64,
    ready: Instant,
}

/// Why a stream stops early.
enum Stop {
    /// The client went away: end silently.
    Gone,
    /// End the stream with this status.
    Fail(Status),
}

/// Reads `len` bytes at `off` from the pinned file into a fresh buffer and checks
/// the file still is the generation `meta` names (NOT_FOUND if it changed).
fn read_chunk(file: &File, meta: &ObjectMeta, off: u64, len: usize) -> Result<BytesMut, Status> {
    let gone = || {
        EmuError::NotFound(format!(
            "No such object: {}/{}#{} (it changed while being read)",
            meta.bucket, meta.name, meta.generation
        ))
        .into_status()
    };
    // A pread of at most 2 MiB from a local file: short enough to run inline.
    let buf = store::pread_bytes(file, off, len).map_err(|_| gone())?;
    if meta.finalized {
        let md = file.metadata().map_err(|_| gone())?;
        let mtime = store::mtime_of(&md);
        if md.size() != meta.size || mtime != meta.mtime {
            return Err(gone());
        }
    }
    Ok(buf)
}

/// The task that owns one BidiReadObject stream after its first response.
struct Engine {
    emu: Arc<Emulator>,
    meta: ObjectMeta,
    file: File,
    tx: mpsc::Sender<Result<BidiReadObjectResponse, Status>>,
    ranges: VecDeque<Range>,
    /// Content bytes sent on this stream.
    sent: u64,
    /// Earliest time the next response may go out (bandwidth cap).
    next_send: Instant,
    chunk: usize,
    /// Data chunks sent on this stream.
    chunks_sent: u64,
}

impl Engine {
    fn new(
        emu: Arc<Emulator>,
        meta: ObjectMeta,
        file: File,
        tx: mpsc::Sender<Result<BidiReadObjectResponse, Status>>,
    ) -> Engine {
        let chunk = emu
            .faults
            .shaping
            .chunk_size
            .clamp(1, super::faults::MAX_CHUNK);
        Engine {
            emu,
            meta,
            file,
            tx,
            ranges: VecDeque::new(),
            sent: 0,
            next_send: Instant::now(),
            chunk,
            chunks_sent: 0,
        }
    }

    async fn run(
        mut self,
        first: BidiReadObjectResponse,
        first_ranges: Vec<ReadRange>,
        inbound: Streaming<BidiReadObjectRequest>,
    ) {
        if self.tx.send(Ok(first)).await.is_err() {
            return;
        }
        if let Err(Stop::Fail(st)) = self.serve(first_ranges, inbound).await {
            let _ = self.tx.send(Err(st)).await;
        }
    }

    /// The current size of the object (appendable objects grow).
    fn current_size(&self) -> u64 {
        if self.meta.finalized {
            return self.meta.size;
        }
        self.file
            .metadata()
            .map(|m| m.size())
            .unwrap_or(self.meta.size)
    }

    /// Validates and queues new ranges.
    fn add(&mut self, ranges: Vec<ReadRange>) -> Result<(), Stop> {
        if ranges.is_empty() {
            return Ok(());
        }
        let size = self.current_size();
        let ready = Instant::now() + self.emu.faults.shaping.latency;
        for r in ranges {
            if self.ranges.iter().any(|x| x.id == r.read_id) {
                return Err(Stop::Fail(invalid(format!(
                    "read_id {} is already outstanding on this stream",
                    r.read_id
                ))));
            }
            if r.read_length < 0 {
                return Err(Stop::Fail(invalid(format!(
                    "Invalid read_length {} for read_id {}",
                    r.read_length, r.read_id
                ))));
            }
            let start = if r.read_offset < 0 {
                size.saturating_sub(r.read_offset.unsigned_abs())
            } else {
                r.read_offset as u64
            };
            if start > size {
                return Err(Stop::Fail(out_of_range(r.read_id, r.read_offset, size)));
            }
            let end = match r.read_length {
                0 => size,
                n => start.saturating_add(n as u64).min(size),
            };
            self.ranges.push_back(Range {
                id: r.read_id,
                next: start,
                end,
                ready,
            });
        }
        let owed: u64 = self.ranges.iter().map(|r| r.end - r.next).sum();
        self.emu
            .counters
            .most_bytes_owed
            .fetch_max(owed, Ordering::Relaxed);
        Ok(())
    }

    fn take(&mut self, msg: Option<Result<BidiReadObjectRequest, Status>>) -> Result<bool, Stop> {
        match msg {
            Some(Ok(req)) => {
                if req.read_object_spec.is_some() {
                    return Err(Stop::Fail(invalid(
                        "read_object_spec may only be sent in the first message",
                    )));
                }
                self.add(req.read_ranges)?;
                Ok(true)
            }
            // The client half-closed: finish what is outstanding, then end.
            None => Ok(false),
            Some(Err(_)) => Err(Stop::Gone),
        }
    }

    async fn serve(
        &mut self,
        first_ranges: Vec<ReadRange>,
        mut inbound: Streaming<BidiReadObjectRequest>,
    ) -> Result<(), Stop> {
        self.add(first_ranges)?;
        let mut open = true;
        let shaping = self.emu.faults.shaping.clone();
        loop {
            while open {
                match inbound.next().now_or_never() {
                    Some(m) => open = self.take(m)?,
                    None => break,
                }
            }
            if self.ranges.is_empty() {
                if !open {
                    return Ok(());
                }
                tokio::select! {
                    m = inbound.next() => open = self.take(m)?,
                    _ = self.tx.closed() => return Err(Stop::Gone),
                }
                continue;
            }
            let now = Instant::now();
            let earliest = self.ranges.iter().map(|r| r.ready).min().unwrap_or(now);
            if earliest > now {
                tokio::select! {
                    m = inbound.next(), if open => open = self.take(m)?,
                    _ = super::faults::sleep_until(earliest) => {}
                    _ = self.tx.closed() => return Err(Stop::Gone),
                }
                continue;
            }

            // Fault budgets: bytes this stream may still send.
            let broken = shaping
                .break_after_bytes
                .map(|n| n.saturating_sub(self.sent));
            let stalled = shaping
                .stall_after_bytes
                .map(|n| n.saturating_sub(self.sent));
            if stalled == Some(0) {
                self.emu
                    .counters
                    .fault_stall
                    .fetch_add(1, Ordering::Relaxed);
                // Stop sending without closing, until the client gives up.
                loop {
                    tokio::select! {
                        m = inbound.next(), if open => match m {
                            Some(Ok(_)) => {}
                            _ => open = false,
                        },
                        _ = self.tx.closed() => return Err(Stop::Gone),
                    }
                }
            }
            if broken == Some(0) {
                self.emu
                    .counters
                    .fault_break
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Stop::Fail(Status::unavailable(
                    "injected fault: stream broken",
                )));
            }
            let budget = [broken, stalled]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(u64::MAX);

            let resp = self.build(now, budget)?;
            let bytes: u64 = resp
                .object_data_ranges
                .iter()
                .map(|d| {
                    d.checksummed_data
                        .as_ref()
                        .map_or(0, |c| c.content.len() as u64)
                })
                .sum();
            if let Some(rate) = shaping.stream_bytes_per_sec {
                pace(&mut self.next_send, bytes, rate).await;
            }
            self.sent += bytes;
            self.emu
                .counters
                .bytes_served
                .fetch_add(bytes, Ordering::Relaxed);
            if self.tx.send(Ok(resp)).await.is_err() {
                return Err(Stop::Gone);
            }
            // Let the connection write this response before the next is read
            // and checksummed: the send woke the writer into this worker's
            // LIFO slot, where no other worker takes it, so without yielding a
            // short range's response waited behind the chunks built after it
            // (until the channel filled).
            tokio::task::yield_now().await;
        }
    }

    /// Builds one response from the ready ranges, round-robin, up to one chunk's
    /// worth of bytes (and at most `budget` bytes), ending after a range's
    /// last chunk.
    fn build(&mut self, now: Instant, mut budget: u64) -> Result<BidiReadObjectResponse, Stop> {
        let mut out = Vec::new();
        let mut room = self.chunk as u64;
        let mut visits = self.ranges.len();
        while visits > 0 && room > 0 {
            visits -= 1;
            let Some(mut r) = self.ranges.pop_front() else {
                break;
            };
            if r.ready > now {
                self.ranges.push_back(r);
                continue;
            }
            let len = (r.end - r.next).min(room).min(budget);
            if len == 0 && r.end > r.next {
                self.ranges.push_front(r);
                break;
            }
            let mut buf =
                read_chunk(&self.file, &self.meta, r.next, len as usize).map_err(Stop::Fail)?;
            let crc = crc32c::crc32c(&buf);
            if !buf.is_empty() {
                self.chunks_sent += 1;
            }
            if let Some(i) = self.emu.faults.corrupt(self.chunks_sent, buf.len()) {
                buf[i] ^= 0x5a;
                self.emu
                    .counters
                    .fault_corrupt
                    .fetch_add(1, Ordering::Relaxed);
            }
            let range_end = r.next + len == r.end;
            out.push(ObjectRangeData {
                checksummed_data: Some(ChecksummedData {
                    content: buf.freeze(),
                    crc32c: Some(crc),
                }),
                read_range: Some(ReadRange {
                    read_offset: r.next as i64,
                    read_length: len as i64,
                    read_id: r.id,
                }),
                range_end,
            });
            r.next += len;
            room -= len;
            budget -= len;
            if range_end {
                self.emu
                    .counters
                    .ranges_served
                    .fetch_add(1, Ordering::Relaxed);
                break;
            } else {
                self.ranges.push_back(r);
            }
        }
        Ok(BidiReadObjectResponse {
            metadata: None,
            object_data_ranges: out,
            read_handle: None,
        })
    }
}

/// Credit a paced stream may carry: time lost to scheduling or timer rounding
/// (tokio timers tick in milliseconds) is made up within this much, so the
/// average rate meets the cap instead of falling short of it.
const PACE_CREDIT: Duration = Duration::from_millis(50);

/// Bandwidth shaping: waits until `bytes` may be sent (or, on a write stream,
/// taken in) at `rate` bytes/s and books their time. `next` is when the stream's next byte is due.
pub(super) async fn pace(next: &mut Instant, bytes: u64, rate: f64) {
    let now = Instant::now();
    let floor = now.checked_sub(PACE_CREDIT).unwrap_or(now);
    if *next < floor {
        *next = floor;
    }
    if *next > now {
        tokio::time::sleep_until(*next).await;
    }
    *next += Duration::from_secs_f64(bytes as f64 / rate);
}

/// OUT_OF_RANGE for one range, with a BidiReadObjectError naming its read_id.
fn out_of_range(read_id: i64, offset: i64, size: u64) -> Status {
    let msg = format!("Read offset {offset} is past the end of the object (size {size})");
    let detail = BidiReadObjectError {
        read_range_errors: vec![ReadRangeError {
            read_id,
            status: Some(RpcStatus {
                code: Code::OutOfRange as i32,
                message: msg.clone(),
                details: vec![],
            }),
        }],
    };
    status_with_detail(
        Code::OutOfRange,
        &msg,
        "google.storage.v2.BidiReadObjectError",
        &detail,
    )
}

/// Serves `ReadObject`: one range as a server stream, first message with the
/// metadata, the content range and (for a whole-object read) the checksums.
pub async fn read_object(
    emu: Arc<Emulator>,
    req: ReadObjectRequest,
) -> Result<ReceiverStream<Result<ReadObjectResponse, Status>>, Status> {
    let bucket = store::parse_bucket_resource(&req.bucket)?.to_string();
    store::check_object_name(&req.object)?;
    if req.read_limit < 0 {
        return Err(invalid(format!("Invalid read_limit {}", req.read_limit)));
    }
    let (meta, file) = open_object(&emu, &bucket, &req.object, req.generation).await?;
    let size = meta.size;
    let start = if req.read_offset < 0 {
        size.saturating_sub(req.read_offset.unsigned_abs())
    } else {
        req.read_offset as u64
    };
    if start > size {
        return Err(EmuError::OutOfRange(format!(
            "Read offset {} is past the end of the object (size {size})",
            req.read_offset
        ))
        .into_status());
    }
    let end = match req.read_limit {
        0 => size,
        n => start.saturating_add(n as u64).min(size),
    };
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    tokio::spawn(async move {
        let shaping = emu.faults.shaping.clone();
        let chunk = shaping.chunk_size.clamp(1, super::faults::MAX_CHUNK) as u64;
        super::faults::sleep(shaping.latency).await;
        let whole = start == 0 && end == size;
        let mut first = Some(ReadObjectResponse {
            checksummed_data: None,
            object_checksums: whole.then(|| ObjectChecksums {
                crc32c: meta.crc32c,
                md5_hash: Bytes::new(),
            }),
            content_range: Some(ContentRange {
                start: start as i64,
                end: end as i64,
                complete_length: size as i64,
            }),
            metadata: Some(object_proto(&meta)),
        });
        let mut off = start;
        let mut next_send = Instant::now();
        while off < end || first.is_some() {
            let len = (end - off).min(chunk);
            let mut resp = first.take().unwrap_or_default();
            if len > 0 {
                let buf = match read_chunk(&file, &meta, off, len as usize) {
                    Ok(b) => b,
                    Err(st) => {
                        let _ = tx.send(Err(st)).await;
                        return;
                    }
                };
                let crc = crc32c::crc32c(&buf);
                resp.checksummed_data = Some(ChecksummedData {
                    content: buf.freeze(),
                    crc32c: Some(crc),
                });
            }
            if let Some(rate) = shaping.stream_bytes_per_sec {
                pace(&mut next_send, len, rate).await;
            }
            off += len;
            emu.counters.bytes_served.fetch_add(len, Ordering::Relaxed);
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
        emu.counters.ranges_served.fetch_add(1, Ordering::Relaxed);
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_round_trip() {
        let h = encode_handle("b", "a/b c", 42);
        assert_eq!(
            decode_handle(&h),
            Some(("b".to_string(), "a/b c".to_string(), 42))
        );
        assert_eq!(decode_handle(b"junk"), None);
        assert_eq!(decode_handle(b"zemu1\0b\0o\0x"), None);
    }
}
