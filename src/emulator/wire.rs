//! What every emulator call shares on the wire: an object's metadata as the
//! service sends it, timestamps, the routing header (`x-goog-request-params`)
//! and its check, the per-call bookkeeping of credentials and user agent,
//! statuses carrying a typed detail, the opaque read and write handles, and
//! running a blocking store call off the reactor. `service` (unary calls), `bidi` (read
//! streams) and `send` (their responses) take these from here; none of them
//! imports another for them.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use super::store::ObjectMeta;
use super::{EmuError, Emulator};
use crate::proto::storage;
use crate::proto::RpcStatus;

/// Builds a status whose `grpc-status-details-bin` is a `google.rpc.Status`
/// holding one detail message (as the real service sends typed errors).
pub fn status_with_detail<M: Message>(
    code: tonic::Code,
    message: &str,
    type_name: &str,
    detail: &M,
) -> tonic::Status {
    let rpc = RpcStatus {
        code: code as i32,
        message: message.to_string(),
        details: vec![prost_types::Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value: detail.encode_to_vec(),
        }],
    };
    tonic::Status::with_details(code, message, rpc.encode_to_vec().into())
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// `finalize_time` of a finalized object. The official Python client
/// (google-cloud-storage 3.17) takes an object as finalized only when the seconds
/// within the minute of this time are non-zero, so a time on a whole minute is
/// moved one second later (the emulator's stand-in time is the file's mtime).
fn finalize_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let mut ts = timestamp(t);
    if ts.seconds % 60 == 0 {
        ts.seconds += 1;
    }
    ts
}

/// The wire form of an object's metadata.
pub fn object_proto(m: &ObjectMeta) -> storage::Object {
    storage::Object {
        name: m.name.clone(),
        bucket: format!("projects/_/buckets/{}", m.bucket),
        generation: m.generation,
        metageneration: 1,
        storage_class: "RAPID".to_string(),
        size: m.size as i64,
        content_type: "application/octet-stream".to_string(),
        create_time: Some(timestamp(m.ctime)),
        update_time: Some(timestamp(m.mtime)),
        finalize_time: m.finalized.then(|| finalize_timestamp(m.mtime)),
        checksums: m.crc32c.map(|crc| storage::ObjectChecksums {
            crc32c: Some(crc),
            md5_hash: Default::default(),
        }),
        etag: format!("{:x}", m.generation),
        ..Default::default()
    }
}

/// Parses the `x-goog-request-params` header (`k=v&k=v`, values possibly
/// percent-encoded) into a map.
pub fn request_params(md: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(v) = md
        .get("x-goog-request-params")
        .and_then(|v| v.to_str().ok())
    {
        for kv in v.split('&') {
            if let Some((k, v)) = kv.split_once('=') {
                out.insert(percent_decode(k), percent_decode(v));
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The routing parameters of a call; also counts calls that carry a bearer
/// token (the token itself is never looked at further, nor logged).
pub fn call_params(emu: &Emulator, md: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    let count = |header: &str, prefix: &[u8], counter: &std::sync::atomic::AtomicU64| {
        if md
            .get(header)
            .is_some_and(|v| v.as_bytes().starts_with(prefix))
        {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    };
    count("authorization", b"Bearer ", &emu.counters.authorized_calls);
    count("user-agent", b"zonalfs/", &emu.counters.zonalfs_agent_calls);
    request_params(md)
}

/// Checks that the routing header, when sent, names the bucket of the request.
pub fn check_routing(
    params: &HashMap<String, String>,
    bucket_resource: &str,
) -> Result<(), EmuError> {
    match params.get("bucket") {
        Some(b) if b != bucket_resource => Err(EmuError::InvalidArgument(format!(
            "x-goog-request-params names bucket '{b}' but the request is for '{bucket_resource}'"
        ))),
        _ => Ok(()),
    }
}

/// An opaque handle (a read or a write handle, told apart by `magic`)
/// naming (bucket, object, generation).
pub fn encode_handle(magic: &str, bucket: &str, object: &str, generation: i64) -> bytes::Bytes {
    bytes::Bytes::from(format!("{magic}\0{bucket}\0{object}\0{generation}"))
}

/// The (bucket, object, generation) of a handle made by [`encode_handle`]
/// with the same `magic`.
pub fn decode_handle(magic: &str, h: &[u8]) -> Option<(String, String, i64)> {
    let s = std::str::from_utf8(h).ok()?;
    let mut parts = s.split('\0');
    if parts.next()? != magic {
        return None;
    }
    let bucket = parts.next()?.to_string();
    let object = parts.next()?.to_string();
    let generation = parts.next()?.parse().ok()?;
    parts
        .next()
        .is_none()
        .then_some((bucket, object, generation))
}

/// The generation a reopen pins: the spec's, checked against its handle's
/// (`what`: "read_handle" or "write_handle"), or the handle's when the spec
/// names none.
pub fn pinned_generation(
    magic: &str,
    what: &str,
    handle: Option<&[u8]>,
    bucket: &str,
    object: &str,
    generation: i64,
) -> Result<i64, EmuError> {
    let Some(h) = handle else {
        return Ok(generation);
    };
    let bad = |m: &str| EmuError::InvalidArgument(m.replace("HANDLE", what));
    let (hb, ho, hg) = decode_handle(magic, h).ok_or_else(|| bad("Invalid HANDLE"))?;
    if hb != bucket || ho != object {
        return Err(bad("The HANDLE is for another object"));
    }
    match generation {
        0 => Ok(hg),
        g if g == hg => Ok(g),
        _ => Err(bad("The HANDLE is for another generation")),
    }
}

/// The routing token of a reopen: in the spec and/or the routing header, the
/// same if both; it must be one a redirect handed out.
pub fn routing_token(
    emu: &Emulator,
    in_spec: Option<&String>,
    params: &HashMap<String, String>,
) -> Result<Option<String>, EmuError> {
    let token = match (in_spec, params.get("routing_token")) {
        (Some(a), Some(b)) if a != b => {
            return Err(EmuError::InvalidArgument(
                "routing_token differs between the spec and x-goog-request-params".into(),
            ))
        }
        (Some(a), _) => Some(a.clone()),
        (None, b) => b.cloned(),
    };
    if let Some(t) = &token {
        if !emu.faults.known_token(t) {
            return Err(EmuError::InvalidArgument(format!(
                "Unknown routing token: {t}"
            )));
        }
    }
    Ok(token)
}

/// Runs a blocking store call off the reactor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EmuError> + Send + 'static,
) -> Result<T, tonic::Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .map_err(tonic::Status::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_header() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "x-goog-request-params",
            "bucket=projects%2F_%2Fbuckets%2Fb1&routing_token=t"
                .parse()
                .unwrap(),
        );
        let p = request_params(&md);
        assert_eq!(p["bucket"], "projects/_/buckets/b1");
        assert_eq!(p["routing_token"], "t");
        assert!(check_routing(&p, "projects/_/buckets/b1").is_ok());
        assert!(check_routing(&p, "projects/_/buckets/b2").is_err());
    }
}
