//! Credentials layer (`zonalfs::gcs::auth`) against loopback fakes: a token
//! endpoint (authorized user, external account STS), a GCE metadata server, and
//! the committed test-only service-account key in `tests/fixtures/`.
//!
//! Every test takes one process-wide lock: some mutate the environment
//! (`GCE_METADATA_HOST`, `GOOGLE_APPLICATION_CREDENTIALS`, `HOME`, ...), which
//! is process-global, and the secrets test installs the global tracing
//! subscriber. Nothing waits on wall-clock sleeps: the refresh test arranges a
//! token that is already expired, so the next call must block until the
//! credentials' refresh task fetches a new one.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use zonalfs::gcs::auth::{AuthError, CredentialsSource, TokenProvider, SCOPES};

mod common;

/// Upper bound for anything a test awaits: a hang fails, it does not block CI.
const BOUND: Duration = Duration::from_secs(60);

const READ_ONLY: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const MDS_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const USER_REFRESH_TOKEN: &str = "1//fake-refresh-token-SECRET-3f9a1c";
const USER_CLIENT_SECRET: &str = "fake-client-secret-SECRET-77b2";

/// Serializes the tests of this binary (each runs on its own runtime).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {BOUND:?}"),
    }
}

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 server on loopback.

#[derive(Debug, Clone)]
struct Req {
    method: String,
    /// Path and query.
    target: String,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Req {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// `(request number from 1, request) -> (status, JSON body)`.
type Handler = Arc<dyn Fn(usize, &Req) -> (u16, String) + Send + Sync>;

/// `request number from 1 -> how long the server sits on it before answering`.
type Delay = Arc<dyn Fn(usize) -> Duration + Send + Sync>;

struct Fake {
    addr: SocketAddr,
    reqs: Arc<Mutex<Vec<Req>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    async fn start(handler: Handler) -> Fake {
        Fake::start_slow(handler, Arc::new(|_| Duration::ZERO)).await
    }

    /// A server that answers request `n` only after `delay(n)`.
    async fn start_slow(handler: Handler, delay: Delay) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reqs = Arc::new(Mutex::new(Vec::new()));
        let log = reqs.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (log, handler, delay) = (log.clone(), handler.clone(), delay.clone());
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push(req.clone());
                        log.len()
                    };
                    tokio::time::sleep(delay(n)).await;
                    let (status, body) = handler(n, &req);
                    let resp = format!(
                        "HTTP/1.1 {status} Fake\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Fake { addr, reqs, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.reqs.lock().unwrap().len()
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_string();
        let target = first.next()?.to_string();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return Some(Req {
                method,
                target,
                headers,
                body,
            });
        }
    }
}

