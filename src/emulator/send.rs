//! The emulator's `BidiReadObject` responses sent without a copy of their
//! chunk content.
//!
//! A generic gRPC encoder writes each response message whole into one buffer
//! before the transport sends it: every content byte the emulator read from
//! its file is copied once more there. On two cores that CPU is taken from
//! the daemon being measured. Here a response becomes a few buffers instead:
//! the 5-byte gRPC prefix with the protobuf fields up to a chunk's content,
//! the content itself (the very buffer the file was read into), and the
//! fields after it. HTTP/2 sends each as data frames of its own.
//!
//! [`Router`] sits in front of the generated `Storage` service: it answers
//! `BidiReadObject` itself (the same token check, the same handler, the same
//! stream of responses, only the encoding differs) and hands every other call
//! to the generated service. [`encode`] writes the protobuf encoding prost
//! would (fields in number order, defaults omitted), which a unit test checks
//! byte for byte.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body::Frame;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::Service;
use tonic::service::Interceptor;
use tonic::Status;

use super::Emulator;
use crate::proto::storage::{BidiReadObjectRequest, BidiReadObjectResponse, ObjectRangeData};

/// The path of the call answered here.
const BIDI_READ_OBJECT: &str = "/google.storage.v2.Storage/BidiReadObject";

/// Largest request message accepted (as the generated service is set up).
const MAX_REQUEST: usize = 16 << 20;

/// The generated `Storage` service with `BidiReadObject` answered here.
#[derive(Clone)]
pub struct Router<S, I> {
    pub inner: S,
    pub emu: Arc<Emulator>,
    pub check: I,
}

impl<S, I> tonic::server::NamedService for Router<S, I> {
    const NAME: &'static str = "google.storage.v2.Storage";
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, I> Service<http::Request<tonic::body::Body>> for Router<S, I>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>, Error = Infallible>
        + Send,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Interceptor + Clone + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != BIDI_READ_OBJECT {
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(fut.await?.map(tonic::body::Body::new)) });
        }
        let (emu, mut check) = (self.emu.clone(), self.check.clone());
        Box::pin(async move { Ok(bidi_read_object(emu, &mut check, req).await) })
    }
}

/// Answers one `BidiReadObject` call: the token check, then the emulator's
/// handler, its responses encoded by [`encode`].
async fn bidi_read_object(
    emu: Arc<Emulator>,
    check: &mut impl Interceptor,
    req: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let (parts, body) = req.into_parts();
    let mut codec =
        tonic_prost::ProstCodec::<BidiReadObjectResponse, BidiReadObjectRequest>::default();
    let requests = Streaming::new_request(codec.decoder(), body, None, Some(MAX_REQUEST));
    let request = tonic::Request::from_http(http::Request::from_parts(parts, requests));
    let (metadata, extensions, requests) = request.into_parts();
    let checked = match check.call(tonic::Request::from_parts(metadata, extensions, ())) {
        Ok(r) => r,
        Err(st) => return st.into_http(),
    };
    let params = super::wire::call_params(&emu, checked.metadata());
    match super::bidi::open(emu, params, requests).await {
        Ok(responses) => {
            let mut resp = http::Response::new(tonic::body::Body::new(Framed {
                responses,
                frames: VecDeque::new(),
                done: false,
            }));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            resp
        }
        Err(st) => st.into_http(),
    }
}

/// The response body: each message as the buffers [`encode`] makes, then
/// the call's status as trailers.
struct Framed {
    responses: super::bidi::ResponseStream,
    frames: VecDeque<Bytes>,
    done: bool,
}

impl http_body::Body for Framed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(b) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let status = match Pin::new(&mut self.responses).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(msg))) => {
                encode(&msg, &mut self.frames);
                return match self.frames.pop_front() {
                    Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                    None => Poll::Pending,
                };
            }
            Poll::Ready(Some(Err(st))) => st,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            // A status that cannot be put in headers: say so generically.
            let _ = Status::internal("the status could not be encoded").add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

