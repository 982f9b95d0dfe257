//! The emulator's write streams: `BidiWriteObject`, appendable objects first.
//!
//! [`open`] reads a stream's first request: `write_object_spec` creates a new
//! generation (appendable: visible at once, empty, growing as bytes are
//! persisted; otherwise staged until `finish_write`), `append_object_spec`
//! takes over an unfinalized object (its generation, write handle and routing
//! token checked). It applies open-time faults (failed opens; every Nth fresh
//! stream redirected with a `BidiWriteObjectRedirectedError` that carries the
//! routing token, write handle and generation to reopen with) and answers at
//! once with the object and a write handle, as the service does.
//!
//! A spawned [`Session`] then owns the stream. Data comes as `write_offset` +
//! `checksummed_data`: each chunk at most 2 MiB, its CRC32C checked, its offset
//! exactly where the stream's bytes end. Received bytes wait in memory until
//! they are persisted, by `flush`, by `finish_write`, by the writer closing its
//! side, or by the server itself once 16 MiB wait; only persisted bytes are in
//! the file, so only they are visible to readers and survive a broken stream.
//! `state_lookup` answers `persisted_size` (with the persisted bytes' CRC32C);
//! nothing else is answered, so a writer never reads a stale answer.
//! `finish_write` checks `object_checksums` against the whole object, finalizes
//! it (the generation stays) and answers with the object.
//!
//! A takeover makes the object's earlier writers fail (FAILED_PRECONDITION) the
//! next time they persist: one writer at a time. Data-time faults: a stream
//! breaks (UNAVAILABLE) once it has received `break_after_bytes`, after
//! persisting what it received (the writer must not send it again); a stream
//! stalls (reads on, answers nothing, persists nothing more) once it has
//! received `stall_after_bytes`. Shaping: latency delays every answer, and the
//! per-stream bandwidth cap paces what a stream takes in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::faults::MAX_CHUNK;
use super::store::{self, Preconditions, Written};
use super::wire::{self, blocking, check_routing, object_proto, status_with_detail};
use super::{EmuError, Emulator};
use crate::proto::storage::bidi_write_object_request::{Data, FirstMessage};
use crate::proto::storage::bidi_write_object_response::WriteStatus;
use crate::proto::storage::{
    AppendObjectSpec, BidiWriteHandle, BidiWriteObjectRedirectedError, BidiWriteObjectRequest,
    BidiWriteObjectResponse, ObjectChecksums, WriteObjectSpec,
};

/// The response stream of a BidiWriteObject call.
pub type ResponseStream = ReceiverStream<Result<BidiWriteObjectResponse, Status>>;

/// Received bytes the server persists on its own, unasked.
pub const AUTO_PERSIST: u64 = 16 << 20;

const HANDLE_MAGIC: &str = "zemuw1";

/// An opaque write handle naming (bucket, object, generation).
fn encode_handle(bucket: &str, object: &str, generation: i64) -> BidiWriteHandle {
    BidiWriteHandle {
        handle: wire::encode_handle(HANDLE_MAGIC, bucket, object, generation),
    }
}

#[cfg(test)]
fn decode_handle(h: &[u8]) -> Option<(String, String, i64)> {
    wire::decode_handle(HANDLE_MAGIC, h)
}

fn invalid(msg: impl Into<String>) -> Status {
    EmuError::InvalidArgument(msg.into()).into_status()
}

/// Who may write each object now. Every open (create or takeover) claims the
/// object; a stream whose claim was taken by a later open fails when it next
/// persists.
#[derive(Debug, Default)]
pub struct Writers {
    claims: Mutex<HashMap<(String, String), u64>>,
    next: AtomicU64,
}

impl Writers {
    fn claim(&self, bucket: &str, name: &str) -> u64 {
        let epoch = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        crate::sync::lock(&self.claims).insert((bucket.to_string(), name.to_string()), epoch);
        epoch
    }

