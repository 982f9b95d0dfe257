//! `BidiReadObjectResponse`s decoded straight from HTTP/2 data frames, with
//! no copy of the message.
//!
//! A generic gRPC decoder first gathers each message into one buffer (a copy
//! of every byte received), then decodes it. Nearly all of a read stream's
//! bytes are chunk content that is copied once more, into the block it
//! belongs to. Here the frames stay where the transport received them:
//! [`Framer`] cuts the gRPC messages (a 5-byte prefix: a compression flag and
//! a big-endian length) out of the frames as they arrive, each message a
//! [`Rope`] of slices of those frames; [`decode_response`] walks the
//! message's protobuf fields over the rope and hands each chunk's `content`
//! on as a rope too, so its CRC32C is computed over the received bytes and
//! its only copy is the one into the block. The small fields (metadata, read
//! handle, read range) are gathered and decoded by prost as usual.
//!
//! Protobuf's rules hold as a generic decoder applies them: fields in any
//! order, unknown fields skipped, a repeated occurrence of a message field
//! merged into the earlier one (so, for `checksummed_data`, a later `content`
//! or `crc32c` replaces an earlier one), the last occurrence of a scalar
//! winning.
//!
//! [`bidi_read_object`] makes the call itself on a connection (a tonic
//! channel used as a plain HTTP/2 service): the gRPC request headers, the
//! request messages framed as they are sent, and a [`ResponseStream`] that
//! reads the response body's frames into a [`Framer`] and the call's status
//! from its trailers (or from the headers of a response that is only a
//! status), as tonic's generated stub would.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use prost::Message;
use tonic::codegen::Service;
use tonic::{Code, Status};

use crate::proto::storage::{
    bidi_write_object_request, BidiReadHandle, BidiReadObjectRequest, BidiWriteObjectRequest,
    BidiWriteObjectResponse, Object, ReadRange,
};

/// Why a response could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("a message ends inside a field")]
    Truncated,
    #[error("a malformed varint")]
    Varint,
    #[error("unsupported wire type {0}")]
    WireType(u64),
    #[error("a compressed message (none was asked for)")]
    Compressed,
    #[error("a message of {len} bytes, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
}

/// Bytes in pieces as they arrived: slices of the received frames, never
/// copied.
#[derive(Clone, Default, Debug)]
pub struct Rope {
    parts: Vec<Bytes>,
    len: usize,
}

impl Rope {
    pub fn new() -> Rope {
        Rope::default()
    }

    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push(b);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// CRC32C of the bytes, piece by piece.
    pub fn crc32c(&self) -> u32 {
        self.parts
            .iter()
            .fold(0, |crc, p| crc32c::crc32c_append(crc, p))
    }

    /// The bytes in one contiguous vector (for small fields).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for p in &self.parts {
            v.extend_from_slice(p);
        }
        v
    }
}

impl From<Bytes> for Rope {
    fn from(b: Bytes) -> Rope {
        let mut r = Rope::new();
        r.push(b);
        r
    }
}

/// Cuts gRPC messages out of a call's data frames as they arrive.
#[derive(Debug)]
pub struct Framer {
    frames: VecDeque<Bytes>,
    buffered: usize,
    /// The length of the message whose prefix was read.
    want: Option<usize>,
    max_message: usize,
}

impl Framer {
    pub fn new(max_message: usize) -> Framer {
        Framer {
            frames: VecDeque::new(),
            buffered: 0,
            want: None,
            max_message,
        }
    }

