//! Endpoints, connections and call decoration.
//!
//! [`resolve_endpoint`] picks where to connect: `--endpoint URL` when given
//! (`http://` only when given explicitly), else `STORAGE_EMULATOR_HOST=host:port`
//! (plaintext, anonymous, as Google's own tools do), else
//! `https://storage.googleapis.com` over TLS (rustls, the system's roots).
//! [`Transport`] holds `--connections` HTTP/2 connections (tonic channels) and
//! hands them out round-robin, so streams spread across connections; every call
//! is decorated by [`Transport::request`] with `x-goog-request-params` (bucket,
//! plus the routing token after a redirect) and `authorization` from
//! [`super::auth`]. The user agent is `zonalfs/VERSION`.
//!
//! Connections are made by [`connector`]: plain TCP (TLS on top when the
//! endpoint asks for it), read through [`Fair`], which hands the runtime
//! back after [`FAIR_READ`] bytes read in one go. Without it one
//! connection's task reads a whole burst (megabytes of an object arriving)
//! before any task it woke runs: with one runtime worker, a reader whose
//! first bytes had arrived waited 5-6 ms behind the rest of its object.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Request;

use super::auth::TokenProvider;
use super::GcsError;

/// The real service.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// HTTP/2 windows: room for a high bandwidth × latency product per stream and
/// for several streams per connection.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// What one open stream may hold in decode buffers: a message being
/// assembled (up to 2 MiB of chunk data) plus the frame after it, with the
/// buffer's growth slack. Measured with 16 readers on 32 streams
/// (scripts/bench.sh): 4.5–5.5 MiB a stream beyond the blocks.
pub const STREAM_BUFFER_ALLOWANCE: u64 = 5 << 20;
/// The largest DATA frame we accept. The protocol default (16 KiB) splits each
/// 2 MiB chunk into 128 frames; 1 MiB frames nearly double one stream's
/// throughput on loopback (docs/benchmarks.md).
pub const MAX_FRAME: u32 = 1 << 20;

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http://host:port` or `https://host[:port]`.
    pub url: String,
    pub tls: bool,
    /// The endpoint implies anonymous access (STORAGE_EMULATOR_HOST).
    pub anonymous: bool,
}

/// Chooses the endpoint from the `--endpoint` flag and the
/// `STORAGE_EMULATOR_HOST` environment value.
pub fn resolve_endpoint(
    flag: Option<&str>,
    emulator_host: Option<&str>,
) -> Result<Target, GcsError> {
    if let Some(url) = flag {
        let tls = if url.starts_with("https://") {
            true
        } else if url.starts_with("http://") {
            false
        } else {
            return Err(GcsError::bad_endpoint(format!(
                "endpoint '{url}' must start with https:// (or http:// for a plaintext endpoint such as the emulator)"
            )));
        };
        url.parse::<tonic::transport::Uri>()
            .map_err(|e| GcsError::endpoint(format!("endpoint '{url}': {e}"), e))?;
        return Ok(Target {
            url: url.trim_end_matches('/').to_string(),
            tls,
            anonymous: false,
        });
    }
    if let Some(host) = emulator_host.filter(|h| !h.is_empty()) {
        let host = host.trim_end_matches('/');
        let url = if host.starts_with("http://") {
            host.to_string()
        } else if host.starts_with("https://") {
            return Err(GcsError::bad_endpoint(format!(
                "STORAGE_EMULATOR_HOST={host}: the emulator is plaintext; use host:port"
            )));
        } else {
            format!("http://{host}")
        };
        url.parse::<tonic::transport::Uri>()
            .map_err(|e| GcsError::endpoint(format!("STORAGE_EMULATOR_HOST={host}: {e}"), e))?;
        return Ok(Target {
            url,
            tls: false,
            anonymous: true,
        });
    }
    Ok(Target {
        url: DEFAULT_ENDPOINT.to_string(),
        tls: true,
        anonymous: false,
    })
}

