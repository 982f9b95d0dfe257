//! Shared helpers for integration tests: sample trees, an in-process emulator,
//! a raw tonic client that speaks google.storage.v2 to it, and bounded polling
//! of a condition ([`wait_until`] and its kin).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Request;
pub mod mount;
pub mod python;

use zonalfs::emulator::{self, Config, Running};
use zonalfs::proto::control::storage_control_client::StorageControlClient;
use zonalfs::proto::storage::storage_client::StorageClient;
use zonalfs::proto::storage::{
    BidiReadObjectRequest, BidiReadObjectResponse, BidiReadObjectSpec, ReadRange,
};

pub const BUCKET: &str = "test-bucket";

pub fn bucket_resource(b: &str) -> String {
    format!("projects/_/buckets/{b}")
}

/// How long the `wait_*` helpers sleep between two tries of their condition.
pub const POLL: Duration = Duration::from_millis(10);

/// Tries `probe` until it yields a value or `within` has passed, sleeping
/// [`POLL`] between tries: the value, or `None` on timeout. `probe` runs at
/// least once, and a last time at the bound. (A bounded poll of a condition,
/// for what a test cannot be told of directly.)
pub fn wait_for<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

/// Polls `cond` until it is true or `within` has passed; whether it became
/// true. See [`wait_for`].
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(within, || cond().then_some(())).is_some()
}

/// [`wait_until`], panicking if `cond` is still false after `within`, with a
/// message naming `what` was awaited and the bound.
#[track_caller]
pub fn must_wait_until(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    if !wait_until(within, cond) {
        panic!("timed out after {within:?} waiting until {what}");
    }
}

/// [`wait_until`] for async tests: sleeps with `tokio::time::sleep`, so that
/// the runtime's other tasks run meanwhile. (No panicking twin: a panic in an
/// async helper would not point at its caller; `assert!` the result instead.)
pub async fn wait_until_async(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift), so sources are reproducible.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A temporary emulator root with one bucket.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn new() -> Tree {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join(BUCKET)).expect("bucket dir");
        Tree { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, object: &str) -> PathBuf {
        self.dir.path().join(BUCKET).join(object)
    }

    /// Writes an object and returns its bytes.
    pub fn put(&self, object: &str, data: &[u8]) -> Vec<u8> {
        let p = self.path(object);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, data).expect("write object");
        data.to_vec()
    }

    /// Marks an object appendable (unfinalized).
    pub fn mark_appendable(&self, object: &str) {
        let m = self
            .dir
            .path()
            .join(emulator::store::APPENDABLE_DIR)
            .join(BUCKET)
            .join(object);
        std::fs::create_dir_all(m.parent().expect("parent")).expect("mkdir");
        std::fs::write(m, b"").expect("marker");
    }
}

/// An emulator configuration with these shaping and fault settings.
pub fn shaped(shaping: zonalfs::emulator::Shaping) -> Config {
    Config {
        shaping,
        ..Default::default()
    }
}

pub async fn start(tree: &Tree, config: Config) -> Running {
    emulator::start(tree.root(), config)
        .await
        .expect("emulator starts")
}

pub async fn channel(emu: &Running) -> Channel {
    Channel::from_shared(emu.endpoint())
        .expect("endpoint")
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .connect()
        .await
        .expect("connect")
}

pub async fn storage(emu: &Running) -> StorageClient<Channel> {
    StorageClient::new(channel(emu).await).max_decoding_message_size(16 << 20)
}

pub async fn control(emu: &Running) -> StorageControlClient<Channel> {
    StorageControlClient::new(channel(emu).await)
}

/// Wraps a message with the routing header, as every real client sends it.
pub fn routed<T>(msg: T, bucket: &str, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    let mut v = format!("bucket={}", bucket_resource(bucket));
    if let Some(t) = token {
        v.push_str(&format!("&routing_token={t}"));
    }
    r.metadata_mut()
        .insert("x-goog-request-params", v.parse().expect("ascii header"));
    r
}

pub fn spec(object: &str) -> BidiReadObjectSpec {
    BidiReadObjectSpec {
        bucket: bucket_resource(BUCKET),
        object: object.to_string(),
        ..Default::default()
    }
}

pub fn range(id: i64, offset: i64, length: i64) -> ReadRange {
    ReadRange {
        read_offset: offset,
        read_length: length,
        read_id: id,
    }
}

/// An open BidiReadObject stream: send requests, receive responses.
pub struct Bidi {
    pub tx: mpsc::Sender<BidiReadObjectRequest>,
    pub rx: tonic::Streaming<BidiReadObjectResponse>,
}

impl Bidi {
    /// Opens a stream with this spec and first ranges; the server's answer to the
    /// open (or its error) is returned.
    pub async fn open(
        client: &mut StorageClient<Channel>,
        spec: BidiReadObjectSpec,
        ranges: Vec<ReadRange>,
        token: Option<&str>,
    ) -> Result<Bidi, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(BidiReadObjectRequest {
            read_object_spec: Some(spec),
            read_ranges: ranges,
        })
        .await
        .expect("queue first request");
        let resp = client
            .bidi_read_object(routed(ReceiverStream::new(rx), BUCKET, token))
            .await?;
        Ok(Bidi {
            tx,
            rx: resp.into_inner(),
        })
    }

    pub async fn add(&self, ranges: Vec<ReadRange>) {
        self.tx
            .send(BidiReadObjectRequest {
                read_object_spec: None,
                read_ranges: ranges,
            })
            .await
            .expect("send ranges");
    }
}

/// The `zonalfs emulator` binary running as a child process; killed on drop, so a
/// failing test never leaks it.
pub struct EmuChild {
    pub child: Option<std::process::Child>,
    pub addr: String,
    stdout: Option<std::process::ChildStdout>,
}

impl EmuChild {
    /// Starts the emulator on an ephemeral port and waits for its "listening on"
    /// line (the readiness signal).
    pub fn spawn(root: &Path, extra: &[&str]) -> EmuChild {
        EmuChild::spawn_on(root, "127.0.0.1:0", extra)
    }

    /// Starts the emulator listening on `listen` (e.g. the address of one that
    /// was stopped, to bring "the service" back) and waits for its readiness line.
    pub fn spawn_on(root: &Path, listen: &str, extra: &[&str]) -> EmuChild {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_zonalfs"))
            .arg("emulator")
            .arg("--root")
            .arg(root)
            .args(["--listen", listen, "--log-level", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zonalfs emulator");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut guard = EmuChild {
            child: Some(child),
            addr: String::new(),
            stdout: None,
        };
        let mut line = String::new();
        {
            let mut reader = std::io::BufReader::new(&mut stdout);
            reader.read_line(&mut line).expect("read readiness line");
        }
        guard.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        guard.stdout = Some(stdout);
        guard
    }

    /// Sends a signal and waits for exit; returns (exit status, stderr).
    pub fn signal_and_wait(&mut self, sig: i32) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) with the pid of a child we own and have not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill failed");
        let status = child.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err).expect("read stderr");
        }
        (status, err)
    }
}

impl Drop for EmuChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
