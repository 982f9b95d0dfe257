//! The emulator's gRPC services: `google.storage.v2.Storage` (GetBucket, GetObject,
//! ListObjects, ReadObject, DeleteObject, MoveObject; BidiReadObject is handed to
//! [`super::bidi`], BidiWriteObject to [`super::write`]),
//! `google.storage.control.v2.StorageControl` (GetStorageLayout and the folder
//! calls) and `google.longrunning.Operations` (GetOperation, for the folder
//! renames, which are done when they return).
//!
//! Each call parses and validates its request, checks the `x-goog-request-params`
//! routing header against the bucket it names, asks the [`super::store`] and turns
//! the answer into wire messages. `ReadObject` streams chunks from a spawned task
//! through a small channel (backpressure: at most a few chunks are buffered).

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::store::{self, ListCursor, ListQuery, Preconditions};
use super::wire::{blocking, call_params, check_routing, object_proto, timestamp};
use super::{bidi, write, EmuError, Emulator};
use crate::proto::{control, longrunning, storage};

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

/// `google.longrunning.Operations` over the emulator: the operations that
/// folder renames return (they finish before they are returned).
pub struct OperationsService {
    pub emu: Arc<Emulator>,
}

/// Parses `projects/_/buckets/B/folders/PATH` into (B, PATH with a trailing `/`).
fn parse_folder_name(name: &str) -> Result<(String, String), EmuError> {
    let bad = || {
        EmuError::InvalidArgument(format!(
            "Invalid folder name '{name}': expected projects/_/buckets/BUCKET/folders/PATH/"
        ))
    };
    let rest = name.strip_prefix("projects/_/buckets/").ok_or_else(bad)?;
    let (bucket, path) = rest.split_once("/folders/").ok_or_else(bad)?;
    let bucket = store::parse_bucket_resource(&format!("projects/_/buckets/{bucket}"))?.to_string();
    Ok((bucket, store::folder_path(path)?))
}

fn folder_proto(f: &store::FolderMeta) -> control::Folder {
    control::Folder {
        name: format!("projects/_/buckets/{}/folders/{}", f.bucket, f.path),
        metageneration: 1,
        create_time: Some(timestamp(f.ctime)),
        update_time: Some(timestamp(f.mtime)),
        pending_rename_info: None,
    }
}

