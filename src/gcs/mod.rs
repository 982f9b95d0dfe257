//! The client side of the protocol: everything that talks to the bucket.
//!
//! Data flow: [`transport`] turns an endpoint (`https://storage.googleapis.com`,
//! `--endpoint`, or `STORAGE_EMULATOR_HOST`) into a pool of HTTP/2 connections and
//! decorates every call with the routing header, user agent and credentials from
//! [`auth`]. [`client::GcsClient`] makes the metadata calls (bucket, storage
//! layout, stat, list). [`mrd`] runs one `BidiReadObject` stream that multiplexes
//! many ranges, checks every chunk's CRC32C, writes verified bytes straight into
//! each caller's [`RangeSink`], and resumes after breaks and redirects. [`pool`]
//! shares those streams across every reader of an object. Everything above this
//! layer sees the [`ObjectClient`] trait only.
//!
//! Errors are [`GcsError`]: one type for the layer, built from gRPC statuses in one
//! place ([`GcsError::from_status`]) with the bucket/object they concern.

pub mod auth;
pub mod client;
pub mod mem;
pub mod mrd;
pub mod pool;
pub mod retry;
pub mod transport;
pub mod wire;
pub mod write;

use std::sync::Arc;
use std::time::SystemTime;

pub use auth::AuthError;
pub use client::GcsClient;
pub use pool::{MrdPool, PoolConfig};