    /// Takes in a data frame.
    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.buffered += data.len();
            self.frames.push_back(data);
        }
    }

    /// Bytes received and not yet handed out in a message.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The next whole message, if it has arrived.
    pub fn next_message(&mut self) -> Result<Option<Rope>, WireError> {
        let len = match self.want {
            Some(n) => n,
            None => {
                if self.buffered < 5 {
                    return Ok(None);
                }
                let mut prefix = [0u8; 5];
                let mut at = 0;
                for part in self.take(5).parts() {
                    prefix[at..at + part.len()].copy_from_slice(part);
                    at += part.len();
                }
                if prefix[0] != 0 {
                    return Err(WireError::Compressed);
                }
                let n = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if n > self.max_message {
                    return Err(WireError::TooLarge {
                        len: n,
                        max: self.max_message,
                    });
                }
                self.want = Some(n);
                n
            }
        };
        if self.buffered < len {
            return Ok(None);
        }
        self.want = None;
        Ok(Some(self.take(len)))
    }

    /// Takes `n` buffered bytes (the caller checked they are there).
    fn take(&mut self, mut n: usize) -> Rope {
        let mut out = Rope::new();
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                if let Some(f) = self.frames.pop_front() {
                    self.buffered -= f.len();
                    out.push(f);
                }
            } else {
                out.push(front.split_to(n));
                self.buffered -= n;
                n = 0;
            }
        }
        out
    }
}

/// A chunk's data: its content (slices of the frames) and its CRC32C.
#[derive(Debug, Default, Clone)]
pub struct Checksummed {
    pub content: Rope,
    pub crc32c: Option<u32>,
}

/// One `ObjectRangeData`.
#[derive(Debug, Default, Clone)]
pub struct RangeData {
    pub data: Option<Checksummed>,
    pub read_range: Option<ReadRange>,
    pub range_end: bool,
}

impl From<crate::proto::storage::ObjectRangeData> for RangeData {
    fn from(d: crate::proto::storage::ObjectRangeData) -> RangeData {
        RangeData {
            data: d.checksummed_data.map(|c| Checksummed {
                content: Rope::from(c.content),
                crc32c: c.crc32c,
            }),
            read_range: d.read_range,
            range_end: d.range_end,
        }
    }
}

/// One `BidiReadObjectResponse`.
#[derive(Debug, Default, Clone)]
pub struct Response {
    pub metadata: Option<Object>,
    pub read_handle: Option<BidiReadHandle>,
    pub ranges: Vec<RangeData>,
}

impl From<crate::proto::storage::BidiReadObjectResponse> for Response {
    fn from(r: crate::proto::storage::BidiReadObjectResponse) -> Response {
        Response {
            metadata: r.metadata,
            read_handle: r.read_handle,
            ranges: r.object_data_ranges.into_iter().map(Into::into).collect(),
        }
    }
}

/// Reads protobuf fields from a rope front to back.
struct Cursor<'a> {
    parts: &'a [Bytes],
    part: usize,
    off: usize,
    left: usize,
}

/// Wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

impl<'a> Cursor<'a> {
    fn new(r: &'a Rope) -> Cursor<'a> {
        Cursor {
            parts: &r.parts,
            part: 0,
            off: 0,
            left: r.len,
        }
    }

    fn at_end(&self) -> bool {
        self.left == 0
    }

    fn byte(&mut self) -> Result<u8, WireError> {
        while self.part < self.parts.len() && self.off == self.parts[self.part].len() {
            self.part += 1;
            self.off = 0;
        }
        let b = *self
            .parts
            .get(self.part)
            .and_then(|p| p.get(self.off))
            .ok_or(WireError::Truncated)?;
        self.off += 1;
        self.left -= 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::Varint)
    }

    fn fixed32(&mut self) -> Result<u32, WireError> {
        let mut b = [0u8; 4];
        for x in &mut b {
            *x = self.byte()?;
        }
        Ok(u32::from_le_bytes(b))
    }

    /// The next `n` bytes as slices of the pieces.
    fn take(&mut self, mut n: usize) -> Result<Rope, WireError> {
        if n > self.left {
            return Err(WireError::Truncated);
        }
        let mut out = Rope::new();
        self.left -= n;
        while n > 0 {
            let p = &self.parts[self.part];
            let here = (p.len() - self.off).min(n);
            out.push(p.slice(self.off..self.off + here));
            self.off += here;
            n -= here;
            if self.off == p.len() {
                self.part += 1;
                self.off = 0;
            }
        }
        Ok(out)
    }

    /// A length-delimited field's bytes.
    fn delimited(&mut self) -> Result<Rope, WireError> {
        let n = usize::try_from(self.varint()?).map_err(|_| WireError::Truncated)?;
        self.take(n)
    }

