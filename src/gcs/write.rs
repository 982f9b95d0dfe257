//! Appendable writes: one object written over one `BidiWriteObject` stream.
//!
//! An [`AppendableWriter`] creates an appendable object (or takes over an
//! unfinalized one) and streams bytes to it in chunks of at most 2 MiB, each
//! with its CRC32C. Every `flush_every` bytes it asks the service to persist
//! (`flush` + `state_lookup`) without waiting for the answer: it reads the
//! previous answer before asking again, so at most two flush intervals of
//! bytes are held. Bytes stay held until an answer says they are persisted:
//! only persisted bytes survive a broken stream.
//!
//! When the stream breaks, stalls (no progress within the stall timeout) or is
//! redirected, the writer reopens by takeover (`append_object_spec` with the
//! generation, write handle and routing token), learns the persisted size from
//! the answer and sends again exactly the held bytes after it: no byte lost,
//! none written twice. A persisted size below what was already acknowledged,
//! or beyond what was sent, is data loss or another writer, never retried.
//! Retries back off within the retry deadline, which restarts whenever bytes
//! are persisted. [`AppendableWriter::finalize`] sends `finish_write` with the
//! whole object's CRC32C (for a takeover, the service's checksum of the
//! bytes that were there, combined with ours).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::client::{object_info, GcsClient};
use super::retry::Backoff;
use super::wire::{self, status_detail, WriteResponseStream};
use super::{GcsError, ObjectInfo};
use crate::proto::storage::bidi_write_object_request::{Data, FirstMessage};
use crate::proto::storage::bidi_write_object_response::WriteStatus;
use crate::proto::storage::{
    AppendObjectSpec, BidiWriteHandle, BidiWriteObjectRedirectedError, BidiWriteObjectRequest,
    BidiWriteObjectResponse, ChecksummedData, Object, ObjectChecksums, WriteObjectSpec,
};

/// Largest chunk of one write request.
pub const MAX_CHUNK: usize = 2 << 20;

/// Bytes between flushes unless told otherwise (as the official clients).
pub const DEFAULT_FLUSH_EVERY: u64 = 16 << 20;

/// How a writer writes.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Ask the service to persist every this many bytes.
    pub flush_every: u64,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            flush_every: DEFAULT_FLUSH_EVERY,
        }
    }
}

/// What a writer did, for tools and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Flushes asked for.
    pub flushes: u64,
    /// Streams reopened by takeover after a failure or redirect.
    pub reopens: u64,
    /// Bytes sent again after a reopen (sent before, not persisted then).
    pub resent: u64,
}

/// The CRC32C of A then B from those of A and B (`len`: B's length). A whole
/// chunk's shift is one linear map, computed once: 32 conditional XORs per
/// chunk instead of the general combine's matrix squarings (which cost about
/// 2% of a write's CPU).
fn combine(a: u32, b: u32, len: usize) -> u32 {
    static CHUNK_SHIFT: std::sync::OnceLock<[u32; 32]> = std::sync::OnceLock::new();
    if len != MAX_CHUNK {
        return crc32c::crc32c_combine(a, b, len);
    }
    let cols = CHUNK_SHIFT
        .get_or_init(|| std::array::from_fn(|i| crc32c::crc32c_combine(1 << i, 0, MAX_CHUNK)));
    let mut shifted = 0;
    for (i, col) in cols.iter().enumerate() {
        if a & (1 << i) != 0 {
            shifted ^= col;
        }
    }
    shifted ^ b
}

/// A failed stream: the error, and where a redirect says to go.
struct Failed {
    err: GcsError,
    redirect: Option<BidiWriteObjectRedirectedError>,
}

impl Failed {
    fn status(st: &Status, what: &str) -> Failed {
        Failed {
            err: GcsError::from_status(st, what),
            redirect: status_detail(st, "google.storage.v2.BidiWriteObjectRedirectedError"),
        }
    }

    fn unavailable(msg: String) -> Failed {
        GcsError::Unavailable(msg).into()
    }
}

impl From<GcsError> for Failed {
    fn from(err: GcsError) -> Self {
        Failed {
            err,
            redirect: None,
        }
    }
}

