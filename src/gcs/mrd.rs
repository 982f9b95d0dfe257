//! One multi-range download (MRD) stream: a `BidiReadObject` call that carries
//! many concurrent range reads of one object generation.
//!
//! [`MrdStream::open`] sends the `read_object_spec`, waits for the first response
//! (metadata and read handle) and pins the generation. The open request also
//! carries the read that opened the stream ([`MrdStream::open_reading`]) and,
//! on a reopen, every unfinished range, so their data follows the metadata
//! one round trip after the open. A spawned driver task then
//! owns the call: [`MrdStream::read`] hands it a range and a [`RangeSink`]; the
//! driver gives the range a `read_id`, requests it, and for every chunk that
//! arrives checks the read_id, that the chunk starts exactly at the range's next
//! byte (no gap, no overlap), that it does not run past the range, and its CRC32C,
//! before it writes the bytes straight into the sink at their offset. `range_end`
//! (or the last requested byte) completes the range.
//!
//! A stream sends a large range only once the ranges already sent owe at most
//! [`SEND_AHEAD`] bytes; until then it holds it (a small range goes at once).
//! The server may interleave the ranges of a stream (the emulator does,
//! round-robin): two 8 MiB blocks sent together then both arrive at half
//! speed, and a reader that reads them in order waits for the first twice as
//! long. Sent one chunk before the last one's end, the next range's request
//! crosses the network while that chunk arrives: the stream never idles for a
//! round trip between blocks, and the blocks arrive one after the other.
//!
//! When the stream breaks (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED,
//! RESOURCE_EXHAUSTED, ABORTED, a CRC mismatch, an invalid response, no data
//! for `stall_timeout` while ranges are outstanding, or no answer to the open
//! within `stall_timeout`), the driver reopens it with
//! the read handle, the pinned generation and any routing token, and re-requests
//! each unfinished range from its last verified byte, with exponential backoff
//! and jitter until the retry deadline. A redirect (ABORTED carrying a
//! `BidiReadObjectRedirectedError`) is followed the same way. OUT_OF_RANGE fails
//! only the ranges its `BidiReadObjectError` names; NOT_FOUND (generation gone)
//! and other permanent errors fail every range. A range whose caller went away is
//! dropped (its sink released) and its late chunks ignored.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status};

use super::client::{object_info, GcsClient};
use super::retry::Backoff;
use super::wire::{self, RangeData, ResponseStream};
use super::{GcsError, ObjectInfo, RangeSink};
use crate::proto::storage::{
    BidiReadHandle, BidiReadObjectError, BidiReadObjectRedirectedError, BidiReadObjectRequest,
    BidiReadObjectSpec, ReadRange,
};

/// Most ranges sent in one request message (as the official clients do).
const MAX_RANGES_PER_MESSAGE: usize = 100;

/// A range longer than this waits until the stream's sent ranges owe at most
/// this many bytes (one chunk: far more than a round trip's worth of data at
/// a stream's rate, on loopback and across a zone alike).
pub const SEND_AHEAD: u64 = 2 << 20;

/// Counters of what the streams did (shared by every stream of a pool).
#[derive(Debug, Default)]
pub struct StreamStats {
    pub streams_opened: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub ranges_completed: AtomicU64,
    pub retry_unavailable: AtomicU64,
    pub retry_redirect: AtomicU64,
    pub retry_corrupt: AtomicU64,
    pub retry_stall: AtomicU64,
    pub retry_protocol: AtomicU64,
}

impl StreamStats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

struct ReadCmd {
    offset: u64,
    len: u64,
    sink: Arc<dyn RangeSink>,
    done: oneshot::Sender<Result<u64, GcsError>>,
}

/// A handle to a running stream. Dropping every handle closes the stream once
/// its outstanding ranges are done.
pub struct MrdStream {
    tx: mpsc::UnboundedSender<ReadCmd>,
    /// Bytes requested and not yet delivered (the pool's load measure).
    load: Arc<AtomicU64>,
    /// Bytes of reads handed to the driver that it has not taken in yet: counted
    /// at once so that a burst of reads spreads over the pool's streams.
    queued: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    handle: Bytes,
    info: ObjectInfo,
}

impl std::fmt::Debug for MrdStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MrdStream")
            .field("object", &self.info.name)
            .field("generation", &self.info.generation)
            .field("load", &self.load())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// A first read carried by a stream's open request: `len` bytes at `offset`
/// into `sink`. With `head` set (and `len` more than twice it) its first
/// `head` bytes go as a range of their own: the server answers a range chunk
/// by chunk (up to 2 MiB each, every chunk checked whole before its bytes are
/// used), so a small head arrives without waiting for a whole first chunk.
/// Only set `head` where `offset + head` lies inside the object.
pub struct FirstRead {
    pub offset: u64,
    pub len: u64,
    pub head: u64,
    pub sink: Arc<dyn RangeSink>,
}

/// Writes a range's bytes `base` bytes further into another sink (the rest of
/// a read whose head went as a range of its own).
struct OffsetSink {
    inner: Arc<dyn RangeSink>,
    base: usize,
}

impl RangeSink for OffsetSink {
    fn put(&self, at: usize, data: &[u8]) {
        self.inner.put(self.base + at, data);
    }
}

/// The outcome of a read handed to a stream: the bytes delivered, once done.
pub struct PendingRead {
    first: oneshot::Receiver<Result<u64, GcsError>>,
    /// The rest of a read split after its head: the head's length and the
    /// rest's outcome.
    rest: Option<(u64, oneshot::Receiver<Result<u64, GcsError>>)>,
}

impl PendingRead {
    fn one(rx: oneshot::Receiver<Result<u64, GcsError>>) -> PendingRead {
        PendingRead {
            first: rx,
            rest: None,
        }
    }

    async fn part(rx: oneshot::Receiver<Result<u64, GcsError>>) -> Result<u64, GcsError> {
        rx.await.map_err(|_| {
            GcsError::Unavailable("the stream closed before the range completed".into())
        })?
    }

    pub async fn wait(self) -> Result<u64, GcsError> {
        let first = Self::part(self.first).await?;
        match self.rest {
            Some((head, rest)) if first == head => Ok(first + Self::part(rest).await?),
            // The object ended inside the head (the rest reads nothing).
            _ => Ok(first),
        }
    }
}