    /// Skips a field of wire type `wt` whose key was read.
    fn skip(&mut self, wt: u64) -> Result<(), WireError> {
        match wt {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.delimited().map(drop),
            FIXED32 => self.take(4).map(drop),
            other => Err(WireError::WireType(other)),
        }
    }

    /// The next field's number and wire type.
    fn key(&mut self) -> Result<(u64, u64), WireError> {
        let k = self.varint()?;
        Ok((k >> 3, k & 7))
    }
}

/// Decodes a small message from the (merged) occurrences of its field.
fn decode_merged<M: Message + Default>(occurrences: &[Rope]) -> Result<Option<M>, WireError> {
    if occurrences.is_empty() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    for r in occurrences {
        for p in r.parts() {
            bytes.extend_from_slice(p);
        }
    }
    Ok(Some(M::decode(bytes.as_slice())?))
}

fn decode_checksummed(r: &Rope, into: &mut Checksummed) -> Result<(), WireError> {
    let mut c = Cursor::new(r);
    while !c.at_end() {
        match c.key()? {
            (1, LEN) => into.content = c.delimited()?,
            (2, FIXED32) => into.crc32c = Some(c.fixed32()?),
            (_, wt) => c.skip(wt)?,
        }
    }
    Ok(())
}

fn decode_range(r: &Rope) -> Result<RangeData, WireError> {
    let mut out = RangeData::default();
    let mut read_range = Vec::new();
    let mut c = Cursor::new(r);
    while !c.at_end() {
        match c.key()? {
            (1, LEN) => {
                let sub = c.delimited()?;
                decode_checksummed(&sub, out.data.get_or_insert_with(Default::default))?;
            }
            (2, LEN) => read_range.push(c.delimited()?),
            (3, VARINT) => out.range_end = c.varint()? != 0,
            (_, wt) => c.skip(wt)?,
        }
    }
    out.read_range = decode_merged(&read_range)?;
    Ok(out)
}

/// Decodes one `BidiReadObjectResponse` message; chunk contents stay slices
/// of `msg`.
pub fn decode_response(msg: &Rope) -> Result<Response, WireError> {
    let (mut metadata, mut handle) = (Vec::new(), Vec::new());
    let mut ranges = Vec::new();
    let mut c = Cursor::new(msg);
    while !c.at_end() {
        match c.key()? {
            (4, LEN) => metadata.push(c.delimited()?),
            (6, LEN) => ranges.push(decode_range(&c.delimited()?)?),
            (7, LEN) => handle.push(c.delimited()?),
            (_, wt) => c.skip(wt)?,
        }
    }
    Ok(Response {
        metadata: decode_merged(&metadata)?,
        read_handle: decode_merged(&handle)?,
        ranges,
    })
}

/// The methods' paths.
const BIDI_READ_OBJECT: &str = "/google.storage.v2.Storage/BidiReadObject";
const BIDI_WRITE_OBJECT: &str = "/google.storage.v2.Storage/BidiWriteObject";

fn wire_status(e: WireError) -> Status {
    Status::internal(format!("an undecodable response: {e}"))
}

/// The messages of a streaming call's response body, framed as they arrive.
struct Frames {
    body: tonic::body::Body,
    framer: Framer,
    /// The trailers said OK: no more messages.
    ended: bool,
}

impl Frames {
    /// The next message's bytes; `None` once the call ended with OK; the
    /// call's status if it ended otherwise.
    async fn next(&mut self) -> Result<Option<Rope>, Status> {
        loop {
            if let Some(m) = self.framer.next_message().map_err(wire_status)? {
                return Ok(Some(m));
            }
            if self.ended {
                if self.framer.buffered() > 0 {
                    return Err(Status::internal("the call ended inside a message"));
                }
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.framer.push(data),
                    Err(frame) => {
                        let status = frame
                            .trailers_ref()
                            .and_then(Status::from_header_map)
                            .unwrap_or_else(|| Status::internal("trailers without grpc-status"));
                        if status.code() != Code::Ok {
                            return Err(status);
                        }
                        self.ended = true;
                    }
                },
                Some(Err(st)) => return Err(st),
                None => {
                    return Err(Status::internal(
                        "the call ended without a status (no trailers)",
                    ))
                }
            }
        }
    }
}