struct Stream {
    tx: mpsc::Sender<BidiWriteObjectRequest>,
    rx: WriteResponseStream,
}

/// Writes one appendable object (see the module doc).
pub struct AppendableWriter {
    client: GcsClient,
    name: String,
    what: String,
    opts: WriteOptions,
    /// Create preconditions, until the object exists.
    if_generation_match: Option<i64>,
    /// 0 until the object is created.
    generation: i64,
    handle: Option<BidiWriteHandle>,
    token: Option<String>,
    stream: Option<Stream>,
    /// Has a stream been opened (the object's starting size known)?
    started: bool,
    /// Bytes the service said are persisted.
    persisted: u64,
    /// Bytes sent (persisted or held).
    sent: u64,
    /// CRC32C of the object's bytes up to `sent`, when known.
    crc: Option<u32>,
    /// The bytes from `persisted` to `sent`, as sent: each chunk and its CRC32C.
    held: VecDeque<(Bytes, u32)>,
    since_flush: u64,
    /// A state lookup whose answer has not been read.
    lookup_pending: bool,
    /// Backoff of the current run of failures, and the persisted size when it
    /// began (progress starts a new one).
    backoff: Option<(Backoff, u64)>,
    stats: WriteStats,
}

fn data_request(offset: u64, content: Bytes, crc: u32) -> BidiWriteObjectRequest {
    BidiWriteObjectRequest {
        write_offset: offset as i64,
        data: Some(Data::ChecksummedData(ChecksummedData {
            content,
            crc32c: Some(crc),
        })),
        ..Default::default()
    }
}

fn lookup_request(flush: bool) -> BidiWriteObjectRequest {
    BidiWriteObjectRequest {
        flush,
        state_lookup: true,
        ..Default::default()
    }
}

impl AppendableWriter {
    fn new(client: &GcsClient, name: &str, opts: WriteOptions) -> AppendableWriter {
        AppendableWriter {
            client: client.clone(),
            name: name.to_string(),
            what: format!("gs://{}/{name}", client.bucket()),
            opts,
            if_generation_match: None,
            generation: 0,
            handle: None,
            token: None,
            stream: None,
            started: false,
            persisted: 0,
            sent: 0,
            crc: Some(0),
            held: VecDeque::new(),
            since_flush: 0,
            lookup_pending: false,
            backoff: None,
            stats: WriteStats::default(),
        }
    }

    /// Creates a new appendable object (a new generation), empty.
    /// `if_generation_match`: Some(0) refuses to replace an existing object,
    /// Some(g) replaces only generation g.
    pub async fn create(
        client: &GcsClient,
        name: &str,
        if_generation_match: Option<i64>,
        opts: WriteOptions,
    ) -> Result<AppendableWriter, GcsError> {
        let mut w = AppendableWriter::new(client, name, opts);
        w.if_generation_match = if_generation_match;
        w.start().await?;
        Ok(w)
    }

    /// Takes over an unfinalized object to append to it: `generation`, or the
    /// live one. A finalized object cannot be appended to.
    pub async fn append(
        client: &GcsClient,
        name: &str,
        generation: Option<i64>,
        opts: WriteOptions,
    ) -> Result<AppendableWriter, GcsError> {
        let generation = match generation {
            Some(g) => g,
            None => {
                let info = client.stat(name).await?;
                if info.finalized {
                    return Err(GcsError::PreconditionFailed(format!(
                        "gs://{}/{name} is finalized: it cannot be appended to",
                        client.bucket()
                    )));
                }
                info.generation
            }
        };
        let mut w = AppendableWriter::new(client, name, opts);
        w.generation = generation;
        w.crc = None;
        w.start().await?;
        // The checksum of the bytes already there, to finalize with the
        // whole object's.
        if w.sent > 0 {
            if let Some(crc) = w.lookup_checksum().await? {
                w.crc = Some(crc);
            }
        } else {
            w.crc = Some(0);
        }
        Ok(w)
    }

    async fn start(&mut self) -> Result<(), GcsError> {
        if let Err(f) = self.reopen().await {
            self.recover(f).await?;
        }
        Ok(())
    }