    fn holds(&self, bucket: &str, name: &str, epoch: u64) -> bool {
        crate::sync::lock(&self.claims)
            .get(&(bucket.to_string(), name.to_string()))
            .is_some_and(|e| *e == epoch)
    }

    fn release(&self, bucket: &str, name: &str, epoch: u64) {
        let mut claims = crate::sync::lock(&self.claims);
        let key = (bucket.to_string(), name.to_string());
        if claims.get(&key) == Some(&epoch) {
            claims.remove(&key);
        }
    }
}

/// The CRC32C of a file's first `len` bytes.
fn file_crc(file: &std::fs::File, len: u64) -> Result<u32, EmuError> {
    let mut buf = vec![0u8; (1usize << 20).min(len as usize).max(1)];
    let (mut crc, mut off) = (0u32, 0u64);
    while off < len {
        let n = buf.len().min((len - off) as usize);
        store::read_exact_at(file, &mut buf[..n], off)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        off += n as u64;
    }
    Ok(crc)
}

/// What the first request opened.
struct Opened {
    written: Written,
    /// The persisted bytes' CRC32C and length.
    crc: u32,
    persisted: u64,
    /// Preconditions to check again when a staged object is finalized.
    pre: Preconditions,
    ctime: std::time::SystemTime,
}

async fn create(emu: &Arc<Emulator>, spec: &WriteObjectSpec) -> Result<Opened, Status> {
    let resource = spec
        .resource
        .as_ref()
        .ok_or_else(|| invalid("write_object_spec must carry the object resource"))?;
    let bucket = store::parse_bucket_resource(&resource.bucket)?.to_string();
    store::check_object_name(&resource.name)?;
    let pre = Preconditions {
        if_generation_match: spec.if_generation_match,
        if_generation_not_match: spec.if_generation_not_match,
        if_metageneration_match: spec.if_metageneration_match,
        if_metageneration_not_match: spec.if_metageneration_not_match,
    };
    let appendable = spec.appendable.unwrap_or(false);
    let (e, b, name) = (emu.clone(), bucket.clone(), resource.name.clone());
    let written = blocking(move || e.store.create(&b, &name, &pre, appendable)).await?;
    Ok(Opened {
        written,
        crc: 0,
        persisted: 0,
        pre,
        ctime: std::time::SystemTime::now(),
    })
}

async fn take_over(
    emu: &Arc<Emulator>,
    spec: &AppendObjectSpec,
    token: Option<&String>,
) -> Result<Opened, Status> {
    let bucket = store::parse_bucket_resource(&spec.bucket)?.to_string();
    store::check_object_name(&spec.object)?;
    let generation = wire::pinned_generation(
        HANDLE_MAGIC,
        "write_handle",
        spec.write_handle.as_ref().map(|h| h.handle.as_ref()),
        &bucket,
        &spec.object,
        spec.generation,
    )?;
    if token.is_some() && spec.write_handle.is_none() {
        return Err(invalid(
            "A redirected stream must be reopened with its write_handle",
        ));
    }
    let (e, name) = (emu.clone(), spec.object.clone());
    let pre = Preconditions {
        if_metageneration_match: spec.if_metageneration_match,
        if_metageneration_not_match: spec.if_metageneration_not_match,
        ..Default::default()
    };
    let (written, meta, crc) = blocking(move || {
        let (written, meta) = e.store.reopen_appendable(&bucket, &name, generation)?;
        pre.check(Some(&meta))?;
        let crc = file_crc(&written.file, meta.size)?;
        Ok((written, meta, crc))
    })
    .await?;
    emu.counters.write_takeovers.fetch_add(1, Ordering::Relaxed);
    Ok(Opened {
        written,
        crc,
        persisted: meta.size,
        pre: Preconditions::default(),
        ctime: meta.ctime,
    })
}

