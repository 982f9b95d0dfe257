//! The emulator's gRPC services: `google.storage.v2.Storage` (GetBucket, GetObject,
//! ListObjects, ReadObject; BidiReadObject is handed to [`super::bidi`]) and
//! `google.storage.control.v2.StorageControl` (GetStorageLayout).
//!
//! Each call parses and validates its request, checks the `x-goog-request-params`
//! routing header against the bucket it names, asks the [`super::store`] and turns
//! the answer into wire messages. `ReadObject` streams chunks from a spawned task
//! through a small channel (backpressure: at most a few chunks are buffered).

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::store::{self, ListCursor, ListQuery, ObjectMeta};
use super::wire::{call_params, check_routing, object_proto, timestamp};
use super::{bidi, EmuError, Emulator};
use crate::proto::{control, storage};

/// Largest page ListObjects returns (and its default), as GCS.
pub const MAX_PAGE: usize = 1000;

/// `storage.v2.Storage` over the emulator.
pub struct StorageService {
    pub emu: Arc<Emulator>,
}

/// `storage.control.v2.StorageControl` over the emulator.
pub struct ControlService {
    pub emu: Arc<Emulator>,
}

fn encode_cursor(c: &ListCursor) -> String {
    let (tag, s) = match c {
        ListCursor::AfterName(n) => ('o', n),
        ListCursor::AfterPrefix(p) => ('p', p),
    };
    let mut out = String::with_capacity(1 + 2 * s.len());
    out.push(tag);
    for b in s.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn decode_cursor(t: &str) -> Result<ListCursor, EmuError> {
    let bad = || EmuError::InvalidArgument(format!("Invalid page token: {t:?}"));
    let tag = t.chars().next().ok_or_else(bad)?;
    let hex = &t[tag.len_utf8()..];
    if !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    match tag {
        'o' => Ok(ListCursor::AfterName(s)),
        'p' => Ok(ListCursor::AfterPrefix(s)),
        _ => Err(bad()),
    }
}

impl StorageService {
    fn list(
        &self,
        req: &storage::ListObjectsRequest,
    ) -> Result<storage::ListObjectsResponse, EmuError> {
        let bucket = store::parse_bucket_resource(&req.parent)?;
        if req.page_size < 0 {
            return Err(EmuError::InvalidArgument(format!(
                "Invalid page_size: {}",
                req.page_size
            )));
        }
        if !req.match_glob.is_empty() || !req.filter.is_empty() {
            return Err(EmuError::InvalidArgument(
                "match_glob and filter are not supported by the emulator".to_string(),
            ));
        }
        let page_size = match req.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let q = ListQuery {
            prefix: req.prefix.clone(),
            delimiter: req.delimiter.clone(),
            include_folders_as_prefixes: req.include_folders_as_prefixes && req.delimiter == "/",
            start: req.lexicographic_start.clone(),
            end: req.lexicographic_end.clone(),
            cursor: if req.page_token.is_empty() {
                None
            } else {
                Some(decode_cursor(&req.page_token)?)
            },
            page_size,
        };
        let page = self.emu.store.list(bucket, &q)?;
        Ok(storage::ListObjectsResponse {
            objects: page.objects.iter().map(object_proto).collect(),
            prefixes: page.prefixes,
            next_page_token: page.next.as_ref().map(encode_cursor).unwrap_or_default(),
        })
    }

    fn bucket(&self, name: &str) -> Result<storage::Bucket, EmuError> {
        let bucket = store::parse_bucket_resource(name)?;
        let created = timestamp(self.emu.store.bucket_time(bucket)?);
        Ok(storage::Bucket {
            name: name.to_string(),
            bucket_id: bucket.to_string(),
            project: "projects/0".to_string(),
            metageneration: 1,
            location: self.emu.location.to_uppercase(),
            location_type: self.emu.location_type.clone(),
            storage_class: "RAPID".to_string(),
            create_time: Some(created),
            update_time: Some(created),
            logging: None,
            etag: "CAE=".to_string(),
            hierarchical_namespace: Some(storage::bucket::HierarchicalNamespace { enabled: true }),
        })
    }
}

type ReadObjectStream = ReceiverStream<Result<storage::ReadObjectResponse, Status>>;

#[tonic::async_trait]
impl storage::storage_server::Storage for StorageService {
    async fn get_bucket(
        &self,
        request: Request<storage::GetBucketRequest>,
    ) -> Result<Response<storage::Bucket>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        check_routing(&params, &req.name)?;
        Ok(Response::new(self.bucket(&req.name)?))
    }

    async fn get_object(
        &self,
        request: Request<storage::GetObjectRequest>,
    ) -> Result<Response<storage::Object>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        check_routing(&params, &req.bucket)?;
        let bucket = store::parse_bucket_resource(&req.bucket)?.to_string();
        let emu = self.emu.clone();
        let meta = tokio::task::spawn_blocking(move || -> Result<ObjectMeta, EmuError> {
            let (mut meta, file) = emu.store.open(&bucket, &req.object, req.generation)?;
            emu.store.checksum(&mut meta, &file)?;
            Ok(meta)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(object_proto(&meta)))
    }

    type ReadObjectStream = ReadObjectStream;

    async fn read_object(
        &self,
        request: Request<storage::ReadObjectRequest>,
    ) -> Result<Response<Self::ReadObjectStream>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        check_routing(&params, &req.bucket)?;
        let rx = bidi::read_object(self.emu.clone(), req).await?;
        Ok(Response::new(rx))
    }

    type BidiReadObjectStream = bidi::ResponseStream;

    async fn bidi_read_object(
        &self,
        request: Request<Streaming<storage::BidiReadObjectRequest>>,
    ) -> Result<Response<Self::BidiReadObjectStream>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let stream = bidi::open(self.emu.clone(), params, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    type BidiWriteObjectStream = ReceiverStream<Result<storage::BidiWriteObjectResponse, Status>>;

    async fn bidi_write_object(
        &self,
        _request: Request<Streaming<storage::BidiWriteObjectRequest>>,
    ) -> Result<Response<Self::BidiWriteObjectStream>, Status> {
        Err(Status::unimplemented(
            "BidiWriteObject is not implemented by the emulator yet",
        ))
    }

    async fn list_objects(
        &self,
        request: Request<storage::ListObjectsRequest>,
    ) -> Result<Response<storage::ListObjectsResponse>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        check_routing(&params, &req.parent)?;
        let svc = StorageService {
            emu: self.emu.clone(),
        };
        let resp = tokio::task::spawn_blocking(move || svc.list(&req))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(resp))
    }
}