/// Appends `msg` to `out` as one gRPC message: buffers that, concatenated,
/// are the 5-byte prefix and the protobuf encoding prost would write, with
/// each chunk's content its own buffer (not copied).
pub fn encode(msg: &BidiReadObjectResponse, out: &mut VecDeque<Bytes>) {
    let ranges_len: usize = msg
        .object_data_ranges
        .iter()
        .map(|r| {
            let l = range_len(r);
            key_len(6) + encoded_len_varint(l as u64) + l
        })
        .sum();
    let meta_len = msg.metadata.as_ref().map_or(0, |m| {
        let l = m.encoded_len();
        key_len(4) + encoded_len_varint(l as u64) + l
    });
    let handle_len = msg.read_handle.as_ref().map_or(0, |h| {
        let l = h.encoded_len();
        key_len(7) + encoded_len_varint(l as u64) + l
    });
    let total = meta_len + ranges_len + handle_len;
    let mut head = BytesMut::with_capacity(5 + meta_len + 64);
    head.put_u8(0);
    head.put_u32(total as u32);
    if let Some(m) = &msg.metadata {
        prost::encoding::message::encode(4, m, &mut head);
    }
    for r in &msg.object_data_ranges {
        encode_key(6, WireType::LengthDelimited, &mut head);
        encode_varint(range_len(r) as u64, &mut head);
        if let Some(cd) = &r.checksummed_data {
            encode_key(1, WireType::LengthDelimited, &mut head);
            encode_varint(data_len(cd) as u64, &mut head);
            if !cd.content.is_empty() {
                encode_key(1, WireType::LengthDelimited, &mut head);
                encode_varint(cd.content.len() as u64, &mut head);
                out.push_back(head.split().freeze());
                out.push_back(cd.content.clone());
            }
            if let Some(crc) = cd.crc32c {
                encode_key(2, WireType::ThirtyTwoBit, &mut head);
                head.put_u32_le(crc);
            }
        }
        if let Some(rr) = &r.read_range {
            prost::encoding::message::encode(2, rr, &mut head);
        }
        if r.range_end {
            prost::encoding::bool::encode(3, &r.range_end, &mut head);
        }
    }
    if let Some(h) = &msg.read_handle {
        prost::encoding::message::encode(7, h, &mut head);
    }
    if !head.is_empty() {
        out.push_back(head.freeze());
    }
}

/// Encoded length of a `ChecksummedData`'s fields.
fn data_len(cd: &crate::proto::storage::ChecksummedData) -> usize {
    let content = if cd.content.is_empty() {
        0
    } else {
        key_len(1) + encoded_len_varint(cd.content.len() as u64) + cd.content.len()
    };
    content + cd.crc32c.map_or(0, |_| key_len(2) + 4)
}

/// Encoded length of an `ObjectRangeData`'s fields.
fn range_len(r: &ObjectRangeData) -> usize {
    let data = r.checksummed_data.as_ref().map_or(0, |cd| {
        let l = data_len(cd);
        key_len(1) + encoded_len_varint(l as u64) + l
    });
    let range = r.read_range.as_ref().map_or(0, |rr| {
        let l = rr.encoded_len();
        key_len(2) + encoded_len_varint(l as u64) + l
    });
    data + range + if r.range_end { key_len(3) + 1 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::storage::{BidiReadHandle, ChecksummedData, Object, ReadRange};
    use proptest::prelude::*;

    fn range() -> impl Strategy<Value = ObjectRangeData> {
        (
            proptest::option::of((
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::option::of(any::<u32>()),
            )),
            proptest::option::of((any::<i64>(), any::<i64>(), any::<i64>())),
            any::<bool>(),
        )
            .prop_map(|(data, rr, end)| ObjectRangeData {
                checksummed_data: data.map(|(c, crc)| ChecksummedData {
                    content: Bytes::from(c),
                    crc32c: crc,
                }),
                read_range: rr.map(|(o, l, id)| ReadRange {
                    read_offset: o,
                    read_length: l,
                    read_id: id,
                }),
                range_end: end,
            })
    }

    proptest! {
        /// The buffers are the 5-byte prefix and exactly prost's encoding,
        /// and every non-empty content is a buffer of its own, not a copy.
        #[test]
        fn encodes_as_prost_does(
            ranges in proptest::collection::vec(range(), 0..4),
            name in proptest::option::of("[a-z]{0,20}"),
            handle in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ) {
            let msg = BidiReadObjectResponse {
                object_data_ranges: ranges,
                metadata: name.map(|n| Object { name: n, size: 7, ..Default::default() }),
                read_handle: handle.map(|h| BidiReadHandle { handle: Bytes::from(h) }),
            };
            let mut out = VecDeque::new();
            encode(&msg, &mut out);
            let joined: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
            let want = msg.encode_to_vec();
            prop_assert_eq!(joined[0], 0);
            prop_assert_eq!(&joined[1..5], &(want.len() as u32).to_be_bytes()[..]);
            prop_assert_eq!(&joined[5..], &want[..]);
            for r in &msg.object_data_ranges {
                if let Some(cd) = r.checksummed_data.as_ref().filter(|cd| !cd.content.is_empty()) {
                    prop_assert!(
                        out.iter().any(|b| b.as_ptr() == cd.content.as_ptr() && b.len() == cd.content.len()),
                        "the content went as its own buffer"
                    );
                }
            }
        }
    }
}