/// The responses of a `BidiReadObject` call, decoded as their frames arrive.
pub struct ResponseStream {
    frames: Frames,
}

impl ResponseStream {
    /// The next response; `None` once the call ended with OK; the call's
    /// status if it ended otherwise.
    pub async fn message(&mut self) -> Result<Option<Response>, Status> {
        match self.frames.next().await? {
            Some(m) => decode_response(&m).map(Some).map_err(wire_status),
            None => Ok(None),
        }
    }
}

/// The responses of a `BidiWriteObject` call (small messages, decoded whole).
pub struct WriteResponseStream {
    frames: Frames,
}

impl WriteResponseStream {
    /// The next response; `None` once the call ended with OK; the call's
    /// status if it ended otherwise.
    pub async fn message(&mut self) -> Result<Option<BidiWriteObjectResponse>, Status> {
        match self.frames.next().await? {
            Some(m) => BidiWriteObjectResponse::decode(m.to_vec().as_slice())
                .map(Some)
                .map_err(|e| wire_status(WireError::Decode(e))),
            None => Ok(None),
        }
    }
}

/// The status a non-200 HTTP response stands for (as gRPC maps them).
fn http_status(code: http::StatusCode) -> Status {
    let c = match code.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(c, format!("HTTP status {code}"))
}

/// Starts a streaming call to `path` whose request body is `frames` (gRPC
/// messages already framed, possibly in several pieces each) and `metadata`
/// its headers; returns the response frames once the response headers
/// arrived.
async fn start_call<F>(
    mut channel: tonic::transport::Channel,
    path: &'static str,
    metadata: tonic::metadata::MetadataMap,
    frames: F,
    max_message: usize,
) -> Result<Frames, Status>
where
    F: Stream<Item = Bytes> + Send + 'static,
{
    let frames = frames.map(|b| Ok::<_, Status>(http_body::Frame::data(b)));
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(frames));
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(body)
        .map_err(|e| Status::internal(format!("cannot build the request: {e}")))?;
    request.headers_mut().extend(metadata.into_headers());
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    // A call that fails at once answers with its status in the headers.
    if let Some(st) = Status::from_header_map(response.headers()) {
        if st.code() != Code::Ok {
            return Err(st);
        }
    }
    if response.status() != http::StatusCode::OK {
        return Err(http_status(response.status()));
    }
    Ok(Frames {
        body: response.into_body(),
        framer: Framer::new(max_message),
        ended: false,
    })
}

/// One message as a gRPC frame in one buffer.
fn framed<M: Message>(m: &M) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + m.encoded_len());
    buf.put_u8(0);
    buf.put_u32(m.encoded_len() as u32);
    // Cannot fail: the buffer has room for the whole message.
    let _ = m.encode(&mut buf);
    buf.freeze()
}

/// Starts a `BidiReadObject` call on `channel` sending `req`'s messages (its
/// metadata as the call's headers); returns the response stream once the
/// response headers arrived.
pub async fn bidi_read_object<S>(
    channel: tonic::transport::Channel,
    req: tonic::Request<S>,
    max_message: usize,
) -> Result<ResponseStream, Status>
where
    S: Stream<Item = BidiReadObjectRequest> + Send + 'static,
{
    let (metadata, _, messages) = req.into_parts();
    let frames = messages.map(|m| framed(&m));
    let frames = start_call(channel, BIDI_READ_OBJECT, metadata, frames, max_message).await?;
    Ok(ResponseStream { frames })
}

