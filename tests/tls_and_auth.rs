//! Transport security and credentials end to end: the bearer token reaches the
//! server on every call, and https endpoints really use TLS with the system's
//! roots (an untrusted certificate is refused with a clear error; a trusted one
//! works).

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;

use common::*;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use zonalfs::emulator::service::{ControlService, StorageService};
use zonalfs::emulator::{Config, Emulator};
use zonalfs::gcs::auth::CredentialsSource;
use zonalfs::gcs::client::ClientConfig;
use zonalfs::gcs::{GcsClient, GcsError, MrdPool, ObjectId, PoolConfig, VecSink};
use zonalfs::proto::control::storage_control_server::StorageControlServer;
use zonalfs::proto::storage::storage_server::StorageServer;

fn fixture_key() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test-service-account.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_sent_on_every_call() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(3 << 20, 1));
    let emu = start(&tree, Config::default()).await;
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::KeyFile(fixture_key());
    let c = GcsClient::connect(cfg)
        .await
        .expect("connect with a key file");
    c.bucket_info().await.expect("bucket");
    let info = c.stat("obj").await.expect("stat");
    c.list("", None).await.expect("list");
    let pool = MrdPool::new(
        c,
        PoolConfig {
            pool_size: Some(1),
            ..Default::default()
        },
    );
    let id = ObjectId {
        name: "obj".into(),
        generation: info.generation,
    };
    let sink = VecSink::new(data.len());
    pool.read(&id, info.size, 0, data.len() as u64, sink.clone())
        .await
        .expect("read");
    assert_eq!(sink.take(), data);
    // layout + stat + list + one BidiReadObject stream
    assert_eq!(emu.emu.counters.authorized_calls.load(Ordering::Relaxed), 4);
    // ... each with the zonalfs/VERSION user agent.
    assert_eq!(
        emu.emu.counters.zonalfs_agent_calls.load(Ordering::Relaxed),
        4
    );

    // Anonymous sends none.
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::Anonymous;
    let c = GcsClient::connect(cfg).await.expect("connect");
    c.stat("obj").await.expect("stat");
    assert_eq!(emu.emu.counters.authorized_calls.load(Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_uses_tls_and_checks_the_certificate() {
    let tree = Tree::new();
    tree.put("obj", b"over tls");
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("self-signed certificate");
    let ca = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(ca.path(), cert.pem()).expect("write cert");

    let emu = Emulator::new(tree.root(), Config::default()).expect("emulator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let identity = Identity::from_pem(cert.pem(), signing_key.serialize_pem());
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .expect("tls config")
        .add_service(StorageServer::new(StorageService { emu: emu.clone() }))
        .add_service(StorageControlServer::new(ControlService { emu }))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let connect = || {
        let mut cfg = ClientConfig::new(BUCKET);
        cfg.endpoint = Some(format!("https://127.0.0.1:{}", addr.port()));
        cfg.credentials = CredentialsSource::Anonymous;
        GcsClient::connect(cfg)
    };
    // Not in the trusted roots: refused, with a message that says why.
    std::env::set_var("SSL_CERT_FILE", "/nonexistent-roots.pem");
    match connect().await {
        Err(GcsError::Endpoint { message: m, source }) => {
            assert!(source.is_some(), "the TLS failure is kept as the source");
            assert!(m.contains("https://127.0.0.1"), "{m}");
            assert!(
                m.to_lowercase().contains("certificate") || m.contains("tls"),
                "{m}"
            );
        }
        other => panic!("connected to an untrusted server: {other:?}"),
    }
    // Trusted (through the standard SSL_CERT_FILE): works, over TLS.
    std::env::set_var("SSL_CERT_FILE", ca.path());
    let c = connect().await.expect("connect over TLS");
    assert_eq!(c.stat("obj").await.expect("stat").size, 8);
    // A plaintext client cannot talk to it.
    let mut cfg = ClientConfig::new(BUCKET);
    cfg.endpoint = Some(format!("http://127.0.0.1:{}", addr.port()));
    cfg.credentials = CredentialsSource::Anonymous;
    let plain = GcsClient::connect(cfg).await;
    let failed = match plain {
        Err(_) => true,
        Ok(c) => c.stat("obj").await.is_err(),
    };
    assert!(failed, "plaintext reached a TLS server");
    server.abort();
}