/// Starts a BidiWriteObject stream (see the module doc).
pub async fn open(
    emu: Arc<Emulator>,
    params: HashMap<String, String>,
    mut inbound: Streaming<BidiWriteObjectRequest>,
) -> Result<ResponseStream, Status> {
    emu.counters.write_streams.fetch_add(1, Ordering::Relaxed);
    let mut first = inbound
        .message()
        .await?
        .ok_or_else(|| invalid("the stream ended before its first message"))?;
    let (opened, token) = match first.first_message.take() {
        Some(FirstMessage::WriteObjectSpec(spec)) => {
            let bucket = spec.resource.as_ref().map(|r| r.bucket.as_str());
            check_routing(&params, bucket.unwrap_or_default())?;
            if emu.faults.fail_open() {
                emu.counters.fault_fail_open.fetch_add(1, Ordering::Relaxed);
                return Err(Status::unavailable("injected fault: stream open failed"));
            }
            (create(&emu, &spec).await?, None)
        }
        Some(FirstMessage::AppendObjectSpec(spec)) => {
            check_routing(&params, &spec.bucket)?;
            let token = wire::routing_token(&emu, spec.routing_token.as_ref(), &params)?;
            if emu.faults.fail_open() {
                emu.counters.fault_fail_open.fetch_add(1, Ordering::Relaxed);
                return Err(Status::unavailable("injected fault: stream open failed"));
            }
            (take_over(&emu, &spec, token.as_ref()).await?, token)
        }
        Some(FirstMessage::UploadId(_)) => {
            return Err(Status::unimplemented(
                "resumable uploads (upload_id) are not supported by the emulator",
            ))
        }
        None => {
            return Err(invalid(
                "the first message must carry write_object_spec or append_object_spec",
            ))
        }
    };
    let w = &opened.written;
    let handle = encode_handle(&w.bucket, &w.name, w.generation);
    if token.is_none() && w.appendable() {
        if let Some(t) = emu.faults.redirect() {
            emu.counters.fault_redirect.fetch_add(1, Ordering::Relaxed);
            let detail = BidiWriteObjectRedirectedError {
                routing_token: Some(t),
                write_handle: Some(handle),
                generation: Some(w.generation),
            };
            return Err(status_with_detail(
                Code::Aborted,
                "injected fault: redirected",
                "google.storage.v2.BidiWriteObjectRedirectedError",
                &detail,
            ));
        }
    }
    let epoch = emu.writers.claim(&w.bucket, &w.name);
    let mut meta = w.meta(false, None).map_err(EmuError::Io)?;
    meta.ctime = opened.ctime;
    let first_response = BidiWriteObjectResponse {
        write_status: Some(WriteStatus::Resource(object_proto(&meta))),
        write_handle: Some(handle),
        persisted_data_checksums: None,
    };
    let (tx, rx) = mpsc::channel(4);
    let session = Session {
        emu,
        written: opened.written,
        epoch,
        persisted: opened.persisted,
        crc: opened.crc,
        pending: Vec::new(),
        pending_len: 0,
        pending_crc: 0,
        received: 0,
        pre: opened.pre,
        finished: false,
        paced: tokio::time::Instant::now(),
        tx,
    };
    tokio::spawn(session.run(first_response, first, inbound));
    Ok(ReceiverStream::new(rx))
}

/// Why a stream stops early.
enum Stop {
    /// The client went away: end silently.
    Gone,
    /// Stall: take in requests, answer none, persist nothing, until the
    /// client goes away.
    Stall,
    /// End the stream with this status.
    Fail(Status),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Fail(s)
    }
}

impl From<EmuError> for Stop {
    fn from(e: EmuError) -> Self {
        Stop::Fail(e.into_status())
    }
}

/// The task that owns one BidiWriteObject stream after its first response.
struct Session {
    emu: Arc<Emulator>,
    written: Written,
    /// This stream's claim on the object (see [`Writers`]).
    epoch: u64,
    /// Bytes in the file, and their CRC32C.
    persisted: u64,
    crc: u32,
    /// Received bytes not persisted yet, and their CRC32C.
    pending: Vec<Bytes>,
    pending_len: u64,
    pending_crc: u32,
    /// Content bytes received on this stream.
    received: u64,
    pre: Preconditions,
    finished: bool,
    /// When the bytes received so far may have arrived, at the bandwidth cap.
    paced: tokio::time::Instant,
    tx: mpsc::Sender<Result<BidiWriteObjectResponse, Status>>,
}