/// A `BidiWriteObjectRequest` as the pieces of its gRPC frame: the chunk's
/// content is a piece of its own, the caller's buffer itself, so it goes to
/// the connection without being copied into an encoding buffer. The pieces
/// together are the 5-byte frame header and a protobuf encoding of the
/// message (the first-message fields, then `write_offset`, then
/// `checksummed_data`, then the rest: any field order decodes the same).
pub fn write_request_frames(m: BidiWriteObjectRequest) -> Vec<Bytes> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let Some(bidi_write_object_request::Data::ChecksummedData(data)) = m.data.clone() else {
        return vec![framed(&m)];
    };
    let first = BidiWriteObjectRequest {
        first_message: m.first_message.clone(),
        ..Default::default()
    };
    let rest = BidiWriteObjectRequest {
        first_message: None,
        write_offset: 0,
        data: None,
        ..m.clone()
    };
    let content_len = data.content.len();
    let content_field = if content_len > 0 {
        1 + encoded_len_varint(content_len as u64) + content_len
    } else {
        0
    };
    let data_len = content_field + data.crc32c.map_or(0, |_| 1 + 4);
    let offset_field = if m.write_offset != 0 {
        1 + encoded_len_varint(m.write_offset as u64)
    } else {
        0
    };
    let total = first.encoded_len()
        + offset_field
        + 1
        + encoded_len_varint(data_len as u64)
        + data_len
        + rest.encoded_len();
    let mut head = BytesMut::with_capacity(5 + first.encoded_len() + 32);
    head.put_u8(0);
    head.put_u32(total as u32);
    let _ = first.encode(&mut head);
    if m.write_offset != 0 {
        encode_key(3, WireType::Varint, &mut head);
        encode_varint(m.write_offset as u64, &mut head);
    }
    encode_key(4, WireType::LengthDelimited, &mut head);
    encode_varint(data_len as u64, &mut head);
    if content_len > 0 {
        encode_key(1, WireType::LengthDelimited, &mut head);
        encode_varint(content_len as u64, &mut head);
    }
    let mut tail = BytesMut::with_capacity(5 + rest.encoded_len());
    if let Some(crc) = data.crc32c {
        encode_key(2, WireType::ThirtyTwoBit, &mut tail);
        tail.put_u32_le(crc);
    }
    let _ = rest.encode(&mut tail);
    let mut pieces = vec![head.freeze()];
    if content_len > 0 {
        pieces.push(data.content);
    }
    if !tail.is_empty() {
        pieces.push(tail.freeze());
    }
    pieces
}

/// Starts a `BidiWriteObject` call on `channel` sending `req`'s messages
/// (chunk content without a copy, see [`write_request_frames`]; its metadata
/// as the call's headers); returns the response stream once the response
/// headers arrived (the service answers the first message at once).
pub async fn bidi_write_object<S>(
    channel: tonic::transport::Channel,
    req: tonic::Request<S>,
    max_message: usize,
) -> Result<WriteResponseStream, Status>
where
    S: Stream<Item = BidiWriteObjectRequest> + Send + 'static,
{
    let (metadata, _, messages) = req.into_parts();
    let frames = messages.flat_map(|m| futures::stream::iter(write_request_frames(m)));
    let frames = start_call(channel, BIDI_WRITE_OBJECT, metadata, frames, max_message).await?;
    Ok(WriteResponseStream { frames })
}