    /// The object's generation.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// Bytes the service has persisted, as far as the writer knows.
    pub fn persisted(&self) -> u64 {
        self.persisted
    }

    /// Bytes written (the object's size once they are persisted).
    pub fn written(&self) -> u64 {
        self.sent
    }

    pub fn stats(&self) -> WriteStats {
        self.stats
    }

    fn stall(&self) -> Duration {
        self.client.retry.stall_timeout
    }

    fn first_message(&self) -> FirstMessage {
        if self.generation == 0 {
            FirstMessage::WriteObjectSpec(WriteObjectSpec {
                resource: Some(Object {
                    name: self.name.clone(),
                    bucket: format!("projects/_/buckets/{}", self.client.bucket()),
                    ..Default::default()
                }),
                if_generation_match: self.if_generation_match,
                appendable: Some(true),
                ..Default::default()
            })
        } else {
            FirstMessage::AppendObjectSpec(AppendObjectSpec {
                bucket: format!("projects/_/buckets/{}", self.client.bucket()),
                object: self.name.clone(),
                generation: self.generation,
                routing_token: self.token.clone(),
                write_handle: self.handle.clone(),
                ..Default::default()
            })
        }
    }

    /// Opens a stream (create or takeover), learns the persisted size and
    /// sends the held bytes after it again.
    async fn reopen(&mut self) -> Result<(), Failed> {
        self.stream = None;
        self.lookup_pending = false;
        let (tx, rx) = mpsc::channel(8);
        let first = BidiWriteObjectRequest {
            first_message: Some(self.first_message()),
            ..Default::default()
        };
        let _ = tx.send(first).await;
        let req = self
            .client
            .transport
            .request(
                ReceiverStream::new(rx),
                self.client.bucket(),
                self.token.as_deref(),
            )
            .await?;
        let what = self.what.clone();
        let opening = async {
            let channel = self.client.transport.channel();
            let mut rx = wire::bidi_write_object(channel, req, self.client.max_message)
                .await
                .map_err(|st| Failed::status(&st, &what))?;
            let answer = rx
                .message()
                .await
                .map_err(|st| Failed::status(&st, &what))?
                .ok_or_else(|| {
                    Failed::unavailable(format!("{what}: the write stream ended at its open"))
                })?;
            Ok::<_, Failed>((rx, answer))
        };
        let (rx, answer) = tokio::time::timeout(self.stall(), opening)
            .await
            .map_err(|_| Failed::unavailable(format!("{what}: no answer to the open")))??;
        self.token = None;
        if let Some(h) = answer.write_handle {
            self.handle = Some(h);
        }
        let size = match answer.write_status {
            Some(WriteStatus::Resource(o)) => {
                if self.generation == 0 {
                    self.generation = o.generation;
                }
                if o.finalize_time.is_some() {
                    return Err(GcsError::PreconditionFailed(format!(
                        "{what} is finalized: it cannot be appended to"
                    ))
                    .into());
                }
                o.size.max(0) as u64
            }
            Some(WriteStatus::PersistedSize(n)) => n.max(0) as u64,
            None => {
                return Err(GcsError::Protocol(format!(
                    "{what}: the open was answered without the object or its size"
                ))
                .into())
            }
        };
        self.stream = Some(Stream { tx, rx });
        self.resume_at(size)?;
        // The held bytes again, flushed as they go like any others (a long
        // resend must not depend on the stream lasting to its end).
        let mut offset = self.persisted;
        self.since_flush = 0;
        let resend: Vec<(Bytes, u32)> = self.held.iter().cloned().collect();
        for (chunk, crc) in resend {
            let len = chunk.len() as u64;
            self.stats.resent += len;
            self.send(data_request(offset, chunk, crc)).await?;
            offset += len;
            self.since_flush += len;
            if self.since_flush >= self.opts.flush_every {
                self.ask_flush().await?;
            }
        }
        Ok(())
    }