impl Session {
    async fn run(
        mut self,
        first_response: BidiWriteObjectResponse,
        first: BidiWriteObjectRequest,
        inbound: Streaming<BidiWriteObjectRequest>,
    ) {
        let outcome = match self.answer(first_response).await {
            Ok(()) => self.serve(first, inbound).await,
            Err(stop) => Err(stop),
        };
        if let Err(Stop::Fail(st)) = outcome {
            let _ = self.tx.send(Err(st)).await;
        }
        self.emu
            .writers
            .release(&self.written.bucket, &self.written.name, self.epoch);
        if !self.finished {
            self.emu.store.abandon(&self.written);
        }
    }

    async fn answer(&self, response: BidiWriteObjectResponse) -> Result<(), Stop> {
        let latency = self.emu.faults.shaping.latency;
        if !latency.is_zero() {
            super::faults::sleep(latency).await;
        }
        self.tx.send(Ok(response)).await.map_err(|_| Stop::Gone)
    }

    async fn serve(
        &mut self,
        first: BidiWriteObjectRequest,
        mut inbound: Streaming<BidiWriteObjectRequest>,
    ) -> Result<(), Stop> {
        let mut step = self.handle(first).await;
        loop {
            if let Err(Stop::Stall) = step {
                // Held open, silent, until the client gives up on it.
                while let Ok(Some(_)) = inbound.message().await {}
                return Err(Stop::Gone);
            }
            step?;
            match inbound.message().await {
                Ok(Some(msg)) => step = self.handle(msg).await,
                Ok(None) => break,
                Err(_) => return Err(Stop::Gone),
            }
        }
        // The writer closed its side: what it sent is persisted, and the
        // persisted size is the last answer.
        if !self.finished {
            self.persist()?;
            self.answer(self.persisted_answer()).await?;
        }
        Ok(())
    }

    fn persisted_answer(&self) -> BidiWriteObjectResponse {
        BidiWriteObjectResponse {
            write_status: Some(WriteStatus::PersistedSize(self.persisted as i64)),
            write_handle: None,
            persisted_data_checksums: Some(ObjectChecksums {
                crc32c: Some(self.crc),
                md5_hash: Bytes::new(),
            }),
        }
    }