/// The detail of type `type_name` (e.g. `google.storage.v2.BidiReadObjectRedirectedError`)
/// a status carries in its `google.rpc.Status` details, if any.
pub fn status_detail<M: Message + Default>(st: &Status, type_name: &str) -> Option<M> {
    crate::proto::RpcStatus::decode(st.details())
        .ok()?
        .details
        .into_iter()
        .find_map(|a| {
            a.type_url
                .strip_suffix(type_name)
                .is_some_and(|head| head.ends_with('/'))
                .then(|| M::decode(a.value.as_slice()).ok())
                .flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::storage::{BidiReadObjectResponse, ChecksummedData, ObjectRangeData};
    use proptest::prelude::*;

    /// Splits `bytes` at the cut points (fractions of its length) into frames.
    fn frames(bytes: &[u8], cuts: &[f64]) -> Vec<Bytes> {
        let mut at: Vec<usize> = cuts
            .iter()
            .map(|f| (f * bytes.len() as f64) as usize)
            .collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        at.dedup();
        at.windows(2)
            .map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]]))
            .collect()
    }

    fn grpc_frame(msg: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(msg);
        out
    }

    fn same(got: &Response, want: &BidiReadObjectResponse) {
        assert_eq!(got.metadata, want.metadata);
        assert_eq!(got.read_handle, want.read_handle);
        assert_eq!(got.ranges.len(), want.object_data_ranges.len());
        for (g, w) in got.ranges.iter().zip(&want.object_data_ranges) {
            assert_eq!(g.read_range, w.read_range);
            assert_eq!(g.range_end, w.range_end);
            match (&g.data, &w.checksummed_data) {
                (None, None) => {}
                (Some(g), Some(w)) => {
                    assert_eq!(g.content.to_vec(), w.content.to_vec());
                    assert_eq!(g.crc32c, w.crc32c);
                    assert_eq!(g.content.crc32c(), crc32c::crc32c(&w.content));
                }
                other => panic!("checksummed_data differs: {other:?}"),
            }
        }
    }

    fn response() -> impl Strategy<Value = BidiReadObjectResponse> {
        let range = (
            proptest::option::of((
                proptest::collection::vec(any::<u8>(), 0..3000),
                proptest::option::of(any::<u32>()),
            )),
            proptest::option::of((any::<i64>(), any::<i64>(), any::<i64>())),
            any::<bool>(),
        )
            .prop_map(|(data, rr, end)| ObjectRangeData {
                checksummed_data: data.map(|(content, crc32c)| ChecksummedData {
                    content: Bytes::from(content),
                    crc32c,
                }),
                read_range: rr.map(|(o, l, id)| ReadRange {
                    read_offset: o,
                    read_length: l,
                    read_id: id,
                }),
                range_end: end,
            });
        (
            proptest::option::of(("[a-z/]{0,20}", any::<i64>(), 0i64..1 << 40)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(range, 0..5),
        )
            .prop_map(|(md, handle, ranges)| BidiReadObjectResponse {
                metadata: md.map(|(name, generation, size)| Object {
                    name,
                    generation,
                    size,
                    ..Default::default()
                }),
                read_handle: handle.map(|h| BidiReadHandle {
                    handle: Bytes::from(h),
                }),
                object_data_ranges: ranges,
            })
    }

    proptest! {
        /// Any responses, framed and cut into frames anywhere, decode to
        /// what prost decodes, message by message.
        #[test]
        fn decodes_what_prost_decodes(
            msgs in proptest::collection::vec(response(), 1..4),
            cuts in proptest::collection::vec(0.0f64..1.0, 0..12),
        ) {
            let mut wire = Vec::new();
            for m in &msgs {
                wire.extend(grpc_frame(&m.encode_to_vec()));
            }
            let mut framer = Framer::new(4 << 20);
            let mut got = Vec::new();
            for f in frames(&wire, &cuts) {
                framer.push(f);
                while let Some(m) = framer.next_message().expect("framing") {
                    got.push(decode_response(&m).expect("decode"));
                }
            }
            prop_assert_eq!(got.len(), msgs.len());
            prop_assert_eq!(framer.buffered(), 0);
            for (g, w) in got.iter().zip(&msgs) {
                same(g, w);
            }
        }
    }

    /// Unknown fields are skipped, repeated message fields merge, and the
    /// later content of a repeated `checksummed_data` wins, as prost does.
    #[test]
    fn unknown_and_repeated_fields_follow_protobuf() {
        let a = ObjectRangeData {
            checksummed_data: Some(ChecksummedData {
                content: Bytes::from_static(b"first"),
                crc32c: Some(7),
            }),
            read_range: Some(ReadRange {
                read_offset: 5,
                read_length: 0,
                read_id: 1,
            }),
            range_end: false,
        };
        let b = ObjectRangeData {
            checksummed_data: Some(ChecksummedData {
                content: Bytes::from_static(b"second"),
                crc32c: None,
            }),
            read_range: Some(ReadRange {
                read_offset: 0,
                read_length: 9,
                read_id: 0,
            }),
            range_end: true,
        };
        // One ObjectRangeData made of both encodings (a merge), plus unknown
        // fields of every wire type at both levels.
        let mut inner = a.encode_to_vec();
        inner.extend(b.encode_to_vec());
        inner.extend([0x50, 0x01]); // field 10, varint
        inner.extend([0x59, 1, 2, 3, 4, 5, 6, 7, 8]); // field 11, fixed64
        let mut msg = vec![0x32];
        prost::encoding::encode_varint(inner.len() as u64, &mut msg);
        msg.extend(&inner);
        msg.extend([0x6d, 1, 2, 3, 4]); // field 13, fixed32
        msg.extend([0x72, 2, b'h', b'i']); // field 14, bytes
        let want = BidiReadObjectResponse::decode(msg.as_slice()).expect("prost");
        let got = decode_response(&Rope::from(Bytes::from(msg))).expect("ours");
        same(&got, &want);
        let d = got.ranges[0].data.as_ref().expect("data");
        assert_eq!(d.content.to_vec(), b"second");
        assert_eq!(
            d.crc32c,
            Some(7),
            "a later occurrence without crc32c keeps it"
        );
        assert_eq!(
            got.ranges[0].read_range.as_ref().map(|r| r.read_length),
            Some(9)
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let msg = BidiReadObjectResponse {
            object_data_ranges: vec![ObjectRangeData {
                checksummed_data: Some(ChecksummedData {
                    content: Bytes::from_static(&[9; 100]),
                    crc32c: Some(1),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        for cut in 0..msg.len() {
            let r = Rope::from(Bytes::copy_from_slice(&msg[..cut]));
            let _ = decode_response(&r);
        }
        assert!(matches!(
            decode_response(&Rope::from(Bytes::copy_from_slice(&msg[..50]))),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            decode_response(&Rope::from(Bytes::from_static(&[0x0b]))),
            Err(WireError::WireType(3))
        ));
        assert!(matches!(
            decode_response(&Rope::from(Bytes::from_static(&[0xff; 11]))),
            Err(WireError::Varint)
        ));
        let mut f = Framer::new(16);
        f.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert!(matches!(f.next_message(), Err(WireError::Compressed)));
        let mut f = Framer::new(16);
        f.push(Bytes::from_static(&[0, 0, 0, 0, 17]));
        assert!(matches!(
            f.next_message(),
            Err(WireError::TooLarge { len: 17, .. })
        ));
    }

    fn write_request() -> impl Strategy<Value = BidiWriteObjectRequest> {
        use crate::proto::storage::bidi_write_object_request::{Data, FirstMessage};
        use crate::proto::storage::{AppendObjectSpec, ObjectChecksums};
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::option::of(any::<u32>()),
            0i64..(1 << 40),
            any::<(bool, bool, bool, bool)>(),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(
                |(content, crc, offset, (flush, lookup, finish, first), whole)| {
                    BidiWriteObjectRequest {
                        first_message: first.then(|| {
                            FirstMessage::AppendObjectSpec(AppendObjectSpec {
                                bucket: "projects/_/buckets/b".into(),
                                object: "o".into(),
                                generation: 7,
                                ..Default::default()
                            })
                        }),
                        write_offset: offset,
                        data: Some(Data::ChecksummedData(ChecksummedData {
                            content: Bytes::from(content),
                            crc32c: crc,
                        })),
                        object_checksums: whole.map(|c| ObjectChecksums {
                            crc32c: Some(c),
                            md5_hash: Bytes::new(),
                        }),
                        state_lookup: lookup,
                        flush,
                        finish_write: finish,
                        common_object_request_params: None,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

        /// A write request's pieces are one gRPC frame whose message decodes
        /// to the request; the content piece is the caller's buffer itself.
        #[test]
        fn write_requests_frame_without_copying_content(m in write_request()) {
            let pieces = write_request_frames(m.clone());
            let whole: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
            prop_assert_eq!(whole[0], 0);
            let len = u32::from_be_bytes([whole[1], whole[2], whole[3], whole[4]]) as usize;
            prop_assert_eq!(len, whole.len() - 5);
            let back = BidiWriteObjectRequest::decode(&whole[5..]).expect("decodes");
            prop_assert_eq!(&back, &m);
            if let Some(bidi_write_object_request::Data::ChecksummedData(d)) = &m.data {
                if !d.content.is_empty() {
                    prop_assert!(pieces.iter().any(|p| p.as_ptr() == d.content.as_ptr()));
                }
            }
        }
    }
}
