//! The loopback emulator: a plaintext HTTP/2 gRPC server that speaks the real
//! `google.storage.v2` (and `google.storage.control.v2`) wire protocol over a
//! directory tree, so that zonalfs is tested and benchmarked without GCS.
//!
//! Data flow: a request arrives through tonic at [`service`] (unary calls and
//! `ReadObject`), [`bidi`] (`BidiReadObject` streams) or [`write`]
//! (`BidiWriteObject` streams). Both resolve names through
//! [`store`] (buckets are subdirectories of the root, objects the files below
//! them), read bytes with `pread` into one fresh buffer per chunk (the `Bytes` that
//! is sent), CRC32C each chunk, and consult [`faults`] for shaping and injected
//! failures. Errors are [`EmuError`] inside and become `tonic::Status` at the edge,
//! in one place ([`EmuError::into_status`]). With `--require-token`, an
//! interceptor in front of both services checks the bearer token of every call
//! first (UNAUTHENTICATED / PERMISSION_DENIED).

pub mod bidi;
pub mod faults;
pub mod send;
pub mod service;
pub mod store;
pub mod wire;
pub mod write;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::proto::{control, storage};
pub use faults::{Counters, Shaping};

/// Errors of the emulator layer; each maps to the gRPC code GCS gives.
#[derive(Debug, thiserror::Error)]
pub enum EmuError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(String),
}

impl EmuError {
    /// The gRPC status a client sees for this error.
    pub fn into_status(self) -> tonic::Status {
        use tonic::Code;
        let code = match &self {
            EmuError::InvalidArgument(_) => Code::InvalidArgument,
            EmuError::NotFound(_) => Code::NotFound,
            EmuError::OutOfRange(_) => Code::OutOfRange,
            EmuError::Unavailable(_) => Code::Unavailable,
            EmuError::FailedPrecondition(_) => Code::FailedPrecondition,
            EmuError::AlreadyExists(_) => Code::AlreadyExists,
            EmuError::Io(_) | EmuError::Listen { .. } | EmuError::Serve(_) => Code::Internal,
        };
        tonic::Status::new(code, self.to_string())
    }
}

impl From<EmuError> for tonic::Status {
    fn from(e: EmuError) -> Self {
        e.into_status()
    }
}

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub shaping: Shaping,
    /// Reported as the buckets' location.
    pub location: String,
    /// Reported as the buckets' location type (`zone` for zonal buckets).
    pub location_type: String,
    /// `--require-token`: every call must carry `authorization: Bearer TOKEN`;
    /// none is UNAUTHENTICATED, another token PERMISSION_DENIED (as GCS answers
    /// missing and insufficient credentials).
    pub require_token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shaping: Shaping::default(),
            location: "us-central1-a".to_string(),
            location_type: "zone".to_string(),
            require_token: None,
        }
    }
}

/// State shared by every call.
pub struct Emulator {
    pub store: store::Store,
    pub faults: faults::Faults,
    pub counters: Counters,
    pub location: String,
    pub location_type: String,
    pub require_token: Option<String>,
    /// Who writes each object now (takeovers).
    pub writers: write::Writers,
    /// Finished long-running operations (folder renames), by name.
    pub operations:
        std::sync::Mutex<std::collections::HashMap<String, crate::proto::longrunning::Operation>>,
}

impl Emulator {
    /// Opens the store over `root` with these settings.
    pub fn new(root: &Path, config: Config) -> Result<Arc<Emulator>, EmuError> {
        Ok(Arc::new(Emulator {
            store: store::Store::new(root)?,
            faults: faults::Faults::new(config.shaping),
            counters: Counters::default(),
            location: config.location,
            location_type: config.location_type,
            require_token: config.require_token,
            writers: write::Writers::default(),
            operations: Default::default(),
        }))
    }
}

/// HTTP/2 flow-control windows: large, so that one stream can carry a high
/// bandwidth × latency product without waiting for window updates.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 64 << 20;

/// Binds `addr` (port 0 for an ephemeral port).
pub async fn bind(addr: &str) -> Result<TcpListener, EmuError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EmuError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// The accepted connections of `listener`, with Nagle's algorithm off.
/// (`Server::tcp_nodelay` only reaches sockets tonic accepts itself; without
/// this a small response frame written after the headers waited for the
/// client's delayed ACK: 40 ms before the first byte of every new stream.)
fn no_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        Ok(conn)
    })
}

/// The `--require-token` check, run before every call: no bearer token is
/// UNAUTHENTICATED, a different one PERMISSION_DENIED. The token is compared,
/// never logged.
fn token_check(
    token: Option<String>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let Some(want) = &token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match got {
            None => Err(tonic::Status::unauthenticated(
                "Request is missing required authentication credential (a bearer token)",
            )),
            Some(t) if t == want.as_bytes() => Ok(req),
            Some(_) => Err(tonic::Status::permission_denied(
                "The caller does not have storage.objects.get access to the bucket",
            )),
        }
    }
}

/// Serves the emulator on `listener` until `shutdown` resolves.
pub async fn serve(
    emu: Arc<Emulator>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), EmuError> {
    let check = token_check(emu.require_token.clone());
    let storage_svc = send::Router {
        inner: tonic::service::interceptor::InterceptedService::new(
            storage::storage_server::StorageServer::new(service::StorageService {
                emu: emu.clone(),
            })
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20),
            check.clone(),
        ),
        emu: emu.clone(),
        check: check.clone(),
    };
    let control_svc = tonic::service::interceptor::InterceptedService::new(
        control::storage_control_server::StorageControlServer::new(service::ControlService {
            emu: emu.clone(),
        }),
        check.clone(),
    );
    let operations_svc = tonic::service::interceptor::InterceptedService::new(
        crate::proto::longrunning::operations_server::OperationsServer::new(
            service::OperationsService { emu },
        ),
        check,
    );
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(Some(1 << 20))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(storage_svc)
        .add_service(control_svc)
        .add_service(operations_svc)
        .serve_with_incoming_shutdown(no_delay(listener), shutdown)
        .await
        .map_err(|e| EmuError::Serve(e.to_string()))
}

/// An emulator running in this process (for tests and benchmarks).
pub struct Running {
    pub addr: SocketAddr,
    pub emu: Arc<Emulator>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), EmuError>>>,
}

impl Running {
    /// `http://ADDR`, the endpoint to give a client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(mut self) -> Result<(), EmuError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => t.await.map_err(|e| EmuError::Serve(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Starts an emulator on `127.0.0.1:0` over `root` in the current runtime.
pub async fn start(root: &Path, config: Config) -> Result<Running, EmuError> {
    let emu = Emulator::new(root, config)?;
    let listener = bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(serve(emu.clone(), listener, async {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        emu,
        stop: Some(tx),
        task: Some(task),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every accepted connection has Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = Box::pin(no_delay(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let conn = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(conn.nodelay().expect("getsockopt"));
    }
}