impl MrdStream {
    /// Opens a stream on `object` (`generation` 0: the live one), optionally
    /// reusing a read handle from another stream of the same object.
    pub async fn open(
        client: &GcsClient,
        object: &str,
        generation: i64,
        handle: Option<Bytes>,
        stats: Arc<StreamStats>,
    ) -> Result<MrdStream, GcsError> {
        let (stream, _) =
            Self::open_reading(client, object, generation, handle, stats, None).await?;
        Ok(stream)
    }

    /// Opens a stream whose open request already carries `first` (so its
    /// bytes arrive one round trip after the open, right behind the
    /// metadata); returns the stream and that read's outcome.
    pub async fn open_reading(
        client: &GcsClient,
        object: &str,
        generation: i64,
        handle: Option<Bytes>,
        stats: Arc<StreamStats>,
        first: Option<FirstRead>,
    ) -> Result<(MrdStream, Option<PendingRead>), GcsError> {
        let mut driver = Driver {
            client: client.clone(),
            what: format!("gs://{}/{object}", client.bucket),
            object: object.to_string(),
            generation,
            handle: handle.unwrap_or_default(),
            routing_token: None,
            table: RangeTable::new(format!("gs://{}/{object}", client.bucket), stats.clone()),
            queued: Arc::new(AtomicU64::new(0)),
            stats,
        };
        let pending = first.map(|f| {
            let split = f.head > 0 && f.len > 2 * f.head;
            let head_len = if split { f.head } else { f.len };
            let (done, rx) = oneshot::channel();
            driver.table.add(ReadCmd {
                offset: f.offset,
                len: head_len,
                sink: f.sink.clone(),
                done,
            });
            let mut pending = PendingRead::one(rx);
            if split {
                let (done, rx) = oneshot::channel();
                driver.table.add(ReadCmd {
                    offset: f.offset + head_len,
                    len: f.len - head_len,
                    sink: Arc::new(OffsetSink {
                        inner: f.sink,
                        base: head_len as usize,
                    }),
                    done,
                });
                pending.rest = Some((head_len, rx));
            }
            pending
        });
        let mut backoff: Option<Backoff> = None;
        let (conn, info) = loop {
            match driver.connect().await {
                Ok(ok) => break ok,
                Err(Failure::Redirect) => {
                    continue_after(&mut backoff, &driver, &driver.redirected()).await?
                }
                Err(Failure::Retry(e)) => continue_after(&mut backoff, &driver, &e).await?,
                // A missing object is an answer (a lookup asks this way),
                // not a failure worth a warning.
                Err(Failure::Fatal(e @ GcsError::NotFound(_))) => {
                    tracing::debug!(object = %driver.what, error = %e, "no such object");
                    return Err(e);
                }
                Err(Failure::Fatal(e)) => {
                    tracing::warn!(object = %driver.what, error = %e, "cannot open a read stream");
                    return Err(e);
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let stream = MrdStream {
            tx,
            load: driver.table.load.clone(),
            queued: driver.queued.clone(),
            closed: closed.clone(),
            handle: driver.handle.clone(),
            info,
        };
        tokio::spawn(async move {
            driver.run(conn, rx).await;
            closed.store(true, Ordering::Release);
        });
        Ok((stream, pending))
    }

    /// The object version this stream reads, as its first response described it.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    /// The read handle from the first response (for opening sibling streams).
    pub fn read_handle(&self) -> Bytes {
        self.handle.clone()
    }

    /// Bytes requested on this stream and not yet delivered.
    pub fn load(&self) -> u64 {
        self.load.load(Ordering::Relaxed) + self.queued.load(Ordering::Relaxed)
    }

    /// The driver has stopped: the stream takes no more reads.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Reads `len` bytes at `offset` into `sink`; returns the bytes delivered
    /// (fewer only where the object ends). Dropping the future abandons the range.
    pub async fn read(
        &self,
        offset: u64,
        len: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<u64, GcsError> {
        let (done, rx) = oneshot::channel();
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self
            .tx
            .send(ReadCmd {
                offset,
                len,
                sink,
                done,
            })
            .is_err()
        {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return Err(GcsError::Unavailable("the stream is closed".into()));
        }
        PendingRead::one(rx).wait().await
    }
}

/// Waits out the backoff before the next attempt after `last` failed, or gives
/// up (with `last` as the cause) once the retry deadline has passed.
async fn continue_after(
    backoff: &mut Option<Backoff>,
    driver: &Driver,
    last: &GcsError,
) -> Result<(), GcsError> {
    let b = backoff.get_or_insert_with(|| Backoff::new(&driver.client.retry));
    match b.next_delay() {
        Some(d) => {
            tracing::debug!(object = %driver.what, why = %last, attempt = b.attempts(), "reopening stream");
            tokio::time::sleep(d).await;
            Ok(())
        }
        None => Err(GcsError::RetryDeadline {
            attempts: b.attempts(),
            secs: b.elapsed().as_secs_f64(),
            last: Arc::new(last.clone()),
        }),
    }
}

/// How an attempt ended.
enum Failure {
    /// Follow a redirect (handle and token already taken).
    Redirect,
    /// Reopen after backoff.
    Retry(GcsError),
    /// Fail every range.
    Fatal(GcsError),
}

/// One outstanding range.
struct Active {
    offset: u64,
    len: u64,
    delivered: u64,
    /// Requested from the server (else held until the stream nears its end).
    sent: bool,
    sink: Arc<dyn RangeSink>,
    done: oneshot::Sender<Result<u64, GcsError>>,
}

/// A live call: where to send requests, where responses come from.
struct Conn {
    tx: mpsc::UnboundedSender<BidiReadObjectRequest>,
    rx: ResponseStream,
    /// Counts this stream on its HTTP/2 connection while it is open.
    _lease: super::transport::StreamLease,
}

/// The outstanding ranges of a stream and the rules every chunk must pass
/// (kept apart from the network so they can be tested against any sequence of
/// responses).
struct RangeTable {
    what: String,
    ranges: HashMap<i64, Active>,
    /// Ranges completed or given up whose late chunks are ignored.
    abandoned: HashSet<i64>,
    next_id: i64,
    load: Arc<AtomicU64>,
    stats: Arc<StreamStats>,
    /// Bytes the sent ranges still owe.
    in_flight: u64,
    /// Ranges held back, oldest first (see [`SEND_AHEAD`]); 0 sends all at once.
    held: std::collections::VecDeque<i64>,
    send_ahead: u64,
}

struct Driver {
    client: GcsClient,
    what: String,
    object: String,
    /// Pinned after the first response.
    generation: i64,
    handle: Bytes,
    routing_token: Option<String>,
    table: RangeTable,
    /// See [`MrdStream::queued`].
    queued: Arc<AtomicU64>,
    stats: Arc<StreamStats>,
}

impl RangeTable {
    fn new(what: String, stats: Arc<StreamStats>) -> RangeTable {
        RangeTable {
            what,
            ranges: HashMap::new(),
            abandoned: HashSet::new(),
            next_id: 1,
            load: Arc::new(AtomicU64::new(0)),
            stats,
            in_flight: 0,
            held: std::collections::VecDeque::new(),
            send_ahead: SEND_AHEAD,
        }
    }

    /// What the sent ranges still owe, as requests from the last verified
    /// byte, oldest first (a read's head before its rest); late chunks of
    /// finished ranges cannot come on a new stream. Held ranges stay held.
    fn resume(&mut self) -> Vec<ReadRange> {
        self.abandoned.clear();
        let mut out: Vec<ReadRange> = self
            .ranges
            .iter()
            .filter(|(_, a)| a.sent)
            .map(|(id, a)| ReadRange {
                read_offset: (a.offset + a.delivered) as i64,
                read_length: (a.len - a.delivered) as i64,
                read_id: *id,
            })
            .collect();
        out.sort_unstable_by_key(|r| r.read_id);
        out
    }

    /// Registers a new range and returns its request, or None if it is held
    /// (see [`SEND_AHEAD`]; [`RangeTable::release`] sends it later).
    fn add(&mut self, cmd: ReadCmd) -> Option<ReadRange> {
        if cmd.len == 0 {
            let _ = cmd.done.send(Ok(0));
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.load.fetch_add(cmd.len, Ordering::Relaxed);
        let send = self.send_ahead == 0
            || cmd.len <= self.send_ahead
            || (self.held.is_empty() && self.in_flight <= self.send_ahead);
        self.ranges.insert(
            id,
            Active {
                offset: cmd.offset,
                len: cmd.len,
                delivered: 0,
                sent: send,
                sink: cmd.sink,
                done: cmd.done,
            },
        );
        if !send {
            self.held.push_back(id);
            return None;
        }
        self.in_flight += cmd.len;
        Some(ReadRange {
            read_offset: cmd.offset as i64,
            read_length: cmd.len as i64,
            read_id: id,
        })
    }

    /// The held ranges that may go now: oldest first, while the sent ones owe
    /// at most [`SEND_AHEAD`] bytes.
    fn release(&mut self) -> Vec<ReadRange> {
        let mut out = Vec::new();
        while self.in_flight <= self.send_ahead {
            let Some(id) = self.held.pop_front() else {
                break;
            };
            // Ranges given up while held are gone from the table.
            let Some(a) = self.ranges.get_mut(&id) else {
                continue;
            };
            if a.done.is_closed() {
                // Its caller went away while it waited: never ask for it.
                self.finish(id, Err(GcsError::Cancelled));
                continue;
            }
            a.sent = true;
            self.in_flight += a.len;
            out.push(ReadRange {
                read_offset: a.offset as i64,
                read_length: a.len as i64,
                read_id: id,
            });
        }
        out
    }

    fn finish(&mut self, id: i64, result: Result<u64, GcsError>) {
        if let Some(a) = self.ranges.remove(&id) {
            self.load.fetch_sub(a.len - a.delivered, Ordering::Relaxed);
            if a.sent {
                self.in_flight -= a.len - a.delivered;
            } else {
                self.held.retain(|h| *h != id);
            }
            if result.is_ok() {
                StreamStats::bump(&self.stats.ranges_completed);
            }
            let _ = a.done.send(result);
            self.abandoned.insert(id);
        }
    }

    fn fail_all(&mut self, e: &GcsError) {
        let ids: Vec<i64> = self.ranges.keys().copied().collect();
        for id in ids {
            self.finish(id, Err(e.clone()));
        }
    }

    /// Applies one chunk. An error means the stream must be reopened.
    fn chunk(&mut self, d: RangeData) -> Result<bool, GcsError> {
        let rr = d.read_range.ok_or_else(|| {
            GcsError::Protocol(format!("{}: a chunk without read_range", self.what))
        })?;
        let id = rr.read_id;
        let content_len = d.data.as_ref().map_or(0, |c| c.content.len()) as u64;
        let Some(a) = self.ranges.get_mut(&id) else {
            if self.abandoned.contains(&id) {
                return Ok(false);
            }
            return Err(GcsError::Protocol(format!(
                "{}: data for unknown read_id {id}",
                self.what
            )));
        };
        if !a.sent {
            return Err(GcsError::Protocol(format!(
                "{}: data for read_id {id}, which was not requested yet",
                self.what
            )));
        }
        if a.done.is_closed() {
            // The caller went away: drop the range and its sink.
            self.finish(id, Err(GcsError::Cancelled));
            return Ok(false);
        }
        let expected = a.offset + a.delivered;
        if rr.read_offset < 0 || rr.read_offset as u64 != expected {
            return Err(GcsError::Protocol(format!(
                "{}: read_id {id} chunk at offset {} but the next byte is {expected}",
                self.what, rr.read_offset
            )));
        }
        if rr.read_length != 0 && rr.read_length as u64 != content_len {
            return Err(GcsError::Protocol(format!(
                "{}: read_id {id} chunk says {} bytes but carries {content_len}",
                self.what, rr.read_length
            )));
        }
        if a.delivered + content_len > a.len {
            return Err(GcsError::Protocol(format!(
                "{}: read_id {id} overruns its range ({} + {content_len} > {})",
                self.what, a.delivered, a.len
            )));
        }
        if let Some(cd) = &d.data {
            if !cd.content.is_empty() {
                // Checked first, over the received bytes (which stay in cache
                // for the copy): a chunk's bytes reach the sink only whole
                // and verified.
                match cd.crc32c {
                    Some(want) if cd.content.crc32c() == want => {}
                    Some(_) => {
                        StreamStats::bump(&self.stats.retry_corrupt);
                        return Err(GcsError::Protocol(format!(
                            "{}: CRC32C mismatch in the chunk at offset {expected}",
                            self.what
                        )));
                    }
                    None => {
                        return Err(GcsError::Protocol(format!(
                            "{}: a chunk without CRC32C at offset {expected}",
                            self.what
                        )))
                    }
                }
                let mut at = a.delivered as usize;
                for part in cd.content.parts() {
                    a.sink.put(at, part);
                    at += part.len();
                }
            }
        }
        a.delivered += content_len;
        self.load.fetch_sub(content_len, Ordering::Relaxed);
        self.in_flight -= content_len;
        self.stats
            .bytes_fetched
            .fetch_add(content_len, Ordering::Relaxed);
        let (delivered, complete) = (a.delivered, d.range_end || a.delivered == a.len);
        if complete {
            self.finish(id, Ok(delivered));
        }
        Ok(content_len > 0)
    }
}

impl Driver {
    /// Opens the call and reads its first response; a server that does not
    /// answer within the stall timeout (frozen, black-holed) is a retryable
    /// failure, so the retry deadline still bounds the wait.
    async fn connect(&mut self) -> Result<(Conn, ObjectInfo), Failure> {
        let limit = self
            .client
            .retry
            .stall_timeout
            .min(self.client.retry.deadline);
        match tokio::time::timeout(limit, self.try_connect()).await {
            Ok(r) => r,
            Err(_) => {
                StreamStats::bump(&self.stats.retry_stall);
                Err(Failure::Retry(GcsError::Unavailable(format!(
                    "{}: no response to the stream open within {limit:?}",
                    self.what
                ))))
            }
        }
    }

    async fn try_connect(&mut self) -> Result<(Conn, ObjectInfo), Failure> {
        StreamStats::bump(&self.stats.streams_opened);
        let spec = BidiReadObjectSpec {
            bucket: format!("projects/_/buckets/{}", self.client.bucket),
            object: self.object.clone(),
            generation: self.generation,
            read_handle: (!self.handle.is_empty()).then(|| BidiReadHandle {
                handle: self.handle.clone(),
            }),
            routing_token: self.routing_token.clone(),
            ..Default::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // One round trip: the open carries every unfinished range (the first
        // read of a new stream, or what a broken stream still owed, from its
        // last verified byte), and the server answers with the metadata and
        // then their data. More than fit one message follow at once.
        let mut pending = self.table.resume();
        let rest = pending.split_off(pending.len().min(MAX_RANGES_PER_MESSAGE));
        let first = BidiReadObjectRequest {
            read_object_spec: Some(spec),
            read_ranges: pending,
        };
        tx.send(first)
            .map_err(|_| Failure::Fatal(GcsError::Other("request channel closed".into())))?;
        let req = self
            .client
            .transport
            .request(
                UnboundedReceiverStream::new(rx),
                &self.client.bucket,
                self.routing_token.as_deref(),
            )
            .await
            .map_err(|e| {
                // No token right now: the credentials' verdict decides. A
                // transient failure (token endpoint hiccup, timeout) is
                // retried within the retry deadline like a broken stream.
                if e.is_retryable() {
                    Failure::Retry(e)
                } else {
                    Failure::Fatal(e)
                }
            })?;
        let (channel, lease) = self.client.transport.stream_channel();
        let mut resp = match wire::bidi_read_object(channel, req, self.client.max_message).await {
            Ok(r) => r,
            Err(st) => return Err(self.classify(&st)),
        };
        let first = match resp.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(Failure::Retry(GcsError::Unavailable(format!(
                    "{}: the stream ended before its first response",
                    self.what
                ))))
            }
            Err(st) => return Err(self.classify(&st)),
        };
        let info = match &first.metadata {
            Some(md) => object_info(md),
            None => {
                return Err(Failure::Retry(GcsError::Protocol(format!(
                    "{}: the first response has no metadata",
                    self.what
                ))))
            }
        };
        if self.generation != 0 && info.generation != self.generation {
            return Err(Failure::Fatal(GcsError::NotFound(format!(
                "{}: generation {} is gone (now {})",
                self.what, self.generation, info.generation
            ))));
        }
        self.generation = info.generation;
        if let Some(h) = first.read_handle.as_ref().filter(|h| !h.handle.is_empty()) {
            self.handle = h.handle.clone();
        }
        let mut conn = Conn {
            tx,
            rx: resp,
            _lease: lease,
        };
        send_ranges(&mut conn, rest).map_err(Failure::Retry)?;
        // The first response may already carry data of the ranges it asked for.
        for d in first.ranges {
            if let Err(e) = self.table.chunk(d) {
                StreamStats::bump(&self.stats.retry_protocol);
                return Err(Failure::Retry(e));
            }
        }
        Ok((conn, info))
    }

    /// Classifies a failed call, taking the handle and token of a redirect.
    fn classify(&mut self, st: &Status) -> Failure {
        if st.code() == Code::Aborted {
            if let Some(r) = redirect_detail(st) {
                if let Some(h) = r.read_handle.filter(|h| !h.handle.is_empty()) {
                    self.handle = h.handle;
                }
                if let Some(t) = r.routing_token.filter(|t| !t.is_empty()) {
                    self.routing_token = Some(t);
                }
                StreamStats::bump(&self.stats.retry_redirect);
                return Failure::Redirect;
            }
        }
        if st.code() == Code::OutOfRange {
            if let Some(e) = range_errors(st) {
                for re in e.read_range_errors {
                    let msg = re.status.map(|s| s.message).unwrap_or_default();
                    let e = GcsError::OutOfRange(format!("{}: {msg}", self.what));
                    self.table.finish(re.read_id, Err(e));
                }
                // The other ranges go on, on a new stream.
                return Failure::Retry(GcsError::Unavailable(format!(
                    "{}: stream ended by a range error",
                    self.what
                )));
            }
        }
        let e = GcsError::from_status(st, &self.what);
        if e.is_retryable() {
            StreamStats::bump(&self.stats.retry_unavailable);
            Failure::Retry(e)
        } else {
            Failure::Fatal(e)
        }
    }

    /// What a redirect counts as when it is the last failure before the retry
    /// deadline.
    fn redirected(&self) -> GcsError {
        GcsError::Unavailable(format!("{}: redirected", self.what))
    }

    /// Fails every range, outstanding or still queued, and stops taking more.
    fn give_up(&mut self, cmds: &mut mpsc::UnboundedReceiver<ReadCmd>, e: &GcsError) {
        tracing::warn!(object = %self.what, error = %e, "read stream failed; its reads fail");
        self.table.fail_all(e);
        cmds.close();
        while let Ok(cmd) = cmds.try_recv() {
            self.queued.fetch_sub(cmd.len, Ordering::Relaxed);
            let _ = cmd.done.send(Err(e.clone()));
        }
    }

    /// Serves until every handle is dropped and nothing is outstanding, or a
    /// permanent failure.
    async fn run(mut self, conn: Conn, mut cmds: mpsc::UnboundedReceiver<ReadCmd>) {
        let mut conn = Some(conn);
        let mut cmds_open = true;
        let mut backoff: Option<Backoff> = None;
        loop {
            let mut c = match conn.take() {
                Some(c) => c,
                None => {
                    if self.table.ranges.is_empty() && !cmds_open {
                        return;
                    }
                    match self.connect().await {
                        Ok((c, _)) => c,
                        Err(Failure::Fatal(e)) => return self.give_up(&mut cmds, &e),
                        Err(f) => {
                            let last = match f {
                                Failure::Retry(e) => e,
                                _ => self.redirected(),
                            };
                            if let Err(e) = continue_after(&mut backoff, &self, &last).await {
                                return self.give_up(&mut cmds, &e);
                            }
                            continue;
                        }
                    }
                }
            };
            match self
                .serve(&mut c, &mut cmds, &mut cmds_open, &mut backoff)
                .await
            {
                Ok(()) => {
                    // Clean close: half-close and let the server end the call.
                    drop(c.tx);
                    let _ = tokio::time::timeout(self.client.retry.stall_timeout, async {
                        while let Ok(Some(_)) = c.rx.message().await {}
                    })
                    .await;
                    return;
                }
                Err(Failure::Fatal(e)) => return self.give_up(&mut cmds, &e),
                // The broken call is cancelled before the backoff, not after:
                // else the server keeps sending into it (up to a whole stream
                // window) while we wait.
                Err(Failure::Redirect) => {
                    drop(c);
                    let last = self.redirected();
                    if let Err(e) = continue_after(&mut backoff, &self, &last).await {
                        return self.give_up(&mut cmds, &e);
                    }
                }
                Err(Failure::Retry(e)) => {
                    drop(c);
                    if let Err(d) = continue_after(&mut backoff, &self, &e).await {
                        return self.give_up(&mut cmds, &d);
                    }
                }
            }
        }
    }

    /// Runs one live call. Ok: nothing outstanding and no handles left.
    async fn serve(
        &mut self,
        c: &mut Conn,
        cmds: &mut mpsc::UnboundedReceiver<ReadCmd>,
        cmds_open: &mut bool,
        backoff: &mut Option<Backoff>,
    ) -> Result<(), Failure> {
        let stall = self.client.retry.stall_timeout;
        let mut last_progress = Instant::now();
        loop {
            if !*cmds_open && self.table.ranges.is_empty() {
                return Ok(());
            }
            let due = self.table.release();
            if !due.is_empty() {
                send_ranges(c, due).map_err(Failure::Retry)?;
            }
            let outstanding = !self.table.ranges.is_empty();
            tokio::select! {
                cmd = cmds.recv(), if *cmds_open => match cmd {
                    Some(cmd) => {
                        if !outstanding {
                            last_progress = Instant::now();
                        }
                        self.queued.fetch_sub(cmd.len, Ordering::Relaxed);
                        let mut batch: Vec<ReadRange> = self.table.add(cmd).into_iter().collect();
                        while let Ok(more) = cmds.try_recv() {
                            self.queued.fetch_sub(more.len, Ordering::Relaxed);
                            batch.extend(self.table.add(more));
                        }
                        send_ranges(c, batch).map_err(Failure::Retry)?;
                    }
                    None => *cmds_open = false,
                },
                msg = c.rx.message() => match msg {
                    Ok(Some(resp)) => {
                        if let Some(h) = resp.read_handle.filter(|h| !h.handle.is_empty()) {
                            self.handle = h.handle;
                        }
                        let mut progressed = false;
                        for d in resp.ranges {
                            match self.table.chunk(d) {
                                Ok(p) => progressed |= p,
                                Err(e) => {
                                    StreamStats::bump(&self.stats.retry_protocol);
                                    tracing::warn!(error = %e, "invalid response; reopening the stream");
                                    return Err(Failure::Retry(e));
                                }
                            }
                        }
                        if progressed {
                            last_progress = Instant::now();
                            *backoff = None;
                            // Let the readers these bytes woke run before the
                            // next chunk is checked and copied: woken from
                            // this task they wait in this worker's LIFO slot,
                            // which no other worker takes, so a first read
                            // waited for every chunk already received behind
                            // its own.
                            tokio::task::yield_now().await;
                        }
                    }
                    Ok(None) => {
                        // The server ended the call. Fine when idle; else reopen.
                        if self.table.ranges.is_empty() && !*cmds_open {
                            return Ok(());
                        }
                        StreamStats::bump(&self.stats.retry_unavailable);
                        return Err(Failure::Retry(GcsError::Unavailable(format!(
                            "{}: the server ended the stream", self.what
                        ))));
                    }
                    Err(st) => return Err(self.classify(&st)),
                },
                _ = tokio::time::sleep_until(last_progress + stall), if outstanding => {
                    StreamStats::bump(&self.stats.retry_stall);
                    return Err(Failure::Retry(GcsError::Unavailable(format!(
                        "{}: no data for {:?}", self.what, stall
                    ))));
                }
            }
        }
    }
}

fn send_ranges(c: &mut Conn, ranges: Vec<ReadRange>) -> Result<(), GcsError> {
    for batch in ranges.chunks(MAX_RANGES_PER_MESSAGE) {
        c.tx.send(BidiReadObjectRequest {
            read_object_spec: None,
            read_ranges: batch.to_vec(),
        })
        .map_err(|_| GcsError::Unavailable("the stream's request side closed".into()))?;
    }
    Ok(())
}

fn redirect_detail(st: &Status) -> Option<BidiReadObjectRedirectedError> {
    wire::status_detail(st, "google.storage.v2.BidiReadObjectRedirectedError")
}

fn range_errors(st: &Status) -> Option<BidiReadObjectError> {
    wire::status_detail(st, "google.storage.v2.BidiReadObjectError")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcs::VecSink;
    use crate::proto::storage::{BidiReadObjectResponse, ChecksummedData, ObjectRangeData};
    use proptest::prelude::*;
    use prost::Message;

    fn truth() -> Vec<u8> {
        (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    struct Reader {
        offset: u64,
        len: u64,
        sink: Arc<VecSink>,
        done: oneshot::Receiver<Result<u64, GcsError>>,
    }

    /// No range has taken more bytes than it asked for.
    fn no_range_overfilled(
        t: &RangeTable,
        readers: &[(i64, Reader)],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        for (id, r) in readers {
            if let Some(a) = t.ranges.get(id) {
                prop_assert!(a.delivered <= r.len);
            }
        }
        Ok(())
    }

    /// Every byte a range reported (done or still in the table) is the
    /// object's own.
    fn sinks_hold_only_true_bytes(
        t: &RangeTable,
        readers: &mut [(i64, Reader)],
        truth: &[u8],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        for (id, r) in readers.iter_mut() {
            let got = r.sink.take();
            let delivered = match r.done.try_recv() {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => t.ranges.get(id).map_or(0, |a| a.delivered),
            };
            prop_assert!(delivered <= r.len);
            let (o, n) = (r.offset as usize, delivered as usize);
            prop_assert_eq!(&got[..n], &truth[o..o + n], "wrong bytes in range {}", id);
        }
        Ok(())
    }

    fn table_with(ranges: &[(u64, u64)]) -> (RangeTable, Vec<(i64, Reader)>) {
        let mut t = RangeTable::new("gs://b/o".into(), Arc::new(StreamStats::default()));
        let mut readers = vec![];
        for &(offset, len) in ranges {
            let sink = VecSink::new(len as usize);
            let (tx, rx) = oneshot::channel();
            let rr = t
                .add(ReadCmd {
                    offset,
                    len,
                    sink: sink.clone(),
                    done: tx,
                })
                .expect("non-empty range");
            readers.push((
                rr.read_id,
                Reader {
                    offset,
                    len,
                    sink,
                    done: rx,
                },
            ));
        }
        (t, readers)
    }

    fn chunk(id: i64, off: u64, data: &[u8], crc: Option<u32>, end: bool) -> RangeData {
        raw_chunk(id, off, data, crc, end).into()
    }

    fn raw_chunk(id: i64, off: u64, data: &[u8], crc: Option<u32>, end: bool) -> ObjectRangeData {
        ObjectRangeData {
            checksummed_data: Some(ChecksummedData {
                content: Bytes::copy_from_slice(data),
                crc32c: crc,
            }),
            read_range: Some(ReadRange {
                read_offset: off as i64,
                read_length: data.len() as i64,
                read_id: id,
            }),
            range_end: end,
        }
    }

    /// What an adversarial server may do with one chunk.
    #[derive(Debug, Clone)]
    enum Move {
        Good { pick: usize, len: u64, end: bool },
        Shift { pick: usize, delta: i64, len: u64 },
        Corrupt { pick: usize, len: u64 },
        BadCrc { pick: usize, len: u64 },
        NoCrc { pick: usize, len: u64 },
        UnknownId { len: u64 },
        NoRange,
    }

    fn moves() -> impl Strategy<Value = Move> {
        prop_oneof![
            6 => (0usize..4, 0u64..3000, any::<bool>()).prop_map(|(pick, len, end)| Move::Good { pick, len, end }),
            1 => (0usize..4, -50i64..50, 1u64..100).prop_map(|(pick, delta, len)| Move::Shift { pick, delta, len }),
            1 => (0usize..4, 1u64..500).prop_map(|(pick, len)| Move::Corrupt { pick, len }),
            1 => (0usize..4, 1u64..500).prop_map(|(pick, len)| Move::BadCrc { pick, len }),
            1 => (0usize..4, 1u64..500).prop_map(|(pick, len)| Move::NoCrc { pick, len }),
            1 => (1u64..100).prop_map(|len| Move::UnknownId { len }),
            1 => Just(Move::NoRange),
        ]
    }

    /// One step of a wire-level adversary: the next honest response, possibly
    /// mutated at the byte level after encoding, or a chunk with wild fields.
    #[derive(Debug, Clone)]
    enum Wire {
        Honest {
            len: u64,
            /// (position, byte, kind): flip, truncate, insert or delete.
            mutation: Option<(prop::sample::Index, u8, u8)>,
        },
        Wild {
            read_id: i64,
            read_offset: i64,
            read_length: i64,
            crc: Option<u32>,
            len: usize,
            end: bool,
        },
    }

    fn wire() -> impl Strategy<Value = Wire> {
        let edge = || {
            prop_oneof![
                any::<i64>(),
                Just(i64::MAX),
                Just(i64::MIN),
                Just(-1i64),
                0i64..20_000
            ]
        };
        prop_oneof![
            6 => (1u64..3000, proptest::option::weighted(0.5, (any::<prop::sample::Index>(), any::<u8>(), 0u8..4)))
                .prop_map(|(len, mutation)| Wire::Honest { len, mutation }),
            1 => (prop_oneof![any::<i64>(), 0i64..6], edge(), edge(), proptest::option::of(any::<u32>()), 0usize..3000, any::<bool>())
                .prop_map(|(read_id, read_offset, read_length, crc, len, end)| Wire::Wild { read_id, read_offset, read_length, crc, len, end }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

        /// Responses as they come off the wire: honest ones encoded, then
        /// mutated byte by byte (bit flips, truncation, inserted and deleted
        /// bytes) and decoded by prost, mixed with chunks whose ids, offsets,
        /// lengths and checksums are anything (i64 extremes included). Decoding
        /// and the table never panic, and no byte that is not the object's
        /// reaches a sink.
        #[test]
        fn proptest_mutated_wire_responses_never_yield_wrong_bytes(
            specs in proptest::collection::vec((0u64..19_000, 1u64..4000), 1..4),
            steps in proptest::collection::vec(wire(), 1..80),
        ) {
            let truth = truth();
            let specs: Vec<(u64, u64)> = specs
                .into_iter()
                .map(|(o, l)| (o, l.min(truth.len() as u64 - o)))
                .collect();
            let (mut t, mut readers) = table_with(&specs);
            for (i, step) in steps.into_iter().enumerate() {
                let d = match step {
                    Wire::Honest { len, mutation } => {
                        let mut live: Vec<i64> = t.ranges.keys().copied().collect();
                        if live.is_empty() {
                            break;
                        }
                        live.sort_unstable();
                        let id = live[i % live.len()];
                        let a = &t.ranges[&id];
                        let next = a.offset + a.delivered;
                        let len = len.min(a.len - a.delivered);
                        let data = &truth[next as usize..(next + len) as usize];
                        let end = a.delivered + len == a.len;
                        let resp = BidiReadObjectResponse {
                            object_data_ranges: vec![raw_chunk(id, next, data, Some(crc32c::crc32c(data)), end)],
                            ..Default::default()
                        };
                        let mut buf = resp.encode_to_vec();
                        if let Some((at, byte, kind)) = mutation {
                            let at = at.index(buf.len());
                            match kind {
                                0 => buf[at] ^= byte | 1,
                                1 => buf.truncate(at),
                                2 => buf.insert(at, byte),
                                _ => {
                                    buf.remove(at);
                                }
                            }
                        }
                        // Decoded as the stream decodes what it receives.
                        match wire::decode_response(&wire::Rope::from(Bytes::from(buf))) {
                            Ok(r) => r.ranges,
                            Err(_) => {
                                // A stream error: the stream is reopened.
                                let _ = t.resume();
                                continue;
                            }
                        }
                    }
                    Wire::Wild { read_id, read_offset, read_length, crc, len, end } => {
                        // The object's bytes where the offset is inside it, else
                        // bytes that are not (and do not match `crc`, whatever it is).
                        let data = match usize::try_from(read_offset) {
                            Ok(o) if o < truth.len() => truth[o..(o + len).min(truth.len())].to_vec(),
                            _ => vec![0xA5; len],
                        };
                        vec![ObjectRangeData {
                            checksummed_data: Some(ChecksummedData { content: Bytes::from(data), crc32c: crc }),
                            read_range: Some(ReadRange { read_offset, read_length, read_id }),
                            range_end: end,
                        }.into()]
                    }
                };
                for d in d {
                    if t.chunk(d).is_err() {
                        let _ = t.resume();
                    }
                }
                no_range_overfilled(&t, &readers)?;
            }
            sinks_hold_only_true_bytes(&t, &mut readers, &truth)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

        /// Whatever the server sends, the table never panics, never lets a byte
        /// that is not the object's into a sink, and never completes a range with
        /// more bytes than asked.
        #[test]
        fn adversarial_responses_never_yield_wrong_bytes(
            specs in proptest::collection::vec((0u64..19_000, 1u64..4000), 1..4),
            script in proptest::collection::vec(moves(), 0..60),
        ) {
            let truth = truth();
            let specs: Vec<(u64, u64)> = specs
                .into_iter()
                .map(|(o, l)| (o, l.min(truth.len() as u64 - o)))
                .filter(|(_, l)| *l > 0)
                .collect();
            prop_assume!(!specs.is_empty());
            let (mut t, mut readers) = table_with(&specs);
            let mut errors = 0;
            for m in script {
                let live: Vec<(i64, u64, u64)> = readers
                    .iter()
                    .filter_map(|(id, r)| t.ranges.get(id).map(|a| (*id, r.offset + a.delivered, r.offset + r.len)))
                    .collect();
                let pick = |p: usize| live.get(p % live.len().max(1)).copied();
                let slice = |from: u64, len: u64| {
                    let to = (from + len).min(truth.len() as u64);
                    truth[from.min(to) as usize..to as usize].to_vec()
                };
                let d = match m {
                    Move::Good { pick: p, len, end } => {
                        let Some((id, next, stop)) = pick(p) else { continue };
                        let data = slice(next, len.min(stop - next));
                        let crc = crc32c::crc32c(&data);
                        chunk(id, next, &data, Some(crc), end)
                    }
                    Move::Shift { pick: p, delta, len } => {
                        let Some((id, next, _)) = pick(p) else { continue };
                        let at = (next as i64 + delta).max(0) as u64;
                        let data = slice(at, len);
                        chunk(id, at, &data, Some(crc32c::crc32c(&data)), false)
                    }
                    Move::Corrupt { pick: p, len } => {
                        let Some((id, next, stop)) = pick(p) else { continue };
                        let mut data = slice(next, len.min(stop - next));
                        let crc = crc32c::crc32c(&data);
                        if let Some(b) = data.first_mut() { *b ^= 1; }
                        chunk(id, next, &data, Some(crc), false)
                    }
                    Move::BadCrc { pick: p, len } => {
                        let Some((id, next, stop)) = pick(p) else { continue };
                        let data = slice(next, len.min(stop - next));
                        chunk(id, next, &data, Some(crc32c::crc32c(&data) ^ 0xdead), false)
                    }
                    Move::NoCrc { pick: p, len } => {
                        let Some((id, next, stop)) = pick(p) else { continue };
                        let data = slice(next, len.min(stop - next));
                        chunk(id, next, &data, None, false)
                    }
                    Move::UnknownId { len } => chunk(9_999, 0, &slice(0, len), None, false),
                    Move::NoRange => ObjectRangeData { checksummed_data: None, read_range: None, range_end: true }.into(),
                };
                if t.chunk(d).is_err() {
                    errors += 1;
                    // As after a reconnect: the same table resumes.
                    let _ = t.resume();
                }
                no_range_overfilled(&t, &readers)?;
            }
            let _ = errors;
            sinks_hold_only_true_bytes(&t, &mut readers, &truth)?;
        }

        /// A well-behaved server, chunking and interleaving at random, completes
        /// every range with exactly the object's bytes.
        #[test]
        fn honest_interleaved_responses_complete_exactly(
            specs in proptest::collection::vec((0u64..19_000, 1u64..4000), 1..6),
            sizes in proptest::collection::vec(1u64..1500, 1..200),
            order in proptest::collection::vec(0usize..6, 1..200),
        ) {
            let truth = truth();
            let specs: Vec<(u64, u64)> = specs
                .into_iter()
                .map(|(o, l)| (o, l.min(truth.len() as u64 - o)))
                .collect();
            let (mut t, mut readers) = table_with(&specs);
            let mut i = 0;
            while !t.ranges.is_empty() {
                let live: Vec<i64> = t.ranges.keys().copied().collect();
                let mut sorted = live.clone();
                sorted.sort_unstable();
                let id = sorted[order[i % order.len()] % sorted.len()];
                let a = &t.ranges[&id];
                let next = a.offset + a.delivered;
                let len = sizes[i % sizes.len()].min(a.len - a.delivered);
                let end = a.delivered + len == a.len;
                let data = truth[next as usize..(next + len) as usize].to_vec();
                let crc = crc32c::crc32c(&data);
                prop_assert!(t.chunk(chunk(id, next, &data, Some(crc), end)).is_ok());
                i += 1;
            }
            for (_, r) in readers.iter_mut() {
                prop_assert_eq!(r.done.try_recv().ok().and_then(|x| x.ok()), Some(r.len));
                let (o, n) = (r.offset as usize, r.len as usize);
                prop_assert_eq!(r.sink.take(), truth[o..o + n].to_vec());
            }
            prop_assert_eq!(t.load.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn abandoned_range_releases_its_sink() {
        let (mut t, mut readers) = table_with(&[(0, 100)]);
        let (id, r) = readers.remove(0);
        let weak = Arc::downgrade(&r.sink);
        drop(r);
        let data = truth()[..10].to_vec();
        let crc = crc32c::crc32c(&data);
        assert!(t.chunk(chunk(id, 0, &data, Some(crc), false)).is_ok());
        assert!(t.ranges.is_empty());
        assert!(weak.upgrade().is_none(), "sink released");
        // Late chunks of the abandoned range are ignored, not errors.
        let more = truth()[10..20].to_vec();
        let crc = crc32c::crc32c(&more);
        assert!(t.chunk(chunk(id, 10, &more, Some(crc), true)).is_ok());
        assert_eq!(t.load.load(Ordering::Relaxed), 0);
    }

    /// Adds a range to `t`; returns its request if it went at once.
    fn add_one(t: &mut RangeTable, offset: u64, len: u64) -> (Option<ReadRange>, Reader) {
        let sink = VecSink::new(len as usize);
        let (tx, rx) = oneshot::channel();
        let rr = t.add(ReadCmd {
            offset,
            len,
            sink: sink.clone(),
            done: tx,
        });
        let r = Reader {
            offset,
            len,
            sink,
            done: rx,
        };
        (rr, r)
    }

    /// Delivers `len` true bytes of range `id` from `off`.
    fn deliver(t: &mut RangeTable, id: i64, off: u64, len: u64) {
        let data = truth()[off as usize..(off + len) as usize].to_vec();
        let crc = crc32c::crc32c(&data);
        t.chunk(chunk(id, off, &data, Some(crc), false))
            .expect("a true chunk");
    }

    /// A large range waits until what was sent owes at most `send_ahead`
    /// bytes, then goes (oldest first); a small one goes at once; a reopen
    /// re-requests only what was sent; a held range whose caller left is
    /// never sent; data for a held range is refused.
    #[test]
    fn large_ranges_wait_for_the_stream_to_near_its_end() {
        let mut t = RangeTable::new("gs://b/o".into(), Arc::new(StreamStats::default()));
        t.send_ahead = 1000;
        let (a, _ra) = add_one(&mut t, 0, 4000);
        let a = a.expect("an idle stream sends at once");
        let (b, rb) = add_one(&mut t, 4000, 4000);
        assert!(b.is_none(), "held behind 4000 owed bytes");
        let (c, _rc) = add_one(&mut t, 8000, 4000);
        assert!(c.is_none());
        let (small, _rs) = add_one(&mut t, 12_000, 500);
        assert!(small.is_some(), "a small range goes at once");
        assert!(t.release().is_empty(), "4500 owed");
        // Data for a held range: the server was never asked for it.
        let held_id = a.read_id + 1;
        let data = truth()[4000..4100].to_vec();
        let crc = crc32c::crc32c(&data);
        assert!(t
            .chunk(chunk(held_id, 4000, &data, Some(crc), false))
            .is_err());
        // A reopen asks again for what was sent only.
        let resumed: Vec<i64> = t.resume().iter().map(|r| r.read_id).collect();
        assert_eq!(resumed, vec![a.read_id, a.read_id + 3]);
        deliver(&mut t, a.read_id, 0, 3000);
        assert!(t.release().is_empty(), "1500 owed");
        deliver(&mut t, a.read_id + 3, 12_000, 500);
        let sent = t.release();
        assert_eq!(sent.len(), 1, "1000 owed: the oldest held goes");
        assert_eq!(sent[0].read_id, held_id);
        assert_eq!(sent[0].read_offset, 4000);
        // The third's caller leaves while it waits: it is never asked for.
        drop(_rc);
        deliver(&mut t, a.read_id, 3000, 1000);
        deliver(&mut t, held_id, 4000, 4000);
        assert!(t.release().is_empty(), "the abandoned range is not sent");
        assert!(t.ranges.is_empty());
        assert_eq!(t.in_flight, 0);
        assert_eq!(t.load.load(Ordering::Relaxed), 0);
        let mut rb = rb;
        assert_eq!(rb.done.try_recv().expect("done").expect("ok"), 4000);
        assert!(rb.sink.take() == truth()[4000..8000]);
    }
}