    /// The service persisted `size` bytes: forget the held bytes below it.
    fn resume_at(&mut self, size: u64) -> Result<(), Failed> {
        if !self.started {
            self.started = true;
            self.persisted = size;
            self.sent = size;
            return Ok(());
        }
        if size < self.persisted {
            return Err(GcsError::DataLoss(format!(
                "{}: the service has {size} bytes, fewer than the {} it acknowledged",
                self.what, self.persisted
            ))
            .into());
        }
        if size > self.sent {
            return Err(GcsError::PreconditionFailed(format!(
                "{}: the object has {size} bytes, more than the {} written here (another writer appended)",
                self.what, self.sent
            ))
            .into());
        }
        self.persisted_to(size);
        Ok(())
    }

    /// Drops held bytes up to `size`, now persisted.
    fn persisted_to(&mut self, size: u64) {
        if size <= self.persisted {
            return;
        }
        let mut drop = size - self.persisted;
        while drop > 0 {
            let Some(front) = self.held.front_mut() else {
                break;
            };
            let len = front.0.len() as u64;
            if len <= drop {
                drop -= len;
                self.held.pop_front();
            } else {
                // Part of a chunk persisted: hold its tail, checksummed anew.
                let tail = front.0.slice(drop as usize..);
                let crc = crc32c::crc32c(&tail);
                *front = (tail, crc);
                drop = 0;
            }
        }
        self.persisted = size;
        if self
            .backoff
            .as_ref()
            .is_some_and(|(_, mark)| *mark < self.persisted)
        {
            self.backoff = None;
        }
    }

    /// After a failure: back off (unless redirected) and reopen, until a
    /// stream is open or the error is final.
    async fn recover(&mut self, mut f: Failed) -> Result<(), GcsError> {
        loop {
            self.stream = None;
            let redirected = f.redirect.is_some();
            if let Some(r) = f.redirect.take() {
                self.token = r.routing_token;
                if let Some(h) = r.write_handle {
                    self.handle = Some(h);
                }
                if let (0, Some(g)) = (self.generation, r.generation) {
                    self.generation = g;
                }
            } else if !f.err.is_retryable() {
                return Err(f.err);
            }
            if !redirected {
                let persisted = self.persisted;
                let policy = &self.client.retry;
                let (b, _) = self
                    .backoff
                    .get_or_insert_with(|| (Backoff::new(policy), persisted));
                match b.next_delay() {
                    Some(d) => {
                        tracing::debug!(object = %self.what, error = %f.err, attempt = b.attempts(), "reopening the write stream");
                        tokio::time::sleep(d).await;
                    }
                    None => {
                        return Err(GcsError::RetryDeadline {
                            attempts: b.attempts(),
                            secs: b.elapsed().as_secs_f64(),
                            last: std::sync::Arc::new(f.err),
                        })
                    }
                }
            }
            self.stats.reopens += 1;
            match self.reopen().await {
                Ok(()) => return Ok(()),
                Err(next) => f = next,
            }
        }
    }

    /// Sends one request on the open stream.
    async fn send(&mut self, req: BidiWriteObjectRequest) -> Result<(), Failed> {
        let stall = self.stall();
        let Some(stream) = self.stream.as_mut() else {
            return Err(Failed::unavailable(format!("{}: no stream", self.what)));
        };
        match tokio::time::timeout(stall, stream.tx.send(req)).await {
            Ok(Ok(())) => Ok(()),
            // The call ended: its status says why.
            Ok(Err(_)) => Err(self.ended().await),
            Err(_) => Err(Failed::unavailable(format!(
                "{}: the write stream took nothing for {stall:?}",
                self.what
            ))),
        }
    }

    /// Why the stream ended (reading what answers remain).
    async fn ended(&mut self) -> Failed {
        loop {
            match self.answer().await {
                Ok(_) => continue,
                Err(f) => return f,
            }
        }
    }

