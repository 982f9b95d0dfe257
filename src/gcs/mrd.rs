//! One multi-range download (MRD) stream: a `BidiReadObject` call that carries
//! many concurrent range reads of one object generation.
//!
//! [`MrdStream::open`] sends the `read_object_spec`, waits for the first response
//! (metadata and read handle) and pins the generation. A spawned driver task then
//! owns the call: [`MrdStream::read`] hands it a range and a [`RangeSink`]; the
//! driver gives the range a `read_id`, requests it, and for every chunk that
//! arrives checks the read_id, that the chunk starts exactly at the range's next
//! byte (no gap, no overlap), that it does not run past the range, and its CRC32C,
//! before it writes the bytes straight into the sink at their offset. `range_end`
//! (or the last requested byte) completes the range.
//!
//! When the stream breaks (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED,
//! RESOURCE_EXHAUSTED, ABORTED, a CRC mismatch, an invalid response, or no data
//! for `stall_timeout` while ranges are outstanding), the driver reopens it with
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
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status, Streaming};

use super::client::{object_info, GcsClient};
use super::retry::Backoff;
use super::{GcsError, ObjectInfo, RangeSink};
use crate::proto::storage::{
    BidiReadHandle, BidiReadObjectError, BidiReadObjectRedirectedError, BidiReadObjectRequest,
    BidiReadObjectResponse, BidiReadObjectSpec, ObjectRangeData, ReadRange,
};
use crate::proto::RpcStatus;

/// Most ranges sent in one request message (as the official clients do).
const MAX_RANGES_PER_MESSAGE: usize = 100;

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
        let mut driver = Driver {
            client: client.clone(),
            what: format!("gs://{}/{object}", client.bucket),
            object: object.to_string(),
            generation,
            handle: handle.unwrap_or_default(),
            routing_token: None,
            ranges: HashMap::new(),
            abandoned: HashSet::new(),
            next_id: 1,
            load: Arc::new(AtomicU64::new(0)),
            stats,
        };
        let mut backoff: Option<Backoff> = None;
        let (conn, info) = loop {
            match driver.connect().await {
                Ok(ok) => break ok,
                Err(Failure::Redirect) => continue_after(&mut backoff, &driver, "redirect").await?,
                Err(Failure::Retry(e)) => continue_after(&mut backoff, &driver, &e.to_string())
                    .await
                    .map_err(|d| with_last(d, &e))?,
                Err(Failure::Fatal(e)) => return Err(e),
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let stream = MrdStream {
            tx,
            load: driver.load.clone(),
            closed: closed.clone(),
            handle: driver.handle.clone(),
            info,
        };
        tokio::spawn(async move {
            driver.run(conn, rx).await;
            closed.store(true, Ordering::Release);
        });
        Ok(stream)
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
        self.load.load(Ordering::Relaxed)
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
        self.tx
            .send(ReadCmd {
                offset,
                len,
                sink,
                done,
            })
            .map_err(|_| GcsError::Unavailable("the stream is closed".into()))?;
        rx.await.map_err(|_| {
            GcsError::Unavailable("the stream closed before the range completed".into())
        })?
    }
}

async fn continue_after(
    backoff: &mut Option<Backoff>,
    driver: &Driver,
    why: &str,
) -> Result<(), GcsError> {
    let b = backoff.get_or_insert_with(|| Backoff::new(&driver.client.retry));
    match b.next_delay() {
        Some(d) => {
            tracing::debug!(object = %driver.what, why, attempt = b.attempts(), "reopening stream");
            tokio::time::sleep(d).await;
            Ok(())
        }
        None => Err(GcsError::RetryDeadline {
            attempts: b.attempts(),
            secs: b.elapsed().as_secs_f64(),
            last: why.to_string(),
        }),
    }
}

