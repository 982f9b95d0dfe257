//! Security properties of the real binary and a real mount:
//! - no access token, refresh token, client secret or private key material in
//!   logs (TRACE, to a file and to stderr) or error messages;
//! - plaintext only when asked for (`http://` or STORAGE_EMULATOR_HOST), an
//!   untrusted certificate refused in one line;
//! - the mount's options: `default_permissions`, no `allow_other` unless asked;
//! - object names from the server never lead outside the mount or show as
//!   `.`/`..`/empty/`/`-containing entries, even from a misbehaving server
//!   that lists names outside the directory asked for.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::mount::{is_mounted, zonalfs_cmd, MountGuard};
use common::*;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};
use zonalfs::emulator::service::{ControlService, StorageService};
use zonalfs::emulator::{Config, Emulator};
use zonalfs::proto::control::storage_control_server::StorageControlServer;
use zonalfs::proto::storage::storage_server::{Storage, StorageServer};
use zonalfs::proto::storage::{self as pb};

const ACCESS_TOKEN: &str = "ya29.SECRET-access-token-7f3a9c";
const REFRESH_TOKEN: &str = "1//SECRET-refresh-token-b81e";
const CLIENT_SECRET: &str = "GOCSPX-SECRET-client-secret-44d2";

fn fixture_key() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test-service-account.json")
}

/// A loopback OAuth token endpoint: answers every request with ACCESS_TOKEN;
/// runs until the process ends (one thread, blocking accept). Returns its URL
/// and a count of requests served.
fn token_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/token", l.local_addr().expect("addr"));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for sock in l.incoming() {
            let Ok(sock) = sock else { continue };
            let mut r = BufReader::new(sock);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let l = line.to_ascii_lowercase();
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let json = format!(
                r#"{{"access_token":"{ACCESS_TOKEN}","expires_in":3600,"token_type":"Bearer"}}"#
            );
            let mut sock = r.into_inner();
            let _ = write!(
                sock,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                json.len()
            );
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    (url, served)
}

fn run(cmd: &mut Command) -> Output {
    cmd.env_remove("STORAGE_EMULATOR_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .stdin(Stdio::null())
        .output()
        .expect("run zonalfs")
}

/// The lines of the fixture's private key (PEM body), each long enough to be
/// distinctive.
fn private_key_lines() -> Vec<String> {
    let key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_key()).expect("fixture")).expect("json");
    let pem = key["private_key"]
        .as_str()
        .expect("private_key")
        .to_string();
    let lines: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_string)
        .collect();
    assert!(lines.len() > 10, "the fixture has a PEM body");
    lines
}

#[test]
fn no_credentials_in_logs_or_errors() {
    let tree = Tree::new();
    let data = tree.put("x", &pattern(300_000, 9));
    let emu = EmuChild::spawn(tree.root(), &["--require-token", ACCESS_TOKEN]);
    let ep = format!("http://{}", emu.addr);
    let (token_url, token_requests) = token_server();
    let dir = tempfile::tempdir().expect("dir");
    let user = dir.path().join("user.json");
    std::fs::write(
        &user,
        serde_json::json!({
            "type": "authorized_user",
            "client_id": "fake-client.apps.googleusercontent.com",
            "client_secret": CLIENT_SECRET,
            "refresh_token": REFRESH_TOKEN,
            "token_uri": token_url,
        })
        .to_string(),
    )
    .expect("write key file");
    let user = user.to_str().expect("utf-8");
    let log_file = dir.path().join("mount.log");
    let mut text = String::new(); // every log line and message of every run

    // A mount that works with the token, at TRACE, logging to a file.
    let mnt = tempfile::tempdir().expect("mountpoint");
    let mut m = MountGuard::mount_args(
        mnt.path(),
        &[
            "--endpoint",
            &ep,
            "--key-file",
            user,
            "--log-level",
            "trace",
            "--log-file",
            log_file.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        sha_of(&std::fs::read(mnt.path().join("x")).expect("read through the mount")),
        sha_of(&data)
    );
    let stderr = m.child.as_mut().and_then(|c| c.stderr.take());
    let status = m.stop();
    assert!(status.success(), "{status}");
    let mut err = String::new();
    stderr
        .expect("piped")
        .read_to_string(&mut err)
        .expect("mount's stderr");
    assert!(err.contains("zonalfs: mounted gs://test-bucket"), "{err}");
    text += &err;
    let logs = std::fs::read_to_string(&log_file).expect("log file");
    assert!(logs.contains("TRACE"), "TRACE lines are in the log file");
    assert!(logs.contains("credentials: new access token"), "{logs}");
    text += &logs;
    assert!(
        token_requests.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the token came from the token server"
    );

    // `zonalfs cat` at TRACE, logging to stderr.
    let out = run(zonalfs_cmd().args([
        "cat",
        "gs://test-bucket/x",
        "--endpoint",
        &ep,
        "--key-file",
        user,
        "--log-level",
        "trace",
    ]));
    assert!(out.status.success());
    assert!(out.stdout == data, "cat delivers the object");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("TRACE"), "TRACE lines on stderr");
    text += &err;

    // Failures: a service-account JWT the server refuses (PERMISSION_DENIED),
    // and a token server that is gone. Their errors and TRACE logs too.
    let key = fixture_key();
    for args in [
        vec![
            "--endpoint",
            &ep,
            "--key-file",
            key.to_str().expect("utf-8"),
            "--log-level",
            "trace",
        ],
        vec!["--endpoint", &ep, "--anonymous", "--log-level", "trace"],
    ] {
        let mnt = tempfile::tempdir().expect("mountpoint");
        let out = run(zonalfs_cmd()
            .args(["mount", "-f", BUCKET])
            .arg(mnt.path())
            .args(&args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // At TRACE the HTTP stack logs after the error line too.
        let line = err
            .lines()
            .find(|l| l.starts_with("zonalfs: error: "))
            .unwrap_or_else(|| panic!("no error line in {err}"));
        assert!(
            line.contains("permission denied") || line.contains("not authenticated"),
            "{line}"
        );
        assert!(!is_mounted(mnt.path()));
        text += &err;
    }

    let mut secrets = vec![
        ACCESS_TOKEN.to_string(),
        "SECRET".to_string(), // the distinctive part of every fake secret
        REFRESH_TOKEN.to_string(),
        CLIENT_SECRET.to_string(),
        "eyJ".to_string(), // the start of any JWT (base64url of `{"`)
    ];
    secrets.extend(private_key_lines());
    for s in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "{s:?} leaked into logs or errors"
        );
    }
}