/// A pool of HTTP/2 connections to one endpoint, plus call decoration.
pub struct Transport {
    target: Target,
    channels: Vec<Channel>,
    next: AtomicUsize,
    /// Read streams open on each connection (see [`Transport::stream_channel`]).
    streams: Vec<AtomicUsize>,
    auth: TokenProvider,
}

/// A read stream counted on its connection; uncounted when dropped.
#[derive(Debug)]
pub struct StreamLease {
    transport: Arc<Transport>,
    index: usize,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.transport.streams[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("target", &self.target)
            .field("connections", &self.channels.len())
            .finish()
    }
}

/// Bytes a connection reads before it lets other tasks run: one HTTP/2
/// frame's worth, so a chunk's data keeps flowing in large reads while a
/// task woken by an earlier message (a reader whose bytes are in) waits at
/// most that long.
pub const FAIR_READ: usize = 1 << 20;

/// A connection that yields to the runtime after [`FAIR_READ`] bytes read
/// without a pause: the next read returns `Pending` once, having woken its
/// own task, so the task goes to the back of the run queue.
#[derive(Debug)]
pub struct Fair<T> {
    inner: T,
    /// Bytes read since the last time a read returned `Pending`.
    run: usize,
}

impl<T> Fair<T> {
    pub fn new(inner: T) -> Fair<T> {
        Fair { inner, run: 0 }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Fair<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.run >= FAIR_READ {
            self.run = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) => self.run += buf.filled().len() - before,
            Poll::Pending => self.run = 0,
            Poll::Ready(Err(_)) => {}
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Fair<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Makes a connection: TCP to the URI's host and port (names resolved by
/// the system), no Nagle delay, read through [`Fair`]. tonic puts TLS on
/// top for an `https` endpoint, and bounds the connect by its timeout.
fn connector() -> impl tower::Service<
    http::Uri,
    Response = TokioIo<Fair<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(|uri: http::Uri| async move {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
        let host = uri
            .host()
            .ok_or_else(|| bad("the endpoint names no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = match uri.port_u16() {
            Some(p) => p,
            None if uri.scheme_str() == Some("https") => 443,
            None => 80,
        };
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        Ok(TokioIo::new(Fair::new(tcp)))
    })
}

fn endpoint(target: &Target) -> Result<Endpoint, GcsError> {
    let bad =
        |e: tonic::transport::Error| GcsError::endpoint(format!("endpoint {}: {e}", target.url), e);
    let mut ep = Endpoint::from_shared(target.url.clone())
        .map_err(bad)?
        .user_agent(format!("zonalfs/{}", env!("CARGO_PKG_VERSION")))
        .map_err(bad)?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if target.tls {
        ep = ep
            .tls_config(ClientTlsConfig::new().with_native_roots())
            .map_err(bad)?;
    }
    Ok(ep)
}

/// Why a connection failed, in a few words: the innermost cause of the
/// error chain (an OS error without its "(os error N)" tail, or the TLS
/// alert), marked as a TLS failure when rustls refused the handshake.
pub fn connect_failure(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost: &(dyn std::error::Error + 'static) = e;
    let mut tls = false;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            tls = true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                tls = true;
            }
        }
        innermost = err;
        cur = err.source();
    }
    let what = match innermost.downcast_ref::<std::io::Error>() {
        Some(io) if io.raw_os_error().is_some() => io.kind().to_string(),
        _ => innermost.to_string(),
    };
    let what = if what.is_empty() { e.to_string() } else { what };
    if tls {
        format!("TLS handshake failed: {what}")
    } else {
        what
    }
}