/// Errors of the client layer. Cloneable: one stream failure fans out to every
/// range that was riding on it (sources are shared behind an `Arc`).
///
/// Each variant is a *kind*: [`GcsError::is_retryable`] says whether a new
/// attempt may succeed, and the filesystem maps kinds to errnos in one place
/// (`FsError::errno`). Where an error has a cause from another layer (the
/// credentials, the HTTP/2 transport, the last failed attempt before the retry
/// deadline) it is kept as the error's [`std::error::Error::source`], so the
/// verdict of the layer that saw it (e.g. a token endpoint's transient failure)
/// survives to the top.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GcsError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Bytes the service had acknowledged are gone (never retried).
    #[error("data loss: {0}")]
    DataLoss(String),
    #[error("server sent an invalid response: {0}")]
    Protocol(String),
    /// Retrying ran out of time; `last` is the failure of the last attempt.
    #[error("gave up after {attempts} attempts over {secs:.1} s: {last}")]
    RetryDeadline {
        attempts: u32,
        secs: f64,
        #[source]
        last: Arc<GcsError>,
    },
    /// No access token: the credentials' own verdict (transient or not) decides
    /// whether the call is retried.
    #[error("credentials: {0}")]
    Auth(#[source] Arc<AuthError>),
    /// A bad or unreachable endpoint; the message names the endpoint.
    #[error("{message}")]
    Endpoint {
        message: String,
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    #[error("the request was cancelled")]
    Cancelled,
    #[error("{0}")]
    Other(String),
}

impl GcsError {
    /// Maps a gRPC status about `what` (e.g. `gs://bucket/object`) to an error.
    pub fn from_status(status: &tonic::Status, what: &str) -> GcsError {
        use tonic::Code;
        let msg = format!("{what}: {}", status.message());
        match status.code() {
            Code::NotFound => GcsError::NotFound(msg),
            Code::PermissionDenied => GcsError::PermissionDenied(msg),
            Code::Unauthenticated => GcsError::Unauthenticated(msg),
            Code::InvalidArgument => GcsError::InvalidArgument(msg),
            Code::OutOfRange => GcsError::OutOfRange(msg),
            Code::FailedPrecondition => GcsError::PreconditionFailed(msg),
            Code::AlreadyExists => GcsError::AlreadyExists(msg),
            Code::DataLoss => GcsError::DataLoss(msg),
            // We never cancel a call and then wait for its status: a
            // CANCELLED status comes from a connection that broke under the
            // call (hyper reports a reset connection so), which a new
            // attempt survives.
            Code::Cancelled
            | Code::Unavailable
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown => GcsError::Unavailable(format!("{msg} ({:?})", status.code())),
            other => GcsError::Other(format!("{msg} ({other:?})")),
        }
    }

    /// A bad endpoint, with the error that shows it.
    pub fn endpoint(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> GcsError {
        GcsError::Endpoint {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A bad endpoint found by our own checks.
    pub fn bad_endpoint(message: impl Into<String>) -> GcsError {
        GcsError::Endpoint {
            message: message.into(),
            source: None,
        }
    }

    /// Worth retrying (with backoff) on a new stream or call: the service or
    /// the connection failed transiently, or the credentials say a later token
    /// request may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            GcsError::Unavailable(_) | GcsError::Protocol(_) => true,
            GcsError::Auth(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The service or the credentials refused us (not a transient failure):
    /// a program sees EACCES.
    pub fn is_denied(&self) -> bool {
        match self {
            GcsError::PermissionDenied(_) | GcsError::Unauthenticated(_) => true,
            GcsError::Auth(e) => !e.is_transient(),
            _ => false,
        }
    }
}

impl From<AuthError> for GcsError {
    fn from(e: AuthError) -> Self {
        GcsError::Auth(Arc::new(e))
    }
}

/// What the layers above know of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub generation: i64,
    pub metageneration: i64,
    /// False while the object is appendable (still growing).
    pub finalized: bool,
    pub update_time: SystemTime,
    pub create_time: SystemTime,
    pub crc32c: Option<u32>,
}

impl ObjectInfo {
    /// A new, empty appendable object of `generation`, made now.
    pub fn created(name: &str, generation: i64) -> ObjectInfo {
        let now = SystemTime::now();
        ObjectInfo {
            name: name.to_string(),
            size: 0,
            generation,
            metageneration: 1,
            finalized: false,
            update_time: now,
            create_time: now,
            crc32c: None,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    /// Collapsed prefixes ("directories"), with their trailing `/`.
    pub prefixes: Vec<String>,
    pub next_page_token: Option<String>,
}

/// Where a range's verified bytes go. The stream calls [`RangeSink::put`] with
/// consecutive chunks, in order, only after their CRC32C was checked; `at` is the
/// number of bytes of the range delivered before this chunk.
pub trait RangeSink: Send + Sync + 'static {
    fn put(&self, at: usize, data: &[u8]);
}

/// A plain heap buffer as a sink (tools and tests; the read engine uses its own
/// mmap'd blocks).
#[derive(Debug)]
pub struct VecSink(std::sync::Mutex<Vec<u8>>);

impl VecSink {
    pub fn new(len: usize) -> Arc<VecSink> {
        Arc::new(VecSink(std::sync::Mutex::new(vec![0; len])))
    }

    /// The buffer (the bytes delivered so far, zeros after them).
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *crate::sync::lock(&self.0))
    }
}

impl RangeSink for VecSink {
    fn put(&self, at: usize, data: &[u8]) {
        let mut v = crate::sync::lock(&self.0);
        if let Some(dst) = v.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
    }
}

/// An object version to read from: the name and the generation it is pinned to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectId {
    pub name: String,
    pub generation: i64,
}

/// The rest of a [`ObjectClient::stat_with_head`]: the head's load, ending
/// with the bytes delivered or the error.
pub type HeadLoad =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, GcsError>> + Send>>;

/// What the read engine and the filesystem use to reach objects.
#[tonic::async_trait]
pub trait ObjectClient: Send + Sync + 'static {
    /// Metadata of the live version of an object.
    async fn stat(&self, name: &str) -> Result<ObjectInfo, GcsError>;
    /// Metadata of the live version of an object, as [`ObjectClient::stat`],
    /// with its first `head` bytes on the way into `sink`: a client that can
    /// ask for both in one round trip (a read stream's open carries a range
    /// and is answered with the metadata first) returns once the metadata is
    /// in, with the head's load still under way (it ends with the bytes
    /// delivered, or the error). Others stat and load nothing (None).
    async fn stat_with_head(
        &self,
        name: &str,
        _head: u64,
        _sink: Arc<dyn RangeSink>,
    ) -> Result<(ObjectInfo, Option<HeadLoad>), GcsError> {
        Ok((self.stat(name).await?, None))
    }
    /// One page of objects and `/`-prefixes under `prefix`.
    async fn list(&self, prefix: &str, page_token: Option<String>) -> Result<ListPage, GcsError>;
    /// Reads `len` bytes at `offset` of the object version into `sink`; returns the
    /// number of bytes delivered (fewer than `len` only where the object ends).
    async fn read(
        &self,
        object: &ObjectId,
        size_hint: u64,
        offset: u64,
        len: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<u64, GcsError>;
    /// Ranges of an object of `size` bytes this client carries at once (its
    /// streams for the object): a sequential reader's window keeps at least
    /// that many blocks in flight, so every stream has one to carry.
    fn parallelism(&self, _size: u64) -> usize {
        1
    }
    /// Ranges longer than this the client paces itself: a stream sends one
    /// only as what it already carries nears its end, so a reader's window of
    /// such blocks beyond two per stream holds memory without moving data
    /// sooner.
    fn paces_above(&self) -> u64 {
        u64::MAX
    }

    // ---- writes and namespace changes (a read-only client refuses them) ----

    /// Creates a new appendable object (a new generation) to write;
    /// `if_generation_match`: Some(0) refuses to replace an existing object.
    async fn create(
        &self,
        name: &str,
        _if_generation_match: Option<i64>,
    ) -> Result<Box<dyn ObjectWrite>, GcsError> {
        Err(cannot_write(name))
    }
    /// Takes over unfinalized object `name` at `generation` to append to it.
    async fn append(&self, name: &str, _generation: i64) -> Result<Box<dyn ObjectWrite>, GcsError> {
        Err(cannot_write(name))
    }
    /// Deletes an object's live version (`generation`: only that one).
    async fn delete(&self, name: &str, _generation: Option<i64>) -> Result<(), GcsError> {
        Err(cannot_write(name))
    }
    /// Renames an object atomically, keeping its generation
    /// (`if_generation_match` on the destination: Some(0), it must not exist).
    async fn rename(
        &self,
        from: &str,
        _to: &str,
        _if_generation_match: Option<i64>,
    ) -> Result<ObjectInfo, GcsError> {
        Err(cannot_write(from))
    }
    /// Creates a folder (`a/b/`) and any missing parents.
    async fn create_folder(&self, path: &str) -> Result<(), GcsError> {
        Err(cannot_write(path))
    }
    /// Deletes an empty folder.
    async fn delete_folder(&self, path: &str) -> Result<(), GcsError> {
        Err(cannot_write(path))
    }
    /// Is there a folder (`a/b/`), empty or not? (A bucket without folders
    /// has none.)
    async fn folder_exists(&self, _path: &str) -> Result<bool, GcsError> {
        Ok(false)
    }
    /// Renames a folder and everything below it.
    async fn rename_folder(&self, from: &str, _to: &str) -> Result<(), GcsError> {
        Err(cannot_write(from))
    }
}

fn cannot_write(name: &str) -> GcsError {
    GcsError::PermissionDenied(format!("{name}: this client does not write"))
}

/// An object being written (an appendable upload): bytes go in order,
/// persisted by `flush`; `close` leaves the object unfinalized, `finalize`
/// finalizes it. (`write::AppendableWriter` over the service; an in-memory one
/// in `mem`.)
#[tonic::async_trait]
pub trait ObjectWrite: Send {
    /// The object's generation.
    fn generation(&self) -> i64;
    /// Bytes written (the object's size once they are persisted).
    fn written(&self) -> u64;
    /// Bytes the service said are persisted: the writer holds the rest.
    fn persisted(&self) -> u64;
    /// Appends `data` (persisted by a later flush).
    async fn write(&mut self, data: bytes::Bytes) -> Result<(), GcsError>;
    /// [`ObjectWrite::write`], with the CRC32C of each 2 MiB chunk of `data`
    /// computed by the caller (the writer uses them if there is one per
    /// chunk).
    async fn write_with_crcs(
        &mut self,
        data: bytes::Bytes,
        _crcs: Vec<u32>,
    ) -> Result<(), GcsError> {
        self.write(data).await
    }
    /// Persists everything written; returns the persisted size.
    async fn flush(&mut self) -> Result<u64, GcsError>;
    /// Persists everything and ends the upload, leaving the object appendable.
    async fn close(self: Box<Self>) -> Result<u64, GcsError>;
    /// Persists everything and finalizes the object.
    async fn finalize(self: Box<Self>) -> Result<ObjectInfo, GcsError>;
}

#[cfg(test)]
mod tests {
    use super::GcsError;
    use tonic::{Code, Status};

    /// Statuses map to kinds once: what a new attempt may survive is
    /// retryable (a connection that broke under a call surfaces as
    /// CANCELLED), what it cannot is not.
    #[test]
    fn statuses_keep_their_kind() {
        for code in [
            Code::Cancelled,
            Code::Unavailable,
            Code::Internal,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Unknown,
        ] {
            let e = GcsError::from_status(&Status::new(code, "x"), "gs://b/o");
            assert!(e.is_retryable(), "{code:?}: {e}");
        }
        for code in [
            Code::NotFound,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::OutOfRange,
            Code::FailedPrecondition,
        ] {
            let e = GcsError::from_status(&Status::new(code, "x"), "gs://b/o");
            assert!(!e.is_retryable(), "{code:?}: {e}");
            assert!(e.to_string().contains("gs://b/o"), "{e}");
        }
    }
}
