//! The metadata calls of one bucket: storage layout / bucket (is it there, is it
//! zonal), get object (stat), list objects (prefix, delimiter `/`, folders as
//! prefixes, pagination), delete and move objects, and the folders of a
//! hierarchical namespace (create, get, delete, rename: a long-running
//! operation, polled until it is done). Unary calls are retried with backoff while the error
//! is retryable and the retry deadline allows (an attempt with no answer within
//! the stall timeout counts as UNAVAILABLE); every error names the bucket or
//! object it concerns.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::auth::{CredentialsSource, TokenProvider};
use super::retry::{Backoff, RetryPolicy};
use super::transport::{resolve_endpoint, Transport};
use super::{GcsError, ListPage, ObjectInfo};
use crate::proto::control::storage_control_client::StorageControlClient;
use crate::proto::control::{
    CreateFolderRequest, DeleteFolderRequest, GetFolderRequest, GetStorageLayoutRequest,
    RenameFolderRequest,
};
use crate::proto::longrunning::operations_client::OperationsClient;
use crate::proto::longrunning::{operation, GetOperationRequest};
use crate::proto::storage::storage_client::StorageClient;
use crate::proto::storage::{
    DeleteObjectRequest, GetBucketRequest, GetObjectRequest, ListObjectsRequest, MoveObjectRequest,
    Object,
};

/// Everything needed to reach a bucket.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub bucket: String,
    /// `--endpoint`; None: STORAGE_EMULATOR_HOST or the real service.
    pub endpoint: Option<String>,
    /// `--connections`: HTTP/2 connections to the endpoint.
    pub connections: usize,
    pub credentials: CredentialsSource,
    pub retry: RetryPolicy,
    /// Largest gRPC message accepted (responses carry up to 2 MiB of data).
    pub max_message: usize,
}

impl ClientConfig {
    pub fn new(bucket: &str) -> ClientConfig {
        ClientConfig {
            bucket: bucket.to_string(),
            endpoint: None,
            connections: DEFAULT_CONNECTIONS,
            credentials: CredentialsSource::Adc,
            retry: RetryPolicy::default(),
            max_message: 16 << 20,
        }
    }
}

/// Default HTTP/2 connections. One connection's HTTP/2 framing is processed by
/// one task at a time on each side; two let the two cores of a small machine
/// work on two streams at once, and more buys nothing on loopback
/// (docs/benchmarks.md). Streams are multiplexed over them.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Where a bucket lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketInfo {
    pub name: String,
    pub location: String,
    pub location_type: String,
    pub hierarchical_namespace: bool,
}

impl BucketInfo {
    pub fn is_zonal(&self) -> bool {
        self.location_type.eq_ignore_ascii_case("zone")
    }
}

/// A connected client for one bucket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GcsClient {
    pub(crate) transport: Arc<Transport>,
    pub(crate) bucket: String,
    pub(crate) retry: RetryPolicy,
    pub(crate) max_message: usize,
    calls: Arc<CallStats>,
}

/// Metadata calls made to the service (each attempt counts), shared by the
/// client's clones: what the metrics report as `zonalfs_gcs_requests_total`.
#[derive(Debug, Default)]
pub struct CallStats {
    pub get_object: std::sync::atomic::AtomicU64,
    pub list_objects: std::sync::atomic::AtomicU64,
}

fn time(t: Option<prost_types::Timestamp>) -> SystemTime {
    match t {
        Some(ts) if ts.seconds >= 0 => {
            UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos.clamp(0, 999_999_999) as u32)
        }
        _ => UNIX_EPOCH,
    }
}

/// The layer's view of an object's metadata.
pub fn object_info(o: &Object) -> ObjectInfo {
    ObjectInfo {
        name: o.name.clone(),
        size: o.size.max(0) as u64,
        generation: o.generation,
        metageneration: o.metageneration,
        finalized: o.finalize_time.is_some(),
        update_time: time(o.update_time),
        create_time: time(o.create_time),
        crc32c: o.checksums.as_ref().and_then(|c| c.crc32c),
    }
}