fn sha_of(b: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::digest(b).to_vec()
}

/// The options of the mount at `mnt`, from /proc/mounts.
fn mount_options(mnt: &Path) -> Vec<String> {
    let want = mnt.to_string_lossy().to_string();
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        .expect("mounted");
    line.split_whitespace()
        .nth(3)
        .expect("options")
        .split(',')
        .map(str::to_string)
        .collect()
}

#[test]
fn mount_options_default_permissions_and_no_allow_other() {
    let tree = Tree::new();
    tree.put("x", b"x");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    for (extra, mode, want_ro) in [(&[][..], 0o644, false), (&["--read-only"][..], 0o644, true)] {
        let m = MountGuard::mount(&format!("http://{}", emu.addr), mnt.path(), extra);
        let opts = mount_options(mnt.path());
        for want in ["nosuid", "nodev", "default_permissions"] {
            assert!(opts.iter().any(|o| o == want), "{want} not in {opts:?}");
        }
        let rw = if want_ro { "ro" } else { "rw" };
        assert!(
            opts.iter().any(|o| o == rw),
            "{rw} not in {opts:?} ({extra:?})"
        );
        assert!(
            !opts.iter().any(|o| o == "allow_other"),
            "allow_other without --allow-other: {opts:?}"
        );
        // The permission bits are enforced by the kernel: 0644 files, 0755 dirs.
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(mnt.path().join("x")).expect("stat");
        assert_eq!(md.permissions().mode() & 0o7777, mode);
        drop(m);
        assert!(!is_mounted(mnt.path()));
    }
}

/// Plaintext only when given explicitly: STORAGE_EMULATOR_HOST=host:port is
/// plaintext (and anonymous), as Google's tools take it; `--endpoint
/// host:port` (no scheme) is refused rather than guessed (tests/bad_input.rs),
/// and the default is https (unit test in src/gcs/transport.rs).
#[test]
fn storage_emulator_host_is_the_only_implicit_plaintext() {
    let tree = Tree::new();
    tree.put("x", b"hello");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let out = zonalfs_cmd()
        .args(["cat", "gs://test-bucket/x"])
        .env("STORAGE_EMULATOR_HOST", &emu.addr)
        .env_remove("ZONALFS_ENDPOINT")
        .output()
        .expect("run");
    assert!(out.status.success(), "{:?}", out);
    assert_eq!(out.stdout, b"hello");
}