fn any<M: prost::Message>(type_name: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: m.encode_to_vec(),
    }
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
        let (meta, _) = bidi::open_object(&self.emu, &bucket, &req.object, req.generation).await?;
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

    type BidiWriteObjectStream = write::ResponseStream;

    async fn bidi_write_object(
        &self,
        request: Request<Streaming<storage::BidiWriteObjectRequest>>,
    ) -> Result<Response<Self::BidiWriteObjectStream>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let stream = write::open(self.emu.clone(), params, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn delete_object(
        &self,
        request: Request<storage::DeleteObjectRequest>,
    ) -> Result<Response<()>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        check_routing(&params, &req.bucket)?;
        let bucket = store::parse_bucket_resource(&req.bucket)?.to_string();
        store::check_object_name(&req.object)?;
        let pre = Preconditions {
            if_generation_match: req.if_generation_match,
            if_generation_not_match: req.if_generation_not_match,
            if_metageneration_match: req.if_metageneration_match,
            if_metageneration_not_match: req.if_metageneration_not_match,
        };
        let emu = self.emu.clone();
        blocking(move || emu.store.delete(&bucket, &req.object, req.generation, &pre)).await?;
        Ok(Response::new(()))
    }

    async fn move_object(
        &self,
        request: Request<storage::MoveObjectRequest>,
    ) -> Result<Response<storage::Object>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        check_routing(&params, &req.bucket)?;
        let bucket = store::parse_bucket_resource(&req.bucket)?.to_string();
        store::check_object_name(&req.source_object)?;
        store::check_object_name(&req.destination_object)?;
        let source_pre = Preconditions {
            if_generation_match: req.if_source_generation_match,
            if_generation_not_match: req.if_source_generation_not_match,
            if_metageneration_match: req.if_source_metageneration_match,
            if_metageneration_not_match: req.if_source_metageneration_not_match,
        };
        let pre = Preconditions {
            if_generation_match: req.if_generation_match,
            if_generation_not_match: req.if_generation_not_match,
            if_metageneration_match: req.if_metageneration_match,
            if_metageneration_not_match: req.if_metageneration_not_match,
        };
        let emu = self.emu.clone();
        let meta = blocking(move || {
            emu.store.rename(
                &bucket,
                &req.source_object,
                &req.destination_object,
                &source_pre,
                &pre,
            )
        })
        .await?;
        Ok(Response::new(object_proto(&meta)))
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
        let resp = blocking(move || svc.list(&req)).await?;
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

    async fn create_folder(
        &self,
        request: Request<control::CreateFolderRequest>,
    ) -> Result<Response<control::Folder>, Status> {
        let params = call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        check_routing(&params, &req.parent)?;
        let bucket = store::parse_bucket_resource(&req.parent)?.to_string();
        let path = store::folder_path(&req.folder_id)?;
        let emu = self.emu.clone();
        let f = blocking(move || emu.store.create_folder(&bucket, &path, req.recursive)).await?;
        Ok(Response::new(folder_proto(&f)))
    }

    async fn delete_folder(
        &self,
        request: Request<control::DeleteFolderRequest>,
    ) -> Result<Response<()>, Status> {
        call_params(&self.emu, request.metadata());
        let (bucket, path) = parse_folder_name(&request.into_inner().name)?;
        let emu = self.emu.clone();
        blocking(move || emu.store.delete_folder(&bucket, &path)).await?;
        Ok(Response::new(()))
    }

    async fn get_folder(
        &self,
        request: Request<control::GetFolderRequest>,
    ) -> Result<Response<control::Folder>, Status> {
        call_params(&self.emu, request.metadata());
        let (bucket, path) = parse_folder_name(&request.into_inner().name)?;
        let emu = self.emu.clone();
        let f = blocking(move || emu.store.folder(&bucket, &path)).await?;
        Ok(Response::new(folder_proto(&f)))
    }

    async fn rename_folder(
        &self,
        request: Request<control::RenameFolderRequest>,
    ) -> Result<Response<longrunning::Operation>, Status> {
        call_params(&self.emu, request.metadata());
        let req = request.into_inner();
        let (bucket, from) = parse_folder_name(&req.name)?;
        let to = store::folder_path(&req.destination_folder_id)?;
        let started = std::time::SystemTime::now();
        let (emu, b, f, t) = (self.emu.clone(), bucket.clone(), from.clone(), to.clone());
        let folder = blocking(move || emu.store.rename_folder(&b, &f, &t)).await?;
        let id = self.emu.store.next_generation();
        let name = format!("projects/_/buckets/{bucket}/operations/rename-{id}");
        let ended = Some(timestamp(std::time::SystemTime::now()));
        let metadata = control::RenameFolderMetadata {
            common_metadata: Some(control::CommonLongRunningOperationMetadata {
                create_time: Some(timestamp(started)),
                end_time: ended,
                update_time: ended,
                r#type: "rename-folder".to_string(),
                requested_cancellation: false,
                progress_percent: 100,
            }),
            source_folder_id: from,
            destination_folder_id: to,
        };
        let op = longrunning::Operation {
            name: name.clone(),
            metadata: Some(any(
                "google.storage.control.v2.RenameFolderMetadata",
                &metadata,
            )),
            done: true,
            result: Some(longrunning::operation::Result::Response(any(
                "google.storage.control.v2.Folder",
                &folder_proto(&folder),
            ))),
        };
        let mut ops = crate::sync::lock(&self.emu.operations);
        if ops.len() > 10_000 {
            ops.clear();
        }
        ops.insert(name, op.clone());
        Ok(Response::new(op))
    }
}

#[tonic::async_trait]
impl longrunning::operations_server::Operations for OperationsService {
    async fn get_operation(
        &self,
        request: Request<longrunning::GetOperationRequest>,
    ) -> Result<Response<longrunning::Operation>, Status> {
        let name = request.into_inner().name;
        let op = crate::sync::lock(&self.emu.operations).get(&name).cloned();
        op.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("No such operation: {name}")))
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