    /// Reads the next answer (within the stall timeout) and takes in the
    /// persisted size it reports.
    async fn answer(&mut self) -> Result<BidiWriteObjectResponse, Failed> {
        let stall = self.stall();
        let what = self.what.clone();
        let Some(stream) = self.stream.as_mut() else {
            return Err(Failed::unavailable(format!("{what}: no stream")));
        };
        let resp = match tokio::time::timeout(stall, stream.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => {
                return Err(Failed::unavailable(format!(
                    "{what}: the write stream ended"
                )))
            }
            Ok(Err(st)) => return Err(Failed::status(&st, &what)),
            Err(_) => {
                return Err(Failed::unavailable(format!(
                    "{what}: no answer for {stall:?}"
                )))
            }
        };
        if let Some(h) = &resp.write_handle {
            self.handle = Some(h.clone());
        }
        if let Some(WriteStatus::PersistedSize(n)) = resp.write_status {
            let n = n.max(0) as u64;
            if n < self.persisted || n > self.sent {
                return Err(GcsError::Protocol(format!(
                    "{what}: persisted_size {n} outside {}..={}",
                    self.persisted, self.sent
                ))
                .into());
            }
            self.persisted_to(n);
        }
        Ok(resp)
    }

    /// Reads the answer to the pending state lookup, if any.
    async fn settle(&mut self) -> Result<(), Failed> {
        if self.lookup_pending {
            self.answer().await?;
            self.lookup_pending = false;
        }
        Ok(())
    }

    /// Asks for a flush (and its answer, read later).
    async fn ask_flush(&mut self) -> Result<(), Failed> {
        self.settle().await?;
        self.stats.flushes += 1;
        self.send(lookup_request(true)).await?;
        self.lookup_pending = true;
        self.since_flush = 0;
        Ok(())
    }

    /// Appends `data`. It is persisted by the next flush (every
    /// `flush_every` bytes, [`AppendableWriter::flush`], `finalize` or `close`).
    pub async fn write(&mut self, data: Bytes) -> Result<(), GcsError> {
        self.write_with_crcs(data, &[]).await
    }

    /// [`AppendableWriter::write`], with the CRC32C of each [`MAX_CHUNK`] of
    /// `data` (cut from its start) already computed by the caller (who
    /// checksummed the bytes as it copied them). Used only when there is one
    /// per chunk; otherwise they are computed here. The service checks each
    /// chunk against its CRC32C either way.
    pub async fn write_with_crcs(&mut self, mut data: Bytes, crcs: &[u32]) -> Result<(), GcsError> {
        let given = crcs.len() == data.len().div_ceil(MAX_CHUNK);
        let mut i = 0;
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_CHUNK));
            let len = chunk.len() as u64;
            let crc = match crcs.get(i) {
                Some(c) if given => *c,
                _ => crc32c::crc32c(&chunk),
            };
            i += 1;
            let offset = self.sent;
            self.held.push_back((chunk.clone(), crc));
            self.sent += len;
            self.crc = self.crc.map(|c| combine(c, crc, len as usize));
            self.since_flush += len;
            let mut step = self.send(data_request(offset, chunk, crc)).await;
            if step.is_ok() && self.since_flush >= self.opts.flush_every {
                step = self.ask_flush().await;
            }
            if let Err(f) = step {
                // The reopen sends the held bytes, this chunk among them.
                self.recover(f).await?;
            }
        }
        Ok(())
    }

    /// Persists everything written so far; returns the persisted size.
    pub async fn flush(&mut self) -> Result<u64, GcsError> {
        while self.persisted < self.sent || self.stream.is_none() {
            let step = async {
                self.ask_flush().await?;
                self.settle().await
            };
            if let Err(f) = step.await {
                self.recover(f).await?;
            }
        }
        Ok(self.persisted)
    }

    /// The service's CRC32C of the persisted bytes (a state lookup).
    async fn lookup_checksum(&mut self) -> Result<Option<u32>, GcsError> {
        loop {
            let step = async {
                self.settle().await?;
                self.send(lookup_request(false)).await?;
                self.answer().await
            };
            match step.await {
                Ok(r) => {
                    return Ok(r
                        .persisted_data_checksums
                        .and_then(|c| c.crc32c)
                        .filter(|_| self.persisted == self.sent))
                }
                Err(f) => self.recover(f).await?,
            }
        }
    }

    /// Persists everything and finalizes the object with its whole CRC32C:
    /// it cannot be appended to any more.
    pub async fn finalize(mut self) -> Result<ObjectInfo, GcsError> {
        self.flush().await?;
        let checksums = self.crc.map(|c| ObjectChecksums {
            crc32c: Some(c),
            md5_hash: Bytes::new(),
        });
        loop {
            let finish = BidiWriteObjectRequest {
                finish_write: true,
                object_checksums: checksums.clone(),
                ..Default::default()
            };
            let step = async {
                self.send(finish).await?;
                loop {
                    let r = self.answer().await?;
                    if let Some(WriteStatus::Resource(o)) = r.write_status {
                        return Ok::<_, Failed>(o);
                    }
                }
            };
            let failed = match step.await {
                Ok(o) => return self.check_final(object_info(&o)),
                Err(f) => f,
            };
            // The finish may have been done with its answer lost: then the
            // object is finalized and a takeover is refused.
            if let Err(e) = self.recover(failed).await {
                let info = self.client.stat(&self.name).await?;
                if info.finalized && info.generation == self.generation {
                    return self.check_final(info);
                }
                return Err(e);
            }
        }
    }

    fn check_final(&self, info: ObjectInfo) -> Result<ObjectInfo, GcsError> {
        let crc_ok = match (self.crc, info.crc32c) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        if info.size != self.sent || !crc_ok {
            return Err(GcsError::DataLoss(format!(
                "{}: finalized with {} bytes (CRC32C {:?}), {} written (CRC32C {:?})",
                self.what, info.size, info.crc32c, self.sent, self.crc
            )));
        }
        Ok(info)
    }

    /// Persists everything and closes the stream, leaving the object
    /// unfinalized (appendable); returns its persisted size.
    pub async fn close(mut self) -> Result<u64, GcsError> {
        let size = self.flush().await?;
        if let Some(Stream { tx, mut rx }) = self.stream.take() {
            drop(tx);
            // The service may answer the close with the persisted size; what
            // it says no longer matters (everything is persisted).
            let drain = async { while let Ok(Some(_)) = rx.message().await {} };
            let _ = tokio::time::timeout(self.client.retry.stall_timeout, drain).await;
        }
        Ok(size)
    }
}