/// An https endpoint whose certificate no trusted root signed: refused, in
/// one line that says it was the certificate, and nothing mounted.
#[test]
fn untrusted_certificate_is_refused_in_one_line() {
    let tree = Tree::new();
    tree.put("x", b"x");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = rt.block_on(async {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        let emu = Emulator::new(tree.root(), Config::default()).expect("emulator");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let identity =
            tonic::transport::Identity::from_pem(cert.pem(), signing_key.serialize_pem());
        let server = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .expect("tls")
            .add_service(StorageServer::new(StorageService { emu: emu.clone() }))
            .add_service(StorageControlServer::new(ControlService { emu }))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        addr
    });
    let mnt = tempfile::tempdir().expect("mountpoint");
    let ep = format!("https://{addr}");
    let out = run(zonalfs_cmd()
        .args(["mount", "-f", BUCKET])
        .arg(mnt.path())
        .args(["--endpoint", &ep, "--anonymous"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "zonalfs: error: cannot connect to {ep}: TLS handshake failed"
        )) && err.contains("certificate"),
        "{err}"
    );
    assert!(!is_mounted(mnt.path()));
}

/// The emulator's Storage service, plus objects whose names a real bucket may
/// hold but a file system cannot show (`../x`, `a//b`, `/abs`, ...), listed
/// as GCS would (collapsed at `/`). It also misbehaves: listings repeat a
/// name, every listing below the root carries an object and a prefix from
/// outside the directory asked for, and the root's a prefix two levels deep.
struct Adversarial {
    inner: StorageService,
    injected: Vec<String>,
}

const INJECTED: &[&str] = &[
    "../x",
    "a/../../x",
    "/abs",
    "a//b",
    "./dot",
    "b/./c",
    "b/..",
    "nul\0byte",
    "new\nline",
    "trail/",
    "ok-injected",
    "d/ok2",
];

fn injected_object(name: &str) -> pb::Object {
    pb::Object {
        name: name.to_string(),
        bucket: bucket_resource(BUCKET),
        generation: 7,
        metageneration: 1,
        size: 0,
        finalize_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_001,
            nanos: 0,
        }),
        update_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_001,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Storage for Adversarial {
    async fn get_bucket(
        &self,
        r: Request<pb::GetBucketRequest>,
    ) -> Result<Response<pb::Bucket>, Status> {
        self.inner.get_bucket(r).await
    }

    async fn get_object(
        &self,
        r: Request<pb::GetObjectRequest>,
    ) -> Result<Response<pb::Object>, Status> {
        if self.injected.contains(&r.get_ref().object) {
            return Ok(Response::new(injected_object(&r.get_ref().object)));
        }
        self.inner.get_object(r).await
    }

    type ReadObjectStream = <StorageService as Storage>::ReadObjectStream;

    async fn read_object(
        &self,
        r: Request<pb::ReadObjectRequest>,
    ) -> Result<Response<Self::ReadObjectStream>, Status> {
        self.inner.read_object(r).await
    }

    type BidiReadObjectStream = <StorageService as Storage>::BidiReadObjectStream;

    async fn bidi_read_object(
        &self,
        r: Request<Streaming<pb::BidiReadObjectRequest>>,
    ) -> Result<Response<Self::BidiReadObjectStream>, Status> {
        self.inner.bidi_read_object(r).await
    }

    type BidiWriteObjectStream = <StorageService as Storage>::BidiWriteObjectStream;

    async fn bidi_write_object(
        &self,
        r: Request<Streaming<pb::BidiWriteObjectRequest>>,
    ) -> Result<Response<Self::BidiWriteObjectStream>, Status> {
        self.inner.bidi_write_object(r).await
    }

    async fn delete_object(
        &self,
        r: Request<pb::DeleteObjectRequest>,
    ) -> Result<Response<()>, Status> {
        self.inner.delete_object(r).await
    }

    async fn move_object(
        &self,
        r: Request<pb::MoveObjectRequest>,
    ) -> Result<Response<pb::Object>, Status> {
        self.inner.move_object(r).await
    }

    async fn list_objects(
        &self,
        r: Request<pb::ListObjectsRequest>,
    ) -> Result<Response<pb::ListObjectsResponse>, Status> {
        let req = r.get_ref().clone();
        let mut resp = self.inner.list_objects(r).await?.into_inner();
        if req.page_token.is_empty() && !req.prefix.is_empty() {
            // Misbehaving: names from outside the directory asked for.
            resp.objects.push(injected_object("q"));
            resp.prefixes.push("z/".to_string());
        }
        if req.page_token.is_empty() && req.prefix.is_empty() {
            // Misbehaving: a prefix two levels deep.
            resp.prefixes.push("deep/er/".to_string());
        }
        if req.page_token.is_empty() {
            for n in &self.injected {
                let Some(rest) = n.strip_prefix(&req.prefix) else {
                    continue;
                };
                match rest.find('/') {
                    Some(i) => {
                        let p = n[..req.prefix.len() + i + 1].to_string();
                        if !resp.prefixes.contains(&p) {
                            resp.prefixes.push(p);
                        }
                    }
                    None => resp.objects.push(injected_object(n)),
                }
            }
            // Misbehaving: the same name twice.
            if let Some(o) = resp.objects.first().cloned() {
                resp.objects.push(o);
            }
            if let Some(p) = resp.prefixes.first().cloned() {
                resp.prefixes.push(p);
            }
        }
        Ok(Response::new(resp))
    }
}