#[tonic::async_trait]
impl control::storage_control_server::StorageControl for ControlService {
    async fn get_storage_layout(
        &self,
        request: Request<control::GetStorageLayoutRequest>,
    ) -> Result<Response<control::StorageLayout>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        let resource = req.name.strip_suffix("/storageLayout").ok_or_else(|| {
            EmuError::InvalidArgument(format!(
                "Invalid storage layout name '{}': expected projects/_/buckets/BUCKET/storageLayout",
                req.name
            ))
        })?;
        check_routing(&params, resource)?;
        let bucket = store::parse_bucket_resource(resource)?;
        self.emu.store.bucket_dir(bucket)?;
        Ok(Response::new(control::StorageLayout {
            name: req.name.clone(),
            location: self.emu.location.to_uppercase(),
            location_type: self.emu.location_type.clone(),
            custom_placement_config: Some(control::storage_layout::CustomPlacementConfig {
                data_locations: vec![self.emu.location.clone()],
            }),
            hierarchical_namespace: Some(control::storage_layout::HierarchicalNamespace {
                enabled: true,
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        for c in [
            ListCursor::AfterName("a/b é".into()),
            ListCursor::AfterPrefix("x/".into()),
        ] {
            assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        }
        assert!(decode_cursor("zzz").is_err());
        assert!(decode_cursor("o6").is_err());
        assert!(decode_cursor("").is_err());
    }
}