impl Transport {
    /// Connects the first connection now (so a bad endpoint fails fast, with a
    /// clear error) and the others lazily.
    pub async fn connect(
        target: Target,
        connections: usize,
        auth: TokenProvider,
    ) -> Result<Transport, GcsError> {
        let ep = endpoint(&target)?;
        let first = ep.connect_with_connector(connector()).await.map_err(|e| {
            let message = format!("cannot connect to {}: {}", target.url, connect_failure(&e));
            GcsError::endpoint(message, e)
        })?;
        let mut channels = vec![first];
        for _ in 1..connections.max(1) {
            channels.push(ep.connect_with_connector_lazy(connector()));
        }
        let streams = channels.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(Transport {
            target,
            channels,
            next: AtomicUsize::new(0),
            streams,
            auth,
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The next connection, round-robin.
    /// HTTP/2 connections (channels) to the endpoint.
    pub fn connections(&self) -> usize {
        self.channels.len()
    }

    /// The connection with the fewest open read streams, for a new stream, and
    /// a lease that counts the stream there until dropped. (Round-robin alone
    /// let unary calls between stream opens put every stream on one
    /// connection, whose HTTP/2 framing one task does: four readers then ran
    /// at ~750 MB/s or ~1250 MB/s depending on the interleaving.)
    pub fn stream_channel(self: &Arc<Self>) -> (Channel, StreamLease) {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.channels.len();
        let i = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.streams[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.streams[i].fetch_add(1, Ordering::Relaxed);
        (
            self.channels[i].clone(),
            StreamLease {
                transport: self.clone(),
                index: i,
            },
        )
    }

    /// Read streams open on each connection now.
    pub fn streams_per_connection(&self) -> Vec<usize> {
        self.streams
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    pub fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }

    /// Wraps a message for a call about `bucket`: routing header (with the
    /// routing token after a redirect) and credentials.
    pub async fn request<T>(
        &self,
        msg: T,
        bucket: &str,
        routing_token: Option<&str>,
    ) -> Result<Request<T>, GcsError> {
        let mut req = Request::new(msg);
        let mut params = format!("bucket=projects/_/buckets/{bucket}");
        if let Some(t) = routing_token {
            params.push_str("&routing_token=");
            params.push_str(t);
        }
        let value = MetadataValue::try_from(params.as_str())
            .map_err(|_| GcsError::InvalidArgument(format!("bucket name {bucket:?}")))?;
        req.metadata_mut().insert("x-goog-request-params", value);
        if let Some(auth) = self.auth.authorization().await? {
            req.metadata_mut().insert("authorization", auth);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection read without a pause hands the runtime back (one
    /// `Pending`, its task woken) after FAIR_READ bytes, and reads on
    /// after that; every byte arrives, in order.
    #[tokio::test]
    async fn a_long_read_yields_once_per_fair_share_and_loses_nothing() {
        use tokio::io::AsyncWriteExt;
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let total = 3 * FAIR_READ + 12_345;
        let sent: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let (mut tx, rx) = tokio::io::duplex(total);
        tx.write_all(&sent).await.expect("write");
        drop(tx);
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fair = Fair::new(rx);
        let (mut got, mut yields, mut buf) = (Vec::new(), 0, vec![0u8; 64 << 10]);
        loop {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut fair).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
                Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => panic!("read: {e}"),
                Poll::Pending => yields += 1,
            }
        }
        assert!(got == sent, "the bytes read are the bytes sent");
        assert_eq!(yields, total / FAIR_READ, "one yield per FAIR_READ bytes");
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            yields,
            "each yield woke its task"
        );
    }

    #[test]
    fn endpoint_resolution() {
        let t = resolve_endpoint(None, None).unwrap();
        assert_eq!(
            (t.url.as_str(), t.tls, t.anonymous),
            (DEFAULT_ENDPOINT, true, false)
        );
        let t = resolve_endpoint(None, Some("127.0.0.1:9000")).unwrap();
        assert_eq!(
            (t.url.as_str(), t.tls, t.anonymous),
            ("http://127.0.0.1:9000", false, true)
        );
        let t = resolve_endpoint(Some("http://localhost:1/"), Some("127.0.0.1:9000")).unwrap();
        assert_eq!(
            (t.url.as_str(), t.tls, t.anonymous),
            ("http://localhost:1", false, false)
        );
        assert!(
            resolve_endpoint(Some("https://example.com"), None)
                .unwrap()
                .tls
        );
        assert!(resolve_endpoint(Some("storage.googleapis.com"), None).is_err());
        assert!(resolve_endpoint(None, Some("https://x:1")).is_err());
    }
}