/// Every path under `root` (not following symlinks), relative, with its
/// type.
fn walk(root: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("readdir") {
            let e = e.expect("entry");
            let is_dir = e.file_type().expect("type").is_dir();
            let rel = e.path().strip_prefix(root).expect("inside").to_path_buf();
            assert!(out.len() < 1000, "runaway tree");
            if is_dir {
                todo.push(e.path());
            }
            out.push((rel, is_dir));
        }
    }
    out.sort();
    out
}

#[test]
fn object_names_never_escape_the_mount() {
    let tree = Tree::new();
    tree.put("real.txt", b"real");
    tree.put("d/inner", b"inner");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = rt.block_on(async {
        let emu = Emulator::new(tree.root(), Config::default()).expect("emulator");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let adv = Adversarial {
            inner: StorageService { emu: emu.clone() },
            // 255 bytes: the longest valid name; 256: skipped.
            injected: INJECTED
                .iter()
                .map(|s| s.to_string())
                .chain(["v".repeat(255), "L".repeat(256)])
                .collect(),
        };
        let server = tonic::transport::Server::builder()
            .add_service(StorageServer::new(adv))
            .add_service(StorageControlServer::new(ControlService { emu }))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        addr
    });
    // The mountpoint's parent holds a file named like an escaping object.
    let parent = tempfile::tempdir().expect("dir");
    std::fs::write(parent.path().join("x"), b"outside").expect("write");
    let mnt = parent.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let m = MountGuard::mount(&format!("http://{addr}"), &mnt, &[]);

    let got = walk(&mnt);
    let names: Vec<(String, bool)> = got
        .iter()
        .map(|(p, d)| (p.to_str().expect("utf-8").to_string(), *d))
        .collect();
    let want: Vec<(String, bool)> = [
        ("a", true),
        ("b", true),
        ("d", true),
        ("d/inner", false),
        ("d/ok2", false),
        ("new\nline", false),
        ("ok-injected", false),
        ("real.txt", false),
        ("trail", true),
    ]
    .iter()
    .map(|(n, d)| (n.to_string(), *d))
    .chain([("v".repeat(255), false)])
    .collect();
    assert_eq!(names, want, "only valid names, each once, all inside");
    for (p, _) in &got {
        for c in p.components() {
            let c = c.as_os_str().to_str().expect("utf-8");
            assert!(c != "." && c != ".." && !c.is_empty() && !c.contains('\0'));
        }
        let real = mnt.join(p).canonicalize().expect("canonicalize");
        assert!(
            real.starts_with(&mnt),
            "{} resolves outside",
            real.display()
        );
    }
    assert_eq!(std::fs::read(mnt.join("real.txt")).expect("read"), b"real");
    assert_eq!(std::fs::read(mnt.join("d/inner")).expect("read"), b"inner");
    assert_eq!(std::fs::read(mnt.join("ok-injected")).expect("read"), b"");
    // Names that are not entries are not there either.
    for bad in ["x", "abs", "dot", "q", "z", "deep", "a/b", "b/c", "nul"] {
        assert!(
            std::fs::symlink_metadata(mnt.join(bad)).is_err(),
            "{bad} is visible"
        );
    }
    // `..` of the root is the mountpoint's parent (the kernel's, not the
    // daemon's), and the object `../x` did not replace what is there.
    assert_eq!(
        std::fs::read(mnt.join("a/../../x")).expect("read"),
        b"outside"
    );
    // Each skipped name was logged (once, as a warning).
    let mut m = m;
    let stderr = m.child.as_mut().and_then(|c| c.stderr.take());
    assert!(m.stop().success());
    let mut log = String::new();
    if let Some(mut e) = stderr {
        e.read_to_string(&mut log).expect("mount's stderr");
    }
    for want in [
        "skipping an object whose name is not a valid file name",
        "skipping a prefix that is not a valid directory name",
        "LLLLLLLL",
        "nul\\0byte",
    ] {
        assert!(log.contains(want), "{want:?} not in the log:\n{log}");
    }
    drop(m);
    assert!(!is_mounted(&mnt));
}