    async fn handle(&mut self, msg: BidiWriteObjectRequest) -> Result<(), Stop> {
        if self.finished {
            return Err(Stop::Fail(Status::failed_precondition(
                "The object was finalized on this stream; nothing more can be written",
            )));
        }
        if msg.first_message.is_some() {
            return Err(Stop::Fail(invalid(
                "write_object_spec and append_object_spec belong in the first message only",
            )));
        }
        if let Some(Data::ChecksummedData(data)) = msg.data {
            let expected = self.persisted + self.pending_len;
            if msg.write_offset < 0 || msg.write_offset as u64 != expected {
                return Err(Stop::Fail(Status::out_of_range(format!(
                    "write_offset {} is not where the object's bytes end ({expected})",
                    msg.write_offset
                ))));
            }
            if data.content.len() > MAX_CHUNK {
                return Err(Stop::Fail(invalid(format!(
                    "checksummed_data of {} bytes is larger than {MAX_CHUNK}",
                    data.content.len()
                ))));
            }
            let crc = crc32c::crc32c(&data.content);
            if data.crc32c.is_some_and(|c| c != crc) {
                return Err(Stop::Fail(invalid(format!(
                    "checksummed_data at offset {}: CRC32C mismatch",
                    msg.write_offset
                ))));
            }
            let len = data.content.len() as u64;
            self.received += len;
            if let Some(rate) = self.emu.faults.shaping.stream_bytes_per_sec {
                // The bandwidth cap: this stream takes in no more than `rate`.
                super::bidi::pace(&mut self.paced, len, rate).await;
            }
            self.pending_crc = crc32c::crc32c_combine(self.pending_crc, crc, len as usize);
            self.pending_len += len;
            self.pending.push(data.content);
            let shaping = &self.emu.faults.shaping;
            if shaping
                .break_after_bytes
                .is_some_and(|n| self.received >= n)
            {
                self.persist()?;
                self.emu
                    .counters
                    .fault_break
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Stop::Fail(Status::unavailable(
                    "injected fault: stream broken",
                )));
            }
            if shaping
                .stall_after_bytes
                .is_some_and(|n| self.received >= n)
            {
                self.emu
                    .counters
                    .fault_stall
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Stop::Stall);
            }
            if self.pending_len >= AUTO_PERSIST {
                self.persist()?;
            }
        }
        if msg.flush || msg.finish_write {
            self.persist()?;
        }
        if msg.flush {
            self.emu
                .counters
                .write_flushes
                .fetch_add(1, Ordering::Relaxed);
        }
        if msg.finish_write {
            return self.finish(msg.object_checksums).await;
        }
        if msg.state_lookup {
            self.answer(self.persisted_answer()).await?;
        }
        Ok(())
    }

    /// Writes the pending bytes to the file, if this stream still writes the
    /// live version of the object.
    fn persist(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let w = &self.written;
        if !self.emu.writers.holds(&w.bucket, &w.name, self.epoch) {
            return Err(Stop::Fail(Status::failed_precondition(format!(
                "{}/{} was taken over by another writer",
                w.bucket, w.name
            ))));
        }
        if !self.emu.store.is_live(w) {
            return Err(Stop::Fail(Status::not_found(format!(
                "No such object: {}/{}#{} (deleted or replaced while being written)",
                w.bucket, w.name, w.generation
            ))));
        }
        // At most AUTO_PERSIST bytes to a local file: short enough to run
        // inline, as the read side's preads do.
        w.write_at(self.persisted, &self.pending)
            .map_err(EmuError::Io)?;
        self.crc = crc32c::crc32c_combine(self.crc, self.pending_crc, self.pending_len as usize);
        self.persisted += self.pending_len;
        self.emu
            .counters
            .bytes_written
            .fetch_add(self.pending_len, Ordering::Relaxed);
        self.pending.clear();
        self.pending_len = 0;
        self.pending_crc = 0;
        Ok(())
    }

    async fn finish(&mut self, checksums: Option<ObjectChecksums>) -> Result<(), Stop> {
        if let Some(want) = checksums.and_then(|c| c.crc32c) {
            if want != self.crc {
                return Err(Stop::Fail(invalid(format!(
                    "object_checksums: the CRC32C sent ({want:#010x}) is not the object's ({:#010x})",
                    self.crc
                ))));
            }
        }
        let meta = self
            .emu
            .store
            .finalize(&mut self.written, self.crc, &self.pre)?;
        self.finished = true;
        self.answer(BidiWriteObjectResponse {
            write_status: Some(WriteStatus::Resource(object_proto(&meta))),
            write_handle: None,
            persisted_data_checksums: None,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_handles_round_trip_and_refuse_others() {
        let h = encode_handle("b", "dir/o", 42);
        assert_eq!(
            decode_handle(&h.handle),
            Some(("b".to_string(), "dir/o".to_string(), 42))
        );
        assert_eq!(
            decode_handle(b"zemu1\x00b\x00o\x0042"),
            None,
            "a read handle"
        );
        assert_eq!(decode_handle(b"zemuw1\0b\0o"), None);
    }

    #[test]
    fn a_takeover_ends_the_earlier_claim() {
        let w = Writers::default();
        let a = w.claim("b", "o");
        assert!(w.holds("b", "o", a));
        let b = w.claim("b", "o");
        assert!(!w.holds("b", "o", a), "taken over");
        assert!(w.holds("b", "o", b));
        w.release("b", "o", a);
        assert!(w.holds("b", "o", b), "a stale release keeps the new claim");
        w.release("b", "o", b);
        assert!(!w.holds("b", "o", b));
    }
}