fn with_last(e: GcsError, last: &GcsError) -> GcsError {
    match e {
        GcsError::RetryDeadline { attempts, secs, .. } => GcsError::RetryDeadline {
            attempts,
            secs,
            last: last.to_string(),
        },
        other => other,
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
    sink: Arc<dyn RangeSink>,
    done: oneshot::Sender<Result<u64, GcsError>>,
}

/// A live call: where to send requests, where responses come from.
struct Conn {
    tx: mpsc::UnboundedSender<BidiReadObjectRequest>,
    rx: Streaming<BidiReadObjectResponse>,
}

struct Driver {
    client: GcsClient,
    what: String,
    object: String,
    /// Pinned after the first response.
    generation: i64,
    handle: Bytes,
    routing_token: Option<String>,
    ranges: HashMap<i64, Active>,
    /// Ranges completed or given up whose late chunks are ignored.
    abandoned: HashSet<i64>,
    next_id: i64,
    load: Arc<AtomicU64>,
    stats: Arc<StreamStats>,
}

impl Driver {
    /// Opens the call and reads its first response.
    async fn connect(&mut self) -> Result<(Conn, ObjectInfo), Failure> {
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
        let first = BidiReadObjectRequest {
            read_object_spec: Some(spec),
            read_ranges: vec![],
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
            .map_err(Failure::Fatal)?;
        let mut resp = match self.client.storage().bidi_read_object(req).await {
            Ok(r) => r.into_inner(),
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
        let mut conn = Conn { tx, rx: resp };
        if !first.object_data_ranges.is_empty() {
            // No ranges were requested yet: data here is a server error.
            return Err(Failure::Retry(GcsError::Protocol(format!(
                "{}: data before any range was requested",
                self.what
            ))));
        }
        // Re-request what is unfinished, from the last verified byte.
        let pending: Vec<ReadRange> = self
            .ranges
            .iter()
            .map(|(id, a)| ReadRange {
                read_offset: (a.offset + a.delivered) as i64,
                read_length: (a.len - a.delivered) as i64,
                read_id: *id,
            })
            .collect();
        self.abandoned.clear();
        send_ranges(&mut conn, pending).map_err(Failure::Retry)?;
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
                    if let Some(a) = self.ranges.remove(&re.read_id) {
                        self.load.fetch_sub(a.len - a.delivered, Ordering::Relaxed);
                        let msg = re.status.map(|s| s.message).unwrap_or_default();
                        let _ = a.done.send(Err(GcsError::OutOfRange(format!(
                            "{} at offset {}: {msg}",
                            self.what, a.offset
                        ))));
                    }
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

    /// Registers a new range and returns its request.
    fn add(&mut self, cmd: ReadCmd) -> Option<ReadRange> {
        if cmd.len == 0 {
            let _ = cmd.done.send(Ok(0));
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.load.fetch_add(cmd.len, Ordering::Relaxed);
        self.ranges.insert(
            id,
            Active {
                offset: cmd.offset,
                len: cmd.len,
                delivered: 0,
                sink: cmd.sink,
                done: cmd.done,
            },
        );
        Some(ReadRange {
            read_offset: cmd.offset as i64,
            read_length: cmd.len as i64,
            read_id: id,
        })
    }

    fn finish(&mut self, id: i64, result: Result<u64, GcsError>) {
        if let Some(a) = self.ranges.remove(&id) {
            self.load.fetch_sub(a.len - a.delivered, Ordering::Relaxed);
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
    fn chunk(&mut self, d: ObjectRangeData) -> Result<bool, GcsError> {
        let rr = d.read_range.ok_or_else(|| {
            GcsError::Protocol(format!("{}: a chunk without read_range", self.what))
        })?;
        let id = rr.read_id;
        let content = d.checksummed_data.as_ref().map(|c| &c.content);
        let content_len = content.map_or(0, |c| c.len()) as u64;
        let Some(a) = self.ranges.get_mut(&id) else {
            if self.abandoned.contains(&id) {
                return Ok(false);
            }
            return Err(GcsError::Protocol(format!(
                "{}: data for unknown read_id {id}",
                self.what
            )));
        };
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
        if let Some(cd) = &d.checksummed_data {
            if !cd.content.is_empty() {
                match cd.crc32c {
                    Some(want) if crc32c::crc32c(&cd.content) == want => {}
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
                a.sink.put(a.delivered as usize, &cd.content);
            }
        }
        a.delivered += content_len;
        self.load.fetch_sub(content_len, Ordering::Relaxed);
        self.stats
            .bytes_fetched
            .fetch_add(content_len, Ordering::Relaxed);
        let (delivered, complete) = (a.delivered, d.range_end || a.delivered == a.len);
        if complete {
            self.finish(id, Ok(delivered));
        }
        Ok(content_len > 0)
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
                    if self.ranges.is_empty() && !cmds_open {
                        return;
                    }
                    match self.connect().await {
                        Ok((c, _)) => c,
                        Err(Failure::Fatal(e)) => {
                            self.fail_all(&e);
                            return;
                        }
                        Err(f) => {
                            let why = match &f {
                                Failure::Retry(e) => e.to_string(),
                                _ => "redirected".to_string(),
                            };
                            if let Err(e) = continue_after(&mut backoff, &self, &why).await {
                                self.fail_all(&e);
                                return;
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
                Err(Failure::Fatal(e)) => {
                    self.fail_all(&e);
                    return;
                }
                Err(Failure::Redirect) => {
                    if let Err(e) = continue_after(&mut backoff, &self, "redirected").await {
                        self.fail_all(&e);
                        return;
                    }
                }
                Err(Failure::Retry(e)) => {
                    if let Err(d) = continue_after(&mut backoff, &self, &e.to_string()).await {
                        self.fail_all(&with_last(d, &e));
                        return;
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
            if !*cmds_open && self.ranges.is_empty() {
                return Ok(());
            }
            let outstanding = !self.ranges.is_empty();
            tokio::select! {
                cmd = cmds.recv(), if *cmds_open => match cmd {
                    Some(cmd) => {
                        if !outstanding {
                            last_progress = Instant::now();
                        }
                        let mut batch: Vec<ReadRange> = self.add(cmd).into_iter().collect();
                        while let Ok(more) = cmds.try_recv() {
                            batch.extend(self.add(more));
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
                        for d in resp.object_data_ranges {
                            match self.chunk(d) {
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
                        }
                    }
                    Ok(None) => {
                        // The server ended the call. Fine when idle; else reopen.
                        if self.ranges.is_empty() && !*cmds_open {
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

fn details(st: &Status) -> Option<RpcStatus> {
    RpcStatus::decode(st.details()).ok()
}

fn redirect_detail(st: &Status) -> Option<BidiReadObjectRedirectedError> {
    details(st)?.details.into_iter().find_map(|a| {
        a.type_url
            .ends_with("google.storage.v2.BidiReadObjectRedirectedError")
            .then(|| BidiReadObjectRedirectedError::decode(a.value.as_slice()).ok())
            .flatten()
    })
}

fn range_errors(st: &Status) -> Option<BidiReadObjectError> {
    details(st)?.details.into_iter().find_map(|a| {
        a.type_url
            .ends_with("google.storage.v2.BidiReadObjectError")
            .then(|| BidiReadObjectError::decode(a.value.as_slice()).ok())
            .flatten()
    })
}