#[tonic::async_trait]
impl super::ObjectWrite for AppendableWriter {
    fn generation(&self) -> i64 {
        self.generation
    }

    fn written(&self) -> u64 {
        self.sent
    }

    fn persisted(&self) -> u64 {
        self.persisted
    }

    async fn write(&mut self, data: Bytes) -> Result<(), GcsError> {
        AppendableWriter::write(self, data).await
    }

    async fn write_with_crcs(&mut self, data: Bytes, crcs: Vec<u32>) -> Result<(), GcsError> {
        AppendableWriter::write_with_crcs(self, data, &crcs).await
    }

    async fn flush(&mut self) -> Result<u64, GcsError> {
        AppendableWriter::flush(self).await
    }

    async fn close(self: Box<Self>) -> Result<u64, GcsError> {
        AppendableWriter::close(*self).await
    }

    async fn finalize(self: Box<Self>) -> Result<ObjectInfo, GcsError> {
        AppendableWriter::finalize(*self).await
    }
}

#[cfg(test)]
mod tests {
    use super::{combine, MAX_CHUNK};

    /// The chunk-sized combine is the general one, and combines chunk CRCs
    /// into the whole's.
    #[test]
    fn chunk_combine_is_the_general_combine() {
        let data: Vec<u8> = (0..2 * MAX_CHUNK + 5)
            .map(|i| (i * 13 % 241) as u8)
            .collect();
        let parts: Vec<u32> = data.chunks(MAX_CHUNK).map(crc32c::crc32c).collect();
        let mut whole = parts[0];
        for (p, part) in parts.iter().zip(data.chunks(MAX_CHUNK)).skip(1) {
            whole = combine(whole, *p, part.len());
        }
        assert_eq!(whole, crc32c::crc32c(&data));
        for (a, b) in [(0, 0), (1, 2), (0xdead_beef, 0x1234_5678), (u32::MAX, 7)] {
            assert_eq!(
                combine(a, b, MAX_CHUNK),
                crc32c::crc32c_combine(a, b, MAX_CHUNK)
            );
        }
    }
}