impl GcsClient {
    /// Resolves the endpoint, builds credentials and connects.
    pub async fn connect(cfg: ClientConfig) -> Result<GcsClient, GcsError> {
        let emulator_host = std::env::var("STORAGE_EMULATOR_HOST").ok();
        let target = resolve_endpoint(cfg.endpoint.as_deref(), emulator_host.as_deref())?;
        let source = if target.anonymous {
            CredentialsSource::Anonymous
        } else {
            cfg.credentials.clone()
        };
        let auth = TokenProvider::new(source).await?;
        let transport = Transport::connect(target, cfg.connections, auth).await?;
        Ok(GcsClient {
            transport: Arc::new(transport),
            bucket: cfg.bucket,
            retry: cfg.retry,
            max_message: cfg.max_message,
            calls: Arc::default(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The metadata calls made so far.
    pub fn calls(&self) -> &CallStats {
        &self.calls
    }

    /// Read streams open on each HTTP/2 connection now.
    pub fn streams_per_connection(&self) -> Vec<usize> {
        self.transport.streams_per_connection()
    }

    fn bucket_resource(&self) -> String {
        format!("projects/_/buckets/{}", self.bucket)
    }

    pub(crate) fn storage(&self) -> StorageClient<tonic::transport::Channel> {
        self.storage_on(self.transport.channel())
    }

    /// The storage stub on a given connection.
    pub(crate) fn storage_on(
        &self,
        channel: tonic::transport::Channel,
    ) -> StorageClient<tonic::transport::Channel> {
        StorageClient::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message)
    }

    /// Runs a unary call, retrying retryable failures with backoff.
    async fn retrying<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, GcsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, GcsError>>,
    {
        let mut backoff: Option<Backoff> = None;
        // An attempt the server never answers (frozen, black-holed) must not
        // outlive the retry deadline: it fails after the stall timeout, as a
        // retryable error.
        let attempt_limit = self.retry.stall_timeout.min(self.retry.deadline);
        loop {
            let attempt = match tokio::time::timeout(attempt_limit, call()).await {
                Ok(r) => r,
                Err(_) => Err(GcsError::Unavailable(format!(
                    "{what}: no answer within {attempt_limit:?}"
                ))),
            };
            match attempt {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() => {
                    let b = backoff.get_or_insert_with(|| Backoff::new(&self.retry));
                    match b.next_delay() {
                        Some(d) => {
                            tracing::debug!(what, error = %e, attempt = b.attempts(), "retrying");
                            tokio::time::sleep(d).await;
                        }
                        None => {
                            return Err(GcsError::RetryDeadline {
                                attempts: b.attempts(),
                                secs: b.elapsed().as_secs_f64(),
                                last: Arc::new(e),
                            })
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Is the bucket there and where does it live? Asks the storage layout
    /// (StorageControl) first, as the peers do, and falls back to GetBucket.
    pub async fn bucket_info(&self) -> Result<BucketInfo, GcsError> {
        let what = format!("gs://{}", self.bucket);
        let layout = self
            .retrying(&what, || async {
                let req = self
                    .transport
                    .request(
                        GetStorageLayoutRequest {
                            name: format!("{}/storageLayout", self.bucket_resource()),
                            prefix: String::new(),
                            request_id: String::new(),
                        },
                        &self.bucket,
                        None,
                    )
                    .await?;
                StorageControlClient::new(self.transport.channel())
                    .get_storage_layout(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| GcsError::from_status(&s, &what))
            })
            .await;
        match layout {
            Ok(l) => Ok(BucketInfo {
                name: self.bucket.clone(),
                location: l.location,
                location_type: l.location_type,
                hierarchical_namespace: l.hierarchical_namespace.is_some_and(|h| h.enabled),
            }),
            Err(GcsError::Other(_)) => {
                // StorageControl not offered by this endpoint: ask GetBucket.
                let b = self
                    .retrying(&what, || async {
                        let req = self
                            .transport
                            .request(
                                GetBucketRequest {
                                    name: self.bucket_resource(),
                                    ..Default::default()
                                },
                                &self.bucket,
                                None,
                            )
                            .await?;
                        self.storage()
                            .get_bucket(req)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(|s| GcsError::from_status(&s, &what))
                    })
                    .await?;
                Ok(BucketInfo {
                    name: self.bucket.clone(),
                    location: b.location,
                    location_type: b.location_type,
                    hierarchical_namespace: b.hierarchical_namespace.is_some_and(|h| h.enabled),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Checks the bucket before serving it: it must exist and be reachable with
    /// these credentials. A bucket that is not zonal still works (reads use the
    /// same protocol), with a warning that it is not what zonalfs is tuned for.
    pub async fn check_bucket(&self) -> Result<BucketInfo, GcsError> {
        let info = self.bucket_info().await?;
        if !info.is_zonal() {
            tracing::warn!(
                bucket = %info.name,
                location_type = %info.location_type,
                "gs://{} is not a zonal bucket (location type {:?}); it will work, but zonalfs is built for zonal (Rapid) buckets",
                info.name,
                info.location_type
            );
        }
        Ok(info)
    }

    /// Metadata of an object's live version.
    pub async fn stat(&self, name: &str) -> Result<ObjectInfo, GcsError> {
        let what = format!("gs://{}/{name}", self.bucket);
        self.retrying(&what, || async {
            self.calls.get_object.fetch_add(1, Ordering::Relaxed);
            let req = self
                .transport
                .request(
                    GetObjectRequest {
                        bucket: self.bucket_resource(),
                        object: name.to_string(),
                        ..Default::default()
                    },
                    &self.bucket,
                    None,
                )
                .await?;
            self.storage()
                .get_object(req)
                .await
                .map(|r| object_info(r.get_ref()))
                .map_err(|s| GcsError::from_status(&s, &what))
        })
        .await
    }

    /// One page of objects and `/`-prefixes (folders included) under `prefix`.
    pub async fn list(
        &self,
        prefix: &str,
        page_token: Option<String>,
    ) -> Result<ListPage, GcsError> {
        let what = format!("gs://{}/{prefix}", self.bucket);
        self.retrying(&what, || async {
            self.calls.list_objects.fetch_add(1, Ordering::Relaxed);
            let req = self
                .transport
                .request(
                    ListObjectsRequest {
                        parent: self.bucket_resource(),
                        prefix: prefix.to_string(),
                        delimiter: "/".to_string(),
                        include_folders_as_prefixes: true,
                        page_size: 1000,
                        page_token: page_token.clone().unwrap_or_default(),
                        ..Default::default()
                    },
                    &self.bucket,
                    None,
                )
                .await?;
            let r = self
                .storage()
                .list_objects(req)
                .await
                .map_err(|s| GcsError::from_status(&s, &what))?
                .into_inner();
            Ok(ListPage {
                objects: r.objects.iter().map(object_info).collect(),
                prefixes: r.prefixes,
                next_page_token: (!r.next_page_token.is_empty()).then_some(r.next_page_token),
            })
        })
        .await
    }

    fn control(&self) -> StorageControlClient<tonic::transport::Channel> {
        StorageControlClient::new(self.transport.channel())
    }

    /// One unary call about `what`, retried: `msg` goes out with the routing
    /// header and credentials, `call` sends it on a stub.
    async fn unary<M, T, F, Fut>(&self, what: &str, msg: M, call: F) -> Result<T, GcsError>
    where
        M: Clone,
        F: Fn(tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.retrying(what, || async {
            let req = self
                .transport
                .request(msg.clone(), &self.bucket, None)
                .await?;
            call(req).await.map_err(|s| GcsError::from_status(&s, what))
        })
        .await
    }

    /// Deletes an object's live version (`generation`: only that one).
    pub async fn delete(&self, name: &str, generation: Option<i64>) -> Result<(), GcsError> {
        let msg = DeleteObjectRequest {
            bucket: self.bucket_resource(),
            object: name.to_string(),
            if_generation_match: generation,
            ..Default::default()
        };
        let what = format!("gs://{}/{name}", self.bucket);
        self.unary(&what, msg, |r| async move {
            self.storage().delete_object(r).await.map(|_| ())
        })
        .await
    }

    /// Renames an object atomically (the service's MoveObject), keeping its
    /// generation. `if_generation_match`: a precondition on the destination
    /// (Some(0): it must not exist).
    pub async fn move_object(
        &self,
        from: &str,
        to: &str,
        if_generation_match: Option<i64>,
    ) -> Result<ObjectInfo, GcsError> {
        let msg = MoveObjectRequest {
            bucket: self.bucket_resource(),
            source_object: from.to_string(),
            destination_object: to.to_string(),
            if_generation_match,
            ..Default::default()
        };
        let what = format!("gs://{}/{from}", self.bucket);
        self.unary(&what, msg, |r| async move {
            self.storage()
                .move_object(r)
                .await
                .map(|o| object_info(o.get_ref()))
        })
        .await
    }

    fn folder_name(&self, path: &str) -> String {
        format!(
            "{}/folders/{}/",
            self.bucket_resource(),
            path.trim_end_matches('/')
        )
    }

    /// Creates a folder (`a/b`); `recursive` creates missing parents too.
    pub async fn create_folder(&self, path: &str, recursive: bool) -> Result<(), GcsError> {
        let msg = CreateFolderRequest {
            parent: self.bucket_resource(),
            folder: None,
            folder_id: format!("{}/", path.trim_end_matches('/')),
            recursive,
            request_id: String::new(),
        };
        let what = format!("gs://{}/{path}", self.bucket);
        self.unary(&what, msg, |r| async move {
            self.control().create_folder(r).await.map(|_| ())
        })
        .await
    }

    /// Is there a folder at `path`?
    pub async fn folder_exists(&self, path: &str) -> Result<bool, GcsError> {
        let msg = GetFolderRequest {
            name: self.folder_name(path),
            ..Default::default()
        };
        let what = format!("gs://{}/{path}", self.bucket);
        let found = self
            .unary(&what, msg, |r| async move {
                self.control().get_folder(r).await.map(|_| ())
            })
            .await;
        match found {
            Ok(()) => Ok(true),
            Err(GcsError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes an empty folder.
    pub async fn delete_folder(&self, path: &str) -> Result<(), GcsError> {
        let msg = DeleteFolderRequest {
            name: self.folder_name(path),
            ..Default::default()
        };
        let what = format!("gs://{}/{path}", self.bucket);
        self.unary(&what, msg, |r| async move {
            self.control().delete_folder(r).await.map(|_| ())
        })
        .await
    }

    /// Renames a folder and everything below it; waits for the operation.
    pub async fn rename_folder(&self, from: &str, to: &str) -> Result<(), GcsError> {
        let msg = RenameFolderRequest {
            name: self.folder_name(from),
            destination_folder_id: format!("{}/", to.trim_end_matches('/')),
            ..Default::default()
        };
        let what = format!("gs://{}/{from}", self.bucket);
        let mut op = self
            .unary(&what, msg, |r| async move {
                self.control()
                    .rename_folder(r)
                    .await
                    .map(|o| o.into_inner())
            })
            .await?;
        let mut backoff = Backoff::new(&self.retry);
        while !op.done {
            let Some(d) = backoff.next_delay() else {
                return Err(GcsError::Unavailable(format!(
                    "{what}: the rename to {to} did not finish within {:?}",
                    self.retry.deadline
                )));
            };
            tokio::time::sleep(d).await;
            let msg = GetOperationRequest {
                name: op.name.clone(),
            };
            op = self
                .unary(&what, msg, |r| async move {
                    OperationsClient::new(self.transport.channel())
                        .get_operation(r)
                        .await
                        .map(|o| o.into_inner())
                })
                .await?;
        }
        match op.result {
            Some(operation::Result::Error(st)) => {
                let status = tonic::Status::new(tonic::Code::from(st.code), st.message);
                Err(GcsError::from_status(&status, &what))
            }
            _ => Ok(()),
        }
    }
}