/// An OAuth token endpoint at `POST /token`: answers `{prefix}-{n}` valid for
/// `expires_in` seconds when the request carries the fake refresh token.
fn token_endpoint(prefix: &'static str, expires_in: u64) -> Handler {
    Arc::new(move |n, req| {
        if req.method != "POST" || req.path() != "/token" {
            return (404, r#"{"error":"not_found"}"#.into());
        }
        if !req.body.contains(USER_REFRESH_TOKEN) {
            return (400, r#"{"error":"invalid_request"}"#.into());
        }
        (200, token_json(prefix, n, expires_in))
    })
}

fn token_json(prefix: &str, n: usize, expires_in: u64) -> String {
    format!(r#"{{"access_token":"{prefix}-{n}","expires_in":{expires_in},"token_type":"Bearer"}}"#)
}

/// Always answers `status` with an OAuth error body.
fn failing_endpoint(status: u16) -> Handler {
    Arc::new(move |_, _| (status, r#"{"error":"invalid_grant"}"#.into()))
}

/// A GCE metadata server: the default service account's token, only with
/// `Metadata-Flavor: Google`.
fn metadata_server(prefix: &'static str) -> Handler {
    Arc::new(move |n, req| {
        if req.header("metadata-flavor") != Some("Google") {
            return (403, r#"{"error":"missing Metadata-Flavor header"}"#.into());
        }
        if req.method == "GET" && req.path() == MDS_TOKEN_PATH {
            return (200, token_json(prefix, n, 3600));
        }
        (404, r#"{"error":"not found"}"#.into())
    })
}

// ---------------------------------------------------------------------------
// Credential files.

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture_key() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("test-service-account.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn write_json(path: &Path, json: &serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(json).unwrap()).unwrap();
    path.to_path_buf()
}

fn authorized_user(token_uri: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "authorized_user",
        "client_id": "fake-client-id.apps.googleusercontent.com",
        "client_secret": USER_CLIENT_SECRET,
        "refresh_token": USER_REFRESH_TOKEN,
        "token_uri": token_uri,
    })
}

fn bearer(value: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>) -> String {
    let text = value.to_str().expect("ASCII header value");
    text.strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not a Bearer header: {} chars", text.len()))
        .to_string()
}

async fn token_of(tp: &TokenProvider) -> String {
    let value = bounded("authorization", tp.authorization())
        .await
        .expect("authorization")
        .expect("a header");
    bearer(&value)
}

/// The number at the end of a fake token (`prefix-N`).
fn serial_of(token: &str) -> usize {
    token.rsplit('-').next().unwrap().parse().unwrap()
}

/// Sets and removes environment variables, restoring them on drop.
struct Env {
    saved: Vec<(&'static str, Option<std::ffi::OsString>)>,
}

impl Env {
    fn new() -> Env {
        Env { saved: Vec::new() }
    }
    fn save(&mut self, key: &'static str) {
        if !self.saved.iter().any(|(k, _)| *k == key) {
            self.saved.push((key, std::env::var_os(key)));
        }
    }
    fn set(&mut self, key: &'static str, value: impl AsRef<std::ffi::OsStr>) {
        self.save(key);
        std::env::set_var(key, value);
    }
    fn remove(&mut self, key: &'static str) {
        self.save(key);
        std::env::remove_var(key);
    }
    /// No ADC file anywhere, metadata server at `mds` (host:port) if given.
    fn isolate(&mut self, home: &Path, mds: Option<&str>) {
        self.remove("GOOGLE_APPLICATION_CREDENTIALS");
        self.remove("CLOUDSDK_CONFIG");
        self.set("HOME", home);
        match mds {
            Some(host) => self.set("GCE_METADATA_HOST", host),
            None => self.remove("GCE_METADATA_HOST"),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (key, value) in self.saved.drain(..).rev() {
            match value {
                Some(v) => std::env::set_var(key, v),
                None => std::env::remove_var(key),
            }
        }
    }
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

// ---------------------------------------------------------------------------
// 1. Service-account key file.

fn b64url(part: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url JWT part")
}

fn rsa_public_key_der() -> Vec<u8> {
    let pem = std::fs::read_to_string(fixture("test-service-account.pub.pem")).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

#[tokio::test]
async fn service_account_key_file_signs_a_scoped_jwt_locally() {
    let _serial = serial().await;
    let server = Fake::start(token_endpoint("sa-should-not-be-used", 3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut key = fixture_key();
    key["token_uri"] = server.url("/token").into();
    let path = write_json(&dir.path().join("sa.json"), &key);

    let tp = bounded(
        "new",
        TokenProvider::new(CredentialsSource::KeyFile(path.clone())),
    )
    .await
    .expect("service-account key file");
    assert!(!tp.is_anonymous());
    let debug = format!("{tp:?}");
    assert!(debug.contains(&path.display().to_string()), "{debug}");
    assert!(debug.contains("service_account"), "{debug}");

    let jwt = token_of(&tp).await;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts");
    let header: serde_json::Value = serde_json::from_slice(&b64url(parts[0])).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], key["private_key_id"]);
    let claims: serde_json::Value = serde_json::from_slice(&b64url(parts[1])).unwrap();
    assert_eq!(claims["iss"], key["client_email"]);
    assert_eq!(claims["sub"], key["client_email"]);
    assert_eq!(claims["scope"], SCOPES.join(" "));
    assert_eq!(claims["scope"], READ_ONLY);
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        iat <= now + 60 && exp > now,
        "iat {iat} exp {exp} now {now}"
    );
    assert!(
        (3600..=3700).contains(&(exp - iat)),
        "lifetime {}",
        exp - iat
    );

    // Signed by the fixture's private key.
    let signed = format!("{}.{}", parts[0], parts[1]);
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        rsa_public_key_der(),
    )
    .verify(signed.as_bytes(), &b64url(parts[2]))
    .expect("the JWT verifies with the fixture's public key");

    // Cached: the same token again.
    assert_eq!(token_of(&tp).await, jwt);
    assert_eq!(token_of(&tp.clone()).await, jwt);
    // google-cloud-auth signs service-account tokens locally: no token server.
    assert_eq!(server.count(), 0, "{:?}", server.requests());
}

// ---------------------------------------------------------------------------
// 2. Token endpoint: caching and refresh.

#[tokio::test]
async fn authorized_user_token_is_fetched_once_and_cached() {
    let _serial = serial().await;
    let server = Fake::start(token_endpoint("user-tok", 3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_json(
        &dir.path().join("user.json"),
        &authorized_user(&server.url("/token")),
    );
    let tp = bounded(
        "new",
        TokenProvider::new(CredentialsSource::KeyFile(path.clone())),
    )
    .await
    .expect("authorized-user file");
    assert!(format!("{tp:?}").contains("authorized_user"));

    let value = bounded("authorization", tp.authorization())
        .await
        .unwrap()
        .expect("a header");
    assert_eq!(value.to_str().unwrap(), "Bearer user-tok-1");
    for _ in 0..5 {
        assert_eq!(token_of(&tp).await, "user-tok-1");
    }
    let clone = tp.clone();
    assert_eq!(token_of(&clone).await, "user-tok-1");
    assert_eq!(server.count(), 1, "one token request, then the cache");

    let req = &server.requests()[0];
    assert_eq!(req.method, "POST");
    let body: serde_json::Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(body["grant_type"], "refresh_token");
    assert_eq!(body["refresh_token"], USER_REFRESH_TOKEN);
    assert!(
        req.body.contains(READ_ONLY),
        "scope requested: {}",
        req.body
    );
}

/// The token server hands out tokens that are already expired
/// (`expires_in: 0`): a call after the first must not reuse the cached token,
/// and blocks until the credentials' refresh task has fetched the next one
/// (google-cloud-auth re-asks every 10 s for tokens valid for less than its
/// 240 s refresh margin, so this test takes about 10 s).
#[tokio::test]
async fn expired_token_is_refreshed_before_use() {
    let _serial = serial().await;
    let server = Fake::start(token_endpoint("short-tok", 0)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_json(
        &dir.path().join("user.json"),
        &authorized_user(&server.url("/token")),
    );
    let tp = bounded("new", TokenProvider::new(CredentialsSource::KeyFile(path)))
        .await
        .unwrap();
    let first = token_of(&tp).await;
    let second = token_of(&tp).await;
    assert!(
        serial_of(&second) > serial_of(&first),
        "refreshed: {first} then {second}"
    );
    assert!(server.count() >= 2, "{} requests", server.count());
}

#[tokio::test]
async fn external_account_exchanges_a_subject_token_at_token_url() {
    let _serial = serial().await;
    let server = Fake::start(Arc::new(|n, req: &Req| {
        if req.method == "POST" && req.path() == "/sts" && req.body.contains("fake-subject-jwt") {
            let body = format!(
                r#"{{"access_token":"sts-tok-{n}","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3600}}"#
            );
            return (200, body);
        }
        (400, r#"{"error":"invalid_request"}"#.into())
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("subject.txt");
    std::fs::write(&subject, "fake-subject-jwt").unwrap();
    let path = write_json(
        &dir.path().join("wif.json"),
        &serde_json::json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": server.url("/sts"),
            "credential_source": {"file": subject.display().to_string()},
        }),
    );
    let tp = bounded("new", TokenProvider::new(CredentialsSource::KeyFile(path)))
        .await
        .expect("external-account file");
    assert!(format!("{tp:?}").contains("external_account"));
    assert_eq!(token_of(&tp).await, "sts-tok-1");
    assert_eq!(token_of(&tp).await, "sts-tok-1");
    assert_eq!(server.count(), 1);
    assert!(server.requests()[0].body.contains("devstorage.read_only"));
}

#[tokio::test]
async fn impersonated_service_account_uses_its_source_credentials() {
    let _serial = serial().await;
    let server = Fake::start(Arc::new(|n, req: &Req| {
        if req.method != "POST" {
            return (404, "{}".into());
        }
        if req.path() == "/token" && req.body.contains(USER_REFRESH_TOKEN) {
            return (200, token_json("src-tok", n, 3600));
        }
        if req.path().ends_with(":generateAccessToken")
            && req.header("authorization") == Some("Bearer src-tok-1")
            && req.body.contains(READ_ONLY)
        {
            let body =
                format!(r#"{{"accessToken":"imp-tok-{n}","expireTime":"2099-01-01T00:00:00Z"}}"#);
            return (200, body);
        }
        (403, r#"{"error":"denied"}"#.into())
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_json(
        &dir.path().join("impersonated.json"),
        &serde_json::json!({
            "type": "impersonated_service_account",
            "service_account_impersonation_url": server.url(
                "/v1/projects/-/serviceAccounts/target@p.iam.gserviceaccount.com:generateAccessToken"
            ),
            "source_credentials": authorized_user(&server.url("/token")),
        }),
    );
    let tp = bounded("new", TokenProvider::new(CredentialsSource::KeyFile(path)))
        .await
        .expect("impersonated-service-account file");
    assert!(format!("{tp:?}").contains("impersonated_service_account"));
    assert_eq!(token_of(&tp).await, "imp-tok-2");
    assert_eq!(token_of(&tp).await, "imp-tok-2");
    assert_eq!(server.count(), 2, "{:?}", server.requests());
}

// ---------------------------------------------------------------------------
// 3. Application Default Credentials and the metadata server.

#[tokio::test]
async fn adc_resolution_and_metadata_server() {
    let _serial = serial().await;
    let mut env = Env::new();
    let home = tempfile::tempdir().unwrap();

    // (a) No file anywhere: the metadata server, found through GCE_METADATA_HOST.
    let mds = Fake::start(metadata_server("mds-tok")).await;
    let host = mds.addr.to_string();
    env.isolate(home.path(), Some(&host));
    let tp = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .expect("ADC through the metadata server");
    let debug = format!("{tp:?}");
    assert!(
        debug.contains(&format!("metadata server http://{host}")),
        "{debug}"
    );
    assert_eq!(token_of(&tp).await, "mds-tok-1");
    assert_eq!(token_of(&tp).await, "mds-tok-1");
    let reqs = mds.requests();
    assert_eq!(reqs.len(), 1, "probe in new(), then the cache: {reqs:?}");
    assert_eq!(reqs[0].path(), MDS_TOKEN_PATH);
    assert_eq!(reqs[0].header("metadata-flavor"), Some("Google"));
    assert!(
        reqs[0].target.contains("devstorage.read_only"),
        "scopes in the query: {}",
        reqs[0].target
    );
    drop(tp);

    // (b) No file, and the metadata server refuses connections: one clear
    // error from new(), soon.
    let dead = closed_port().await;
    env.isolate(home.path(), Some(&dead.to_string()));
    let err = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .expect_err("no credentials anywhere");
    assert!(matches!(err, AuthError::NoAdc { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("metadata server http://{dead}")),
        "{msg}"
    );
    assert!(msg.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{msg}");
    assert!(
        msg.contains(".config/gcloud/application_default_credentials.json"),
        "{msg}"
    );

    // (c) A metadata server without a service account (404): same error kind.
    let no_sa = Fake::start(Arc::new(|_, _: &Req| (404, "{}".into()))).await;
    env.isolate(home.path(), Some(&no_sa.addr.to_string()));
    let err = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .expect_err("metadata server has no token");
    assert!(matches!(err, AuthError::NoAdc { .. }), "{err:?}");

    // (d) GOOGLE_APPLICATION_CREDENTIALS wins over the metadata server.
    let token_server = Fake::start(token_endpoint("adc-env-tok", 3600)).await;
    let file = write_json(
        &home.path().join("elsewhere/adc.json"),
        &authorized_user(&token_server.url("/token")),
    );
    env.isolate(home.path(), Some(&host));
    env.set("GOOGLE_APPLICATION_CREDENTIALS", &file);
    let tp = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .unwrap();
    let debug = format!("{tp:?}");
    assert!(debug.contains(&file.display().to_string()), "{debug}");
    assert!(debug.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{debug}");
    assert_eq!(token_of(&tp).await, "adc-env-tok-1");
    assert_eq!(mds.count(), 1, "the metadata server is not asked");
    drop(tp);

    // (e) GOOGLE_APPLICATION_CREDENTIALS naming a missing file is an error
    // naming the file, not a fall back to the metadata server.
    let missing = home.path().join("missing.json");
    env.set("GOOGLE_APPLICATION_CREDENTIALS", &missing);
    let err = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .expect_err("missing ADC file");
    assert!(matches!(err, AuthError::Read { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{msg}");

    // (f) gcloud's well-known file under $HOME.
    let well_known = write_json(
        &home
            .path()
            .join(".config/gcloud/application_default_credentials.json"),
        &authorized_user(&token_server.url("/token")),
    );
    env.isolate(home.path(), Some(&host));
    let tp = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .unwrap();
    let debug = format!("{tp:?}");
    assert!(
        debug.contains(&format!("gcloud ADC file {}", well_known.display())),
        "{debug}"
    );
    assert_eq!(token_of(&tp).await, "adc-env-tok-2");
    drop(tp);

    // (g) ... or under $CLOUDSDK_CONFIG.
    let config = tempfile::tempdir().unwrap();
    let in_config = write_json(
        &config.path().join("application_default_credentials.json"),
        &authorized_user(&token_server.url("/token")),
    );
    env.set("CLOUDSDK_CONFIG", config.path());
    let tp = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .unwrap();
    assert!(format!("{tp:?}").contains(&in_config.display().to_string()));
    assert_eq!(token_of(&tp).await, "adc-env-tok-3");
    assert_eq!(mds.count(), 1);
}

// ---------------------------------------------------------------------------
// 4. Failing token sources.

#[tokio::test]
async fn failing_token_sources_give_clear_bounded_errors() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    for (status, transient) in [(500, true), (503, true), (401, false), (400, false)] {
        let server = Fake::start(failing_endpoint(status)).await;
        let path = write_json(
            &dir.path().join(format!("user-{status}.json")),
            &authorized_user(&server.url("/token")),
        );
        let tp = bounded(
            "new",
            TokenProvider::new(CredentialsSource::KeyFile(path.clone())),
        )
        .await
        .expect("the file is fine; the token server is not");
        let err = bounded("authorization", tp.authorization())
            .await
            .expect_err("token server fails");
        match &err {
            AuthError::Token { transient: t, .. } => assert_eq!(*t, transient, "{status}: {err}"),
            other => panic!("{status}: expected a token error, got {other:?}"),
        }
        assert_eq!(err.is_transient(), transient);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&status.to_string()), "{msg}");
        // No retry storm: the failure is remembered, not re-fetched per call.
        let again = bounded("authorization", tp.authorization()).await;
        assert!(again.is_err());
        assert_eq!(server.count(), 1, "{status}");
    }

    // Connection refused.
    let dead = closed_port().await;
    let path = write_json(
        &dir.path().join("user-dead.json"),
        &authorized_user(&format!("http://{dead}/token")),
    );
    let tp = bounded(
        "new",
        TokenProvider::new(CredentialsSource::KeyFile(path.clone())),
    )
    .await
    .unwrap();
    let err = bounded("authorization", tp.authorization())
        .await
        .expect_err("connection refused");
    assert!(
        matches!(
            err,
            AuthError::Token {
                transient: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// 5. Bad key files.

#[tokio::test]
async fn bad_key_files_give_errors_naming_the_file() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let key = fixture_key();
    let pem = key["private_key"].as_str().unwrap().to_string();

    async fn fails(path: &Path) -> AuthError {
        let err = bounded(
            "new",
            TokenProvider::new(CredentialsSource::KeyFile(path.into())),
        )
        .await
        .expect_err("a bad key file");
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "names the file: {msg}"
        );
        err
    }

    // Unreadable: missing, and a directory.
    let err = fails(&dir.path().join("nope.json")).await;
    assert!(matches!(err, AuthError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot read"), "{err}");
    let err = fails(dir.path()).await;
    assert!(matches!(err, AuthError::Read { .. }), "{err:?}");

    // Malformed JSON (a truncated key file), not an object, no type.
    let truncated = dir.path().join("truncated.json");
    let full = serde_json::to_string_pretty(&key).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let err = fails(&truncated).await;
    assert!(matches!(err, AuthError::Malformed { .. }), "{err:?}");
    assert!(err.to_string().contains("invalid JSON"), "{err}");
    let err = fails(&write_json(
        &dir.path().join("array.json"),
        &serde_json::json!([1]),
    ))
    .await;
    assert!(matches!(err, AuthError::Malformed { .. }), "{err:?}");
    let mut untyped = key.clone();
    untyped.as_object_mut().unwrap().remove("type");
    let err = fails(&write_json(&dir.path().join("untyped.json"), &untyped)).await;
    assert!(matches!(err, AuthError::Malformed { .. }), "{err:?}");
    assert!(err.to_string().contains("\"type\""), "{err}");

    // Unsupported types.
    for kind in ["gdch_service_account", "api_key", "something_else"] {
        let mut other = key.clone();
        other["type"] = kind.into();
        let err = fails(&write_json(
            &dir.path().join(format!("{kind}.json")),
            &other,
        ))
        .await;
        assert!(matches!(err, AuthError::UnsupportedType { .. }), "{err:?}");
        assert!(err.to_string().contains(kind), "{err}");
    }

    // A service account without a private key, and one whose key is garbage.
    let mut keyless = key.clone();
    keyless.as_object_mut().unwrap().remove("private_key");
    let err = fails(&write_json(&dir.path().join("keyless.json"), &keyless)).await;
    assert!(matches!(err, AuthError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains("private_key"), "{err}");
    let mut garbage = key.clone();
    let bad_pem = "-----BEGIN PRIVATE KEY-----\nTk9UQUtFWU5PVEFLRVlOT1RBS0VZTk9UQUtFWU5PVEFLRVk=\n-----END PRIVATE KEY-----\n";
    garbage["private_key"] = bad_pem.into();
    let err = fails(&write_json(&dir.path().join("garbage.json"), &garbage)).await;
    assert!(matches!(err, AuthError::Invalid { .. }), "{err:?}");
    let msg = format!("{err} {err:?}");
    assert!(!msg.contains("Tk9UQUtFWU5PVEFLRVlOT1RBS0VZ"), "{msg}");

    // An authorized-user file missing its refresh token.
    let mut user = authorized_user("http://127.0.0.1:9/token");
    user.as_object_mut().unwrap().remove("refresh_token");
    let err = fails(&write_json(&dir.path().join("user.json"), &user)).await;
    assert!(matches!(err, AuthError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains("refresh_token"), "{err}");

    // None of these errors carries key material.
    let body_line = pem.lines().nth(5).unwrap();
    for path in [
        "garbage.json",
        "keyless.json",
        "untyped.json",
        "truncated.json",
    ] {
        let err = fails(&dir.path().join(path)).await;
        let msg = format!("{err} {err:?}");
        assert!(!msg.contains(body_line), "{path}: {msg}");
    }
}

// ---------------------------------------------------------------------------
// 6. No secrets in logs, errors or Debug.

/// Everything every tracing event (and `log` record) of the process writes,
/// at TRACE, from the moment the first test asks for it.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        use tracing_subscriber::util::SubscriberInitExt as _;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish()
            .try_init()
            .expect("the only global subscriber of this test binary");
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secrets_in_logs_errors_or_debug() {
    let _serial = serial().await;
    let logs = captured_logs();
    let mut env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let mut shown = String::new(); // Display and Debug of everything we got
    let mut tokens = Vec::new();

    // Service account (locally signed JWT).
    let key = fixture_key();
    let sa_path = write_json(&dir.path().join("sa.json"), &key);
    let sa = bounded(
        "new",
        TokenProvider::new(CredentialsSource::KeyFile(sa_path)),
    )
    .await
    .unwrap();
    let value = bounded("authorization", sa.authorization())
        .await
        .unwrap()
        .unwrap();
    tokens.push(bearer(&value));
    shown += &format!("{sa:?} {value:?}\n");

    // Authorized user: success.
    let server = Fake::start(token_endpoint("ya29.SECRET-user-access-token", 3600)).await;
    let user_path = write_json(
        &dir.path().join("user.json"),
        &authorized_user(&server.url("/token")),
    );
    let user = bounded(
        "new",
        TokenProvider::new(CredentialsSource::KeyFile(user_path)),
    )
    .await
    .unwrap();
    let value = bounded("authorization", user.authorization())
        .await
        .unwrap()
        .unwrap();
    tokens.push(bearer(&value));
    shown += &format!("{user:?} {value:?}\n");

    // Metadata server: success.
    let mds = Fake::start(metadata_server("ya29.SECRET-mds-access-token")).await;
    env.isolate(dir.path(), Some(&mds.addr.to_string()));
    let from_mds = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .unwrap();
    let value = bounded("authorization", from_mds.authorization())
        .await
        .unwrap()
        .unwrap();
    tokens.push(bearer(&value));
    shown += &format!("{from_mds:?} {value:?}\n");

    // Failures: a 401 from the token endpoint, a bad private key, a metadata
    // server that is not there.
    let refusing = Fake::start(failing_endpoint(401)).await;
    let failing_path = write_json(
        &dir.path().join("failing.json"),
        &authorized_user(&refusing.url("/token")),
    );
    let failing = bounded(
        "new",
        TokenProvider::new(CredentialsSource::KeyFile(failing_path)),
    )
    .await
    .unwrap();
    let err = bounded("authorization", failing.authorization())
        .await
        .unwrap_err();
    shown += &format!("{failing:?} {err} {err:?}\n");
    let mut garbage = key.clone();
    let pem = key["private_key"].as_str().unwrap();
    garbage["private_key"] = pem.replacen("MII", "XXX", 1).into();
    let garbage_path = write_json(&dir.path().join("garbage.json"), &garbage);
    let err = bounded(
        "new",
        TokenProvider::new(CredentialsSource::KeyFile(garbage_path)),
    )
    .await
    .unwrap_err();
    shown += &format!("{err} {err:?}\n");
    env.isolate(dir.path(), Some(&closed_port().await.to_string()));
    let err = bounded("new", TokenProvider::new(CredentialsSource::Adc))
        .await
        .unwrap_err();
    shown += &format!("{err} {err:?}\n");
    drop(env);

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    // The capture works (so the test can fail): our own events are there, and
    // the HTTP stack's TRACE events too.
    assert!(logs.contains("credentials: new access token"), "{logs}");
    assert!(logs.contains("TRACE"), "TRACE events captured");
    assert!(logs.contains("credentials: permanent failure"), "{logs}");

    let mut secrets: Vec<String> = tokens.clone();
    secrets.push(USER_REFRESH_TOKEN.into());
    secrets.push(USER_CLIENT_SECRET.into());
    // The fake tokens' distinctive part, in case only a piece leaks.
    secrets.push("SECRET-user-access-token".into());
    secrets.push("SECRET-mds-access-token".into());
    // Every line of the private key's body, and the JWT's signature.
    secrets.extend(
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_owned),
    );
    secrets.push(tokens[0].rsplit('.').next().unwrap().to_string());
    assert!(secrets.len() > 10);
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret ({} chars) is in the logs",
            secret.len()
        );
        assert!(
            !shown.contains(secret.as_str()),
            "a secret ({} chars) is in an error or Debug output",
            secret.len()
        );
    }
}

// ---------------------------------------------------------------------------
// 7. Anonymous.

#[tokio::test]
async fn anonymous_sends_no_header() {
    let _serial = serial().await;
    let tp = TokenProvider::new(CredentialsSource::Anonymous)
        .await
        .unwrap();
    assert!(tp.is_anonymous());
    assert!(tp.authorization().await.unwrap().is_none());
    assert!(tp.clone().authorization().await.unwrap().is_none());
    assert!(format!("{tp:?}").contains("anonymous"));
}

// ---------------------------------------------------------------------------
// 7. Token failures while reads are in flight (through the client layer, the
// shared MRD pool and the filesystem's errno mapping, against the emulator
// with `--require-token` and streams that break every 2 MiB).

const READ_TOKEN: &str = "read-token-7c1e";

/// A client of the emulator that authenticates with the authorized-user file
/// `creds` (its token endpoint is a fake).
async fn token_client(emu: &zonalfs::emulator::Running, creds: PathBuf) -> zonalfs::gcs::GcsClient {
    let mut cfg = zonalfs::gcs::client::ClientConfig::new(common::BUCKET);
    cfg.endpoint = Some(emu.endpoint());
    cfg.credentials = CredentialsSource::KeyFile(creds);
    cfg.retry = zonalfs::gcs::retry::RetryPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        deadline: Duration::from_secs(45),
        stall_timeout: Duration::from_secs(3),
    };
    bounded("connect", zonalfs::gcs::GcsClient::connect(cfg))
        .await
        .expect("connect")
}

async fn breaking_emulator(tree: &common::Tree) -> zonalfs::emulator::Running {
    common::start(
        tree,
        zonalfs::emulator::Config {
            require_token: Some(READ_TOKEN.into()),
            ..common::shaped(zonalfs::emulator::Shaping {
                break_after_bytes: Some(2 << 20),
                ..Default::default()
            })
        },
    )
    .await
}

/// The token endpoint hiccups while reads run over streams that keep breaking
/// (so every few MiB a stream reopens and needs a token): request 1 gives a
/// token that expires at once, so callers wait for the credentials' refresh
/// task (google-cloud-auth refreshes such tokens every 10 s) and their stream
/// opens time out; request 2 answers 503 after sitting on it for 2 s, which
/// the credentials publish as a transient error that every caller gets until
/// the next refresh; request 3 gives a good token. Every read completes with
/// the object's bytes: the transient verdict of the credentials layer reaches
/// the stream, which retries within the retry deadline instead of failing
/// every range. (Before errors kept their kind, the 503 failed every read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_hiccups_during_reads_are_retried() {
    use zonalfs::gcs::{MrdPool, ObjectId, PoolConfig, VecSink};
    let _serial = serial().await;
    let tree = common::Tree::new();
    let data = tree.put("data.bin", &common::pattern(12 << 20, 7));
    let emu = breaking_emulator(&tree).await;
    let server = Fake::start_slow(
        Arc::new(|n, _req: &Req| match n {
            1 => (200, token_json_fixed(READ_TOKEN, 1)),
            2 => (503, r#"{"error":"temporarily_unavailable"}"#.into()),
            _ => (200, token_json_fixed(READ_TOKEN, 3600)),
        }),
        Arc::new(|n| Duration::from_secs(if n == 2 { 2 } else { 0 })),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let creds = write_json(
        &dir.path().join("user.json"),
        &authorized_user(&server.url("/token")),
    );
    let client = token_client(&emu, creds).await;
    let info = bounded("stat", client.stat("data.bin"))
        .await
        .expect("stat");
    let pool = MrdPool::new(client.clone(), PoolConfig::default());
    let id = ObjectId {
        name: "data.bin".into(),
        generation: info.generation,
    };
    // Whole-object reads, one after another, until one starts after the
    // token endpoint has answered its third request (the good token).
    let mut spanning = 0;
    let mut reads = 0;
    loop {
        let before = server.count();
        let sink = VecSink::new(data.len());
        let got = bounded(
            "read",
            pool.read(&id, info.size, 0, info.size, sink.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("read {reads} (token requests {before}): {e} ({e:?})"));
        assert_eq!(got, info.size);
        assert!(sink.take() == data, "read {reads}: wrong bytes");
        reads += 1;
        if before < 3 && server.count() >= 3 {
            spanning += 1;
        }
        if before >= 3 {
            break;
        }
    }
    assert!(
        spanning >= 1,
        "a read was in flight across the token failures ({reads} reads)"
    );
    assert!(server.count() >= 3, "{} token requests", server.count());
}

/// A token endpoint that refuses the refresh token for good (`invalid_grant`):
/// reads fail at once (not after the retry deadline) with the credentials'
/// error kept as the source, a warning that names it, and EACCES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_token_failure_fails_reads_fast_with_eacces() {
    use zonalfs::fs::FsError;
    use zonalfs::gcs::{GcsError, MrdPool, ObjectId, PoolConfig, VecSink};
    use zonalfs::read::ReadError;
    let _serial = serial().await;
    let logs = captured_logs();
    let tree = common::Tree::new();
    tree.put("data.bin", &common::pattern(1 << 20, 8));
    let emu = breaking_emulator(&tree).await;
    let server = Fake::start(failing_endpoint(400)).await;
    let dir = tempfile::tempdir().unwrap();
    let creds = write_json(
        &dir.path().join("user.json"),
        &authorized_user(&server.url("/token")),
    );
    let client = token_client(&emu, creds).await;
    let pool = MrdPool::new(client.clone(), PoolConfig::default());
    let id = ObjectId {
        name: "data.bin".into(),
        generation: 0,
    };
    let err = bounded(
        "read",
        pool.read(&id, 1 << 20, 0, 1 << 20, VecSink::new(1 << 20)),
    )
    .await
    .expect_err("no token, no read");
    match &err {
        GcsError::Auth(a) => assert!(!a.is_transient(), "{a:?}"),
        other => panic!("expected the credentials' error, got {other:?}"),
    }
    let source = std::error::Error::source(&err).expect("the credentials' error is the source");
    assert!(source.to_string().contains("400"), "{source}");
    let fs_err = FsError::from(ReadError::Gcs(err.clone()));
    assert_eq!(fs_err.errno(), libc::EACCES, "{fs_err}");
    let stat = bounded("stat", client.stat("data.bin")).await;
    assert!(
        matches!(&stat, Err(e) if !e.is_retryable() && e.is_denied()),
        "{stat:?}"
    );
    assert_eq!(FsError::from(stat.unwrap_err()).errno(), libc::EACCES);
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("WARN") && l.contains("read stream") && l.contains("400")),
        "a warning names the failure:\n{logged}"
    );
}

fn token_json_fixed(token: &str, expires_in: u64) -> String {
    format!(r#"{{"access_token":"{token}","expires_in":{expires_in},"token_type":"Bearer"}}"#)
}
